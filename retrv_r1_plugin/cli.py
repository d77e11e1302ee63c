"""``retrv-r1``: index a corpus into Qdrant, search and rerank, train, evaluate.

    retrv-r1 index ./docs                      # folder of text/image files, JSONL, or BEIR corpus.jsonl
    retrv-r1 search "how do plants make food?" --model retrv-r1-smollm2-wordnet
    retrv-r1 search "a sleeping cat" --image cat.jpg --model ./my-vl-checkpoint   # text finds, VL model reads the image
    retrv-r1 rank "query" "candidate one" "candidate two" --model PATH
    retrv-r1 train sft --config training/configs/sft.yaml
    retrv-r1 eval --beir DIR --model MODEL --top-k 20 --output results.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Iterable

from ._optional import MissingExtraError
from .jsonl import DataFormatError, read_jsonl
from .progress import hub_progress
from .types import Candidate, Query, RankResult, RetrvR1Error
from .windows import check_window_step

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
# Ordered: an image's caption is the first of these that exists next to it (x.txt before x.md).
TEXT_SUFFIXES = (".txt", ".md", ".rst")
DEFAULT_MODEL_ENV = "RETRV_R1_MODEL"
DEFAULT_MODEL = "retrv-r1-smollm2-wordnet"


# ----------------------------------------------------------------------------- corpus reading
def read_corpus(path: str | os.PathLike) -> list[Candidate]:
    """Candidates from a folder of files, a JSONL file, or a BEIR ``corpus.jsonl``.

    JSONL lines may use BEIR keys (``_id``, ``title``, ``text``) or ours (``id``, ``text``,
    ``image_path``, ``metadata``); relative image paths resolve against the file's folder.
    In a folder, ``x.txt`` next to ``x.jpg`` is that image's caption (``.txt``, then ``.md``,
    then ``.rst``: the first that exists); any other text file is a document of its own.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file or folder: {p}")
    if p.is_dir():
        return _read_folder(p)
    if p.is_file() and p.suffix.lower() in (".jsonl", ".json"):
        return list(_read_jsonl(p))
    raise FileNotFoundError(f"{p} is neither a folder nor a .jsonl file")


def _read_folder(folder: Path) -> list[Candidate]:
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    # Suffixes match in any case (IMG_1.JPG + IMG_1.TXT), as they do when classifying files.
    texts: dict[Path, list[Path]] = {}
    for f in files:
        if f.suffix.lower() in TEXT_SUFFIXES:
            texts.setdefault(f.with_suffix(""), []).append(f)
    captions: dict[Path, Path] = {}  # image -> its caption file: .txt, then .md, then .rst
    for f in files:
        if f.suffix.lower() in IMAGE_SUFFIXES and texts.get(f.with_suffix("")):
            captions[f] = min(texts[f.with_suffix("")], key=lambda t: (TEXT_SUFFIXES.index(t.suffix.lower()), t.name))
    used_as_caption = set(captions.values())
    out: list[Candidate] = []
    for f in files:
        rel = str(f.relative_to(folder))
        if f.suffix.lower() in IMAGE_SUFFIXES:
            caption = _read_text_file(captions[f]) if f in captions else ""
            out.append(Candidate(text=caption, image=str(f), id=rel, metadata={"file_path": str(f)}))
        elif f.suffix.lower() in TEXT_SUFFIXES and f not in used_as_caption:
            # a second text file with an image's stem (x.md next to x.txt and x.jpg) is its own document
            out.append(Candidate(text=_read_text_file(f), id=rel, metadata={"file_path": str(f)}))
    if not out:
        raise ValueError(f"no text ({list(TEXT_SUFFIXES)}) or image files found in {folder}")
    return out


def _read_text_file(path: Path) -> str:
    """A text file's content: UTF-8 whatever the locale (a leading BOM dropped; bytes that are
    not UTF-8 become U+FFFD), stripped."""
    return path.read_bytes().decode("utf-8-sig", errors="replace").strip()


