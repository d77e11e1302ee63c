"""Inspection-aware decoding with a KV cache that survives the splices.

The loop prefills the prompt, then writes one token at a time. When the model closes an
inspection request (``<inspection-index-start><cand_i><inspection-index-end>``) the
candidate's full tokens are run through the decoder as one more chunk on the same cache,
at the positions a fresh forward over the whole sequence would give them, and decoding
goes on. It ends when the model opens ``<answer>``, or when a cap is hit; then the system
appends whatever is missing of ``</think><answer>`` and reads the distribution over the
candidate labels at the answer position: the scores of every candidate.
"""

from __future__ import annotations

import copy
import numbers
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from .backbone import Backbone
from .context import Chunk, ContextBuilder, Encoded
from .tokens import SpecialTokenIds

# Reasons a ranking is not the model's own clean answer (RankResult.fallback).
FORCED_ANSWER = "forced_answer"
ANSWER_OUT_OF_RANGE = "answer_out_of_range"
#: Tokens the system appends at most after the reasoning (:func:`forced_tail`: ``</think><answer>``).
MAX_FORCED_TOKENS = 2


@dataclass
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        # ``not (...)`` so that NaN is refused too
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, numbers.Real) or not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, numbers.Real) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
                                      or not -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed must be None or an int in [-2**63, 2**64), got {self.seed!r}")

    def generator(self) -> torch.Generator | None:
        """The sampling RNG: seeded by ``seed``, else by a draw from torch's global RNG (so
        unseeded calls differ, as transformers' ``generate`` does, and ``torch.manual_seed``
        makes them reproducible). ``None`` for greedy decoding."""
        if not self.do_sample:
            return None
        seed = int(self.seed) if self.seed is not None else int(torch.randint(0, 2**63 - 1, ()))
        return torch.Generator().manual_seed(seed)


