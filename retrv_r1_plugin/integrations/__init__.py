"""Thin framework adapters over the framework-free core.

Each adapter lives in its own module and imports its framework only there, so a missing
extra fails with an error naming the pip command::

    from retrv_r1_plugin.integrations.llama_index import RetrvR1Reranker   # [llama-index]
    from retrv_r1_plugin.integrations.langchain import RetrvR1Retriever, RetrvR1Compressor  # [langchain]

The adapters only convert nodes/documents to :class:`~retrv_r1_plugin.types.Candidate`,
call :meth:`RetrvR1Model.rank <retrv_r1_plugin.model.RetrvR1Model.rank>` (or, with
``window_step``, :meth:`~retrv_r1_plugin.model.RetrvR1Model.rank_windowed`) and write the
result back. What they write into a node's / document's metadata:

* ``retrv_r1_reasoning``: the model's reasoning trace for the query (when ``return_reasoning``);
* ``retrv_r1_inspected``: whether the model inspected this candidate in full tokens;
* ``retrv_r1_fallback``: ``None`` when the ranking is the model's own clean answer, otherwise
  why it is not (e.g. ``"forced_answer"``); the scores are still the label probabilities.
  ``"not_reranked"`` marks an item beyond the model's ``max_candidates``: without
  ``window_step``, an adapter given more items reranks the first ``max_candidates`` and
  appends the others in their given order, scored below every reranked item (see
  ``_common.rerank``); with it, every item is reranked and none is so marked.

This module imports no framework and no model code at import time.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..model import RetrvR1Model
    from ..types import RankResult

REASONING_KEY = "retrv_r1_reasoning"
INSPECTED_KEY = "retrv_r1_inspected"
FALLBACK_KEY = "retrv_r1_fallback"
RETRIEVAL_SCORE_KEY = "retrieval_score"

_LAZY = {
    "RetrvR1Reranker": "llama_index",
    "LocalSentenceTransformerEmbedding": "llama_index",
    "RetrvR1Retriever": "langchain",
    "RetrvR1Compressor": "langchain",
}

__all__ = [
    "FALLBACK_KEY",
    "INSPECTED_KEY",
    "REASONING_KEY",
    "RETRIEVAL_SCORE_KEY",
    "default_device",
    "load_model",
    "result_metadata",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    """Lazy access to the adapters (importing one imports its framework)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_device() -> str:
    """The best available torch device: ``cuda``, then ``mps``, else ``cpu``."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def load_model(model: "RetrvR1Model | str | os.PathLike[str]", device: str | None = None) -> "RetrvR1Model":
    """A ready :class:`RetrvR1Model` from a loaded model or a checkpoint path/name.

    A path is loaded on ``device`` (default: :func:`default_device`, so a GPU is used when
    there is one). A loaded model is moved to ``device`` only when one is given.
    """
    from ..model import RetrvR1Model

    if isinstance(model, RetrvR1Model):
        if device is not None and str(model.device) != str(device):
            model.to(device)
        return model
    if isinstance(model, (str, os.PathLike)):
        return RetrvR1Model.from_pretrained(model, device=device or default_device())
    raise TypeError(f"model must be a RetrvR1Model or a checkpoint path/name, got {type(model).__name__}")


def model_name(model: "RetrvR1Model", given: Any) -> str:
    """The model's name in serialised settings: the path or bundled name it was loaded from
    (so ``from_dict`` loads it again), else a description of its backbone."""
    if isinstance(given, (str, os.PathLike)):
        return os.fspath(given)
    if model.name_or_path:
        return model.name_or_path
    source = model.config.backbone_source
    return f"RetrvR1Model({source or model.backbone.model_type})"


def result_metadata(result: "RankResult", index: int, return_reasoning: bool) -> dict[str, Any]:
    """The Retrv-R1 metadata entries of candidate ``index`` in ``result``."""
    out: dict[str, Any] = {}
    if return_reasoning:
        out[REASONING_KEY] = result.reasoning
    out[INSPECTED_KEY] = index in result.inspected
    out[FALLBACK_KEY] = result.fallback
    return out
