"""Framework-free types shared by the model, the store and the adapters.

A :class:`Query` or :class:`Candidate` carries text, an image, or both. Images may be
given as a filesystem path, a :class:`PIL.Image.Image`, or raw encoded bytes; they are
decoded lazily by :func:`load_image`, which turns every decoding problem into an
:class:`ImageLoadError` that names the offending source.
"""

from __future__ import annotations

import io
import numbers
import os
import stat
import re
from dataclasses import dataclass, field
from typing import Any, Union

from PIL import Image, UnidentifiedImageError

ImageInput = Union[str, os.PathLike, bytes, Image.Image]

#: Images larger than this many pixels are refused (decompression-bomb guard); they are
#: downscaled by the backbone's processor anyway, so nothing useful is lost.
MAX_IMAGE_PIXELS = 64_000_000

_SURROGATES = re.compile("[\ud800-\udfff]")
"""Lone UTF-16 surrogates: valid in a Python ``str`` but not encodable as UTF-8."""


def replace_surrogates(text: str) -> str:
    """``text`` with every lone surrogate (e.g. from a broken JSON escape) replaced by U+FFFD.

    Such characters cannot be encoded as UTF-8, so tokenizers, hashing and storage would fail
    on them; :class:`Query` and :class:`Candidate` apply this to their text on construction.
    """
    return _SURROGATES.sub("\ufffd", text)


class RetrvR1Error(Exception):
    """Base class of the errors this package raises on bad input."""


class ImageLoadError(RetrvR1Error, ValueError):
    """An image could not be read or decoded."""


class EmptyCandidatesError(RetrvR1Error, ValueError):
    """A rerank call received no candidates."""


class NoAnswerError(RetrvR1Error, RuntimeError):
    """Strict mode: the model's output held no usable answer."""


def _describe(source: ImageInput) -> str:
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.size}>"
    return str(source)


def encode_png(image: Image.Image) -> bytes:
    """The PNG bytes of a PIL image (decoded and checked by :func:`load_image` first).

    Used wherever an in-memory image must be stored or serialised (the candidate store's
    ``image_b64`` payload, LangChain documents).
    """
    buffer = io.BytesIO()
    load_image(image).save(buffer, format="PNG")
    return buffer.getvalue()


def load_image(source: ImageInput) -> Image.Image:
    """Decode ``source`` into an RGB PIL image, or raise :class:`ImageLoadError`.

    The pixel limit and the decoding checks apply to PIL images too (one opened lazily with
    ``Image.open`` is only decoded here).
    """
    try:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, (bytes, bytearray)):
            image = Image.open(io.BytesIO(bytes(source)))
        elif isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if not os.path.exists(path):
                raise ImageLoadError(f"image file not found: {path}")
            if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block forever, a device never end
                raise ImageLoadError(f"image path is not a regular file: {path}")
            image = Image.open(path)
        else:
            raise ImageLoadError(
                f"unsupported image type {type(source).__name__}; "
                "give a path, bytes or a PIL.Image"
            )
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ImageLoadError(
                f"image {_describe(source)} has {width}x{height} pixels, above the "
                f"limit of {MAX_IMAGE_PIXELS}"
            )
        image.load()
        if image.width < 1 or image.height < 1:
            raise ImageLoadError(f"image {_describe(source)} is empty ({image.width}x{image.height})")
        return to_rgb(image)
    except ImageLoadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"cannot decode image {_describe(source)}: {exc}") from exc