@dataclass
class GenerationTrace:
    """Everything one decode produced; training reuses ``chunks`` as its exact sequence."""

    chunks: list[Chunk]
    label_logits: torch.Tensor  # (K,) logits of the candidate labels at the answer position
    answer_logits: torch.Tensor  # (V,) full logits at the answer position
    generated_ids: list[int] = field(default_factory=list)
    sampled_logprobs: list[float] = field(default_factory=list)
    inspected: list[int] = field(default_factory=list)
    wrote_answer: bool = False
    stop_reason: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class _PrefixKV:
    ids: torch.Tensor  # the shared prompt prefix
    cache: Any  # its KV cache (copied for every call, never written to)
    next_pos: int
    device: torch.device | None = None  # where and in which dtype it was computed: a model
    dtype: torch.dtype | None = None  # moved or cast since (.to()) needs a new one
    autocast: torch.dtype | None = None  # the autocast dtype it ran under (None: no autocast)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs ``device``'s matmuls in right now, or None when it is off.

    A prefix KV cache computed under bf16 autocast (training rollouts with
    ``mixed_precision: bf16``) holds other keys and values than one computed without it, so
    each is only reused in the mode it was computed in."""
    try:
        if not torch.is_autocast_enabled(device.type):
            return None
        return torch.get_autocast_dtype(device.type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return None


class InspectionDecoder:
    """Runs one query's reasoning with details inspection.

    Every prompt starts with the same tokens (chat frame, system prompt, ``Query: ``;
    ~85 of the ~230 tokens of a K=20 WordNet prompt in ICM mode), so inference prefills them
    once and starts each call from a copy of their KV cache (``prefix_caching``). The copy is
    taken only without gradients and with the LM in eval mode, and is recomputed when the LM
    has moved to another device or dtype, or autocast was turned on, off or to another dtype
    since; after changing weights call
    :meth:`clear_prefix_cache` (``RetrvR1Model.invalidate_signature`` does, and training
    calls that after every step).
    """

    def __init__(self, backbone: Backbone, builder: ContextBuilder, special: SpecialTokenIds, *, prefix_caching: bool = True) -> None:
        self.backbone = backbone
        self.builder = builder
        self.special = special
        self.prefix_caching = prefix_caching
        self._prefix: _PrefixKV | None = None
        self._prefix_lock = threading.Lock()

    def unwritable_ids(self) -> list[int]:
        """Tokens the model is never allowed to write: Qwen-VL's ``<|image_pad|>`` and
        ``<|video_pad|>`` stand for vision-tower embeddings that only the system places. A
        written one has no image behind it, so the mRoPE positions of the whole sequence (as
        training's forward computes them) would not exist."""
        if not self.backbone.is_vision:
            return []
        cfg = self.backbone.config
        return [int(i) for i in (getattr(cfg, "image_token_id", None), getattr(cfg, "video_token_id", None)) if i is not None]

    def clear_prefix_cache(self) -> None:
        with self._prefix_lock:
            self._prefix = None

    def _cached_prefix(self, prompt: Chunk) -> _PrefixKV | None:
        """The shared prefix's KV if ``prompt`` starts with it and caching is safe now."""
        if not self.prefix_caching or torch.is_grad_enabled() or self.backbone.model.training:
            return None
        device, dtype = self.backbone.device, self.backbone.dtype
        autocast = _autocast_dtype(device)
        with self._prefix_lock:
            if self._prefix is None or (self._prefix.device, self._prefix.dtype, self._prefix.autocast) != (device, dtype, autocast):
                ids = torch.tensor(self.builder.shared_prefix(), dtype=torch.long)  # never empty: ends with "Query: "
                state = {"cache": self.backbone.new_cache(), "next_pos": 0, "chunks": []}
                self._run(self.builder.text_chunk(ids.tolist()), state)
                self._prefix = _PrefixKV(ids=ids, cache=state["cache"], next_pos=state["next_pos"], device=device, dtype=dtype,
                                         autocast=autocast)
            prefix = self._prefix
        n = len(prefix.ids)
        if len(prompt) <= n or not torch.equal(prompt.ids[:n], prefix.ids):
            return None
        return prefix

    def _prefill(self, prompt: Chunk, state: dict) -> torch.Tensor:
        """Run the prompt, from the cached shared prefix when there is one."""
        prefix = self._cached_prefix(prompt)
        if prefix is None:
            return self._run(prompt, state)
        n = len(prefix.ids)
        state["cache"], state["next_pos"] = copy.deepcopy(prefix.cache), prefix.next_pos
        rest = Chunk(ids=prompt.ids[n:], embeds=prompt.embeds[n:], role=prompt.role, grids=prompt.grids, deepstack=prompt.deepstack)
        logits = self._run(rest, state)
        state["chunks"][-1] = prompt  # the trace keeps the whole prompt
        return logits

    def _run(self, chunk: Chunk, state: dict) -> torch.Tensor:
        pos, state["next_pos"] = self.backbone.positions(chunk.ids, chunk.grids, state["next_pos"])
        deep = mask = None
        if chunk.deepstack is not None:
            deep = [d.to(self.backbone.device) for d in chunk.deepstack]
            mask = (chunk.ids == self.backbone.image_token_id).unsqueeze(0).to(self.backbone.device)
        logits, _ = self.backbone.forward(
            chunk.embeds.unsqueeze(0).to(self.backbone.device), pos, state["cache"], deepstack=deep, visual_mask=mask
        )
        state["chunks"].append(chunk)
        return logits[0, -1].float()

    def _pick(self, logits: torch.Tensor, sampling: SamplingConfig, generator) -> tuple[int, float]:
        if not sampling.do_sample:
            tok = int(torch.argmax(logits))
            return tok, float(torch.log_softmax(logits, -1)[tok])
        scaled = logits / max(sampling.temperature, 1e-5)
        logp = torch.log_softmax(scaled, -1)
        probs = logp.exp()
        if sampling.top_p < 1.0:
            sorted_p, idx = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < sampling.top_p
            keep[0] = True  # the most likely token always stays (a tiny top_p is near-greedy, never empty)
            probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
            probs = probs / probs.sum()
        tok = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        return tok, float(logp[tok])

    def decode(
        self,
        prompt: Chunk,
        candidates: list[Encoded],
        *,
        reasoning_budget: int,
        max_inspections: int,
        sampling: SamplingConfig,
        allow_inspection: bool = True,
        script: list[int] | None = None,
        context_limit: int | None = None,
    ) -> GenerationTrace:
        """Generate with inspections. ``script`` replaces the model's choices with given
        tokens (teacher forcing for tests and fault injection); the model still runs.
        An inspection whose splice would leave no room in ``context_limit`` for the rest of
        the budget and the answer is not made: reasoning stops there (a forced answer)."""
        state = {"cache": self.backbone.new_cache(), "next_pos": 0, "chunks": []}
        generator = sampling.generator()
        logits = self._prefill(prompt, state)
        trace = GenerationTrace(chunks=state["chunks"], label_logits=torch.empty(0), answer_logits=torch.empty(0))
        thinking = int(prompt.ids[-1]) == self.special.think_start
        machine = InspectionMachine(self.special, len(candidates), reasoning_budget, max_inspections, allow_inspection)
        scripted = iter(script) if script is not None else None
        unwritable = torch.tensor(self.unwritable_ids(), dtype=torch.long)
        while thinking and not machine.done:
            if scripted is not None:
                tok = next(scripted, None)
                if tok is None:
                    machine.stop("script_end", "scripted output ended")
                    break
                logp = float(torch.log_softmax(logits, -1)[tok])
            else:
                allowed = logits.index_fill(0, unwritable.to(logits.device), float("-inf")) if len(unwritable) else logits
                tok, logp = self._pick(allowed, sampling, generator)
            trace.generated_ids.append(tok)
            trace.sampled_logprobs.append(logp)
            logits = self._run(self.builder.text_chunk([tok], role="generated"), state)
            splice = machine.step(tok)
            if splice is not None:
                chunk = self.builder.inspection_chunk(splice, candidates[splice])
                if machine.splice_fits(splice, state["chunks"], chunk, context_limit):
                    logits = self._run(chunk, state)
        trace.inspected, trace.notes = machine.inspected, machine.notes
        trace.wrote_answer, trace.stop_reason = machine.wrote_answer, machine.stop_reason
        if not thinking:
            trace.stop_reason = "direct"  # the prompt itself ends with <answer>: no reasoning budget
        else:
            tail = forced_tail(self.special, machine)
            if tail:
                logits = self._run(self.builder.text_chunk(tail, role="forced"), state)
        trace.answer_logits = logits
        labels = torch.tensor(self.special.labels[: len(candidates)], device=logits.device)
        trace.label_logits = logits[labels]
        return trace


class InspectionMachine:
    """What happens after each model-written token: nothing, a splice, or the end of reasoning.

    Shared by live decoding and by :func:`assemble_trace`, so training sees exactly the
    sequences that inference produces.
    """

    def __init__(self, special: SpecialTokenIds, num_candidates: int, budget: int, max_inspections: int, allow_inspection: bool = True) -> None:
        self.special = special
        self.k = num_candidates
        self.budget = budget
        self.max_inspections = max_inspections
        self.allow_inspection = allow_inspection
        self.written: list[int] = []
        self.inspected: list[int] = []
        self.notes: list[str] = []
        self.wrote_answer = False
        self.stop_reason = ""
        if budget < 0 or max_inspections < 0:
            raise ValueError(f"reasoning_budget and max_inspections must be >= 0, got {budget} and {max_inspections}")
        self.done = budget == 0
        if self.done:  # no reasoning at all (direct scoring): nothing was cut short, so no note
            self.stop_reason = "reasoning_budget"
        self._request_start: int | None = None

    def stop(self, reason: str, note: str | None = None) -> None:
        self.done = True
        self.stop_reason = reason
        if note:
            self.notes.append(note)

    def splice_fits(self, splice: int, chunks: list[Chunk], chunk: Chunk, context_limit: int | None) -> bool:
        """Whether splicing ``chunk`` (candidate ``splice``) after ``chunks`` leaves room in
        ``context_limit`` for the rest of the budget and the answer; if not, the inspection is
        not made and reasoning stops (a forced answer)."""
        used = sum(len(c) for c in chunks)
        if context_limit is None or used + len(chunk) + max(0, self.budget - len(self.written)) + MAX_FORCED_TOKENS <= context_limit:
            return True
        self.inspected.remove(splice)
        self.stop("context_limit", f"inspecting candidate {splice} would exceed the context limit of {context_limit} tokens; answering now")
        return False

    def step(self, tok: int) -> int | None:
        """Record one written token; returns a candidate index to splice in, or ``None``."""
        sp = self.special
        self.written.append(tok)
        splice = None
        if tok == sp.answer_start:
            self.wrote_answer = True
            self.stop("answer")
        elif tok in sp.eos:
            self.stop("eos", "the model ended its output without an answer")
        elif tok == sp.inspect_start:
            self._request_start = len(self.written)
        elif tok == sp.inspect_end and self._request_start is not None:
            named = [sp.label_index(t) for t in self.written[self._request_start : -1]]
            named = [x for x in named if x is not None]
            idx = named[0] if len(named) == 1 else None
            self._request_start = None
            if not self.allow_inspection:
                self.notes.append("inspection request ignored: candidates are already in full tokens")
            elif idx is None or idx >= self.k:
                self.notes.append("ignored an inspection request that named no valid candidate")
            elif idx in self.inspected:
                self.notes.append(f"candidate {idx} was already inspected; not spliced again")
            elif len(self.inspected) >= self.max_inspections:
                self.stop("inspection_cap", f"inspection cap of {self.max_inspections} reached; answering now")
            else:
                self.inspected.append(idx)
                splice = idx
        if not self.done and len(self.written) >= self.budget:
            self.stop("reasoning_budget", f"reasoning stopped at the budget of {self.budget} tokens")
        return splice


def forced_tail(special: SpecialTokenIds, machine: InspectionMachine) -> list[int]:
    """Tokens the system appends so that the sequence ends at an answer position."""
    if machine.wrote_answer:
        return []
    think_tags = [t for t in machine.written if t in (special.think_start, special.think_end)]
    closed = think_tags[-1:] == [special.think_end]  # the model closed its reasoning itself
    return [special.answer_start] if closed else [special.think_end, special.answer_start]


def assemble_trace(
    builder: ContextBuilder,
    special: SpecialTokenIds,
    prompt: Chunk,
    candidates: list[Encoded],
    written: list[int],
    *,
    reasoning_budget: int,
    max_inspections: int,
    allow_inspection: bool = True,
    context_limit: int | None = None,
) -> tuple[list[Chunk], InspectionMachine]:
    """The chunk sequence that decoding would build for the given written tokens, without
    running the model (for training on teacher traces and rollouts). Ends at the answer
    position. A splice that decoding would refuse under ``context_limit`` is refused here too."""
    chunks = [prompt]
    machine = InspectionMachine(special, len(candidates), reasoning_budget, max_inspections, allow_inspection)
    if int(prompt.ids[-1]) != special.think_start:
        return chunks, machine
    for tok in written:
        if machine.done:
            break
        chunks.append(builder.text_chunk([tok], role="generated"))
        splice = machine.step(tok)
        if splice is not None:
            chunk = builder.inspection_chunk(splice, candidates[splice])
            if machine.splice_fits(splice, chunks, chunk, context_limit):
                chunks.append(chunk)
    tail = forced_tail(special, machine)
    if tail:
        chunks.append(builder.text_chunk(tail, role="forced"))
    return chunks, machine