def _read_jsonl(path: Path) -> Iterable[Candidate]:
    """Candidates from a JSON-lines corpus (``id``/``_id``, ``text``, ``title``, ``image_path``)."""
    for lineno, row in read_jsonl(path, "corpus file"):
        where = f"{path}:{lineno}"

        def field(name: str, types: type | tuple[type, ...], what: str):
            value = row.get(name)
            if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
                raise DataFormatError(f"{where}: {name!r} must be {what}, got {type(value).__name__}")
            return value

        id_key = "_id" if "_id" in row else "id"
        ident = field(id_key, (str, int), "a string or an integer")
        text = field("text", str, "a string") or ""
        title = field("title", str, "a string") if "_id" in row else None
        if title:
            text = f"{title}: {text}" if text else title
        image = field("image_path", str, "a path string") or field("image", str, "a path string")
        if image and not os.path.isabs(image):
            image = str(path.parent / image)
        if image and not os.path.isfile(image):  # named here with the line (the store knows only an index)
            raise DataFormatError(f"{where}: image file not found: {image}")
        if not text and not image:
            raise DataFormatError(f"{where}: a line needs 'text' or 'image_path'")
        meta = dict(field("metadata", dict, "a JSON object") or {})
        yield Candidate(text=text, image=image, id=str(ident) if ident is not None else None, metadata=meta)


# ----------------------------------------------------------------------------- helpers
def check_device(device: str | None) -> None:
    """Raise ``ValueError`` naming ``--device`` when torch cannot use ``device`` here
    (an unknown device type, or CUDA/MPS that this machine or torch build lacks)."""
    if device is None:
        return
    import torch

    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(f"--device {device!r} is not usable here: {reason}") from exc


def load_model(name: str | None, device: str | None = None):
    from .backbone import ModelLoadError
    from .model import RetrvR1Model

    check_device(device)
    if name:
        return RetrvR1Model.from_pretrained(name, device=device)
    env = os.environ.get(DEFAULT_MODEL_ENV)
    if not env:
        return RetrvR1Model.from_pretrained(DEFAULT_MODEL, device=device)
    try:
        return RetrvR1Model.from_pretrained(env, device=device)
    except ModelLoadError as exc:  # say where the name came from: no --model was given
        raise ModelLoadError(f"${DEFAULT_MODEL_ENV}={env}: {exc}") from exc


def add_embedder_args(p: argparse.ArgumentParser, image_note: str = "") -> None:
    """``--embedder`` / ``--image-embedder FOLDER`` (one or the other), for index, search and eval."""
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--embedder", metavar="FOLDER",
                      help="first-stage text embedder: a sentence-transformers model folder (default: the bundled "
                           "all-MiniLM-L6-v2); index and search with the same one")
    kind.add_argument("--image-embedder", metavar="FOLDER",
                      help="a sentence-transformers folder of a CLIP-like model that embeds images and texts: images "
                           "are indexed and searched by their pixels, so they need no caption" + image_note)


def embedder_from_args(args: argparse.Namespace):
    """The store embedder ``--embedder`` / ``--image-embedder`` name (``None``: the store's default).
    A folder that does not exist is refused by name; the model itself loads on first use."""
    from .store import SentenceTransformerImageTextEmbedder, TextEmbedder

    for option, folder, kind in (("--embedder", args.embedder, TextEmbedder),
                                 ("--image-embedder", args.image_embedder, SentenceTransformerImageTextEmbedder)):
        if folder is not None:
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{option} {folder}: no such folder (give a sentence-transformers model "
                                        "folder; nothing is downloaded)")
            return kind(folder)
    return None


def check_store_folder(store: str) -> None:
    """Refuse a ``--store`` that names an existing file (the embedded Qdrant store is a folder)."""
    if os.path.exists(store) and not os.path.isdir(store):
        raise ValueError(f"--store {store}: not a folder (the embedded Qdrant store is a folder)")


