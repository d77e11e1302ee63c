"""GRPO rewards (Retrv-R1, arXiv 2510.02745): format reward plus curriculum result-efficiency reward.

``r = r_f + 1[correct] * (1 - lambda_t * N_ins / K)`` with ``lambda_t = t / (T - 1)`` for the 0-based
step ``t`` of ``T``: 0 at the first step, 1 at the last (the paper's ``i / N_iter``, rising from 0 to 1).

* ``r_f`` (**[ours]**: the paper names it without a definition) is ``format_weight`` when
  the written output is well formed: every inspection request is exactly
  ``<inspection-index-start><cand_i><inspection-index-end>`` naming a valid, not yet
  inspected candidate; no stray structural tokens; the model itself closed ``</think>``
  and opened ``<answer>`` within the budget; and the answer is a valid candidate label.
  Without inspection (``compression: none``: the candidates are already in full tokens and
  the decoder ignores requests) an inspection tag is a stray structural token.
* The result term is gated by correctness, so a wrong answer earns 0 whatever the number
  of inspections: skipping inspections can never pay for being wrong.
* The sum of the two is ours too (the paper does not say how they combine).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from retrv_r1_plugin.tokens import SpecialTokenIds

__all__ = ["RewardBreakdown", "curriculum_lambda", "check_format", "result_reward", "compute_reward"]


@dataclass
class RewardBreakdown:
    """The parts of one rollout's reward."""

    format: float
    result: float
    correct: bool
    format_ok: bool
    inspections: int
    lam: float

    @property
    def total(self) -> float:
        return self.format + self.result

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def curriculum_lambda(step: int, total_steps: int, schedule: str = "linear", value: float = 1.0) -> float:
    """Efficiency weight at 0-based ``step`` of ``total_steps``.

    ``linear``: ``step / (total_steps - 1)``, 0 at the first step and 1 at the last (the
    paper's ``i / N_iter``); ``constant``: ``value`` throughout (the paper's ablation).
    """
    if schedule == "constant":
        return float(value)
    if schedule != "linear":
        raise ValueError(f"unknown lambda schedule {schedule!r} (linear or constant)")
    if total_steps <= 1:
        return 1.0
    return min(1.0, max(0.0, step / (total_steps - 1)))


def check_format(special: SpecialTokenIds, written: list[int], num_candidates: int, answer: int | None, *, stop_reason: str = "answer",
                 allow_inspection: bool = True) -> tuple[bool, list[str]]:
    """Whether model-written tokens are well formed; returns ``(ok, problems)``.

    ``allow_inspection=False``: the decoder ignores inspection requests, so none is well formed.
    """
    problems: list[str] = []
    labels = set(special.labels)
    structural = {special.think_start, special.think_end, special.answer_start, special.answer_end, special.inspect_start,
                  special.inspect_end, special.inspected_start, special.inspected_end, special.content_slot, special.relation_slot}
    i, inspected = 0, set()
    body = written
    if stop_reason != "answer" or len(written) < 2 or written[-2:] != [special.think_end, special.answer_start]:
        problems.append("the model did not close </think> and open <answer> itself")
    else:
        body = written[:-2]
    while i < len(body):
        tok = body[i]
        if tok == special.inspect_start and allow_inspection:
            seg = body[i + 1 : i + 3]
            idx = special.label_index(seg[0]) if seg else None
            if len(seg) < 2 or seg[1] != special.inspect_end or idx is None:
                problems.append("malformed inspection request")
                i += 1
                continue
            if idx >= num_candidates:
                problems.append(f"inspection of candidate {idx + 1}, beyond K={num_candidates}")
            elif idx in inspected:
                problems.append(f"candidate {idx + 1} inspected twice")
            inspected.add(idx)
            i += 3
            continue
        if tok in structural:
            problems.append("stray structural token in the reasoning")
        elif tok in labels and special.label_index(tok) >= num_candidates:
            problems.append("reasoning names a candidate beyond K")
        elif tok in special.eos:
            problems.append("end of text inside the reasoning")
        i += 1
    if answer is None or not 0 <= answer < num_candidates:
        problems.append("the answer is not a candidate label")
    return not problems, problems


def result_reward(correct: bool, inspections: int, num_candidates: int, lam: float) -> float:
    """``1[correct] * (1 - lambda * N_ins / K)``."""
    if not correct:
        return 0.0
    return 1.0 - lam * inspections / max(1, num_candidates)


def compute_reward(
    special: SpecialTokenIds,
    written: list[int],
    *,
    answer: int | None,
    positive: int,
    inspections: int,
    num_candidates: int,
    lam: float,
    format_weight: float = 1.0,
    stop_reason: str = "answer",
    direct: bool = False,
    allow_inspection: bool = True,
) -> RewardBreakdown:
    """The reward of one rollout. ``direct`` (no reasoning budget): only the answer is judged.
    ``allow_inspection``: whether the decoder acted on inspection requests (see :func:`check_format`)."""
    if direct:
        ok = answer is not None and 0 <= answer < num_candidates
    else:
        ok, _ = check_format(special, written, num_candidates, answer, stop_reason=stop_reason, allow_inspection=allow_inspection)
    correct = answer is not None and answer == positive
    return RewardBreakdown(
        format=format_weight if ok else 0.0,
        result=result_reward(correct, inspections, num_candidates, lam),
        correct=correct,
        format_ok=ok,
        inspections=inspections,
        lam=lam,
    )