_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_ORIENTATION = 0x0112  # EXIF tag


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, as the Hugging Face image loaders make it:

    * the EXIF orientation of a photo is applied (``ImageOps.exif_transpose``), so a phone
      picture is not read sideways;
    * transparent pixels (an alpha channel, or a palette/grey ``transparency`` key) become
      white, not whatever colour they happen to hide (often black, hiding dark content);
    * 16-bit and 32-bit grey (``I;16``, ``I``, ``F``) are scaled to 8 bits instead of clipped,
      which turned a 16-bit PNG almost white.
    """
    if image.getexif().get(_ORIENTATION, 1) != 1:
        from PIL import ImageOps

        image = ImageOps.exif_transpose(image)
    if image.mode == "La":  # premultiplied: PIL converts it to LA only
        image = image.convert("LA")
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _grey_to_8bit(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def _grey_to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit or 32-bit grey image as mode ``L``: ``I;16`` by its 16-bit range; ``I``/``F``
    unchanged when within 0..255, by the 16-bit range when within 0..65535 (a 16-bit file read
    as ``I``), floats within 0..1 by 255, anything else stretched from its minimum to maximum."""
    import numpy as np

    a = np.asarray(image, dtype=np.float64)
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if image.mode.startswith("I;16") or (lo >= 0 and 255 < hi <= 65535):
        a = a / 257.0
    elif image.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255.0
    elif lo < 0 or hi > 255:
        a = (a - lo) * (255.0 / (hi - lo))
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


@dataclass
class Query:
    """A search query: text, an image, or both."""

    text: str = ""
    image: ImageInput | None = None

    def __post_init__(self) -> None:
        if self.text is None:
            self.text = ""
        if not isinstance(self.text, str):
            raise TypeError(f"Query.text must be a str, got {type(self.text).__name__}")
        self.text = replace_surrogates(self.text)

    @property
    def has_image(self) -> bool:
        return self.image is not None

    @classmethod
    def coerce(cls, value: Query | str) -> Query:
        if isinstance(value, Query):
            return value
        if isinstance(value, str):
            return cls(text=value)
        raise TypeError(f"expected a Query or str, got {type(value).__name__}")


@dataclass
class Candidate:
    """One first-stage result to be reranked.

    Args:
        text: the candidate's text (a passage, a caption, ...).
        image: an image path, PIL image or encoded bytes.
        id: the caller's identifier; kept untouched in results.
        metadata: free-form data carried along (never shown to the model).
        content_tokens: a cached ``t_con`` tensor from ``RetrvR1Model.encode_candidates``;
            when present (and produced by the same model) it is used instead of recomputing.
    """

    text: str = ""
    image: ImageInput | None = None
    id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    content_tokens: Any | None = None

    def __post_init__(self) -> None:
        if self.text is None:
            self.text = ""
        if not isinstance(self.text, str):
            raise TypeError(f"Candidate.text must be a str, got {type(self.text).__name__}")
        self.text = replace_surrogates(self.text)

    @property
    def has_image(self) -> bool:
        return self.image is not None

    @classmethod
    def coerce(cls, value: Candidate | str) -> Candidate:
        if isinstance(value, Candidate):
            return value
        if isinstance(value, str):
            return cls(text=value)
        raise TypeError(f"expected a Candidate or str, got {type(value).__name__}")


@dataclass
class TokenUsage:
    """Token counts of one rerank call."""

    prompt_tokens: int = 0
    """Tokens in the initial context (query, instructions, compressed or full candidates)."""
    generated_tokens: int = 0
    """Tokens the model wrote (reasoning, inspection requests, answer)."""
    inspection_tokens: int = 0
    """Tokens spliced into the context by details inspection."""

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.generated_tokens + self.inspection_tokens


@dataclass
class RankResult:
    """The outcome of reranking one query.

    ``scores[i]`` always belongs to ``candidates[i]`` as they were passed in; ``order`` lists
    candidate indices from best to worst.
    """

    order: list[int]
    scores: list[float]
    reasoning: str = ""
    inspected: list[int] = field(default_factory=list)
    usage: TokenUsage = field(default_factory=TokenUsage)
    answer: int | None = None
    """The index the model itself wrote after ``<answer>``, if it wrote a valid one."""
    fallback: str | None = None
    """Why the ranking was not the model's own clean answer (``None`` when it was)."""
    notes: list[str] = field(default_factory=list)
    """Recorded adjustments, e.g. truncated candidates or ignored images."""
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def best(self) -> int:
        return self.order[0]

    def top_k(self, k: int) -> list[tuple[int, float]]:
        """The ``k`` best ``(index, score)`` pairs (all of them when ``k`` exceeds their number)."""
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            # a negative k would slice from the end: all but the worst candidates, silently
            raise ValueError(f"k must be a non-negative int, got {k!r}")
        return [(i, self.scores[i]) for i in self.order[: int(k)]]