def open_store(args: argparse.Namespace):
    from .store import QdrantCandidateStore

    kwargs: dict = {"collection_name": args.collection}
    embedder = embedder_from_args(args)
    if embedder is not None:
        kwargs["embedder"] = embedder
    if getattr(args, "image_root", None):
        kwargs["image_roots"] = args.image_root
    if args.url:
        kwargs.update(url=args.url, api_key=args.api_key or os.environ.get("QDRANT_API_KEY"))
    elif args.store:
        check_store_folder(args.store)
        kwargs["path"] = args.store
    return QdrantCandidateStore(**kwargs)


def print_ranking(result: RankResult, top_n: int, show_reasoning: bool = True) -> None:
    for rank, (i, score) in enumerate(result.top_k(top_n), 1):
        cand = result.candidates[i]
        label = cand.id or f"#{i}"
        text = " ".join(cand.text.split())[:100]
        kind = " [image]" if cand.image is not None else ""
        mark = " (inspected)" if i in result.inspected else ""
        print(f"{rank:>2}. {score:.3f}  {label}{kind}{mark}  {text}")
    if result.fallback:
        print(f"   fallback: {result.fallback}")
    if show_reasoning and result.reasoning:
        print(f"   reasoning: {' '.join(result.reasoning.split())[:400]}")


def result_json(result: RankResult, top_n: int) -> dict:
    return {
        "ranking": [
            {"index": i, "id": result.candidates[i].id, "score": s, "text": result.candidates[i].text,
             "inspected": i in result.inspected}
            for i, s in result.top_k(top_n)
        ],
        "reasoning": result.reasoning,
        "fallback": result.fallback,
        "notes": result.notes,
        "usage": vars(result.usage) | {"context_tokens": result.usage.context_tokens},
    }


# ----------------------------------------------------------------------------- commands
def cmd_index(args: argparse.Namespace) -> int:
    candidates = read_corpus(args.path)
    model = None
    if args.model:  # check the model before writing anything to the store
        model = load_model(args.model, args.device)
        if not model.icm_available:
            raise ValueError(
                f"--model {args.model}: caching content tokens needs a checkpoint with a trained ICM, "
                "and this one has none (it reads candidates in full tokens); index without --model"
            )
    from .store import ImageEmbedderRequiredError

    with open_store(args) as store:
        try:
            ids = store.add(candidates, batch_size=args.batch_size, show_progress=not args.quiet)
        except ImageEmbedderRequiredError as exc:
            raise ImageEmbedderRequiredError(f"{exc} (here: a caption file x.txt next to x.jpg, or "
                                             "--image-embedder FOLDER)") from exc
        if model is not None:
            tokens = model.encode_candidates(candidates)
            store.put_content_tokens(ids, tokens, model.content_signature, contents=candidates)
        print(f"indexed {len(ids)} candidates into collection {args.collection!r} ({store.count()} in total)")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    query = Query(text=args.query, image=args.image)
    from .store import first_stage_query

    with open_store(args) as store:
        # a typo in --collection or --store fails here, before seconds of model loading
        if not store.client.collection_exists(args.collection):
            raise ValueError(f"no collection {args.collection!r} in {store.url or store.path}: "
                             f"index a corpus into it first (retrv-r1 index PATH --collection {args.collection})")
        model = load_model(args.model, args.device)
        top_k = args.top_k
        if args.window_step is not None:
            try:
                check_window_step(model, args.window_step)
            except ValueError as exc:
                raise ValueError(f"--window-step {args.window_step}: {exc}") from exc
        elif top_k > model.config.max_candidates:
            print(f"retrv-r1: note: --top-k {top_k} capped at {model.config.max_candidates}, "
                  "the most candidates this model ranks at once (--window-step ranks more)", file=sys.stderr)
            top_k = model.config.max_candidates
        first = first_stage_query(query, store.supports_images)  # text-only store: search by the text
        candidates = store.search(first, top_k=top_k, with_content_tokens=model.content_signature)
    if not candidates:
        if args.json:
            print(json.dumps({"ranking": [], "reasoning": "", "fallback": None,
                              "notes": ["no results: the collection is empty"], "usage": None}, indent=2))
        else:
            print("no results: the collection is empty")
        return 0
    settings = dict(reasoning_budget=args.reasoning_budget, max_inspections=args.max_inspections)
    if args.window_step is None:
        result = model.rank(query, candidates, **settings)
    else:
        result = model.rank_windowed(query, candidates, step=args.window_step, **settings)
    if args.json:
        print(json.dumps(result_json(result, args.top_n), indent=2))
    else:
        print_ranking(result, args.top_n)
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    model = load_model(args.model, args.device)
    result = model.rank(Query(text=args.query, image=args.image), args.candidates,
                        reasoning_budget=args.reasoning_budget, max_inspections=args.max_inspections)
    if args.json:
        print(json.dumps(result_json(result, len(args.candidates)), indent=2))
    else:
        print_ranking(result, len(args.candidates))
    return 0


