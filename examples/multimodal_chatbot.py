"""A small image-retrieval chatbot: LlamaIndex ``RetrvR1Reranker`` over image (and text) nodes.

Two corpora, both bundled:

* ``--corpus sample`` (default): the 6 captioned photos and the text passages of the quickstart.
* ``--corpus digits``: 10 handwritten-digit images (one per digit, held-out test images, in
  shuffled order) as ``ImageNode``s with no text at all, so the reranker has to look at the
  pixels. Ask "a handwritten digit seven". (The digits default was trained on text -> image
  and image -> text at K=10; an image query over these image nodes is image -> image, which
  it was not trained for.)

Each turn reranks the corpus with Retrv-R1 and prints the best image: its path,
caption, score and the model's reasoning. Queries are text, an image
(``QueryBundle(query_str="", image_path=...)``), or both. The corpus is reranked whole when
it fits the model's index labels; otherwise only its first ``max_candidates`` nodes are kept
(the default model ranks 10: the sample corpus's 6 photos and its first 4 passages; a note
says so). For a larger corpus put a first stage in front, as in ``examples/quickstart.py``.

    python examples/multimodal_chatbot.py                            # interactive: type queries
    python examples/multimodal_chatbot.py --query "a photo of a cat" --image cat.jpg   # two turns: text, then image
    python examples/multimodal_chatbot.py --corpus digits --model PATH --query "a handwritten digit seven"

In the chat: a line is a text query; ``/image PATH [text]`` is an image (+ text) query
(``PATH`` may also name a bundled image, e.g. ``digit-3-0.png`` or ``cat.jpg``); ``/quit``
ends. With a text-only model, images are reranked by their captions, and image-only
queries cannot be answered (``--corpus digits``, whose images have no captions, is refused).

Default model: the bundled ``retrv-r1-qwen2.5-vl-digits`` (SmolLM2-135M with a grafted
vision tower, trained by ``scripts/train_default_digits.sh``; it knows handwritten digits,
not photos: on the sample corpus it shows the pipeline, not photo retrieval quality).
Everything runs offline.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

SAMPLE = Path(__file__).resolve().parent.parent / "retrv_r1_plugin" / "data" / "sample"
DIGITS = SAMPLE / "digits"
DEFAULT_MODEL = "retrv-r1-qwen2.5-vl-digits"
HELP = "type a text query, '/image PATH [text]' for an image query, '/quit' to end"


def build_nodes(corpus: str = "sample"):
    """``sample``: ImageNodes (by image_path, caption as text) and TextNodes of the sample
    corpus; ``digits``: one ImageNode per digit (the ``digit-<d>-0.png`` images), without any
    text, in a fixed shuffled order."""
    import json

    from llama_index.core.schema import ImageNode, TextNode

    from retrv_r1_plugin.cli import read_corpus

    nodes = []
    if corpus == "digits":
        items = [item for item in json.loads((DIGITS / "labels.json").read_text()) if item["file"].endswith("-0.png")]
        random.Random(0).shuffle(items)
        for item in items:
            node = ImageNode(id_=item["file"], text="", image_path=str(DIGITS / item["file"]), metadata={"kind": "image"})
            node.excluded_embed_metadata_keys = node.excluded_llm_metadata_keys = ["kind"]
            nodes.append(node)
        return nodes
    for cand in read_corpus(SAMPLE / "corpus.jsonl"):
        meta = {"kind": "image" if cand.image is not None else "text"}
        if cand.image is not None:
            node = ImageNode(id_=cand.id, text=cand.text, image_path=str(cand.image), metadata=meta)
        else:
            node = TextNode(id_=cand.id, text=cand.text, metadata=meta)
        node.excluded_embed_metadata_keys = ["kind"]  # bookkeeping, not content for the reranker
        node.excluded_llm_metadata_keys = ["kind"]
        nodes.append(node)
    return nodes


def load_reranker_model(name: str | None):
    """``name`` (a path or bundled name), by default the bundled multimodal checkpoint."""
    from retrv_r1_plugin import RetrvR1Model

    name = name or DEFAULT_MODEL
    return RetrvR1Model.from_pretrained(name), name


def resolve_image(path: str) -> str:
    """``path`` as given, or the sample photo of that name (``cat.jpg``) when no such file exists."""
    if os.path.exists(path):
        return os.path.abspath(path)
    for folder in (SAMPLE / "images", DIGITS):
        if (folder / path).is_file():
            return str(folder / path)
    raise FileNotFoundError(f"no image at {path!r} (nor a bundled image of that name in {SAMPLE / 'images'} or {DIGITS})")


def short(text: str, width: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


class Chatbot:
    def __init__(self, reranker, nodes, show: int = 3) -> None:
        self.reranker = reranker
        self.nodes = nodes
        self.show = show
        self.vision = reranker.retrv_r1_model.backbone.is_vision

    def answer(self, text: str, image: str | None) -> None:
        from llama_index.core.schema import ImageNode, NodeWithScore, QueryBundle

        if image is not None and not self.vision and not text.strip():
            print("bot> this model is text-only: it cannot read an image query; add text to the query or use a Qwen-VL model")
            return
        if image is not None and not self.vision:
            print("bot> (text-only model: the query image is ignored, the text is used)")
        bundle = QueryBundle(query_str=text, image_path=image)
        started = time.perf_counter()
        ranked = self.reranker.postprocess_nodes([NodeWithScore(node=n) for n in self.nodes], query_bundle=bundle)
        seconds = time.perf_counter() - started
        best = next(((rank, nws) for rank, nws in enumerate(ranked, 1) if isinstance(nws.node, ImageNode)), None)
        if best is None:
            print("bot> no image among the candidates")
            return
        rank, nws = best
        meta = nws.node.metadata
        print(f"bot> best image: {nws.node.image_path}")
        if nws.node.get_content().strip():
            print(f"     caption: {short(nws.node.get_content(), 120)}")
        print(f"     score {nws.score:.3f} (rank {rank} of {len(ranked)} nodes, {seconds:.1f} s)")
        if meta.get("retrv_r1_fallback"):
            print(f"     fallback: {meta['retrv_r1_fallback']}")
        reasoning = " ".join(str(meta.get("retrv_r1_reasoning") or "").split())
        if reasoning:
            print(f"     reasoning: {short(reasoning, 300)}")
        print(f"     top {min(self.show, len(ranked))}:")
        for i, other in enumerate(ranked[: self.show], 1):
            kind = "[image]" if isinstance(other.node, ImageNode) else "[text] "
            flag = " (inspected)" if other.node.metadata.get("retrv_r1_inspected") else ""
            shown = other.node.get_content().strip() or os.path.basename(getattr(other.node, "image_path", "") or "")
            print(f"       {i}. {other.score:.3f} {kind} {short(shown, 80)}{flag}")

    def turn(self, kind: str, value: str) -> bool:
        """Answer one turn; False when it failed (bad image, model error), reported, not raised."""
        try:
            if kind == "image-file":  # --image PATH: the path as given (spaces, quotes, backslashes)
                self.answer("", resolve_image(value))
            elif kind == "image":  # '/image PATH [text]' typed in the chat
                parts = shlex.split(value)
                if not parts:
                    print("bot> usage: /image PATH [text]")
                    return False
                self.answer(" ".join(parts[1:]), resolve_image(parts[0]))
            else:
                self.answer(value, None)
            return True
        except (FileNotFoundError, ValueError, OSError) as exc:  # ImageLoadError is a ValueError
            print(f"bot> error: {exc}")
            return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=f"Retrv-R1 checkpoint path or bundled name (default {DEFAULT_MODEL}; text-only models rank images by caption)")
    parser.add_argument("--corpus", choices=["digits", "sample"],
                        default="sample", help="sample: captioned photos + passages (default); digits: 10 bundled digit images, no text")
    parser.add_argument("--query", dest="turns", action="append", type=lambda s: ("text", s),
                        help="a text query, one turn (repeatable; with --query/--image nothing is read from stdin)")
    parser.add_argument("--image", dest="turns", action="append", type=lambda s: ("image-file", s),
                        help="an image query, one turn: a path, or a sample photo name like cat.jpg (repeatable; "
                             "for image + text in one turn use '/image PATH text' in the chat)")
    parser.add_argument("--reasoning-budget", type=int, default=None, help="reasoning tokens per query (default: the model's)")
    parser.add_argument("--show", type=int, default=3, help="how many of the reranked nodes to list per answer")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    for flag, value, least in (("--show", args.show, 1), ("--threads", args.threads, 1), ("--reasoning-budget", args.reasoning_budget, 0)):
        if value is not None and value < least:
            parser.error(f"{flag} must be >= {least}, got {value}")

    import torch

    torch.set_num_threads(args.threads)

    from retrv_r1_plugin.integrations.llama_index import RetrvR1Reranker

    model, description = load_reranker_model(args.model)
    print(f"reranker: {description}")
    vision = model.backbone.is_vision
    print(f"  backbone {model.backbone.model_type}, compression={model.config.compression}, max_candidates={model.config.max_candidates}")
    if not vision:
        print("  text-only model: images are reranked by their captions; image-only queries are not supported")
    nodes = build_nodes(args.corpus)
    if not vision and any(not n.get_content().strip() for n in nodes):
        # every turn would fail on the first image without text: say so once, before the chat
        print(f"error: the {args.corpus!r} corpus has images without text, which the text-only model "
              f"{description!r} cannot rank; use a Qwen-VL model (default {DEFAULT_MODEL}) or --corpus sample",
              file=sys.stderr)
        return 2
    if len(nodes) > model.config.max_candidates:
        nodes = nodes[: model.config.max_candidates]
        print(f"  (only the first {len(nodes)} nodes fit the model's index labels)")
    n_images = sum(n.metadata["kind"] == "image" for n in nodes)
    print(f"corpus: {len(nodes)} nodes ({n_images} images, {len(nodes) - n_images} text passages)")

    reranker = RetrvR1Reranker(model=model, top_n=None, reasoning_budget=args.reasoning_budget)
    bot = Chatbot(reranker, nodes, show=args.show)

    ok = True
    if args.turns:
        for kind, value in args.turns:
            print(f"\nyou> {'/image ' if kind == 'image-file' else ''}{value}")
            ok = bot.turn(kind, value) and ok
        return 0 if ok else 1

    interactive = sys.stdin.isatty()
    print(HELP)
    while True:
        if interactive:
            try:
                line = input("\nyou> ")
            except (EOFError, KeyboardInterrupt):
                print()
                break
        else:
            line = sys.stdin.readline()
            if not line:
                break
            if line.strip():
                print(f"\nyou> {line.strip()}")
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit", "/q"):
            break
        if line in ("/help", "/?"):
            print(HELP)
        elif line.startswith("/image"):
            bot.turn("image", line[len("/image"):].strip())
        else:
            bot.turn("text", line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
