"""A first-stage candidate store over Qdrant: embedded by default, a server by ``url=``.

Layout of one point (compatible with ``langchain_qdrant.QdrantVectorStore``):

* vector: one dense vector, unnamed by default (``vector_name=""``, langchain-qdrant's
  default) or named ``vector_name``; cosine distance.
* payload ``page_content``: the candidate's text (its caption, for an image).
* payload ``metadata``: the caller's metadata plus ``candidate_id`` and, for images,
  ``image_path`` (stored by reference) and/or ``image_b64`` (encoded bytes, base64).
  ``retrieval_score`` (which :meth:`QdrantCandidateStore.search` adds to each result) is
  never stored, so re-adding search results is a no-op for unchanged items.
* payload ``retrv_r1``: bookkeeping (content fingerprint, record hash, embedder, how the
  point was indexed). langchain-qdrant ignores it.
* payload ``retrv_r1_content_tokens`` (optional): the reranker's cached ``t_con`` for this
  candidate, as ``{"signature", "dtype", "orig_dtype", "shape", "data"}`` where ``data``
  is the base64 of the raw little-endian array bytes. It is excluded from search results
  unless asked for, survives re-indexing of unchanged content, and is dropped when the
  candidate's text or image changes.

Point ids are ``uuid5(NAMESPACE, candidate_id)``; a candidate without an ``id`` gets
``candidate_id = "sha256:<hash of text + image bytes/path>"``, so re-adding the same item
never duplicates it and re-running an interrupted indexing job converges to the same
collection (points whose content, metadata and embedder are unchanged are skipped).
A point written by another tool (langchain-qdrant, a plain client) has no ``candidate_id``:
search results name it by its point id, and :meth:`~QdrantCandidateStore.get`,
:meth:`~QdrantCandidateStore.delete`, :meth:`~QdrantCandidateStore.put_content_tokens` and
:meth:`~QdrantCandidateStore.add` find it by that id (re-adding it updates it in place,
keeping that tool's other payload keys). A point llama-index-vector-stores-qdrant wrote (its
node as JSON under ``_node_content``) is read as that node's text, image and metadata.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import json
import logging
import math
import os
import stat
import sys
import threading
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from PIL import Image
from qdrant_client import QdrantClient, models

from ..types import (
    Candidate,
    ImageLoadError,
    Query,
    RetrvR1Error,
    encode_png,
    load_image,
    replace_surrogates,
)
from .embedders import (
    ImageTextEmbedder,
    TextEmbedder,
    TextEmbedderProtocol,
    embedder_name,
    supports_images,
)

T = TypeVar("T")

NAMESPACE = uuid.UUID("5b7d0c4e-2f0a-5d43-9a57-7f1d6a8e2b31")
"""Namespace of the uuid5 point ids derived from candidate ids."""

logger = logging.getLogger(__name__)

CONTENT_KEY = "page_content"
METADATA_KEY = "metadata"
INTERNAL_KEY = "retrv_r1"
TOKENS_KEY = "retrv_r1_content_tokens"
RESERVED_METADATA_KEYS = ("candidate_id", "image_path", "image_b64")
_CANDIDATE_ID_PATH = f"{METADATA_KEY}.candidate_id"
SCORE_KEY = "retrieval_score"
"""Metadata key of the similarity score on search results; dropped from metadata on add."""
_PAYLOAD_VERSION = 1

_OPEN_PATHS: dict[str, weakref.ref] = {}
"""Embedded store folders opened by this process (real path -> the store holding the lock)."""
_OPEN_PATHS_LOCK = threading.Lock()

_CLIENT_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
"""One lock per embedded (local-mode) ``QdrantClient``: qdrant-client's local mode is not
thread-safe (a search racing an upsert fails on mismatched arrays; concurrent writes to an
on-disk store fail in SQLite and are lost), so every store sharing that client serialises its
calls on it."""


class StoreUnavailableError(RetrvR1Error, ConnectionError):
    """The Qdrant server did not answer (after retries)."""


class StoreLockedError(RetrvR1Error, RuntimeError):
    """An embedded store folder is already open in another process."""


class ImageEmbedderRequiredError(RetrvR1Error, ValueError):
    """An image must be embedded but the store has no image-text embedder."""


def first_stage_query(query: Query, supports_images: bool) -> Query:
    """What a first stage searches with: ``query`` itself, or its text alone when the store
    embeds text only (the reranker still reads the image). An image-only query on such a
    store raises :class:`ImageEmbedderRequiredError`."""
    if not query.has_image or supports_images:
        return query
    if not query.text.strip():
        raise ImageEmbedderRequiredError(
            "an image-only query needs a store with an image-text embedder, and this store "
            "embeds text only; give query text too (the reranker still reads the image)"
        )
    return Query(text=query.text)


class CollectionMismatchError(RetrvR1Error, ValueError):
    """The existing collection does not fit the store's embedder or vector name."""


