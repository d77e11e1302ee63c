"""Sliding-window reranking of more candidates than the model has index labels."""

from __future__ import annotations

import math
import random

import pytest

from retrv_r1_plugin.model import TooManyCandidatesError
from retrv_r1_plugin.types import Candidate, RankResult, TokenUsage
from retrv_r1_plugin.windows import rank_in_windows, window_calls

from conftest import boost_label, make_text_model


class OracleRanker:
    """Ranks by a hidden relevance per text, like a perfect model; records every call."""

    def __init__(self, relevance: dict[str, float]) -> None:
        self.relevance = relevance
        self.calls: list[list[str]] = []

    def __call__(self, query, cands: list[Candidate], **kwargs) -> RankResult:
        texts = [c.text for c in cands]
        self.calls.append(texts)
        logits = [self.relevance[t] for t in texts]
        z = sum(math.exp(x) for x in logits)
        scores = [math.exp(x) / z for x in logits]
        order = sorted(range(len(texts)), key=lambda i: -scores[i])
        return RankResult(
            order=order, scores=scores, reasoning=f"window {len(self.calls)}", inspected=[len(texts) - 1],
            usage=TokenUsage(prompt_tokens=10, generated_tokens=2, inspection_tokens=3), answer=order[0], candidates=cands,
        )


@pytest.mark.parametrize("n,window,step", [(23, 8, 4), (50, 20, 10), (9, 4, 1), (21, 20, 19)])
def test_sliding_pass_brings_the_best_to_the_top(n, window, step):
    rng = random.Random(n)
    texts = [f"doc {i}" for i in range(n)]
    relevance = {t: rng.uniform(-3, 3) for t in texts}
    oracle = OracleRanker(relevance)
    result = rank_in_windows(oracle, "q", texts, window=window, step=step)

    assert len(oracle.calls) == window_calls(n, window, step)
    assert all(len(call) <= window for call in oracle.calls)
    assert sorted(result.order) == list(range(n))
    best = sorted(range(n), key=lambda i: -relevance[texts[i]])
    # everything in the overall best window - step is carried up to the final window, in order
    assert result.order[: window - step] == best[: window - step]
    assert result.answer == best[0]
    ranked = [result.scores[i] for i in result.order]
    assert ranked == sorted(ranked, reverse=True)  # scores never rise down the order
    final = oracle.calls[-1]
    z = sum(math.exp(relevance[t]) for t in final)
    for i in result.order[: len(final)]:  # the final window's scores are its own probabilities
        assert result.scores[i] == pytest.approx(math.exp(relevance[texts[i]]) / z)
    assert result.usage.prompt_tokens == 10 * len(oracle.calls)
    assert result.usage.generated_tokens == 2 * len(oracle.calls)
    assert result.usage.inspection_tokens == 3 * len(oracle.calls)
    assert result.reasoning == f"window {len(oracle.calls)}"
    assert [c.text for c in result.candidates] == texts
    assert result.notes[0] == f"{n} candidates ranked in {len(oracle.calls)} sliding windows of {window} (step {step})"


def test_few_candidates_are_one_plain_call():
    oracle = OracleRanker({"a": 1.0, "b": 2.0})
    result = rank_in_windows(oracle, "q", ["a", "b"], window=4, step=2)
    assert len(oracle.calls) == 1 and result.order == [1, 0] and result.notes == []


def test_inspections_are_mapped_to_the_given_indices():
    relevance = {f"d{i}": float(-i) for i in range(6)}  # first-stage order is already right
    result = rank_in_windows(OracleRanker(relevance), "q", list(relevance), window=4, step=2)
    # each window inspects its last member: window [2, 6) -> candidate 5, window [0, 4) -> candidate 3
    assert result.inspected == [5, 3]
    assert result.order == list(range(6))


@pytest.mark.parametrize(
    "window,step,match",
    [(4, 4, "step must be between 1 and window - 1 \\(3\\)"), (4, 0, "step must be"), (1, 1, "window must be between 2"),
     (9, 2, "window must be between 2 and the model's max_candidates \\(8\\)")],
)
def test_bad_window_settings_are_refused(window, step, match):
    with pytest.raises(ValueError, match=match):
        rank_in_windows(OracleRanker({}), "q", ["a"], window=window, step=step, limit=8)
    with pytest.raises(TypeError, match="step must be an int"):
        rank_in_windows(OracleRanker({}), "q", ["a"], window=4, step=2.0, limit=8)
    with pytest.raises(TypeError, match="step must be an int"):  # a bool is an int to isinstance
        rank_in_windows(OracleRanker({}), "q", ["a"], window=4, step=True, limit=8)
    with pytest.raises(TypeError, match="window must be an int"):
        rank_in_windows(OracleRanker({}), "q", ["a"], window=True, step=1, limit=8)


