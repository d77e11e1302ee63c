"""Reranking more candidates than a model has index labels, in sliding windows.

A Retrv-R1 model reads at most ``config.max_candidates`` candidates at once. For longer
lists this module runs RankGPT's sliding window (Sun et al., 2023; RankLLM's
``window_size`` / ``step_size``): rank the last ``window`` candidates, move the window up by
``step``, rank again, until the window reaches the top. Anything in the overall best
``window - step`` stays inside every window it is in and is carried up to the last one, so
the final window, which decides the top of the list, holds the candidates most likely to be
the best. Cost: ``1 + ceil((n - window) / step)`` model calls for ``n`` candidates.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from .types import Candidate, Query, RankResult, TokenUsage

RankFn = Callable[..., RankResult]

# "candidate 3" in the notes RetrvR1Model.rank writes, "[inspected candidate 3]" in its reasoning:
# indices into the candidates of that call, i.e. of one window
_NOTE_INDEX = re.compile(r"\bcandidate (\d+)\b")
_MARKER_INDEX = re.compile(r"\[inspected candidate (\d+)\]")


def _to_given(pattern: re.Pattern[str], text: str, members: list[int]) -> str:
    """``text`` with the window indices that ``pattern`` finds replaced by indices of the given list."""

    def swap(m: re.Match[str]) -> str:
        j = int(m.group(1))
        return m.group(0).replace(m.group(1), str(members[j]), 1) if j < len(members) else m.group(0)

    return pattern.sub(swap, text)


def window_calls(n: int, window: int, step: int) -> int:
    """How many model calls a sliding pass over ``n`` candidates makes."""
    return 1 if n <= window else 1 + math.ceil((n - window) / step)


def check_window(window: int, step: int, limit: int) -> None:
    """Refuse window settings the pass cannot work with, naming the bound."""
    for name, value in (("window", window), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if not 2 <= window <= limit:
        raise ValueError(f"window must be between 2 and the model's max_candidates ({limit}), got {window}")
    if not 1 <= step < window:
        raise ValueError(
            f"step must be between 1 and window - 1 ({window - 1}), got {step}: the best candidate of a "
            "window moves up only if the next window overlaps it"
        )


def check_window_step(model: Any, step: int | None) -> int | None:
    """``step`` if ``model``'s sliding windows (of its ``config.max_candidates``) can move by it."""
    if step is not None:
        limit = model.config.max_candidates
        check_window(limit, step, limit)
    return step


def rank_in_windows(
    rank: RankFn,
    query: Query | str,
    candidates: Sequence[Candidate | str],
    *,
    window: int,
    step: int,
    limit: int | None = None,
    **rank_kwargs: Any,
) -> RankResult:
    """Rank all ``candidates`` with ``rank`` (e.g. ``RetrvR1Model.rank``) in sliding windows.

    ``candidates`` are in first-stage order (best first). With at most ``window`` of them this
    is one ``rank`` call and its result. Otherwise the returned :class:`RankResult` covers all
    candidates:

    * ``order``: the list after the pass, best first;
    * ``scores``: for the final (top) window, the model's probabilities in that window; below
      it, each candidate's probability in the last window that ranked it, capped at the score
      of the candidate ranked above it, so scores never rise down ``order`` (probabilities
      from different windows are not otherwise comparable);
    * ``reasoning`` and ``answer``: the final window's (``answer`` and the reasoning's
      ``[inspected candidate i]`` markers mapped to indices of ``candidates``; the model's own
      words and labels number the final window's members);
    * ``inspected``: every candidate inspected in any window; ``usage``: summed over windows;
    * ``fallback``: ``None`` only when every window gave a clean answer; otherwise the final
      window's reason, else the first earlier window's (the order below the top came from it);
      ``notes``: the windows, and any earlier window's fallback and notes (a note's
      ``candidate i`` mapped to indices of ``candidates``).

    ``rank_kwargs`` go to every ``rank`` call (``strict=True`` raises on the first window
    without a clean answer).
    """
    cands = [Candidate.coerce(c) for c in candidates]
    n = len(cands)
    limit = window if limit is None else limit
    if not (n <= 1 and window == 1 and limit == 1 and type(step) is int):  # a one-label model ranks one candidate
        check_window(window, step, limit)
    if n <= window:
        return rank(query, cands, **rank_kwargs)
    earlier_fallback: str | None = None
    order = list(range(n))
    last_prob: dict[int, float] = {}
    inspected: list[int] = []
    usage = TokenUsage()
    notes = [f"{n} candidates ranked in {window_calls(n, window, step)} sliding windows of {window} (step {step})"]
    end = n
    while True:
        start = max(0, end - window)
        members = order[start:end]
        result = rank(query, [cands[i] for i in members], **rank_kwargs)
        order[start:end] = [members[j] for j in result.order]
        for j, p in enumerate(result.scores):
            last_prob[members[j]] = p
        inspected += [members[j] for j in result.inspected if members[j] not in inspected]
        usage.prompt_tokens += result.usage.prompt_tokens
        usage.generated_tokens += result.usage.generated_tokens
        usage.inspection_tokens += result.usage.inspection_tokens
        if start == 0:
            break
        where = f"window of candidates ranked {start + 1}-{end}"
        if result.fallback is not None:
            notes.append(f"{where}: {result.fallback}")
            earlier_fallback = earlier_fallback or result.fallback
        notes += [f"{where}: {_to_given(_NOTE_INDEX, note, members)}" for note in result.notes]
        end -= step
    notes += [_to_given(_NOTE_INDEX, note, members) for note in result.notes]
    scores = [0.0] * n
    cap = math.inf
    for i in order:
        cap = scores[i] = min(last_prob[i], cap)
    return RankResult(
        order=order,
        scores=scores,
        reasoning=_to_given(_MARKER_INDEX, result.reasoning, members),
        inspected=inspected,
        usage=usage,
        answer=None if result.answer is None else members[result.answer],
        fallback=result.fallback or earlier_fallback,
        notes=notes,
        candidates=cands,
    )


__all__ = ["check_window", "check_window_step", "rank_in_windows", "window_calls"]