class UnknownCandidateError(RetrvR1Error, KeyError):
    """A candidate id is not in the store."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def default_store_path() -> Path:
    """Default folder of the embedded store: ``<user data dir>/retrv-r1-plugin/qdrant``."""
    try:
        import platformdirs
    except ImportError:
        return Path.home() / ".local" / "share" / "retrv-r1-plugin" / "qdrant"
    return Path(platformdirs.user_data_dir("retrv-r1-plugin", appauthor=False)) / "qdrant"


def point_id(candidate_id: str) -> str:
    """The Qdrant point id of ``candidate_id`` (a uuid5 string)."""
    return str(uuid.uuid5(NAMESPACE, str(candidate_id)))


def _foreign_point_id(candidate_id: str) -> str | int | None:
    """The point id that ``candidate_id`` names directly, if it has the form of one.

    A point written by another tool (langchain-qdrant, llama-index, a plain client) has no
    ``candidate_id`` in its payload, so :meth:`QdrantCandidateStore.search` names it by its
    point id (a UUID string or an unsigned integer); this finds that point again. A UUID is
    also taken in its 32-hex-digit form, the one ``langchain_qdrant.QdrantVectorStore.add_texts``
    returns (Qdrant stores and returns it hyphenated).
    """
    if candidate_id.isascii() and candidate_id.isdigit():
        number = int(candidate_id)
        if number < 2**64:
            return number if str(number) == candidate_id else None
    try:
        parsed = uuid.UUID(candidate_id)
    except ValueError:
        return None
    return str(parsed) if candidate_id.lower() in (str(parsed), parsed.hex) else None


def _stored_candidate_id(record: Any) -> str | None:
    """The ``candidate_id`` a stored point carries in its metadata (None for foreign points)."""
    metadata = (record.payload or {}).get(METADATA_KEY)
    value = metadata.get("candidate_id") if isinstance(metadata, dict) else None
    return str(value) if value is not None else None


def _is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a connection problem or timeout worth retrying."""
    import httpx
    from qdrant_client.common.client_exceptions import ResourceExhaustedResponse
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    if isinstance(exc, ResponseHandlingException):
        return isinstance(exc.source, (httpx.TransportError, builtins.ConnectionError, TimeoutError))
    if isinstance(exc, UnexpectedResponse):
        return exc.status_code in (408, 429, 502, 503, 504)
    if isinstance(exc, (ResourceExhaustedResponse, httpx.TransportError, builtins.ConnectionError, TimeoutError)):
        return True
    grpc = sys.modules.get("grpc")
    if grpc is not None and isinstance(exc, grpc.RpcError):
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        return code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    return False


