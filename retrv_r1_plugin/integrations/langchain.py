"""LangChain adapters: :class:`RetrvR1Retriever` and :class:`RetrvR1Compressor`.

Example::

    from retrv_r1_plugin.integrations.langchain import RetrvR1Compressor, RetrvR1Retriever
    from retrv_r1_plugin.store import QdrantCandidateStore

    store = QdrantCandidateStore(path="./index")
    retriever = RetrvR1Retriever(model="path/to/retrv-r1", store=store, k=3, first_stage_k=20)
    docs = retriever.invoke("which passage explains photosynthesis?")
    docs = retriever.invoke("the same object", image="photo.png")      # image (+text) query
    docs[0].metadata["relevance_score"], docs[0].metadata["retrv_r1_reasoning"]

    # or rerank any LangChain retriever's output:
    from langchain_classic.retrievers import ContextualCompressionRetriever
    ContextualCompressionRetriever(base_compressor=RetrvR1Compressor(model=..., top_n=3),
                                   base_retriever=vectorstore.as_retriever(search_kwargs={"k": 20}))

Documents and candidates are converted with the payload layout of
:class:`~retrv_r1_plugin.store.QdrantCandidateStore` (and langchain-qdrant): the text is
``page_content``; an image is ``metadata["image_path"]`` or ``metadata["image_b64"]``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
from collections.abc import Sequence
from typing import Any, Callable, Literal, Optional

from .._optional import require

require("langchain_core", "langchain")

from langchain_core.callbacks import (  # noqa: E402
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForRetrieverRun,
    Callbacks,
)
from langchain_core.documents import BaseDocumentCompressor, Document  # noqa: E402
from langchain_core.retrievers import BaseRetriever  # noqa: E402
from langchain_core.runnables import run_in_executor  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_serializer, field_validator, model_validator  # noqa: E402
from PIL import Image  # noqa: E402

from ..model import RetrvR1Model  # noqa: E402
from ..types import Candidate, ImageInput, ImageLoadError, Query, encode_png, load_image  # noqa: E402
from . import RETRIEVAL_SCORE_KEY, load_model, model_name  # noqa: E402
from ._common import check_window_step, decode_base64, reload_source, rerank, to_rank  # noqa: E402

__all__ = ["RetrvR1Compressor", "RetrvR1Retriever", "candidate_to_document", "document_to_candidate"]

RELEVANCE_SCORE_KEY = "relevance_score"
IMAGE_PATH_KEY = "image_path"
IMAGE_B64_KEY = "image_b64"


# ====================================================================== conversion
def candidate_to_document(candidate: Candidate) -> Document:
    """A LangChain ``Document`` of a store :class:`Candidate` (image kept in metadata).

    A path goes to ``metadata["image_path"]``; bytes, and a PIL image (PNG-encoded, as the
    store does), go to ``metadata["image_b64"]``.

    Raises:
        ImageLoadError: a PIL image cannot be decoded (the message names the candidate).
    """
    metadata = dict(candidate.metadata)
    image = candidate.image
    if isinstance(image, (str, os.PathLike)):
        metadata.setdefault(IMAGE_PATH_KEY, os.fspath(image))
    elif isinstance(image, (bytes, bytearray)):
        metadata.setdefault(IMAGE_B64_KEY, base64.b64encode(bytes(image)).decode("ascii"))
    elif isinstance(image, Image.Image) and IMAGE_B64_KEY not in metadata:
        try:
            data = encode_png(image)
        except ImageLoadError as exc:
            raise ImageLoadError(f"candidate {candidate.id or '<no id>'}: {exc}") from exc
        metadata[IMAGE_B64_KEY] = base64.b64encode(data).decode("ascii")
    return Document(page_content=candidate.text, metadata=metadata, id=candidate.id)


def document_to_candidate(document: Document, load_images: bool = True) -> Candidate:
    """A :class:`Candidate` of ``document``; its image (if any) is decoded when ``load_images``.

    Raises:
        ImageLoadError: the document's image cannot be read (the message names the document).
    """
    meta = document.metadata or {}
    name = document.id or "<no id>"
    image: ImageInput | None = meta.get(IMAGE_PATH_KEY) or None
    if image is None and meta.get(IMAGE_B64_KEY):
        try:
            image = decode_base64(meta[IMAGE_B64_KEY])
        except (binascii.Error, ValueError, TypeError) as exc:
            raise ImageLoadError(f"document {name}: metadata['image_b64'] is not valid base64 ({exc})") from exc
    if image is not None and load_images:
        try:
            image = load_image(image)
        except ImageLoadError as exc:
            raise ImageLoadError(f"document {name}: {exc}") from exc
    return Candidate(text=document.page_content or "", image=image, id=document.id)


# ====================================================================== shared options
class _RetrvR1Options(BaseModel):
    """Model and generation options shared by the retriever and the compressor."""

    # validate_assignment: compressor.top_n = 0 or retriever.k = 0 is refused like in the constructor
    model_config = ConfigDict(arbitrary_types_allowed=True, validate_assignment=True)

    model: RetrvR1Model = Field(repr=False, description="A loaded RetrvR1Model, or a checkpoint path/bundled name to load.")
    device: Optional[str] = Field(default=None, description="Torch device to load/move the model to (default for a path: cuda/mps when available, else cpu).")
    reasoning_budget: Optional[int] = Field(default=None, description="Tokens the model may reason before answering (0: score directly); None uses the model's default.")
    max_inspections: Optional[int] = Field(default=None, description="How many candidates the model may inspect in full tokens; None uses the model's default.")
    compression: Optional[Literal["icm", "none"]] = Field(default=None, description="'icm' (compressed candidates plus inspection) or 'none' (full tokens).")
    strict: bool = Field(default=False, description="Raise NoAnswerError when the model's output has no clean answer; otherwise rank by label probabilities and flag metadata['retrv_r1_fallback'].")
    return_reasoning: bool = Field(default=True, description="Write the reasoning trace into metadata['retrv_r1_reasoning'].")
    window_step: Optional[int] = Field(default=None, ge=1, strict=True, description="Rerank all documents, even more than the model's max_candidates, in sliding windows of max_candidates moving up by this many (RankLLM's step_size; below max_candidates); None reranks the first max_candidates and keeps the rest in their given order.")

    _overflow_warned: bool = PrivateAttr(default=False)

    @model_validator(mode="before")
    @classmethod
    def _load_model(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("model") is not None:
            values = {**values, "model": load_model(values["model"], values.get("device"))}
        return values

    @field_validator("window_step")
    @classmethod
    def _valid_window_step(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        model = info.data.get("model")
        return check_window_step(model, value) if isinstance(model, RetrvR1Model) else value

    @field_serializer("model", when_used="json")
    def _model_source(self, model: RetrvR1Model) -> str:
        # In JSON the model is where it loads from (its checkpoint path or bundled name), so
        # model_validate_json(model_dump_json()) loads it again, like LlamaIndex's from_json;
        # a model built in memory is described, and loading that description fails by name.
        return model_name(model, None)

    def __getstate__(self) -> dict[str, Any]:
        # A RetrvR1Model cannot be pickled (it holds a lock): a pickled retriever/compressor
        # (e.g. sent to a worker process) keeps where the model came from and, on being
        # unpickled, loads it again there, on the same device.
        state = super().__getstate__()
        values = {**state["__dict__"], "model": reload_source(self.model, type(self).__name__)}
        return {**state, "__dict__": values, "retrv_r1_device": str(self.model.device)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        device = state.pop("retrv_r1_device", None)
        values = dict(state["__dict__"])
        values["model"] = load_model(values["model"], values.get("device") or device)
        super().__setstate__({**state, "__dict__": values})

    def _rank_documents(self, query: Query, documents: Sequence[Document], candidates: Sequence[Candidate], top: Optional[int]) -> list[Document]:
        """Rerank ``documents``; best ``top`` first.

        ``candidates`` are the conversions of the first ``max_candidates`` documents (all of
        them when there are no more, or with ``window_step``); the other documents follow, not reranked.
        """
        if not documents:
            return []
        if not self.model.backbone.is_vision:
            for doc, cand in zip(documents, candidates):
                if cand.image is not None and not cand.text.strip():
                    raise ValueError(
                        f"document {doc.id or cand.id} is an image without text, but the model's backbone "
                        f"{self.model.backbone.model_type!r} is text-only; give it page_content or use a Qwen-VL model"
                    )
        ranked = rerank(
            self.model,
            query,
            documents,
            candidates,
            owner=type(self).__name__,
            warn=not self._overflow_warned,
            window_step=self.window_step,
            reasoning_budget=self.reasoning_budget,
            max_inspections=self.max_inspections,
            compression=self.compression,
            strict=self.strict,
        )
        if ranked.overflow:
            self._overflow_warned = True
        order = ranked.order if top is None else ranked.order[:top]
        out = []
        for i in order:
            doc = documents[i]
            metadata = dict(doc.metadata)
            if RELEVANCE_SCORE_KEY in metadata and RETRIEVAL_SCORE_KEY not in metadata:
                metadata[RETRIEVAL_SCORE_KEY] = metadata[RELEVANCE_SCORE_KEY]
            metadata[RELEVANCE_SCORE_KEY] = ranked.scores[i]
            metadata.update(ranked.metadata(i, self.return_reasoning))
            out.append(doc.model_copy(update={"metadata": metadata}))
        return out

    def _candidates(self, documents: Sequence[Document]) -> list[Candidate]:
        vision = self.model.backbone.is_vision
        return [document_to_candidate(d, load_images=vision) for d in documents]

    def _query(self, text: str, image: ImageInput | None) -> Query:
        if image is not None and self.model.backbone.is_vision:
            try:
                image = load_image(image)
            except ImageLoadError as exc:
                raise ImageLoadError(f"query image: {exc}") from exc
        query = Query(text=text or "", image=image)
        if not query.text.strip() and not query.has_image:
            raise ValueError("empty query: give text or an image")
        return query


# ====================================================================== retriever
def _check_first_stage_k(model: RetrvR1Model, n: int, window_step: Optional[int] = None) -> int:
    if window_step is not None:  # sliding windows rank any number
        if n < 1:
            raise ValueError(f"first_stage_k must be >= 1, got {n}")
        return n
    limit = model.config.max_candidates
    if n < 1 or n > limit:
        raise ValueError(
            f"first_stage_k must be between 1 and the model's max_candidates ({limit}), got {n} "
            "(set window_step to rerank more in sliding windows)"
        )
    return n


class RetrvR1Retriever(_RetrvR1Options, BaseRetriever):
    """Two-stage retriever: first-stage candidates, reranked by a Retrv-R1 model.

    Candidates come from ``store`` (a :class:`~retrv_r1_plugin.store.QdrantCandidateStore`,
    any object with ``search(query, top_k)``, or such a callable, returning
    :class:`Candidate` lists) or from ``base_retriever`` (any LangChain retriever; its
    results are cut to ``first_stage_k``). Returned documents are copies, best first, with
    ``metadata["relevance_score"]`` (the model's probability), ``retrv_r1_reasoning``,
    ``retrv_r1_inspected`` and ``retrv_r1_fallback``; a first-stage score already in
    ``relevance_score`` moves to ``retrieval_score``.

    Pickled (e.g. for a worker process), it and :class:`RetrvR1Compressor` keep the model's
    checkpoint path or bundled name and load it again when unpickled; over a model built in
    memory they refuse to be pickled.

    ``invoke(query, k=..., first_stage_k=..., image=...)`` overrides ``k`` and
    ``first_stage_k`` per call; ``image`` (a path, bytes or PIL image) makes an image or
    image+text query. A store with an image-text embedder searches by the image too; a
    text-only store, or a ``base_retriever``, searches by the text only, and the image is
    used by the reranker (an image-only query then needs an image-capable store).
    """

    store: Optional[Any] = Field(default=None, description="First-stage candidate store: QdrantCandidateStore, an object with search(query, top_k), or such a callable.")
    base_retriever: Optional[BaseRetriever] = Field(default=None, description="A LangChain retriever giving the first-stage documents (instead of store).")
    k: int = Field(default=4, ge=1, description="Number of documents returned (>= 1).")
    first_stage_k: Optional[int] = Field(default=None, description="How many first-stage candidates to rerank (above max_candidates only with window_step). Default: k if larger, else 20, capped at max_candidates without window_step; a k above max_candidates without window_step returns the candidates past max_candidates after the reranked ones, in first-stage order, flagged 'not_reranked'.")

    @model_validator(mode="after")
    def _check_sources(self) -> RetrvR1Retriever:
        if (self.store is None) == (self.base_retriever is None):
            raise ValueError("give exactly one of store= or base_retriever=")
        if self.store is not None and not (callable(getattr(self.store, "search", None)) or callable(self.store)):
            raise TypeError(f"store {self.store!r} has no search(query, top_k) method and is not callable")
        return self

    @field_validator("first_stage_k")
    @classmethod
    def _valid_first_stage_k(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        # A field validator (not the model validator): a refused assignment leaves the old value.
        model = info.data.get("model")
        if value is not None and isinstance(model, RetrvR1Model):
            _check_first_stage_k(model, value, info.data.get("window_step"))
        return value

    @field_validator("window_step")
    @classmethod
    def _window_step_fits_first_stage_k(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        # On assignment (first_stage_k is validated after window_step in the constructor):
        # retriever.window_step = None is refused while first_stage_k needs the windows.
        model, n = info.data.get("model"), info.data.get("first_stage_k")
        if n is not None and isinstance(model, RetrvR1Model):
            _check_first_stage_k(model, n, value)
        return value

    def _check_first_stage_k(self, n: int) -> int:
        return _check_first_stage_k(self.model, n, self.window_step)

    def _sizes(self, k: Optional[int], first_stage_k: Optional[int]) -> tuple[int, int]:
        k = self.k if k is None else k
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        n = first_stage_k if first_stage_k is not None else self.first_stage_k
        if n is None:
            # 20, or k when more are asked for (invoke(q, k=25) returns 25 documents when the
            # store holds them); without window_step capped at max_candidates unless k is above
            # it, in which case the documents past max_candidates follow unreranked, as the
            # compressor's do
            n = max(k, 20 if self.window_step is not None else min(20, self.model.config.max_candidates))
        else:
            n = self._check_first_stage_k(n)
        return k, n

    def _search_store(self, query: Query, n: int) -> tuple[list[Document], list[Candidate]]:
        search: Callable[..., Any] = getattr(self.store, "search", None) or self.store  # type: ignore[assignment]
        from ..store import QdrantCandidateStore, first_stage_query

        first = first_stage_query(query, getattr(self.store, "supports_images", True) is not False)

        kwargs: dict[str, Any] = {}
        if isinstance(self.store, QdrantCandidateStore):  # reuse cached content tokens
            kwargs["with_content_tokens"] = self.model.content_signature
        found = list(search(first, top_k=n, **kwargs))[:n]
        documents = [candidate_to_document(c) for c in found]
        candidates = to_rank(self.model, found, self.window_step)  # images past max_candidates are not read
        vision = self.model.backbone.is_vision
        for i, (c, d) in enumerate(zip(candidates, documents)):
            if c.image is not None and vision:
                try:  # on a copy: the store's (or a callable's own) Candidate keeps its image source
                    candidates[i] = dataclasses.replace(c, image=load_image(c.image))
                except ImageLoadError as exc:
                    raise ImageLoadError(f"document {d.id}: {exc}") from exc
        return documents, candidates

    def _first_stage_text(self, query: Query) -> str:
        if not query.text.strip():
            raise ValueError("base_retriever searches by text: an image-only query needs store= with an image-text embedder")
        return query.text

    def _get_relevant_documents(
        self,
        query: str,
        *,
        run_manager: CallbackManagerForRetrieverRun,
        k: Optional[int] = None,
        first_stage_k: Optional[int] = None,
        image: ImageInput | None = None,
    ) -> list[Document]:
        """Fetch ``first_stage_k`` candidates for ``query`` (and ``image``), return the best ``k``."""
        k, n = self._sizes(k, first_stage_k)
        q = self._query(query, image)
        if self.base_retriever is not None:
            docs = self.base_retriever.invoke(self._first_stage_text(q), config={"callbacks": run_manager.get_child()})[:n]
            candidates = self._candidates(to_rank(self.model, docs, self.window_step))
        else:
            docs, candidates = self._search_store(q, n)
        return self._rank_documents(q, docs, candidates, k)

    async def _aget_relevant_documents(
        self,
        query: str,
        *,
        run_manager: AsyncCallbackManagerForRetrieverRun,
        k: Optional[int] = None,
        first_stage_k: Optional[int] = None,
        image: ImageInput | None = None,
    ) -> list[Document]:
        """Async version: the base retriever runs natively async, the model in an executor."""
        k, n = self._sizes(k, first_stage_k)
        q = await run_in_executor(None, self._query, query, image)  # decoding an image file blocks
        if self.base_retriever is not None:
            docs = (await self.base_retriever.ainvoke(self._first_stage_text(q), config={"callbacks": run_manager.get_child()}))[:n]
            candidates = await run_in_executor(None, self._candidates, to_rank(self.model, docs, self.window_step))
        else:
            docs, candidates = await run_in_executor(None, self._search_store, q, n)
        return await run_in_executor(None, self._rank_documents, q, docs, candidates, k)


# ====================================================================== compressor
class RetrvR1Compressor(_RetrvR1Options, BaseDocumentCompressor):
    """Document compressor that reranks documents with a Retrv-R1 model and keeps ``top_n``.

    For ``langchain_classic.retrievers.ContextualCompressionRetriever``. Returned documents
    are copies with the same metadata as :class:`RetrvR1Retriever` writes.

    The model ranks at most its ``max_candidates`` documents at once. Given more (e.g. a
    base retriever with ``k`` above it), the first ``max_candidates`` documents (the base
    retriever's best, in the order given) are reranked and the others follow them in their
    given order, with ``relevance_score`` below every reranked score (counting down from 0,
    so negative), ``retrv_r1_inspected`` False and ``retrv_r1_fallback`` ``"not_reranked"``;
    their images are not read, and a warning is logged once per compressor. With
    ``window_step`` all documents are reranked, in sliding windows (see
    :meth:`RetrvR1Model.rank_windowed`).
    """

    top_n: Optional[int] = Field(default=3, description="Number of documents returned (>= 1); None returns all, reranked.")

    @field_validator("top_n")
    @classmethod
    def _check_top_n(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value < 1:
            raise ValueError(f"top_n must be >= 1 or None, got {value}")
        return value

    def compress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Optional[Callbacks] = None,
    ) -> Sequence[Document]:
        """Rerank ``documents`` for ``query`` and return the best ``top_n``."""
        if not documents:
            return []
        docs = list(documents)
        q = self._query(query, None)
        return self._rank_documents(q, docs, self._candidates(to_rank(self.model, docs, self.window_step)), self.top_n)