def test_model_ranks_more_candidates_than_labels_in_windows():
    model = boost_label(make_text_model(seed=3, max_candidates=4), 0)
    cands = [f"passage number {i}" for i in range(9)]
    with pytest.raises(TooManyCandidatesError, match="rank_windowed"):
        model.rank("q", cands, reasoning_budget=0)
    result = model.rank_windowed("q", cands, reasoning_budget=0)  # window 4, step 2: 4 calls
    assert sorted(result.order) == list(range(9)) and len(result.candidates) == 9
    assert result.notes[0] == "9 candidates ranked in 4 sliding windows of 4 (step 2)"
    # label 0 always wins: the final window's first member, candidate 0, which no earlier window moved
    assert result.answer == 0 and result.order[0] == 0 and result.fallback is None
    single = model.rank("q", cands[:4], reasoning_budget=0)
    assert result.usage.prompt_tokens > 3 * single.usage.prompt_tokens
    ranked = [result.scores[i] for i in result.order]
    assert ranked == sorted(ranked, reverse=True)
    assert model.rank_windowed("q", cands[:4], reasoning_budget=0).scores == single.scores


def test_notes_and_reasoning_markers_name_the_given_indices():
    # a window's notes and the reasoning's inspection markers number the window's own members; the
    # windowed result must name candidates by their index in the given list, like inspected/answer
    def rank(query, cands, **kwargs):
        scores = [float(c.text[1:]) + 1 for c in cands]  # later docs are better
        z = sum(scores)
        scores = [s / z for s in scores]
        order = sorted(range(len(cands)), key=lambda i: -scores[i])
        top = order[0]
        return RankResult(order=order, scores=scores, reasoning=f"look [inspected candidate {top}] fine",
                          inspected=[top], answer=top, notes=[f"candidate {top} truncated from 9 to 4 tokens"],
                          candidates=cands)

    result = rank_in_windows(rank, "q", [f"d{i}" for i in range(6)], window=4, step=2)
    assert result.order[0] == 5 and result.answer == 5
    assert result.inspected == [5]  # both windows inspected candidate 5: listed once
    assert result.reasoning == "look [inspected candidate 5] fine"
    assert result.notes[-1] == "candidate 5 truncated from 9 to 4 tokens"  # the final window's note
    assert result.notes[1] == "window of candidates ranked 3-6: candidate 5 truncated from 9 to 4 tokens"


def test_fallback_is_none_only_when_every_window_answered_cleanly():
    relevance = {f"d{i}": float(-i) for i in range(6)}

    class FallsBackOnce(OracleRanker):
        def __call__(self, query, cands, **kwargs):
            result = super().__call__(query, cands, **kwargs)
            result.fallback = "forced_answer" if len(self.calls) == 1 else None  # only the first (bottom) window
            return result

    result = rank_in_windows(FallsBackOnce(relevance), "q", list(relevance), window=4, step=2)
    assert result.fallback == "forced_answer"  # the order below the top came from a forced answer
    assert "window of candidates ranked 3-6: forced_answer" in result.notes
    clean = rank_in_windows(OracleRanker(relevance), "q", list(relevance), window=4, step=2)
    assert clean.fallback is None


@pytest.mark.parametrize("final", [None, "final_reason"])
def test_fallback_is_the_final_windows_else_the_first_earlier_windows(final):
    relevance = {f"d{i}": float(-i) for i in range(8)}  # window 4, step 2: windows [4, 8), [2, 6), [0, 4)
    reasons = ["forced_answer", "answer_out_of_range", final]

    class FallsBack(OracleRanker):
        def __call__(self, query, cands, **kwargs):
            result = super().__call__(query, cands, **kwargs)
            result.fallback = reasons[len(self.calls) - 1]
            return result

    result = rank_in_windows(FallsBack(relevance), "q", list(relevance), window=4, step=2)
    assert result.fallback == (final or "forced_answer")
    assert "window of candidates ranked 5-8: forced_answer" in result.notes
    assert "window of candidates ranked 3-6: answer_out_of_range" in result.notes


def test_a_one_label_model_ranks_a_single_candidate():
    oracle = OracleRanker({"a": 0.0})
    assert rank_in_windows(oracle, "q", ["a"], window=1, step=1, limit=1).order == [0]
    with pytest.raises(ValueError, match="window must be between 2"):
        rank_in_windows(oracle, "q", ["a", "b"], window=1, step=1, limit=1)


def test_model_errors_name_the_index_in_the_whole_list(tmp_path):
    from retrv_r1_plugin.types import EmptyCandidatesError

    model = make_text_model(seed=3, max_candidates=4)
    cands = [Candidate(text=f"passage {i}") for i in range(9)]
    cands[7] = Candidate(text="", image=b"not read before the check")  # image-only, on a text model
    with pytest.raises(ValueError, match="candidate 7 is an image without text"):
        model.rank_windowed("q", cands, reasoning_budget=0)
    with pytest.raises(EmptyCandidatesError):
        model.rank_windowed("q", [], reasoning_budget=0)
