"""Stage 2, activation SFT (Retrv-R1, arXiv 2510.02745): LM (LoRA or full) and ICM train jointly.

Each CoT trace becomes the exact sequence inference would build for it: the prompt with
compressed candidates (grads flow into the ICM), the written reasoning token by token,
each requested candidate's full tokens spliced in after its inspection request, and the
answer position. The loss is token-mean cross-entropy over the model-written tokens (the
reasoning, inspection requests, ``</think><answer>``) plus the answer label; prompt and
spliced tokens are context only (:mod:`training.sequences`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .config import SFTConfig
from .cot import CoTTrace, read_traces
from .params import configure_trainable
from .sequences import (
    build_sequence,
    check_written,
    logits_at,
    prepare_example,
    reasoning_to_ids,
    strip_inspection_requests,
    target_logprobs,
)
from .trainer import DataOrder, Trainer, check_candidate_counts, warn_ignored_images

logger = logging.getLogger(__name__)

__all__ = ["SFTTrainer", "candidate_order", "train_sft", "trace_tokens"]


def candidate_order(seed: int, step: int, position: int, k: int, probability: float = 1.0) -> list[int] | None:
    """The seeded random candidate order of batch ``position`` at ``step``, or ``None``
    (keep the first-stage order) with probability ``1 - probability``. A function of its
    arguments only, so resumed and data-parallel runs see the same orders."""
    if probability <= 0.0:
        return None
    g = torch.Generator().manual_seed((seed * 1_000_003 + step * 10_007 + position) % (2**63 - 1))
    if probability < 1.0 and float(torch.rand((), generator=g)) >= probability:
        return None
    return torch.randperm(k, generator=g).tolist()


def trace_tokens(model, trace: CoTTrace, allow_inspection: bool = True) -> list[int]:
    """Model-written token ids of a trace: its reasoning, then ``<answer>`` (the label follows as target).

    Without inspection (``compression: none``) the trace's inspection requests are left out:
    inference would ignore them and GRPO's format reward refuses them."""
    ids = reasoning_to_ids(model.tokenizer, model.special, trace.reasoning)
    if not allow_inspection:
        ids = strip_inspection_requests(model.special, ids)
    return ids + [model.special.answer_start]


class SFTTrainer(Trainer):
    """Activation SFT on CoT traces."""

    stage = "sft"
    cfg: SFTConfig

    def setup(self) -> None:
        cfg = self.cfg
        configure_trainable(self.model, lm=cfg.lm, train_icm=cfg.train_icm, train_token_rows=cfg.train_token_rows, lora=cfg.lora, train_vision=cfg.train_vision)
        traces = read_traces(cfg.data)[: cfg.max_examples]
        warn_ignored_images(self.model, [t.example for t in traces])
        check_candidate_counts(self.model, [t.example for t in traces], cfg.data)
        self.items: list[tuple[CoTTrace, list[int]]] = []
        dropped = stripped = 0
        inspect = cfg.compression == "icm"
        for t in traces:
            if cfg.reasoning_budget == 0:  # direct mode: the prompt ends with <answer>, nothing is written
                self.items.append((t, []))
                continue
            full = trace_tokens(self.model, t)
            written = full if inspect else strip_inspection_requests(self.model.special, full)
            stripped += len(written) != len(full)
            machine = check_written(self.model.special, written, t.example.k, reasoning_budget=cfg.reasoning_budget, max_inspections=cfg.max_inspections, allow_inspection=inspect)
            if machine.stop_reason != "answer" or len(machine.written) != len(written):
                dropped += 1  # over the reasoning budget or the inspection cap: inference could not produce it
                continue
            self.items.append((t, written))
        if stripped:
            logger.warning("compression: none reads every candidate in full tokens, so the inspection requests "
                           "of %d of %d traces were left out of their targets", stripped, len(traces))
        if dropped:
            logger.warning("dropped %d of %d traces that exceed reasoning_budget=%d or max_inspections=%d", dropped, len(traces), cfg.reasoning_budget, cfg.max_inspections)
        if not self.items:
            raise ValueError(f"no usable traces in {cfg.data}")
        self.dropped = dropped
        self.order = DataOrder(len(self.items), cfg.seed)

    def data_state(self) -> dict[str, Any]:
        return {**self.order.state(self.step, self.cfg.batch_size), "dropped_traces": self.dropped}

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        batch = [self.items[i] for i in self.order.indices(step, cfg.batch_size)]
        w = cfg.answer_weight
        targets = sum(len(written) + 1 for _, written in batch)  # over the global batch (data parallel: every process's share)
        total = targets + (w - 1.0) * len(batch)  # the answers count w times
        local: dict[int, tuple[float, float, int, int]] = {}
        for j in self.local_positions(len(batch)):
            trace, written = batch[j]
            order = candidate_order(cfg.seed, step, j, trace.example.k, cfg.shuffle_candidates)
            if order is not None:
                trace = trace.permuted(order)
                if written:
                    written = trace_tokens(self.model, trace, allow_inspection=cfg.compression == "icm")
            with torch.enable_grad():
                with self.autocast():
                    prompt, encoded = prepare_example(self.model, trace.example, reasoning_budget=cfg.reasoning_budget, compression=cfg.compression)
                    seq = build_sequence(self.model, prompt, encoded, written, trace.answer, reasoning_budget=cfg.reasoning_budget,
                                         max_inspections=cfg.max_inspections, allow_inspection=cfg.compression == "icm")
                    logp, hidden = target_logprobs(self.model, seq, answer_space=cfg.answer_space, return_hidden=True)
                nll = -logp.sum()
                # the answer is one token among the trace's; answer_weight keeps it from being drowned out
                objective = nll if w == 1.0 else nll - (w - 1.0) * logp[-1]
                self.backward(objective / total)
            with torch.no_grad():
                # greedy pick among the labels at the answer position (what ranking reports)
                last = logits_at(self.model, hidden.detach(), torch.tensor([len(seq) - 1]))[0]
                labels = torch.tensor(self.model.special.labels[: seq.num_candidates], device=last.device)
                hit = int(int(torch.argmax(last[labels])) == trace.answer)
            local[j] = (float(nll.detach()), float(-logp[-1].detach()), len(seq.machine.inspected), hit)
        norm = self.update()
        nll_sum = answer_nll = 0.0
        correct = inspections = 0
        for nll_j, answer_j, inspections_j, hit_j in self.gather(local, len(batch)):  # in batch order
            nll_sum += nll_j
            answer_nll += answer_j
            inspections += inspections_j
            correct += hit_j
        n = len(batch)
        return {
            "loss": nll_sum / targets,
            "answer_loss": answer_nll / n,
            "answer_accuracy": correct / n,
            "inspections": inspections / n,
            "target_tokens": float(total),
            "grad_norm": norm,
        }


def train_sft(cfg: SFTConfig, *, resume: bool = False, model=None, stop_after: int | None = None):
    """Run stage 2; returns the final model directory (``None`` when stopped early)."""
    return SFTTrainer(cfg, model=model).train(resume=resume, stop_after=stop_after)
