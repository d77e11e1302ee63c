"""Stage 3, GRPO with the curriculum result-efficiency reward (Retrv-R1, arXiv 2510.02745).

Per step: ``batch_size`` examples, ``group_size`` rollouts each, sampled with the real
inspection-aware decoder (multi-turn: inspection requests splice the candidate's full
tokens into the context, on the KV cache) with an explicit sampling config. At the answer
position the answer is sampled among the candidate labels (``answer_space: labels``, as
ranking reads them) or from the whole vocabulary, always from the full distribution at the
sampling temperature (``top_p`` applies to the reasoning tokens only): every label keeps a
chance, which is what gives a group reward variance on the answer. Rewards (:mod:`training.rewards`) are
normalised within each group: ``A = (r - mean) / (std + 1e-4)`` (Dr.GRPO: no std).

The loss re-runs each rollout as one forward over the exact chunk sequence the decoder
built (:func:`retrv_r1_plugin.generation.assemble_trace` on the written tokens, prompt
recomputed with gradients through the ICM), logits divided by the sampling temperature.
Targets are the written tokens and the answer; spliced, prompt and forced tokens are
context only. Per token: ``-min(rho * A, clip(rho, 1 - eps, 1 + eps_high) * A) + beta * k3``
with ``k3 = exp(ref - logp) - (ref - logp) - 1``; ``old = logp.detach()`` from the first
pass (``num_iterations`` passes reuse it). Token averaging: ``dapo`` (default), ``grpo``
or ``dr_grpo`` (see :class:`~training.config.RLConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from retrv_r1_plugin.generation import SamplingConfig

from .config import RLConfig
from .examples import TrainingExample, read_examples
from .params import configure_trainable
from .rewards import RewardBreakdown, compute_reward, curriculum_lambda
from .sequences import build_sequence, prepare_example, target_logprobs
from .trainer import DataOrder, Trainer, check_candidate_counts, load_model, warn_ignored_images

__all__ = ["Rollout", "sample_rollouts", "group_advantages", "grpo_token_loss", "aggregate_loss", "GRPOTrainer", "train_rl", "rollout_seed"]


@dataclass
class Rollout:
    """One sampled completion and what it earned."""

    written: list[int]
    answer_token: int
    answer: int | None  # candidate index of the answer (None: not a label of this example)
    sampled_logprobs: list[float]  # per written token, then the answer
    inspected: list[int]
    stop_reason: str
    reward: RewardBreakdown | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_targets(self) -> int:
        return len(self.written) + 1


def rollout_seed(seed: int, step: int, example: int, member: int) -> int:
    """Sampling seed of one rollout: a function of the step, so a resumed run samples the same."""
    return (seed * 1_000_003 + step * 10_007 + example * 101 + member) % (2**31 - 1)


def sample_rollouts(
    model,
    example: TrainingExample,
    seeds: list[int],
    *,
    reasoning_budget: int,
    max_inspections: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    answer_space: str = "labels",
    compression: str | None = None,
    script: list[int] | None = None,
) -> list[Rollout]:
    """Sample one rollout per seed for ``example`` (no gradients). ``script`` forces the
    written tokens (tests); the answer is still sampled."""
    with torch.inference_mode():
        prompt, encoded = prepare_example(model, example, reasoning_budget=reasoning_budget, compression=compression)
        k = len(encoded)
        out = []
        for seed in seeds:
            trace = model.decoder.decode(
                prompt,
                encoded,
                reasoning_budget=reasoning_budget,
                max_inspections=max_inspections,
                sampling=SamplingConfig(do_sample=True, temperature=temperature, top_p=top_p, seed=seed),
                allow_inspection=(compression or model.config.compression) == "icm",
                script=script,
                context_limit=model.context_limit,  # as rank(): a splice past the limit is refused
            )
            logits = trace.answer_logits.float() / max(temperature, 1e-5)
            gen = torch.Generator().manual_seed(seed + 7_777)
            if answer_space == "labels":
                logp = torch.log_softmax(logits[torch.tensor(model.special.labels[:k], device=logits.device)], -1)
                idx = int(torch.multinomial(logp.exp().cpu(), 1, generator=gen))
                answer_token, answer, answer_logp = model.special.labels[idx], idx, float(logp[idx])
            else:
                logp = torch.log_softmax(logits, -1)
                answer_token = int(torch.multinomial(logp.exp().cpu(), 1, generator=gen))
                label = model.special.label_index(answer_token)
                answer = label if label is not None and label < k else None
                answer_logp = float(logp[answer_token])
            out.append(
                Rollout(
                    written=list(trace.generated_ids),
                    answer_token=answer_token,
                    answer=answer,
                    sampled_logprobs=list(trace.sampled_logprobs) + [answer_logp],
                    inspected=list(trace.inspected),
                    stop_reason=trace.stop_reason,
                )
            )
    return out


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """``(r - mean) / (std + eps)`` within each group (row); ``scale=False`` drops the std."""
    mean = rewards.mean(-1, keepdim=True)
    adv = rewards - mean
    if scale:
        adv = adv / (rewards.std(-1, keepdim=True, unbiased=True) + eps)
    return adv


def grpo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantage: float | torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped surrogate (+ ``beta * k3``); returns ``(loss, {kl, clipped})``."""
    ratio = torch.exp(logp - old_logp)
    high = epsilon if epsilon_high is None else epsilon_high
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high)
    loss = -torch.min(ratio * advantage, clipped * advantage)
    # as TRL's clip_ratio/region_mean: only tokens whose gradient the clip removes
    adv = torch.as_tensor(advantage, dtype=ratio.dtype, device=ratio.device)
    region = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
    stats: dict[str, torch.Tensor] = {"clipped": region.float().detach()}
    if ref_logp is not None and beta > 0:
        d = ref_logp - logp
        k3 = torch.exp(d) - d - 1
        loss = loss + beta * k3
        stats["kl"] = k3.detach()
    return loss, stats


