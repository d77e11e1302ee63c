"""Framework-free reranking logic shared by the LlamaIndex and LangChain adapters.

A framework reranker receives whatever its retriever returned, which may be more items
than the model has index labels (``config.max_candidates``). :func:`rerank` then ranks the
first ``max_candidates`` (the best of the first stage, in the order given) with the model
and appends the rest after them in their first-stage order, with scores strictly below
every reranked score, as ``training/evaluate.py`` does with ``ids[top_k:]``. With a
``window_step`` it ranks all items instead, in sliding windows of ``max_candidates``
(:meth:`RetrvR1Model.rank_windowed`).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ..windows import check_window_step
from . import FALLBACK_KEY, INSPECTED_KEY, result_metadata

if TYPE_CHECKING:
    from ..model import RetrvR1Model
    from ..types import Candidate, Query, RankResult

logger = logging.getLogger("retrv_r1_plugin.integrations")

T = TypeVar("T")

NOT_RERANKED = "not_reranked"
"""``retrv_r1_fallback`` of an item beyond the model's ``max_candidates`` (kept in first-stage order)."""


@dataclass
class Reranked:
    """The reranking of all items given to an adapter.

    ``result`` is the model's :class:`RankResult` over the first ``reranked`` items;
    ``order`` lists every item index, best first (the reranked ones, then the rest in their
    given order); ``scores[i]`` belongs to item ``i``.
    """

    result: RankResult
    order: list[int]
    scores: list[float]
    reranked: int

    @property
    def overflow(self) -> int:
        """How many items were not reranked (beyond the model's ``max_candidates``)."""
        return len(self.scores) - self.reranked

    def metadata(self, index: int, return_reasoning: bool) -> dict[str, Any]:
        """The Retrv-R1 metadata entries of item ``index``."""
        out = result_metadata(self.result, min(index, self.reranked - 1), return_reasoning)
        if index >= self.reranked:
            out[INSPECTED_KEY] = False
            out[FALLBACK_KEY] = NOT_RERANKED
        return out


def decode_base64(value: str | bytes) -> bytes:
    """The bytes of base64 ``value``, line breaks and other whitespace allowed (MIME-style
    ``base64.encodebytes`` output, as LlamaIndex's own ``ImageNode.resolve_image`` reads it);
    any other character outside the base64 alphabet raises ``binascii.Error``."""
    if isinstance(value, str):
        value = "".join(value.split())
    elif isinstance(value, (bytes, bytearray)):
        value = b"".join(bytes(value).split())
    return base64.b64decode(value, validate=True)


def to_rank(model: RetrvR1Model, items: Sequence[T], window_step: int | None = None) -> list[T]:
    """The items the model ranks: the first ``max_candidates`` (the first stage's best), or
    all of them with a ``window_step``."""
    return list(items) if window_step is not None else list(items[: model.config.max_candidates])


def reload_source(model: RetrvR1Model, owner: str) -> str:
    """The checkpoint path or bundled name a pickled ``owner`` loads ``model`` again from.

    A :class:`RetrvR1Model` itself cannot be pickled (it holds a lock, and its weights would be
    copied into every pickle), so a pickled adapter keeps where its model came from.

    Raises:
        TypeError: the model was built in memory, so nothing could load it again.
    """
    if not model.name_or_path:
        raise TypeError(
            f"cannot pickle a {owner} over a RetrvR1Model built in memory: save it with "
            f"save_pretrained(path) and give the {owner} that path (or the model loaded from "
            "it), so that the unpickled copy can load the model again"
        )
    return model.name_or_path


def rerank(
    model: RetrvR1Model,
    query: Query,
    items: Sequence[T],
    candidates: Sequence[Candidate],
    *,
    owner: str,
    warn: bool = True,
    window_step: int | None = None,
    **rank_kwargs: Any,
) -> Reranked:
    """Rank ``items`` for ``query``; items beyond ``max_candidates`` follow, unranked.

    ``candidates`` are the conversions of :func:`to_rank` ``(model, items)`` (so images of
    the other items are never loaded); the model ranks them. The other items get the scores
    ``lo - (j + 1) / (n_tail + 1)`` (``lo``: the lowest reranked score, or 0 if that is
    higher), so they sort strictly below every reranked item and keep their given order.
    With ``warn``, a warning naming ``owner`` is logged when there are such items.
    With ``window_step``, ``candidates`` are the conversions of all items and the model ranks
    them all in sliding windows moving up by that step.
    ``items`` must not be empty; ``rank_kwargs`` go to :meth:`RetrvR1Model.rank`.
    """
    if window_step is not None:
        if len(candidates) != len(items):
            raise ValueError(f"expected the candidates of all {len(items)} items, got {len(candidates)}")
        result = model.rank_windowed(query, list(candidates), step=window_step, **rank_kwargs)
        return Reranked(result=result, order=list(result.order), scores=list(result.scores), reranked=len(items))
    limit = model.config.max_candidates
    head = list(candidates)
    if len(head) != min(len(items), limit):
        raise ValueError(f"expected the candidates of the first {min(len(items), limit)} items, got {len(head)}")
    n_tail = len(items) - len(head)
    if n_tail > 0 and warn:
        logger.warning(
            "%s got %d items but the Retrv-R1 model ranks at most %d (max_candidates): the "
            "first %d are reranked and the other %d follow in their first-stage order, scored "
            "below them (retrieve at most %d, or set window_step to rerank all in sliding "
            "windows; logged once per %s instance)",
            owner, len(items), limit, limit, n_tail, limit, owner,
        )
    result = model.rank(query, head, **rank_kwargs)
    scores = list(result.scores)
    lo = min(0.0, min(scores))
    scores += [lo - (j + 1) / (n_tail + 1) for j in range(n_tail)]
    order = list(result.order) + list(range(len(head), len(items)))
    return Reranked(result=result, order=order, scores=scores, reranked=len(head))


__all__ = ["NOT_RERANKED", "Reranked", "check_window_step", "decode_base64", "reload_source", "rerank", "to_rank"]
