"""Evaluation helpers: ranking metrics (Recall@k as hit rate, nDCG@k, MRR@k)."""

from .metrics import (
    evaluate_rankings,
    fraction_recall_at_k,
    mrr_at_k,
    ndcg_at_k,
    per_query_metrics,
    rankings_from_scores,
    recall_at_k,
)

__all__ = [
    "evaluate_rankings",
    "fraction_recall_at_k",
    "mrr_at_k",
    "ndcg_at_k",
    "per_query_metrics",
    "rankings_from_scores",
    "recall_at_k",
]
