"""Token-in, token-out context building.

A context is a list of :class:`Chunk` s. Each chunk holds token ids (placeholders where an
embedding is injected: image pads, ICM slots) together with the embeddings actually fed to
the LM, the image grids it contains, and a role that training uses for loss masks:

* ``prompt``: the instructions, query and (compressed or full) candidates;
* ``generated``: tokens the model wrote (the only training targets);
* ``spliced``: full candidate tokens appended by details inspection (context, never targets);
* ``forced``: tokens the system appended, e.g. ``</think><answer>`` after the budget ran out.

Nothing is ever decoded and re-tokenized: the multi-turn sequence is built by concatenation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from .backbone import Backbone, ImageTokens
from .tokens import SpecialTokenIds, tokenize_trusted, tokenize_untrusted
from .types import Candidate, ImageInput, ImageLoadError, Query, load_image

logger = logging.getLogger(__name__)

#: Qwen-VL image processors refuse images whose long side is over 200 times the short one.
MAX_IMAGE_ASPECT_RATIO = 200


def is_out_of_memory(exc: BaseException) -> bool:
    """An accelerator OOM, or a CPU allocation failure (a ``RuntimeError`` about allocating memory)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if isinstance(exc, RuntimeError):
        message = str(exc).lower()
        # cuBLAS reports a failed workspace allocation as CUBLAS_STATUS_ALLOC_FAILED
        return "out of memory" in message or ("allocat" in message and "memory" in message) or "alloc_failed" in message
    return False


