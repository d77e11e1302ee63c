"""Command lines for training and for building its data.

``main_train(["align"|"sft"|"rl", "--config", FILE, ["--resume"], ["--set", "key=value", ...]])``
runs one stage (wired as ``retrv-r1 train ...``). ``main_data`` builds examples and CoT
traces. Both also run as ``python -m training.cli train ...`` / ``python -m training.cli data ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main_train", "main_data", "main"]


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main_train(argv: Sequence[str], prog: str = "retrv-r1 train") -> int:
    """Run one training stage from a YAML config; returns a process exit code."""
    parser = argparse.ArgumentParser(prog=prog, description="Train a Retrv-R1 stage: align (ICM self-alignment), sft (activation SFT) or rl (GRPO).")
    parser.add_argument("stage", choices=["align", "sft", "rl"])
    parser.add_argument("--config", required=True, help="YAML file with the stage's fields (see training/configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeatable), e.g. --set steps=10 --set lora.r=8")
    args = parser.parse_args(list(argv))
    _setup_logging()
    from .config import load_config

    try:
        cfg = load_config(args.stage, args.config, args.overrides)
    except (OSError, ValueError, TypeError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.stage == "align":
        from .align import train_align as run
    elif args.stage == "sft":
        from .sft import train_sft as run
    else:
        from .grpo import train_rl as run
    try:
        final = run(cfg, resume=args.resume)
    except (OSError, ValueError) as exc:  # missing data, unloadable model, bad data
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.stage}: final model written to {final}")
    return 0


def _teacher(args):
    from .cot import HFTeacher, OpenAITeacher, ProgrammaticTeacher

    if args.teacher == "programmatic":
        return ProgrammaticTeacher(max_inspections=args.max_inspections, seed=args.seed)
    if args.teacher == "hf":
        if not args.model:
            raise ValueError("--teacher hf needs --model (a local model directory)")
        return HFTeacher(args.model, gguf_file=args.gguf_file, max_new_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    if not (args.base_url and args.model):
        raise ValueError("--teacher openai needs --base-url and --model")
    return OpenAITeacher(args.base_url, args.model, temperature=args.temperature, max_tokens=args.max_tokens, requests_per_minute=args.rpm, send_images=args.send_images)


def _rpm(text: str) -> float:
    """``--rpm``: a number >= 0 (0: no limit); a negative one is a usage error, not "no limit"."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number >= 0 (0 or unset: no limit), got {text!r}")
    return value


def _source(args: argparse.Namespace) -> str:
    """What ``data examples`` reads, for its error messages."""
    if args.beir:
        return f"{args.beir} (split {args.split!r})"
    return args.mbeir_queries or f"{args.qrels} over collection {args.collection!r}"


