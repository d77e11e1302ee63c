"""Experiment (docs/benchmarks.md 4c): what a digits checkpoint trained on verbalising traces
writes at test time, scored part by part: how many candidates it names correctly, whether it
names the query's digit, whether its answer is the candidate its own reasoning points to,
and whether the answer is right.

    python scripts/experiments/inspect_digit_generations.py CKPT [--run runs/digits] [--n 20] [--budget 96] [--show 3]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from retrv_r1_plugin import RetrvR1Model  # noqa: E402
from training.data.build_images import DIGIT_WORDS  # noqa: E402
from training.examples import RandomRetriever, examples_from_mbeir  # noqa: E402

NAMED = re.compile(r"<cand_(\d+)>\s*(\w+)\s*<cand_\1>")
ASKS = re.compile(r"(?:asks for|shows)\s+(\w+)\s*(?:<cand_(\d+)>)?")


def labels_of(path: Path, key: str) -> dict[str, int]:
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "label" in rec:
            out[rec[key]] = rec["label"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("ckpt")
    p.add_argument("--run", default="runs/digits")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--budget", type=int, default=96)
    p.add_argument("--show", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    img = Path(args.run) / "data" / "images"
    model = RetrvR1Model.from_pretrained(args.ckpt)
    report = {}
    for task, pool in (("text2image", "mbeir_digits-text2image_test_cand_pool.jsonl"), ("image2text", "mbeir_digits-image2text_cand_pool.jsonl")):
        qfile = img / "query" / "test" / f"mbeir_digits-{task}_test.jsonl"
        pfile = img / "cand_pool" / "local" / pool
        doc_label = labels_of(pfile, "did")
        ids = list(doc_label)
        examples = examples_from_mbeir(qfile, pfile, RandomRetriever(ids, seed=args.seed).search, k=10, seed=args.seed, image_root=img)[: args.n]
        named_ok = named_n = asks_ok = consistent = correct = 0
        for i, ex in enumerate(examples):
            res = model.rank(ex.query(), ex.candidate_objects(), reasoning_budget=args.budget)
            truth = [doc_label[c.id] for c in ex.candidates]
            target = truth[ex.positive]
            for m in NAMED.finditer(res.reasoning):
                j = int(m.group(1)) - 1
                if j < len(truth):
                    named_n += 1
                    named_ok += m.group(2) == DIGIT_WORDS[truth[j]]
            a = ASKS.search(res.reasoning)
            asks_ok += bool(a and a.group(1) == DIGIT_WORDS[target])
            pointed = int(a.group(2)) - 1 if a and a.group(2) else None
            consistent += pointed is not None and pointed == res.best
            correct += res.best == ex.positive
            if i < args.show:
                print(f"[{task}] positive={ex.positive} best={res.best} fallback={res.fallback} truth={[DIGIT_WORDS[t] for t in truth]}")
                print("   ", res.reasoning[:400].replace("\n", " "))
        n = len(examples)
        report[task] = {
            "queries": n,
            "R@1": correct / n,
            "candidates_named_correctly": named_ok / max(named_n, 1),
            "candidates_named": named_n / n,
            "query_digit_named_correctly": asks_ok / n,
            "answer_matches_own_pointer": consistent / n,
        }
        print(task, json.dumps(report[task]))


if __name__ == "__main__":
    main()