def map_batches(fn: Callable[[list], Sequence[Any]], items: Sequence[Any], batch_size: int, *, what: str, notes: list[str] | None = None) -> list:
    """``fn`` over ``items`` in batches of at most ``batch_size``, results concatenated in order.

    A batch that runs out of memory is retried in halves, down to one item per batch (a
    single item that still does not fit re-raises); each split is logged and recorded in
    ``notes``.
    """
    items = list(items)
    size = max(1, int(batch_size))
    out: list = []
    start = 0
    while start < len(items):
        batch = items[start : start + size]
        try:
            part = list(fn(batch))
        except Exception as exc:
            if len(batch) == 1 or not is_out_of_memory(exc):
                raise
            part = None  # leave the except block first, so the failed batch's tensors are freed
        if part is None:
            size = max(1, len(batch) // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            message = f"{what}: a batch of {len(batch)} ran out of memory; split into batches of {size}"
            logger.warning(message)
            if notes is not None:
                notes.append(message)
            continue
        out.extend(part)
        start += len(batch)
    return out


def check_vision_image(image: Image.Image, what: str) -> Image.Image:
    """Refuse, naming ``what``, an image the Qwen-VL processor cannot take."""
    width, height = image.size
    if max(width, height) > MAX_IMAGE_ASPECT_RATIO * min(width, height):
        raise ImageLoadError(
            f"{what}: image of {width}x{height} pixels has an aspect ratio above {MAX_IMAGE_ASPECT_RATIO}, "
            "which the vision processor refuses; crop or pad it"
        )
    return image


def load_vision_image(source: ImageInput, what: str) -> Image.Image:
    """:func:`load_image` then :func:`check_vision_image`; every error names ``what`` (which
    candidate, or the query) first, as a bad image in a list of many is otherwise hard to find."""
    try:
        image = load_image(source)
    except ImageLoadError as exc:
        raise ImageLoadError(f"{what}: {exc}") from exc
    return check_vision_image(image, what)


def pad_embeddings(seqs: list[torch.Tensor], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(L_i, H)`` tensors into ``(B, L, H)`` (``L``: ``length`` or the longest) plus a
    bool mask of real positions."""
    length = max(s.shape[0] for s in seqs) if length is None else length
    out = seqs[0].new_zeros(len(seqs), length, seqs[0].shape[-1])
    mask = torch.zeros(len(seqs), length, dtype=torch.bool, device=seqs[0].device)
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = True
    return out, mask


@dataclass
class Chunk:
    ids: torch.Tensor  # (n,) long
    embeds: torch.Tensor  # (n, H)
    role: str = "prompt"
    grids: list[torch.Tensor] = field(default_factory=list)
    deepstack: list[torch.Tensor] | None = None  # per layer (num_image_tokens_in_chunk, H)

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def cat_chunks(chunks: list[Chunk], role: str | None = None) -> Chunk:
    """Concatenate chunks into one (role of the first unless given)."""
    if not chunks:
        raise ValueError("no chunks to concatenate")
    grids = [g for c in chunks for g in c.grids]
    deep = None
    with_deep = [c.deepstack for c in chunks if c.deepstack is not None]
    if with_deep:
        deep = [torch.cat(layer, 0) for layer in zip(*with_deep)]
    return Chunk(
        ids=torch.cat([c.ids for c in chunks]),
        embeds=torch.cat([c.embeds for c in chunks]),
        role=role or chunks[0].role,
        grids=grids,
        deepstack=deep,
    )


@dataclass
class Encoded:
    """A query or candidate as full tokens: ids with image placeholders, and embeddings."""

    chunk: Chunk
    truncated_from: int | None = None  # original text-token count when truncated
    ignored_image: bool = False
    content: torch.Tensor | None = None  # t_con, when computed or supplied from a cache
    image_tokens: ImageTokens | None = None  # the vision tower's output, reused when re-encoding

    @property
    def embeds(self) -> torch.Tensor:
        return self.chunk.embeds


class ContextBuilder:
    """Turns queries and candidates into chunks for one backbone and tokenizer."""

    def __init__(self, backbone: Backbone, special: SpecialTokenIds, system_prompt: str, *, label_after_candidate: bool = False,
                 query_after_candidates: bool = False) -> None:
        self.backbone = backbone
        self.tok = backbone.tokenizer
        self.special = special
        self.system_prompt = system_prompt
        self.label_after_candidate = label_after_candidate
        self.query_after_candidates = query_after_candidates
        self._template_cache: tuple[list[int], list[int]] | None = None

    # ------------------------------------------------------------------ pieces
    def text_chunk(self, ids: list[int], role: str = "prompt") -> Chunk:
        t = torch.tensor(ids, dtype=torch.long)
        return Chunk(ids=t, embeds=self.backbone.embed_ids(t), role=role)

    def trusted(self, text: str, role: str = "prompt") -> Chunk:
        return self.text_chunk(tokenize_trusted(self.tok, text), role)

    def image_chunk(self, image: ImageTokens, role: str = "prompt") -> Chunk:
        start, end = self.backbone.vision_wrap_ids()
        n = image.num_tokens
        ids = torch.tensor([start] + [self.backbone.image_token_id] * n + [end], dtype=torch.long)
        embeds = self.backbone.embed_ids(ids).clone()
        embeds[1 : 1 + n] = image.embeds.to(embeds.dtype)
        return Chunk(ids=ids, embeds=embeds, role=role, grids=[image.grid_thw], deepstack=image.deepstack)

    def chat_frame(self) -> tuple[list[int], list[int]]:
        """Token ids before and after the user message body, from the chat template."""
        if self._template_cache is None:
            sentinel = "\u2063RETRV_R1_BODY\u2063"
            if getattr(self.tok, "chat_template", None):
                messages = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": sentinel}]
                try:
                    rendered = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                except Exception:  # templates without a system role
                    messages = [{"role": "user", "content": self.system_prompt + "\n\n" + sentinel}]
                    rendered = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                before, _, after = rendered.partition(sentinel)
            else:
                before, after = self.system_prompt + "\n\n", "\n"
            self._template_cache = (tokenize_trusted(self.tok, before), tokenize_trusted(self.tok, after))
        return self._template_cache

    # ------------------------------------------------------------------ encoding
    def encode(
        self,
        text: str,
        image: ImageInput | None,
        *,
        max_text_tokens: int,
        image_tokens: ImageTokens | None = None,
        what: str = "image",
    ) -> Encoded:
        """Full tokens of a query or candidate: ``[image] text`` (text truncated if needed)."""
        ids = tokenize_untrusted(self.tok, text, self.special.forbidden_in_untrusted)
        truncated_from = None
        if len(ids) > max_text_tokens:
            truncated_from = len(ids)
            ids = ids[:max_text_tokens]
        parts: list[Chunk] = []
        ignored_image = False
        if image is not None or image_tokens is not None:
            if self.backbone.is_vision:
                if image_tokens is None:
                    image_tokens = self.backbone.encode_images([load_vision_image(image, what)])[0]
                parts.append(self.image_chunk(image_tokens))
            else:
                ignored_image = True
        if ids or not parts:
            if not ids:  # never hand the ICM an empty sequence
                ids = tokenize_trusted(self.tok, " ")
            parts.append(self.text_chunk(ids))
        return Encoded(chunk=cat_chunks(parts), truncated_from=truncated_from, ignored_image=ignored_image, image_tokens=image_tokens)

    def encode_query(self, query: Query, max_text_tokens: int) -> Encoded:
        return self.encode(query.text, query.image, max_text_tokens=max_text_tokens, what="the query")

    def encode_candidates(self, candidates: list[Candidate], max_text_tokens: int, notes: list[str] | None = None,
                          reuse: list[Encoded] | None = None) -> list[Encoded]:
        """Encode candidates; images are decoded first (clear errors) then run as one batch
        (split in halves if it runs out of memory, recorded in ``notes``). ``reuse`` (an
        earlier encoding of the same candidates) supplies image tokens, so re-encoding with
        another text cap does not run the vision tower again."""
        images = {}
        if self.backbone.is_vision:
            if reuse is not None:
                images = {i: e.image_tokens for i, e in enumerate(reuse) if e.image_tokens is not None}
            pil = {i: load_vision_image(c.image, f"candidate {i}") for i, c in enumerate(candidates) if c.image is not None and i not in images}
            if pil:
                order = list(pil)
                toks = map_batches(self.backbone.encode_images, [pil[i] for i in order], len(order), what="vision encoder", notes=notes)
                images.update(zip(order, toks))
        out = []
        for i, c in enumerate(candidates):
            enc = self.encode(
                c.text,
                c.image if not self.backbone.is_vision else None,
                max_text_tokens=max_text_tokens,
                image_tokens=images.get(i),
            )
            out.append(enc)
        return out

    # ------------------------------------------------------------------ prompt
    def shared_prefix(self) -> list[int]:
        """The token ids every prompt starts with (chat frame, system prompt, ``Query: ``):
        the decoder keeps their KV cache across calls."""
        before, _ = self.chat_frame()
        return before + tokenize_trusted(self.tok, "Query: ")

    def prompt(
        self,
        query: Encoded,
        candidates: list[Encoded],
        slots: list[tuple[torch.Tensor, torch.Tensor]] | None,
        *,
        think: bool,
    ) -> Chunk:
        """The initial context. ``slots`` holds ``(t_con, t_rel)`` per candidate in ICM mode;
        ``None`` lays every candidate out in full tokens."""
        _, after = self.chat_frame()
        colon, newline, space = tokenize_trusted(self.tok, ": "), tokenize_trusted(self.tok, "\n"), tokenize_trusted(self.tok, " ")
        # Text pieces are id lists, embedded below in one lookup (one graph node in training
        # instead of one per piece); queries, candidates and slots arrive embedded.
        parts: list[list[int] | Chunk] = [self.shared_prefix(), query.chunk, tokenize_trusted(self.tok, "\nCandidates:\n")]
        for i, cand in enumerate(candidates):
            parts.append([self.special.labels[i]] + colon)
            parts.append(cand.chunk if slots is None else self.slot_chunk(*slots[i]))
            parts.append(space + [self.special.labels[i]] + newline if self.label_after_candidate else list(newline))
        if self.query_after_candidates:
            parts.extend([tokenize_trusted(self.tok, "Query: "), query.chunk, list(newline)])
        opener = self.special.think_start if think else self.special.answer_start
        parts.append(after + [opener])
        pieces = [p for p in parts if isinstance(p, list)]
        flat = torch.tensor([t for p in pieces for t in p], dtype=torch.long)
        embedded = iter(self.backbone.embed_ids(flat).split([len(p) for p in pieces]))
        chunks = [Chunk(ids=torch.tensor(p, dtype=torch.long), embeds=next(embedded)) if isinstance(p, list) else p for p in parts]
        return cat_chunks(chunks, role="prompt")

    def slot_chunk(self, t_con: torch.Tensor, t_rel: torch.Tensor) -> Chunk:
        ids = torch.tensor([self.special.content_slot, self.special.relation_slot], dtype=torch.long)
        embeds = torch.stack([t_con, t_rel]).to(self.backbone.dtype)
        return Chunk(ids=ids, embeds=embeds, role="prompt")

    def inspection_chunk(self, index: int, candidate: Encoded) -> Chunk:
        """What details inspection splices in: ``<inspected><cand_i>: full tokens</inspected>``."""
        head = self.text_chunk([self.special.inspected_start, self.special.labels[index]] + tokenize_trusted(self.tok, ": "))
        tail = self.text_chunk([self.special.inspected_end])
        return cat_chunks([head, candidate.chunk, tail], role="spliced")
