"""Ranking metrics computed from ranked doc ids and graded qrels (pure Python).

Conventions (shared by every function here):

* ``rankings`` maps a query id to its ranked list of doc ids, best first.
* ``qrels`` maps a query id to ``{doc_id: relevance}``; a doc is *relevant* when its
  relevance is ``> 0``. Zero or negative grades count as non-relevant, and
  unjudged docs are non-relevant.
* Ids are compared as strings, so ``1`` and ``"1"`` name the same doc.
* A doc id repeated in a ranking counts only at its first position.
* Averages run over the queries of ``qrels`` that have at least one relevant doc. Such
  a query that is missing from ``rankings`` scores 0 (it retrieved nothing); rankings
  for queries without relevant docs are ignored.

Metric definitions:

* ``R@k`` (``recall_at_k``) is the *hit rate*: 1 when at least one relevant doc is in
  the top ``k``, else 0. This is the "Recall@k" of M-BEIR / UniIR and of the Retrv-R1
  paper; with a single relevant doc per query it equals classic recall. The classic
  fraction-of-relevant-docs recall is :func:`fraction_recall_at_k`.
* ``nDCG@k`` uses linear gain (gain = relevance grade) and the ``1 / log2(rank + 1)``
  discount, as trec_eval / pytrec_eval (and so BEIR) do; the ideal DCG ranks all judged
  relevant docs by grade.
* ``MRR@k`` is the reciprocal rank of the first relevant doc in the top ``k``, 0 when
  none is there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

Rankings = Mapping[str, Sequence[str]]
Qrels = Mapping[str, Mapping[str, int]]

__all__ = [
    "recall_at_k",
    "fraction_recall_at_k",
    "ndcg_at_k",
    "mrr_at_k",
    "per_query_metrics",
    "evaluate_rankings",
    "rankings_from_scores",
]


def _check_k(k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"cutoff k must be a positive int, got {k!r}")


def _dedup(ranking: Iterable[object]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for doc_id in ranking:
        key = str(doc_id)
        if key not in seen:
            seen.add(key)
            out.append(key)
    return out


def _relevant(judged: Mapping[object, int]) -> dict[str, int]:
    return {str(d): int(r) for d, r in judged.items() if r > 0}


def recall_at_k(ranking: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    """Hit rate: 1.0 if any doc with relevance > 0 is among the first ``k``, else 0.0."""
    _check_k(k)
    relevant = _relevant(judged)
    return 1.0 if any(d in relevant for d in _dedup(ranking)[:k]) else 0.0


def fraction_recall_at_k(ranking: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    """Classic recall: share of the relevant docs found in the first ``k`` (0 if none exist)."""
    _check_k(k)
    relevant = _relevant(judged)
    if not relevant:
        return 0.0
    found = sum(1 for d in _dedup(ranking)[:k] if d in relevant)
    return found / len(relevant)


def ndcg_at_k(ranking: Sequence[str], judged: Mapping[str, int], k: int = 10) -> float:
    """nDCG@k with linear gains and log2 discount; 0.0 when no doc is relevant."""
    _check_k(k)
    relevant = _relevant(judged)
    if not relevant:
        return 0.0
    dcg = sum(
        relevant.get(d, 0) / math.log2(rank + 2) for rank, d in enumerate(_dedup(ranking)[:k])
    )
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal))
    return dcg / idcg


def mrr_at_k(ranking: Sequence[str], judged: Mapping[str, int], k: int = 10) -> float:
    """Reciprocal rank of the first relevant doc within the top ``k``; 0.0 if none."""
    _check_k(k)
    relevant = _relevant(judged)
    for rank, d in enumerate(_dedup(ranking)[:k]):
        if d in relevant:
            return 1.0 / (rank + 1)
    return 0.0


def per_query_metrics(
    rankings: Rankings,
    qrels: Qrels,
    ks: Sequence[int] = (1, 5, 10),
    ndcg_k: int = 10,
    mrr_k: int = 10,
) -> dict[str, dict[str, float]]:
    """Metrics of every evaluated query: ``{qid: {"R@1": .., "nDCG@10": .., ...}}``.

    Only queries of ``qrels`` with at least one relevant doc appear (see module doc).
    """
    for k in (*ks, ndcg_k, mrr_k):
        _check_k(k)
    by_str = {str(q): r for q, r in rankings.items()}
    out: dict[str, dict[str, float]] = {}
    for qid, judged in qrels.items():
        judged_s = {str(d): r for d, r in judged.items()}
        if not _relevant(judged_s):
            continue
        ranking = _dedup(by_str.get(str(qid), ()))
        row = {f"R@{k}": recall_at_k(ranking, judged_s, k) for k in ks}
        row[f"nDCG@{ndcg_k}"] = ndcg_at_k(ranking, judged_s, ndcg_k)
        row[f"MRR@{mrr_k}"] = mrr_at_k(ranking, judged_s, mrr_k)
        out[str(qid)] = row
    return out


def evaluate_rankings(
    rankings: Rankings,
    qrels: Qrels,
    ks: Sequence[int] = (1, 5, 10),
    ndcg_k: int = 10,
    mrr_k: int = 10,
) -> dict[str, float]:
    """Mean metrics over the evaluable queries.

    With the defaults the keys are exactly ``"R@1", "R@5", "R@10", "nDCG@10",
    "MRR@10"``. Raises ``ValueError`` when no query of ``qrels`` has a relevant doc.
    """
    rows = per_query_metrics(rankings, qrels, ks, ndcg_k, mrr_k)
    keys = [f"R@{k}" for k in ks] + [f"nDCG@{ndcg_k}", f"MRR@{mrr_k}"]
    if not rows:
        raise ValueError("no query in qrels has a relevant doc (relevance > 0); nothing to evaluate")
    n = len(rows)
    return {key: sum(row[key] for row in rows.values()) / n for key in keys}


def rankings_from_scores(
    scores: Mapping[str, Mapping[str, float]], k: int | None = None
) -> dict[str, list[str]]:
    """Turn ``{qid: {doc_id: score}}`` into rankings (score descending, ties by doc id).

    NaN scores rank last. ``k`` keeps only the first ``k`` docs of each query.
    """
    if k is not None:
        _check_k(k)

    def key(item: tuple[str, float]) -> tuple[bool, float, str]:
        s = float(item[1])
        nan = math.isnan(s)
        return (nan, 0.0 if nan else -s, str(item[0]))

    out: dict[str, list[str]] = {}
    for qid, doc_scores in scores.items():
        ranked = sorted(doc_scores.items(), key=key)
        out[str(qid)] = [str(d) for d, _ in ranked[:k]]
    return out