def _sha256(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


@dataclass
class _Prepared:
    """A validated candidate ready to embed and write."""

    candidate_id: str
    point_id: str
    text: str
    image: str | bytes | None  # absolute path or encoded bytes
    mode: Literal["text", "caption", "image", "image+text"]
    fingerprint: str
    record: str
    payload: dict[str, Any]


class QdrantCandidateStore:
    """First-stage candidate store over Qdrant (embedded, in memory, or a server).

    Args:
        embedder: a :class:`~retrv_r1_plugin.store.embedders.TextEmbedder`, any object with
            ``dim`` and ``embed_texts``, an :class:`ImageTextEmbedder` (also ``embed_images``,
            so images are searchable by themselves), or a sentence-transformers model name /
            folder. ``None``: the bundled offline all-MiniLM-L6-v2.
        collection_name: the Qdrant collection.
        path: folder of the embedded store; the default (when no other location is given)
            is :func:`default_store_path`. One process at a time may open it.
        location: ``":memory:"`` for a throwaway in-memory store (tests).
        url: a Qdrant server or cluster, e.g. ``"http://localhost:6333"``.
        api_key: API key for ``url``.
        client: an existing ``QdrantClient`` to use (not closed by :meth:`close`).
        timeout: per-request timeout in seconds (server mode).
        retries: retries of a server call after a connection error or timeout.
        backoff: first retry delay in seconds; doubles each time up to ``max_backoff``.
        max_backoff: longest delay between retries.
        vector_name: name of the dense vector; ``""`` (unnamed) matches langchain-qdrant.
        distance: the vector distance.
        inline_images: also store images given by path as bytes, so results carry the image
            even where the path does not exist (e.g. other machines of a server deployment).
        fuse_captions: with an image-text embedder, index an image that has a caption by the
            normalised sum of image and caption embeddings (otherwise by the image alone).
        skip_unchanged: in :meth:`add`, skip points already stored with the same content,
            metadata and embedder (makes resuming an interrupted indexing job cheap).
        image_roots: folders that an ``image_path`` read back from a point (by :meth:`search`
            or :meth:`get`) must lie in, after resolving symlinks and ``..``. A path outside them
            comes back as no image (a warning names the point), so a point that someone else
            wrote into a shared collection cannot make the reranker read any image file this
            process can read. ``None`` (default): any path is returned, as before. Whatever
            the roots, a path that exists but is not a regular file (a FIFO, a device such as
            ``/dev/zero``, a folder) is never returned, nor is ``image_b64`` that is not valid
            base64 or a malformed content-token cache entry (recomputed instead).
        max_request_bytes: a write (:meth:`add`, :meth:`put_content_tokens`) is split into
            requests of at most about this many payload bytes as well as at most
            ``batch_size`` points: a Qdrant server refuses requests above its
            ``service.max_request_size_mb`` (32 MB by default), which a batch of inline images
            or large content tokens can pass. A single larger point goes alone.
        **client_kwargs: passed to ``QdrantClient`` (e.g. ``prefer_grpc=True``).
    """

    def __init__(
        self,
        embedder: TextEmbedderProtocol | ImageTextEmbedder | str | os.PathLike | None = None,
        *,
        collection_name: str = "retrv_r1",
        path: str | os.PathLike | None = None,
        location: str | None = None,
        url: str | None = None,
        api_key: str | None = None,
        client: QdrantClient | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        vector_name: str = "",
        distance: models.Distance = models.Distance.COSINE,
        inline_images: bool = False,
        fuse_captions: bool = True,
        skip_unchanged: bool = True,
        max_request_bytes: int = 16 * 2**20,
        image_roots: Sequence[str | os.PathLike] | None = None,
        **client_kwargs: Any,
    ) -> None:
        if embedder is None:
            embedder = TextEmbedder()
        elif isinstance(embedder, (str, os.PathLike)):
            embedder = TextEmbedder(embedder)
        if not callable(getattr(embedder, "embed_texts", None)):
            raise TypeError(f"embedder {embedder!r} has no embed_texts(list[str]) method")
        self.embedder = embedder
        self.collection_name = collection_name
        self.vector_name = vector_name
        self.distance = distance
        self.inline_images = inline_images
        self.fuse_captions = fuse_captions
        self.skip_unchanged = skip_unchanged
        if not isinstance(max_request_bytes, int) or max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be a positive int, got {max_request_bytes!r}")
        self.max_request_bytes = max_request_bytes
        if isinstance(image_roots, (str, os.PathLike)):
            image_roots = [image_roots]
        self.image_roots: list[str] | None = (
            None if image_roots is None else [os.path.realpath(os.fspath(r)) for r in image_roots]
        )
        self.timeout = timeout
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._collection_ready = False
        self._dim: int | None = None
        self._local_lock: threading.RLock | None = None
        self._embedders_warned: set[str] = set()

        if location is not None and location != ":memory:":
            if url is not None:
                raise ValueError("give either location= or url=, not both")
            url, location = location, None
        given = [name for name, value in (("path", path), ("location", location), ("url", url), ("client", client)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of path=, location=, url=, client= (got {', '.join(given)})")

        self.url: str | None = url
        self.path: Path | None = None
        self.location: str | None = location
        self._owns_client = client is None
        if client is not None:
            self._client = client
            remote = getattr(client, "_client", None)
            self.url = getattr(remote, "rest_uri", None) if type(remote).__name__ == "QdrantRemote" else None
        elif url is not None:
            self._client = QdrantClient(
                url=url, api_key=api_key, timeout=max(1, math.ceil(timeout)), **client_kwargs
            )
            # Fail early, with the retries, when the server cannot be reached (and do not
            # leave the client's connection pool behind).
            try:
                self._call(self._client.collection_exists, collection_name)
            except BaseException:
                self._client.close()
                raise
        elif location is not None:
            self._client = QdrantClient(location=location, **client_kwargs)
        else:
            self.path = Path(path) if path is not None else default_store_path()
            self.path.mkdir(parents=True, exist_ok=True)
            key = os.path.realpath(self.path)
            try:
                self._client = QdrantClient(path=os.fspath(self.path), **client_kwargs)
            except RuntimeError as exc:
                if "already accessed" in str(exc):
                    with _OPEN_PATHS_LOCK:
                        ref = _OPEN_PATHS.get(key)
                        holder = ref() if ref is not None else None
                    if holder is not None:
                        raise StoreLockedError(
                            f"the embedded Qdrant store at {self.path} is already open in this "
                            f"process by {holder!r} (embedded mode allows one client per folder); "
                            "close() that store first (or use it in a with-block), or reuse it"
                        ) from exc
                    raise StoreLockedError(
                        f"the embedded Qdrant store at {self.path} is already open, in another "
                        "process or by another QdrantClient in this one (embedded mode allows one "
                        "client per folder); close it there, use another path=, pass that client "
                        "as client=, or run a Qdrant server and pass url= to share it"
                    ) from exc
                raise
            with _OPEN_PATHS_LOCK:
                _OPEN_PATHS[key] = weakref.ref(self)

    # ------------------------------------------------------------------ plumbing

    def __repr__(self) -> str:
        where = self.url or (os.fspath(self.path) if self.path else self.location) or "client"
        return f"{type(self).__name__}({where!r}, collection={self.collection_name!r})"

    def __enter__(self) -> QdrantCandidateStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def client(self) -> QdrantClient:
        """The underlying ``QdrantClient`` (e.g. to share the collection with langchain-qdrant)."""
        return self._client

    @property
    def supports_images(self) -> bool:
        """Whether images are embedded by themselves (an image-text embedder is configured)."""
        return supports_images(self.embedder)

    @property
    def dim(self) -> int:
        """Size of the dense vectors (loads the embedder)."""
        if self._dim is None:
            self._dim = int(self.embedder.dim)
        return self._dim

    def close(self) -> None:
        """Release the client (and the embedded store's folder lock)."""
        if self._owns_client:
            self._client.close()
        if self.path is not None:
            with _OPEN_PATHS_LOCK:
                key = os.path.realpath(self.path)
                ref = _OPEN_PATHS.get(key)
                if ref is not None and ref() in (self, None):
                    del _OPEN_PATHS[key]

    def _client_lock(self) -> threading.RLock:
        """The lock serialising calls on this store's embedded client (shared by every store
        that uses the same client object)."""
        if self._local_lock is None:
            with _OPEN_PATHS_LOCK:
                try:
                    self._local_lock = _CLIENT_LOCKS.setdefault(self._client, threading.RLock())
                except TypeError:  # not weak-referenceable: a lock of this store's own
                    self._local_lock = threading.RLock()
        return self._local_lock

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a client call; on a server, retry connection errors/timeouts with backoff.

        Embedded (local-mode) calls are serialised: qdrant-client's local mode is not
        thread-safe, and a store may be shared by threads (e.g. a retriever under asyncio).
        """
        if self.url is None:
            with self._client_lock():
                return fn(*args, **kwargs)
        from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

        retrying = Retrying(
            stop=stop_after_attempt(self.retries + 1),
            wait=wait_exponential(multiplier=self.backoff, max=self.max_backoff),
            retry=retry_if_exception(_is_transient),
            reraise=True,
        )
        try:
            return retrying(fn, *args, **kwargs)
        except Exception as exc:
            if _is_transient(exc):
                raise StoreUnavailableError(
                    f"Qdrant server at {self.url} did not answer {getattr(fn, '__name__', 'call')}"
                    f" after {self.retries + 1} attempt(s) (timeout {self.timeout}s): {exc}"
                ) from exc
            raise

    def _vector_params(self) -> models.VectorParams:
        return models.VectorParams(size=self.dim, distance=self.distance)

    def _ensure_collection(self, create: bool) -> bool:
        """Check (or create) the collection; False when it does not exist and ``create`` is off."""
        if self._collection_ready:
            return True
        if not self._call(self._client.collection_exists, self.collection_name):
            if not create:
                return False
            config = self._vector_params()
            vectors_config: Any = config if self.vector_name == "" else {self.vector_name: config}
            try:
                self._call(
                    self._client.create_collection,
                    collection_name=self.collection_name,
                    vectors_config=vectors_config,
                )
            except Exception:
                # Another writer (or a retried call that did succeed) may have created it.
                if not self._call(self._client.collection_exists, self.collection_name):
                    raise
                self._validate_collection()
        else:
            self._validate_collection()
        self._collection_ready = True
        return True

    def _validate_collection(self) -> None:
        info = self._call(self._client.get_collection, self.collection_name)
        vectors = info.config.params.vectors
        where = f"collection {self.collection_name!r}"
        if isinstance(vectors, dict):
            if self.vector_name not in vectors:
                raise CollectionMismatchError(
                    f"{where} has no dense vector named {self.vector_name!r} "
                    f"(it has {sorted(vectors)}); pass vector_name= accordingly"
                )
            params = vectors[self.vector_name]
        elif self.vector_name != "":
            raise CollectionMismatchError(
                f"{where} has one unnamed vector; pass vector_name='' to use it"
            )
        else:
            params = vectors
        if params is None or params.size != self.dim:
            size = None if params is None else params.size
            raise CollectionMismatchError(
                f"{where} holds {size}-d vectors but the embedder "
                f"{embedder_name(self.embedder)!r} makes {self.dim}-d ones; use the embedder "
                "the collection was built with, or another collection_name"
            )
        if params.distance != self.distance:
            raise CollectionMismatchError(
                f"{where} uses {params.distance} distance, not {self.distance}"
            )

    def _vector_struct(self, vector: np.ndarray) -> Any:
        values = [float(x) for x in vector]
        return values if self.vector_name == "" else {self.vector_name: values}

    def _locate(self, candidate_ids: Sequence[str], with_payload: Any) -> dict[str, Any]:
        """The stored record of each of ``candidate_ids`` in the collection (missing ones left out).

        A candidate lives at :func:`point_id` of its id. A point written by another tool
        (e.g. langchain-qdrant) has no ``candidate_id`` and is named by its own point id, so an
        id of that form also finds such a point. ``with_payload`` must include
        ``metadata.candidate_id`` (to tell foreign points from ours).
        """
        primary = {cid: point_id(cid) for cid in candidate_ids}
        raw = {cid: r for cid in candidate_ids if (r := _foreign_point_id(cid)) is not None}
        ids: list[str | int] = list(dict.fromkeys([*primary.values(), *raw.values()]))
        if not ids:
            return {}
        by_id = {
            str(r.id): r
            for r in self._call(
                self._client.retrieve, self.collection_name, ids=ids, with_payload=with_payload, with_vectors=False
            )
        }
        found: dict[str, Any] = {}
        for cid in candidate_ids:
            record = by_id.get(primary[cid])
            if record is None and cid in raw:
                record = by_id.get(str(raw[cid]))
                if record is not None and _stored_candidate_id(record) not in (None, cid):
                    record = None  # one of our points, for another candidate id
            if record is not None:
                found[cid] = record
        return found

    # ------------------------------------------------------------------ writing

    def _prepare(self, index: int, candidate: Candidate | str) -> _Prepared:
        candidate = Candidate.coerce(candidate)
        label = f"candidate {index}" + (f" (id={candidate.id!r})" if candidate.id is not None else "")
        metadata = candidate.metadata if candidate.metadata is not None else {}
        if not isinstance(metadata, dict):
            raise TypeError(f"{label}: metadata must be a dict, got {type(metadata).__name__}")
        # A search result's score is not part of the item: storing it would change the
        # record hash (and re-embed the item) every time search results are re-added.
        metadata = {k: v for k, v in metadata.items() if k != SCORE_KEY}
        clash = [k for k in RESERVED_METADATA_KEYS if k in metadata]
        if clash:
            raise ValueError(f"{label}: metadata keys {clash} are reserved by the store")
        try:
            metadata_json = json.dumps(metadata, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{label}: metadata must be JSON-serialisable: {exc}") from exc

        text = replace_surrogates(candidate.text)  # also when .text was set after construction
        image: str | bytes | None = None
        ours: dict[str, Any] = {}
        key_parts: list[bytes] = [b"text", text.encode("utf-8")]
        finger_parts: list[bytes] = list(key_parts)
        inline_bytes: bytes | None = None  # a path image's bytes, stored inline too
        if candidate.image is not None:
            source = candidate.image
            try:
                if isinstance(source, Image.Image):
                    image = encode_png(source)
                elif isinstance(source, (bytes, bytearray)):
                    image = bytes(source)
                    load_image(image)
                elif isinstance(source, (str, os.PathLike)):
                    image = os.path.abspath(os.fspath(source))
                    load_image(image)
                else:
                    load_image(source)  # raises ImageLoadError for unsupported types
            except ImageLoadError as exc:
                raise ImageLoadError(f"{label}: {exc}") from exc
            if isinstance(image, bytes):
                key_parts += [b"image-bytes", image]
                finger_parts += [b"image-bytes", image]
                ours["image_b64"] = base64.b64encode(image).decode("ascii")
            else:
                assert isinstance(image, str)
                info = os.stat(image)
                key_parts += [b"image-path", image.encode("utf-8")]
                finger_parts += [b"image-path", f"{image}|{info.st_size}|{info.st_mtime_ns}".encode()]
                ours["image_path"] = image
                if self.inline_images:
                    with open(image, "rb") as fh:
                        inline_bytes = fh.read()
                    ours["image_b64"] = base64.b64encode(inline_bytes).decode("ascii")
            if self.supports_images:
                mode: Literal["text", "caption", "image", "image+text"] = (
                    "image+text" if text.strip() and self.fuse_captions else "image"
                )
            elif text.strip():
                mode = "caption"
            else:
                raise ImageEmbedderRequiredError(
                    f"{label} has an image but no caption (text), and the store's embedder "
                    f"{embedder_name(self.embedder)!r} cannot embed images; give the candidate a "
                    "caption or configure an ImageTextEmbedder"
                )
        elif text.strip():
            mode = "text"
        else:
            raise ValueError(f"{label} is empty: it has neither text nor an image")

        if candidate.id is not None:
            candidate_id = str(candidate.id)
        else:
            candidate_id = "sha256:" + _sha256(*key_parts)[:32]
        fingerprint = _sha256(*finger_parts)
        payload: dict[str, Any] = {
            CONTENT_KEY: text,
            METADATA_KEY: {**metadata, "candidate_id": candidate_id, **ours},
        }
        def record_of(fingerprint: str, keys: Iterable[str]) -> str:
            return _sha256(
                fingerprint.encode(),
                metadata_json.encode(),
                candidate_id.encode(),
                embedder_name(self.embedder).encode(),
                mode.encode(),
                json.dumps(sorted(keys)).encode(),
            )

        record = record_of(fingerprint, ours)
        payload[INTERNAL_KEY] = {
            "version": _PAYLOAD_VERSION,
            "fingerprint": fingerprint,
            "record": record,
            "embedder": embedder_name(self.embedder),
            "indexed_by": mode,
        }
        if inline_bytes is not None:
            # Search results carry the inline bytes, not the path: re-adding one unchanged
            # must still be a no-op (keeping the path and the cached content tokens).
            as_bytes = _sha256(*key_parts[:2], b"image-bytes", inline_bytes)
            payload[INTERNAL_KEY]["as_bytes"] = {"fingerprint": as_bytes, "record": record_of(as_bytes, ["image_b64"])}
        return _Prepared(candidate_id, point_id(candidate_id), text, image, mode, fingerprint, record, payload)

    def _check_vectors(self, vectors: Any, n: int, what: str) -> np.ndarray:
        array = np.asarray(vectors, dtype=np.float32)
        if array.shape != (n, self.dim):
            raise ValueError(
                f"embedder {embedder_name(self.embedder)!r} returned {what} of shape "
                f"{array.shape}, expected {(n, self.dim)}"
            )
        return array

    def _embed_prepared(self, items: Sequence[_Prepared]) -> np.ndarray:
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        text_rows = [i for i, p in enumerate(items) if p.mode != "image"]
        image_rows = [i for i, p in enumerate(items) if p.mode in ("image", "image+text")]
        if text_rows:
            vecs = self._check_vectors(
                self.embedder.embed_texts([items[i].text for i in text_rows]), len(text_rows), "text embeddings"
            )
            out[text_rows] = _normalise(vecs)
        if image_rows:
            images = [load_image(items[i].image) for i in image_rows]  # type: ignore[arg-type]
            vecs = self._check_vectors(self.embedder.embed_images(images), len(image_rows), "image embeddings")  # type: ignore[union-attr]
            out[image_rows] += _normalise(vecs)
        return _normalise(out)

    def add(
        self,
        candidates: Sequence[Candidate | str],
        batch_size: int = 64,
        show_progress: bool = True,
    ) -> list[str]:
        """Embed and upsert ``candidates`` in batches; return their candidate ids, in order.

        The whole list is validated first (images decoded, metadata checked), so a bad item
        raises before anything is written. Ids are idempotent: the candidate's ``id`` if
        given, else a hash of its text and image; re-adding an item overwrites it (or skips
        it when unchanged). Server writes are retried on connection errors and timeouts.
        ``metadata["retrieval_score"]`` (set on :meth:`search` results) is not stored, so
        re-adding search results skips the unchanged ones.

        Raises:
            ImageLoadError: an image cannot be decoded (the message names the item).
            ImageEmbedderRequiredError: an image without caption and no image-text embedder.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        prepared = [self._prepare(i, c) for i, c in enumerate(candidates)]
        ids = [p.candidate_id for p in prepared]
        unique = list({p.point_id: p for p in prepared}.values())  # last duplicate wins
        if not unique:
            return ids
        self._ensure_collection(create=True)

        from tqdm.auto import tqdm

        # a vector travels as JSON numbers (~20 bytes each) next to its payload
        vector_bytes = 20 * self.dim
        with tqdm(total=len(unique), desc="Indexing", unit="cand", disable=not show_progress) as bar:
            for batch in _batches(unique, batch_size, self.max_request_bytes, lambda p: _payload_bytes(p.payload) + vector_bytes):
                self._write_batch(batch)
                bar.update(len(batch))
        return ids

    def _write_batch(self, batch: Sequence[_Prepared]) -> None:
        stored = self._locate(
            [p.candidate_id for p in batch],
            models.PayloadSelectorInclude(include=[INTERNAL_KEY, _CANDIDATE_ID_PATH]),
        )
        # Write where the candidate is stored: its own point id, or a foreign point named by it.
        target = {p.candidate_id: (stored[p.candidate_id].id if p.candidate_id in stored else p.point_id) for p in batch}
        existing = {
            cid: ((record.payload or {}).get(INTERNAL_KEY) or {}) for cid, record in stored.items()
        }

        def stored_as(p: _Prepared, key: str) -> bool:
            """Whether ``p`` has the stored point's ``key`` (``"record"`` or ``"fingerprint"``)."""
            return getattr(p, key) in _stored_values(existing.get(p.candidate_id, {}), key)

        todo = [p for p in batch if not (self.skip_unchanged and stored_as(p, "record"))]
        if not todo:
            return
        # Keep cached content tokens of points whose content did not change.
        keep = {str(target[p.candidate_id]): p for p in todo if stored_as(p, "fingerprint")}
        if keep:
            for r in self._call(
                self._client.retrieve,
                self.collection_name,
                ids=[target[p.candidate_id] for p in keep.values()],
                with_payload=models.PayloadSelectorInclude(include=[TOKENS_KEY]),
                with_vectors=False,
            ):
                tokens = (r.payload or {}).get(TOKENS_KEY)
                if tokens:
                    keep[str(r.id)].payload[TOKENS_KEY] = tokens
        # A point another tool wrote (no candidate_id) is updated in place: keep the payload keys
        # of its own layout (llama-index's ``_node_content``, ``ref_doc_id``, ...) so that tool
        # still reads it; ours replace the rest.
        foreign = {str(target[p.candidate_id]): p for p in todo
                   if p.candidate_id in stored and _stored_candidate_id(stored[p.candidate_id]) is None}
        if foreign:
            for r in self._call(
                self._client.retrieve,
                self.collection_name,
                ids=[target[p.candidate_id] for p in foreign.values()],
                with_payload=models.PayloadSelectorExclude(exclude=[CONTENT_KEY, METADATA_KEY, INTERNAL_KEY, TOKENS_KEY]),
                with_vectors=False,
            ):
                p = foreign[str(r.id)]
                p.payload = {**(r.payload or {}), **p.payload}
        vectors = self._embed_prepared(todo)
        points = [
            models.PointStruct(id=target[p.candidate_id], vector=self._vector_struct(v), payload=p.payload)
            for p, v in zip(todo, vectors)
        ]
        self._call(self._client.upsert, self.collection_name, points=points, wait=True)

    def put_content_tokens(
        self,
        ids: Sequence[str],
        tensors: Sequence[Any] | Any,
        model_signature: str,
        *,
        dtype: Literal["float16", "float32"] | None = None,
        batch_size: int = 256,
        contents: Sequence[Candidate | str] | None = None,
    ) -> list[str]:
        """Cache each candidate's compressed content tokens ``t_con`` under ``model_signature``.

        Args:
            ids: candidate ids (as returned by :meth:`add`).
            tensors: one ``(hidden,)`` or ``(n, hidden)`` float tensor/array per id (or a stacked
                tensor whose first dimension matches ``ids``).
            model_signature: identifies the model that produced them; :meth:`search` only
                returns tokens whose signature matches.
            dtype: storage precision; default float16 for float16 input, float32 otherwise. The
                tensor comes back in its original dtype.
            contents: the candidates the tensors were computed from (what was passed to
                ``encode_candidates``). With them, tokens are written only where the stored
                text and image are still that content, checked by Qdrant in the same update,
                so tokens of an old text never land on a point that another process re-added
                with a new one meanwhile. Such ids are skipped with a warning. Points written
                by another tool carry no content fingerprint and are written unchecked.

        Returns:
            The ids whose tokens were written (all of ``ids`` without ``contents``).

        Raises:
            UnknownCandidateError: an id is not in the store.
        """
        if not isinstance(model_signature, str) or not model_signature:
            raise ValueError("model_signature must be a non-empty string")
        ids = [str(i) for i in ids]
        if len(tensors) != len(ids):
            raise ValueError(f"got {len(tensors)} tensors for {len(ids)} ids")
        entries = [
            _encode_tokens(t, model_signature, dtype, label=f"content tokens of {cid!r}")
            for cid, t in zip(ids, tensors)
        ]
        if contents is not None and len(contents) != len(ids):
            raise ValueError(f"got {len(contents)} contents for {len(ids)} ids")
        found: dict[str, Any] = {}
        if self._ensure_collection(create=False):
            found = self._locate(ids, models.PayloadSelectorInclude(include=[_CANDIDATE_ID_PATH, INTERNAL_KEY]))
        missing = [cid for cid in ids if cid not in found]
        if missing:
            raise UnknownCandidateError(f"candidate ids not in collection {self.collection_name!r}: {missing[:10]}")
        # (candidate id, point id, entry, fingerprints the stored content may have or None)
        writes: list[tuple[str, Any, dict[str, Any], list[str] | None]] = []
        stale: list[str] = []
        for i, (cid, entry) in enumerate(zip(ids, entries)):
            record = found[cid]
            info = (record.payload or {}).get(INTERNAL_KEY)
            if contents is None or not isinstance(info, dict) or "fingerprint" not in info:
                writes.append((cid, record.id, entry, None))
                continue
            given = self._prepare(i, contents[i])
            stored = _stored_values(info, "fingerprint")
            if given.fingerprint in stored:
                writes.append((cid, record.id, entry, stored))
            else:
                stale.append(cid)
        if stale:
            logger.warning(
                "content tokens of %d candidate(s) not cached: the stored text or image is no longer "
                "the content they were computed from (re-added since?): %s", len(stale), stale[:10])

        def operation(pid: Any, entry: dict[str, Any], fingerprints: list[str] | None) -> Any:
            if fingerprints is None:
                return models.SetPayloadOperation(set_payload=models.SetPayload(payload={TOKENS_KEY: entry}, points=[pid]))
            unchanged = models.Filter(
                must=[models.HasIdCondition(has_id=[pid])],
                should=[
                    models.FieldCondition(key=key, match=models.MatchValue(value=fp))
                    for key, fp in zip((f"{INTERNAL_KEY}.fingerprint", f"{INTERNAL_KEY}.as_bytes.fingerprint"), fingerprints)
                ],
            )
            return models.SetPayloadOperation(set_payload=models.SetPayload(payload={TOKENS_KEY: entry}, filter=unchanged))

        for batch in _batches(writes, batch_size, self.max_request_bytes, lambda w: len(w[2]["data"]) + 512):
            operations = [operation(pid, entry, fps) for _, pid, entry, fps in batch]
            self._call(self._client.batch_update_points, self.collection_name, update_operations=operations, wait=True)
        return [cid for cid, *_ in writes]

    def delete(self, ids: Iterable[str]) -> None:
        """Delete candidates by id (unknown ids are ignored)."""
        cids = [str(i) for i in ids]
        if not cids or not self._ensure_collection(create=False):
            return
        found = self._locate(cids, models.PayloadSelectorInclude(include=[_CANDIDATE_ID_PATH]))
        pids = list({str(r.id): r.id for r in found.values()}.values())
        if not pids:
            return
        self._call(
            self._client.delete,
            self.collection_name,
            points_selector=models.PointIdsList(points=pids),
            wait=True,
        )

    # ------------------------------------------------------------------ reading

    def count(self) -> int:
        """Number of candidates in the collection (0 when it does not exist yet)."""
        if not self._call(self._client.collection_exists, self.collection_name):
            return 0
        return int(self._call(self._client.count, self.collection_name, exact=True).count)

    def get(self, ids: Sequence[str], *, with_content_tokens: str | None = None) -> list[Candidate]:
        """The stored candidates for ``ids``, in that order; unknown ids are left out.

        Points written by another tool (e.g. langchain-qdrant) are found by the id
        :meth:`search` gives them (their point id).
        """
        cids = [str(i) for i in ids]
        if not cids or not self._ensure_collection(create=False):
            return []
        found = self._locate(cids, self._payload_selector(with_content_tokens))
        return [self._to_candidate(found[cid], None, with_content_tokens) for cid in cids if cid in found]

    def search(
        self,
        query: Query | str,
        top_k: int = 50,
        *,
        with_content_tokens: str | None = None,
        query_filter: models.Filter | None = None,
        score_threshold: float | None = None,
    ) -> list[Candidate]:
        """The ``top_k`` nearest candidates to ``query``, best first.

        Each result has the caller's ``id``, ``text``, ``image`` (a path, or bytes when the
        image was stored as bytes) and ``metadata`` with ``retrieval_score`` (not stored:
        :meth:`add` drops it, so results can be re-added unchanged). Lone surrogates in the
        query text are replaced by U+FFFD, as in :class:`~retrv_r1_plugin.types.Query`. With
        ``with_content_tokens=<model signature>``, ``content_tokens`` is set (a torch tensor)
        where a cache entry of that signature exists.

        Raises:
            ImageEmbedderRequiredError: an image query and no image-text embedder.
        """
        q = Query.coerce(query)  # a plain string becomes a Query: lone surrogates -> U+FFFD
        if q.has_image and not self.supports_images:
            raise ImageEmbedderRequiredError(
                f"an image query needs an image-text embedder, but the store's embedder "
                f"{embedder_name(self.embedder)!r} only embeds text"
            )
        if not q.text.strip() and not q.has_image:
            raise ValueError("empty query: give text or an image")
        if top_k < 1 or not self._ensure_collection(create=False):
            return []
        vector = self._embed_query(q)
        response = self._call(
            self._client.query_points,
            self.collection_name,
            query=[float(x) for x in vector],
            using=self.vector_name or None,
            limit=top_k,
            query_filter=query_filter,
            score_threshold=score_threshold,
            with_payload=self._payload_selector(with_content_tokens),
            with_vectors=False,
        )
        self._check_embedders(response.points)
        return [self._to_candidate(p, p.score, with_content_tokens) for p in response.points]

    def _check_embedders(self, points: Sequence[Any]) -> None:
        """Warn (once per embedder name) when hits were indexed by another embedder than the
        one that embedded the query: a collection built with one 384-d model and searched
        with another passes the dimension check, and its scores compare unrelated vectors."""
        ours = embedder_name(self.embedder)
        for point in points:
            info = (point.payload or {}).get(INTERNAL_KEY)
            other = info.get("embedder") if isinstance(info, dict) else None
            if isinstance(other, str) and other != ours and other not in self._embedders_warned:
                self._embedders_warned.add(other)
                warnings.warn(
                    f"collection {self.collection_name!r} holds points indexed with embedder {other!r}, but "
                    f"this store embeds queries with {ours!r}: their scores compare vectors of two models. "
                    "Open the store with the embedder the collection was built with, or re-index those "
                    "points with add() (it re-embeds points whose embedder changed).",
                    stacklevel=3,
                )

    def _embed_query(self, q: Query) -> np.ndarray:
        vector = np.zeros(self.dim, dtype=np.float32)
        if q.text.strip():
            embed = getattr(self.embedder, "embed_queries", None) or self.embedder.embed_texts
            text = replace_surrogates(q.text)  # also when .text was set after construction
            vector += _normalise(self._check_vectors(embed([text]), 1, "query embeddings"))[0]
        if q.has_image:
            image = load_image(q.image)  # type: ignore[arg-type]
            vecs = self.embedder.embed_images([image])  # type: ignore[union-attr]
            vector += _normalise(self._check_vectors(vecs, 1, "image embeddings"))[0]
        return _normalise(vector[None, :])[0]

    @staticmethod
    def _payload_selector(with_content_tokens: str | None) -> Any:
        if with_content_tokens:
            return True
        return models.PayloadSelectorExclude(exclude=[TOKENS_KEY])

    def _stored_image_path(self, point: Any, path: str) -> str | None:
        """``path`` (an ``image_path`` read from ``point``) if it may be read: a regular file
        (or missing: loading it names it later) within :attr:`image_roots` when they are set."""
        try:
            info = os.stat(path)
        except (OSError, ValueError):
            info = None
        reason = None
        if info is not None and not stat.S_ISREG(info.st_mode):
            reason = "not a regular file"
        elif self.image_roots is not None:
            real = os.path.realpath(path)
            if not any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in self.image_roots):
                reason = f"outside image_roots {self.image_roots}"
        if reason is None:
            return path
        warnings.warn(f"point {point.id} of collection {self.collection_name!r}: its image_path {path!r} is {reason}; "
                      "returned without its image", stacklevel=4)
        return None

    def _to_candidate(self, point: Any, score: float | None, signature: str | None) -> Candidate:
        payload = point.payload or {}
        if CONTENT_KEY not in payload and METADATA_KEY not in payload:
            node = _llama_index_node(payload)
            if node is not None:  # written by llama-index-vector-stores-qdrant
                text, metadata, image = node
                if isinstance(image, str):
                    image = self._stored_image_path(point, image)
                if score is not None:
                    metadata[SCORE_KEY] = float(score)
                return Candidate(text=text, image=image, id=str(point.id), metadata=metadata)
        # A point written by another tool may hold anything under these keys: one odd point
        # must not break every search of the collection.
        raw_metadata = payload.get(METADATA_KEY)
        if isinstance(raw_metadata, dict):
            metadata = dict(raw_metadata)
        else:
            metadata = {} if raw_metadata is None else {METADATA_KEY: raw_metadata}
        stored_id = metadata.pop("candidate_id", None)
        # ``is None``, not falsiness: an id "" must come back as "" (else re-adding the
        # result would write a second point under another id).
        candidate_id = str(stored_id) if stored_id is not None else str(point.id)
        image_b64 = metadata.pop("image_b64", None)
        image_path = metadata.pop("image_path", None)
        image: str | bytes | None = None
        if isinstance(image_b64, str) and image_b64:
            try:
                image = base64.b64decode(image_b64, validate=True)
            except ValueError:  # binascii.Error: a foreign point's garbage must not break the search
                warnings.warn(f"point {point.id} of collection {self.collection_name!r}: its image_b64 is not valid "
                              "base64; returned without its image", stacklevel=3)
        elif isinstance(image_path, (str, os.PathLike)) and os.fspath(image_path):
            image = self._stored_image_path(point, os.fspath(image_path))
        if score is not None:
            metadata[SCORE_KEY] = float(score)
        tokens = None
        entry = payload.get(TOKENS_KEY)
        if signature and isinstance(entry, dict) and entry.get("signature") == signature:
            try:
                tokens = _decode_tokens(entry)
            except (ValueError, TypeError, KeyError) as exc:
                logger.warning("point %s: malformed cached content tokens (%s), recomputed", point.id, exc)
        text = payload.get(CONTENT_KEY)
        return Candidate(
            text=text if isinstance(text, str) else ("" if text is None else str(text)),
            image=image,
            id=str(candidate_id),
            metadata=metadata,
            content_tokens=tokens,
        )


_LLAMA_INDEX_KEYS = ("_node_content", "_node_type", "doc_id", "document_id", "ref_doc_id")


def _llama_index_node(payload: dict[str, Any]) -> tuple[str, dict[str, Any], str | bytes | None] | None:
    """``(text, metadata, image)`` of a point llama-index-vector-stores-qdrant wrote (its node as
    JSON under ``_node_content``, the metadata also flattened beside it), else None."""
    raw = payload.get("_node_content")
    if not isinstance(raw, str):
        return None
    try:
        node = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(node, dict):
        return None
    text = node.get("text")
    resource = node.get("text_resource")
    if not isinstance(text, str) or not text:
        text = resource.get("text") if isinstance(resource, dict) else None
    if not isinstance(text, str) or not text:
        text = payload.get("text")  # a store written with its text in the payload (text_key)
    metadata = node.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {k: v for k, v in payload.items() if k not in _LLAMA_INDEX_KEYS and k != "text"}
    metadata = dict(metadata)
    image: str | bytes | None = None
    image_b64, image_path, image_url = node.get("image"), node.get("image_path"), node.get("image_url")
    if isinstance(image_b64, str) and image_b64:
        try:
            image = base64.b64decode(image_b64)
        except ValueError:
            image = None
    if image is None and isinstance(image_path, str) and image_path:
        image = image_path
    if isinstance(image_url, str) and image_url:
        metadata.setdefault("image_url", image_url)
    return (text if isinstance(text, str) else ""), metadata, image


def _stored_values(info: dict[str, Any], key: str) -> list[Any]:
    """A stored point's ``key`` (``"record"`` or ``"fingerprint"``) as given by path and, for an
    image stored inline too, as given by its bytes (the form search results carry)."""
    values = [info.get(key)]
    if isinstance(info.get("as_bytes"), dict):
        values.append(info["as_bytes"].get(key))
    return [v for v in values if v is not None]


def _batches(items: Sequence[T], max_count: int, max_bytes: int, size: Callable[[T], int]) -> Iterator[list[T]]:
    """Consecutive runs of ``items`` with at most ``max_count`` items and, unless one item is
    larger by itself (it goes alone), at most ``max_bytes`` by ``size``."""
    batch: list[T] = []
    total = 0
    for item in items:
        n = size(item)
        if batch and (len(batch) >= max_count or total + n > max_bytes):
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += n
    if batch:
        yield batch


def _payload_bytes(payload: dict[str, Any]) -> int:
    """About how many bytes ``payload`` takes in a request (its JSON, tokens included)."""
    return len(json.dumps(payload, ensure_ascii=False, default=str).encode("utf-8"))


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def _encode_tokens(tensor: Any, signature: str, dtype: str | None, label: str) -> dict[str, Any]:
    """A JSON-able cache entry for one ``t_con`` tensor."""
    orig_dtype = "float32"
    if hasattr(tensor, "detach"):  # torch tensor
        orig_dtype = str(tensor.dtype).removeprefix("torch.")
        tensor = tensor.detach().to("cpu")
        if not tensor.is_floating_point():
            raise TypeError(f"{label}: expected a float tensor, got {tensor.dtype}")
        array = tensor.float().numpy() if orig_dtype not in ("float16", "float32", "float64") else tensor.numpy()
    else:
        array = np.asarray(tensor)
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"{label}: expected a float array, got {array.dtype}")
        orig_dtype = str(array.dtype)
    if array.ndim not in (1, 2):
        raise ValueError(f"{label}: expected shape (hidden,) or (n, hidden), got {tuple(array.shape)}")
    storage = dtype or ("float16" if orig_dtype == "float16" else "float32")
    if storage not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {storage!r}")
    data = np.ascontiguousarray(array, dtype=np.dtype(storage).newbyteorder("<"))
    return {
        "signature": signature,
        "dtype": storage,
        "orig_dtype": orig_dtype,
        "shape": list(array.shape),
        "data": base64.b64encode(data.tobytes()).decode("ascii"),
    }


def _decode_tokens(entry: dict[str, Any]) -> Any:
    """The torch tensor of a cache entry (in its original dtype)."""
    import torch

    if entry.get("dtype") not in ("float16", "float32"):
        raise ValueError(f"dtype {entry.get('dtype')!r} is not float16 or float32")
    shape = entry.get("shape")
    if (not isinstance(shape, list) or len(shape) not in (1, 2)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        raise ValueError(f"shape {shape!r} is not (hidden,) or (n, hidden)")
    storage = np.dtype(entry["dtype"]).newbyteorder("<")
    data = entry.get("data")
    if not isinstance(data, str) or len(data) * 3 // 4 > 2 * math.prod(shape) * storage.itemsize:
        raise ValueError("data is not a base64 string of the shape's size")
    array = np.frombuffer(base64.b64decode(data, validate=True), dtype=storage).reshape(shape)
    tensor = torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))
    target = getattr(torch, str(entry.get("orig_dtype", entry["dtype"])), None)
    return tensor.to(target) if isinstance(target, torch.dtype) else tensor


__all__ = [
    "CollectionMismatchError",
    "ImageEmbedderRequiredError",
    "QdrantCandidateStore",
    "StoreLockedError",
    "StoreUnavailableError",
    "UnknownCandidateError",
    "default_store_path",
    "point_id",
]