def main_data(argv: Sequence[str]) -> int:
    """Build training examples (``examples``) or CoT traces (``cot``)."""
    parser = argparse.ArgumentParser(prog="python -m training.cli data")
    sub = parser.add_subparsers(dest="what", required=True)
    ex = sub.add_parser("examples", help="query + first-stage top-K + positive, as JSONL")
    ex.add_argument("--beir", help="BEIR-layout directory (first stage: in-memory MiniLM retriever)")
    ex.add_argument("--split", default="train")
    ex.add_argument("--mbeir-queries", help="M-BEIR query JSONL (with --mbeir-pool; first stage: MiniLM over the pool's text)")
    ex.add_argument("--mbeir-pool")
    ex.add_argument("--qdrant-path", help="embedded Qdrant store folder (with --queries, --qrels)")
    ex.add_argument("--qdrant-url", help="Qdrant server URL (with --queries, --qrels)")
    ex.add_argument("--collection", default="retrv_r1")
    ex.add_argument("--queries", help="BEIR queries.jsonl for --qdrant-*")
    ex.add_argument("--qrels", help="BEIR qrels TSV for --qdrant-*")
    ex.add_argument("--first-stage", choices=["minilm", "random"], default="minilm",
                    help="--beir/--mbeir-*: MiniLM over the corpus text (default), or K documents drawn at random "
                         "(seeded; for image pools that nothing offline can embed)")
    ex.add_argument("--k", type=int, default=50)
    ex.add_argument("--max-queries", type=int)
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--out", required=True)
    cot = sub.add_parser("cot", help="four-phase reasoning traces from a teacher, as JSONL")
    cot.add_argument("--examples", required=True)
    cot.add_argument("--out", required=True)
    cot.add_argument("--cache", help="raw-output cache JSONL (resumable); default: <out>.cache.jsonl")
    cot.add_argument("--teacher", choices=["programmatic", "hf", "openai"], default="programmatic")
    cot.add_argument("--model", help="hf: model directory; openai: model name")
    cot.add_argument("--gguf-file")
    cot.add_argument("--base-url", help="openai: e.g. http://localhost:8000/v1")
    cot.add_argument("--rpm", type=_rpm, help="openai: requests per minute (0 or unset: no limit)")
    cot.add_argument("--send-images", action="store_true")
    cot.add_argument("--temperature", type=float, default=0.0)
    cot.add_argument("--max-tokens", type=int, default=1024)
    cot.add_argument("--max-inspections", type=int, default=2)
    cot.add_argument("--seed", type=int, default=0)
    cot.add_argument("--on-error", choices=["stop", "skip"], default="stop",
                     help="when a teacher call fails for good (e.g. HTTP 400 for a prompt that is too long): stop the run "
                          "(default), or skip: leave the example out, count it as 'failed', log it, and do not cache it, "
                          "so a rerun asks again")
    args = parser.parse_args(list(argv))
    _setup_logging()
    try:
        if args.what == "examples":
            from .data.formats import load_beir, load_beir_queries, load_mbeir
            from .examples import EmbeddingRetriever, RandomRetriever, examples_from_dataset, examples_from_store, write_examples

            if bool(args.mbeir_queries) != bool(args.mbeir_pool):
                raise ValueError("--mbeir-queries and --mbeir-pool go together")
            if args.beir or args.mbeir_queries:
                ds = load_beir(args.beir, split=args.split) if args.beir else load_mbeir(args.mbeir_queries, args.mbeir_pool)
                if not any(ds.qrels.values()):  # before embedding the corpus
                    raise ValueError(f"{_source(args)}: no queries with relevance judgements (is the qrels file empty?); "
                                     f"{args.out} was not written")
                if args.first_stage == "random":
                    retriever = RandomRetriever(ds.corpus, seed=args.seed)
                else:
                    retriever = EmbeddingRetriever(ds.corpus)
                examples = examples_from_dataset(ds, retriever.search, k=args.k, seed=args.seed, max_queries=args.max_queries)
            elif args.qdrant_path or args.qdrant_url:
                from retrv_r1_plugin.store.qdrant import QdrantCandidateStore

                if not (args.queries and args.qrels):
                    raise ValueError("--qdrant-* needs --queries and --qrels")
                store = QdrantCandidateStore(collection_name=args.collection, path=args.qdrant_path, url=args.qdrant_url)
                queries = load_beir_queries(args.queries)
                examples = examples_from_store(store, queries, args.qrels, k=args.k, seed=args.seed, max_queries=args.max_queries)
            else:
                raise ValueError("give --beir, --mbeir-queries/--mbeir-pool, or --qdrant-path/--qdrant-url")
            if not examples:  # an empty file would only fail later, in `data cot` or a training stage
                raise ValueError(f"{_source(args)}: no examples built, so {args.out} was not written: no query has a relevant "
                                 "document in the qrels (is the qrels file empty, or are its ids not those of the "
                                 "queries and corpus?), or the first stage found no negative for it")
            n = write_examples(args.out, examples)
            inserted = sum(e.inserted_positive for e in examples)
            print(json.dumps({"examples": n, "inserted_positive": inserted, "out": args.out}))
        else:
            from .cot import synthesize_cot
            from .examples import read_examples

            teacher = _teacher(args)
            cache = args.cache or str(Path(args.out).with_suffix(".cache.jsonl"))
            _, stats = synthesize_cot(read_examples(args.examples), teacher, args.out, cache_path=cache, on_error=args.on_error, progress=True)
            print(json.dumps({**stats.to_dict(), "out": args.out, "cache": cache}))
    except (OSError, ValueError, KeyError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # TeacherError: the teacher failed for good; what came before is cached
        from .cot import TeacherError

        if not isinstance(exc, TeacherError):
            raise
        print(f"{parser.prog}: error: {exc} (outputs so far are cached; rerun to resume, "
              "or pass --on-error skip to leave such examples out)", file=sys.stderr)
        return 1
    return 0


USAGE = """usage: python -m training.cli {train|data} ...

  train {align|sft|rl} --config FILE [--resume] [--set KEY=VALUE ...]
                      one training stage (also: retrv-r1 train ...)
  data examples ...   query + first-stage top-K + positive, as JSONL
  data cot ...        four-phase reasoning traces from a teacher, as JSONL

Run `python -m training.cli train --help` or `python -m training.cli data --help` for the options.
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return main_train(argv[1:], prog="python -m training.cli train")
    if argv and argv[0] == "data":
        return main_data(argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    print(USAGE, end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