def aggregate_loss(per_token: torch.Tensor, loss_type: str, *, num_sequences: int, total_tokens: int, max_len: int) -> torch.Tensor:
    """One sequence's contribution to the batch loss under a token-averaging scheme."""
    if loss_type == "dapo":
        return per_token.sum() / max(1, total_tokens)
    if loss_type == "grpo":
        return per_token.mean() / num_sequences
    if loss_type == "dr_grpo":
        return per_token.sum() / (num_sequences * max_len)
    raise ValueError(f"unknown loss_type {loss_type!r}")


class GRPOTrainer(Trainer):
    """GRPO with multi-turn inspection rollouts."""

    stage = "rl"
    cfg: RLConfig

    def setup(self) -> None:
        cfg = self.cfg
        configure_trainable(self.model, lm=cfg.lm, train_icm=cfg.train_icm, train_token_rows=cfg.train_token_rows, lora=cfg.lora, train_vision=cfg.train_vision)
        self.examples: list[TrainingExample] = read_examples(cfg.data)[: cfg.max_examples]
        warn_ignored_images(self.model, self.examples)
        check_candidate_counts(self.model, self.examples, cfg.data)
        self.order = DataOrder(len(self.examples), cfg.seed)
        self.ref = None
        if cfg.beta > 0:
            self.ref = load_model(cfg, device=self.device)
            for p in self.ref.parameters():
                p.requires_grad_(False)

    def total_updates(self) -> int:
        return self.cfg.steps * self.cfg.num_iterations

    def data_state(self) -> dict[str, Any]:
        return {**self.order.state(self.step, self.cfg.batch_size), "lambda": self.lam(self.step)}

    def lam(self, step: int) -> float:
        return curriculum_lambda(step, self.cfg.steps, self.cfg.lambda_schedule, self.cfg.lambda_value)

    def _sequence(self, model, prompt, encoded, r: Rollout):
        cfg = self.cfg
        return build_sequence(model, prompt, encoded, r.written, None, reasoning_budget=cfg.reasoning_budget, max_inspections=cfg.max_inspections,
                              allow_inspection=cfg.compression == "icm", answer_token=r.answer_token)

    def _logprobs(self, model, prompt, encoded, r: Rollout) -> torch.Tensor:
        seq = self._sequence(model, prompt, encoded, r)
        return target_logprobs(model, seq, temperature=self.cfg.temperature, answer_space=self.cfg.answer_space)

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        lam = self.lam(step)
        idxs = self.order.indices(step, cfg.batch_size)
        batch = [self.examples[i] for i in idxs]
        mine = self.local_positions(len(batch))  # data parallel: this process's examples (all with one process)
        local_groups: dict[int, list[Rollout]] = {}
        with self.autocast():
            for b in mine:
                ex = batch[b]
                seeds = [rollout_seed(cfg.seed, step, b, g) for g in range(cfg.group_size)]
                rollouts = sample_rollouts(
                    self.model, ex, seeds, reasoning_budget=cfg.reasoning_budget, max_inspections=cfg.max_inspections,
                    temperature=cfg.temperature, top_p=cfg.top_p, answer_space=cfg.answer_space, compression=cfg.compression,
                )
                for r in rollouts:
                    r.reward = compute_reward(
                        self.model.special, r.written, answer=r.answer, positive=ex.positive, inspections=len(r.inspected),
                        num_candidates=ex.k, lam=lam, format_weight=cfg.format_weight, stop_reason=r.stop_reason,
                        direct=cfg.reasoning_budget <= 0, allow_inspection=cfg.compression == "icm",
                    )
                local_groups[b] = rollouts
        # what the loss normalisation and the metrics need from every rollout of the global batch
        summary = self.gather({b: [(r.reward.total, r.num_targets, r.reward.format, r.reward.result, r.reward.correct, r.reward.format_ok,
                                    len(r.inspected), len(r.written)) for r in g] for b, g in local_groups.items()}, len(batch))
        rewards = torch.tensor([[s[0] for s in g] for g in summary], dtype=torch.float64)
        adv = group_advantages(rewards, scale=cfg.scale_rewards)
        n_seq = sum(len(g) for g in summary)
        total_tokens = sum(s[1] for g in summary for s in g)
        max_len = cfg.reasoning_budget + 1  # the most targets a rollout has: the written tokens (<= budget) and the answer
        old: dict[tuple[int, int], torch.Tensor] = {}
        ref: dict[tuple[int, int], torch.Tensor] = {}
        loss_sum = kl_sum = clipped_sum = 0.0
        mismatch = 0.0
        norm = 0.0
        stats_local: dict[int, list[list[tuple[float, float, float | None]]]] = {b: [] for b in local_groups}
        for it in range(cfg.num_iterations):
            for b, rollouts in local_groups.items():
                ex = batch[b]
                stats_local[b].append([])
                if self.ref is not None and it == 0:
                    with torch.no_grad(), self.autocast():
                        rp, re_ = prepare_example(self.ref, ex, reasoning_budget=cfg.reasoning_budget, compression=cfg.compression)
                        for g, r in enumerate(rollouts):
                            ref[(b, g)] = self._logprobs(self.ref, rp, re_, r).detach()
                with torch.enable_grad():
                    with self.autocast():
                        prompt, encoded = prepare_example(self.model, ex, reasoning_budget=cfg.reasoning_budget, compression=cfg.compression)
                    for g, r in enumerate(rollouts):
                        with self.autocast():
                            logp = self._logprobs(self.model, prompt, encoded, r)
                        if it == 0:
                            old[(b, g)] = logp.detach()
                            sampled = torch.tensor(r.sampled_logprobs, dtype=logp.dtype, device=logp.device)
                            mismatch = max(mismatch, float((sampled - old[(b, g)]).abs().max()))
                        tok_loss, stats = grpo_token_loss(
                            logp, old[(b, g)], float(adv[b, g]), epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                            ref_logp=ref.get((b, g)), beta=cfg.beta,
                        )
                        loss = aggregate_loss(tok_loss, cfg.loss_type, num_sequences=n_seq, total_tokens=total_tokens, max_len=max_len)
                        self.backward(loss, retain_graph=g < len(rollouts) - 1)
                        stats_local[b][it].append((float(loss.detach()), float(stats["clipped"].sum()), float(stats["kl"].sum()) if "kl" in stats else None))
            norm = self.update()
        per_example = self.gather({b: (s, mismatch) for b, s in stats_local.items()}, len(batch))
        for it in range(cfg.num_iterations):  # summed in the single-process order
            for s, _ in per_example:
                for loss_i, clipped_i, kl_i in s[it]:
                    loss_sum += loss_i
                    clipped_sum += clipped_i
                    if kl_i is not None:
                        kl_sum += kl_i
        mismatch = max((m for _, m in per_example), default=mismatch)
        flat = [s for g in summary for s in g]
        n = len(flat)
        zero_std = float((rewards.std(-1) < 1e-8).float().mean())
        return {
            "reward": float(rewards.mean()),
            "reward_format": sum(s[2] for s in flat) / n,
            "reward_result": sum(s[3] for s in flat) / n,
            "accuracy": sum(s[4] for s in flat) / n,
            "format_ok": sum(s[5] for s in flat) / n,
            "inspections": sum(s[6] for s in flat) / n,
            "reasoning_len": sum(s[7] for s in flat) / n,
            "frac_zero_std_groups": zero_std,
            "lambda": lam,
            "loss": loss_sum / cfg.num_iterations,
            "kl": kl_sum / max(1, total_tokens * cfg.num_iterations),
            "clip_ratio": clipped_sum / max(1, total_tokens * cfg.num_iterations),
            "logprob_mismatch": mismatch,
            "grad_norm": norm,
        }


def train_rl(cfg: RLConfig, *, resume: bool = False, model=None, stop_after: int | None = None):
    """Run stage 3; returns the final model directory (``None`` when stopped early)."""
    return GRPOTrainer(cfg, model=model).train(resume=resume, stop_after=stop_after)