def cmd_train(argv: list[str]) -> int:
    from ._optional import require

    require("matplotlib", "train")  # training curves; the rest of training/ needs only core dependencies
    from training.cli import main_train

    return main_train(argv)


def cmd_eval(argv: list[str]) -> int:
    from training.evaluate import main_eval

    return main_eval(argv)


def _int_at_least(least: int):
    """An argparse ``type`` for ints >= ``least`` (a bad value is a usage error, exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be an int >= {least}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retrv-r1", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def store_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", help="embedded Qdrant folder (default: the user data directory)")
        p.add_argument("--url", help="Qdrant server URL (server or cluster mode)")
        p.add_argument("--api-key", help="Qdrant API key; prefer $QDRANT_API_KEY, since other users can read a command line")
        p.add_argument("--collection", default="retrv_r1")
        add_embedder_args(p)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help=f"checkpoint path or bundled name (default: ${DEFAULT_MODEL_ENV} or {DEFAULT_MODEL})")
        p.add_argument("--device", help="torch device, e.g. cpu or cuda")
        p.add_argument("--reasoning-budget", type=non_negative_int, default=None,
                       help="tokens the model may think before answering; 0 scores directly (default: the model's)")
        p.add_argument("--max-inspections", type=non_negative_int, default=None,
                       help="cap on full-token inspections (default: the model's)")
        p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("index", help="index a folder, JSONL file or BEIR corpus.jsonl")
    p.add_argument("path")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--model", help="also cache this model's content tokens in the store")
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true")
    store_args(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="first-stage search, then rerank with Retrv-R1")
    p.add_argument("query")
    p.add_argument("--image", help="query image (path) for the reranker; the first stage searches by the query "
                                   "text (so give text too), or by both with --image-embedder")
    p.add_argument("--top-k", type=positive_int, default=20,
                   help="candidates from the first stage (capped at the model's max_candidates unless --window-step)")
    p.add_argument("--window-step", type=positive_int, default=None,
                   help="rank all --top-k candidates in sliding windows of the model's max_candidates, moving up "
                        "by this many (one model call per window)")
    p.add_argument("--top-n", type=positive_int, default=5, help="results to print")
    p.add_argument("--image-root", action="append", metavar="DIR",
                   help="read a hit's image only if its path lies in DIR (repeatable); for collections others "
                        "write to, so a point cannot make the reranker read any image file (default: any path)")
    store_args(p)
    model_args(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("rank", help="rerank candidates given on the command line")
    p.add_argument("query")
    p.add_argument("candidates", nargs="+")
    p.add_argument("--image", help="image query (path)")
    model_args(p)
    p.set_defaults(func=cmd_rank)

    sub.add_parser("train", help="training stages: align | sft | rl (see training/)", add_help=False)
    sub.add_parser("eval", help="evaluate on a BEIR or M-BEIR set", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with hub_progress(enabled="--quiet" not in argv[1:]):  # index / eval --quiet: no "Loading weights" bars
        try:
            if argv and argv[0] == "train":
                return cmd_train(argv[1:])
            if argv and argv[0] == "eval":
                return cmd_eval(argv[1:])
            args = build_parser().parse_args(argv)
            return args.func(args)
        except (RetrvR1Error, OSError, ValueError, MissingExtraError) as exc:  # OSError: e.g. --store names a file
            print(f"retrv-r1: error: {exc}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    raise SystemExit(main())
