"""Training sequences: the exact chunks inference builds, plus which tokens are targets.

A :class:`TrainingSequence` is the chunk list that live decoding builds for a given set
of model-written tokens (:func:`retrv_r1_plugin.generation.assemble_trace`): the prompt,
each written token (role ``generated``), the candidates spliced in by details inspection
(role ``spliced``) and any ``</think><answer>`` the system appended (role ``forced``).
It ends at the answer position. Targets are

* every ``generated`` token, predicted from the position before it, and
* the answer label (when given), predicted at the last position (the answer position).

Prompt, spliced and forced tokens are context only: they stay in the sequence (the model
attends to them) but are never predicted, so their loss mask is zero by construction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from retrv_r1_plugin.context import Chunk, Encoded, cat_chunks
from retrv_r1_plugin.generation import InspectionMachine, assemble_trace
from retrv_r1_plugin.tokens import (
    ANSWER_END,
    ANSWER_START,
    INSPECT_END,
    INSPECT_START,
    THINK_END,
    THINK_START,
    SpecialTokenIds,
    tokenize_untrusted,
)

from .examples import TrainingExample

__all__ = [
    "TrainingSequence",
    "prepare_example",
    "build_sequence",
    "target_mask",
    "target_logprobs",
    "chunk_targets",
    "forward_hidden",
    "logits_at",
    "reasoning_to_ids",
    "check_written",
]

_STRUCT = re.compile(
    "(" + "|".join(re.escape(t) for t in (INSPECT_START, INSPECT_END, THINK_START, THINK_END, ANSWER_START, ANSWER_END)) + r"|<cand_\d+>)"
)


@dataclass
class TrainingSequence:
    """Chunks ending at the answer position, and the training targets over them."""

    chunks: list[Chunk]
    full: Chunk
    target_positions: torch.Tensor  # (T,) positions whose logits predict each target
    target_ids: torch.Tensor  # (T,) the target token ids
    answer: int | None  # 0-based candidate index of the answer target (None: no target, or not a label)
    num_candidates: int
    machine: InspectionMachine
    answer_target: bool = False  # the last target is the answer, predicted at the last position

    def __len__(self) -> int:
        return len(self.full)


def prepare_example(model, example: TrainingExample, *, reasoning_budget: int, compression: str | None = None) -> tuple[Chunk, list[Encoded]]:
    """Initial context of one example under the current grad mode (grads reach the ICM)."""
    prompt, encoded, _ = model.prepare(
        example.query(),
        example.candidate_objects(),
        compression=compression,
        think=reasoning_budget > 0,
        reasoning_budget=reasoning_budget,
    )
    return prompt, encoded


def target_mask(chunks: list[Chunk]) -> torch.Tensor:
    """Boolean mask over the concatenated tokens: ``True`` where the token is a model-written target."""
    return torch.cat([torch.full((len(c),), c.role == "generated", dtype=torch.bool) for c in chunks])


def build_sequence(
    model,
    prompt: Chunk,
    encoded: list[Encoded],
    written: list[int],
    answer: int | None,
    *,
    reasoning_budget: int,
    max_inspections: int,
    allow_inspection: bool = True,
    answer_token: int | None = None,
) -> TrainingSequence:
    """The training sequence for ``written`` tokens (as the model wrote them) and an answer.

    ``answer`` is a candidate index whose label is the target at the answer position;
    ``answer_token`` instead gives that target as any token id (a sampled non-label answer).
    """
    chunks, machine = assemble_trace(
        model.builder,
        model.special,
        prompt,
        encoded,
        list(written),
        reasoning_budget=reasoning_budget,
        max_inspections=max_inspections,
        allow_inspection=allow_inspection,
        context_limit=model.context_limit,  # as decoding: a rollout whose splice was refused is rebuilt without it
    )
    full, positions, ids = chunk_targets(chunks)
    if answer is not None and answer_token is not None:
        raise ValueError("give answer or answer_token, not both")
    if answer is not None:
        if not 0 <= answer < len(encoded):
            raise ValueError(f"answer {answer} is not a candidate index (K={len(encoded)})")
        answer_token = model.special.labels[answer]
    elif answer_token is not None:
        idx = model.special.label_index(answer_token)
        answer = idx if idx is not None and idx < len(encoded) else None
    if answer_token is not None:
        positions = torch.cat([positions, torch.tensor([len(full) - 1])])
        ids = torch.cat([ids, torch.tensor([answer_token])])
    return TrainingSequence(chunks, full, positions.long(), ids.long(), answer, len(encoded), machine, answer_token is not None)


def chunk_targets(chunks: list[Chunk]) -> tuple[Chunk, torch.Tensor, torch.Tensor]:
    """Concatenate chunks; positions predicting each ``generated`` token, and those tokens."""
    full = cat_chunks(chunks)
    mask = target_mask(chunks)
    mask[0] = False  # the first token has no previous position
    token_pos = torch.nonzero(mask).squeeze(1)
    return full, (token_pos - 1).long(), full.ids[token_pos].long()


def forward_hidden(model, full: Chunk) -> torch.Tensor:
    """Last hidden states ``(1, n, H)`` of one whole sequence (fresh positions, no cache)."""
    bb = model.backbone
    pos, _ = bb.positions(full.ids, full.grids, 0)
    deep = mask = None
    if full.deepstack is not None:
        deep = [d.to(bb.device) for d in full.deepstack]
        mask = (full.ids == bb.image_token_id).unsqueeze(0).to(bb.device)
    _, hidden = bb.forward(full.embeds.unsqueeze(0).to(bb.device), pos, None, deepstack=deep, visual_mask=mask, logits="none")
    return hidden


def logits_at(model, hidden: torch.Tensor, positions: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """float32 logits ``(T, V)`` at ``positions``, divided by ``temperature``."""
    return model.backbone.lm_head(hidden[0, positions.to(hidden.device)]).float() / max(temperature, 1e-5)


def target_logprobs(
    model,
    seq: TrainingSequence,
    *,
    temperature: float = 1.0,
    answer_space: str = "vocab",
    return_hidden: bool = False,
):
    """Log-probabilities of the targets under the model, one forward over the whole sequence.

    Logits are divided by ``temperature`` (as when sampling). ``answer_space="labels"``
    normalises the answer over the K candidate labels only (label-constrained answer
    sampling); ``"vocab"`` over the full vocabulary. Returns ``(T,)`` float32 log-probs
    (and the ``(1, n, H)`` last hidden states when ``return_hidden``).
    """
    if answer_space not in ("vocab", "labels"):
        raise ValueError(f"answer_space must be 'vocab' or 'labels', got {answer_space!r}")
    hidden = forward_hidden(model, seq.full)
    logits = logits_at(model, hidden, seq.target_positions, temperature)
    ids = seq.target_ids.to(hidden.device)
    logp = torch.log_softmax(logits, -1).gather(1, ids.unsqueeze(1)).squeeze(1)
    if seq.answer_target and answer_space == "labels":
        if seq.answer is None:
            raise ValueError("answer_space='labels' needs an answer that is a candidate label")
        labels = torch.tensor(model.special.labels[: seq.num_candidates], device=hidden.device)
        answer_logp = torch.log_softmax(logits[-1, labels], -1)[seq.answer]
        logp = torch.cat([logp[:-1], answer_logp.unsqueeze(0)])
    return (logp, hidden) if return_hidden else logp


def reasoning_to_ids(tokenizer, special: SpecialTokenIds, text: str) -> list[int]:
    """Token ids of a reasoning text, token-in/token-out safe.

    The structural tokens (inspection tags, ``<cand_N>`` labels, ``</think>``, ``<answer>``)
    become their single ids; everything else is tokenized as untrusted text, so no other
    special token can appear. A leading ``<think>`` is dropped (the prompt already ends with it).
    """
    added = tokenizer.get_added_vocab()  # structural tokens are added tokens: a small dict
    vocab: dict[str, int] | None = None  # the full vocabulary, built only if one is not
    ids: list[int] = []
    for i, part in enumerate(_STRUCT.split(text)):
        if not part:
            continue
        if i % 2 == 1:
            if part == THINK_START and not ids:
                continue
            if part not in added:
                vocab = vocab if vocab is not None else tokenizer.get_vocab()
                if part not in vocab:
                    raise ValueError(f"reasoning names {part!r}, which this model has no token for")
            ids.append(added[part] if part in added else vocab[part])
        else:
            ids.extend(tokenize_untrusted(tokenizer, part, special.forbidden_in_untrusted))
    return ids


def strip_inspection_requests(special: SpecialTokenIds, written: list[int]) -> list[int]:
    """``written`` without its inspection requests (``<inspection-index-start> ...
    <inspection-index-end>``), for models that read every candidate in full tokens: their
    decoder ignores requests, and GRPO's format reward refuses them."""
    out: list[int] = []
    inside = False
    for tok in written:
        if tok == special.inspect_start:
            inside = True
        elif inside and tok == special.inspect_end:
            inside = False
        elif not inside:
            out.append(tok)
    return out


def check_written(special: SpecialTokenIds, written: list[int], num_candidates: int, *, reasoning_budget: int, max_inspections: int, allow_inspection: bool = True) -> InspectionMachine:
    """Run the inspection state machine over written tokens (no model needed)."""
    machine = InspectionMachine(special, num_candidates, reasoning_budget, max_inspections, allow_inspection)
    for tok in written:
        if machine.done:
            break
        machine.step(tok)
    return machine
