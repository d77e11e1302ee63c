"""Fuse all three frozen signals (query likelihood, reverse likelihood, first-stage cosine).

Reads the per-candidate dumps of ``probe_reverse_dictionary.py --dump`` for one scorer per
file (``{split}-{task}.jsonl``: the query likelihood; ``{split}-{task}-rev.jsonl``: the other
direction) from DIR, picks the weights on ``dev`` from a grid, and reports test R@1, plus the
best weights chosen on test itself (an upper bound no real system gets). As in
``retrv-r1 eval``, a query whose positive was not among the first stage's K scores zero.
Answers: do the untrained backbone's signals, combined as well as possible, reach
first stage + 0.15 (docs/benchmarks.md 4a)?

Usage: python scripts/experiments/fuse_three_signals.py DIR [--out FILE]
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics

GRID = [0, 0.25, 0.5, 0.75, 1, 1.5, 2]


def z(xs: list[float]) -> list[float]:
    mu, sd = statistics.fmean(xs), statistics.pstdev(xs) or 1.0
    return [(x - mu) / sd for x in xs]


def load(root: str, split: str, task: str) -> list[dict | None]:
    """Per query, the three z-normalised signals (None when the positive was not retrieved)."""
    rows = [json.loads(line) for line in open(f"{root}/{split}-{task}.jsonl")]
    rev = {r["id"]: r for r in map(json.loads, open(f"{root}/{split}-{task}-rev.jsonl"))}
    ql, other = ("def|word", "word|def") if task == "def2word" else ("word|def", "def|word")
    out: list[dict | None] = []
    for r in rows:
        if not r["genuine"]:
            out.append(None)
            continue
        out.append({"positive": r["positive"], "f": [z(r[ql]), z(rev[r["id"]][other]), z(r["cosine"])]})
    return out


def r1(rows: list[dict | None], w) -> float:
    hits = 0
    for r in rows:
        if r is None:
            continue
        s = [sum(wi * f[j] for wi, f in zip(w, r["f"])) for j in range(len(r["f"][0]))]
        hits += max(range(len(s)), key=s.__getitem__) == r["positive"]
    return hits / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir")
    parser.add_argument("--out")
    args = parser.parse_args()
    out = {}
    for t in ["def2word", "word2def"]:
        dev, test = load(args.dir, "dev", t), load(args.dir, "test", t)
        ws = list(itertools.product([1.0], GRID, GRID)) + [(0.0, 1.0, c) for c in GRID]
        best = max(ws, key=lambda w: (r1(dev, w), -sum(w)))
        oracle = max(ws, key=lambda w: r1(test, w))
        out[t] = dict(first_stage=r1(test, (0, 0, 1)), query_likelihood=r1(test, (1, 0, 0)), reverse_likelihood=r1(test, (0, 1, 0)),
                      weights_from_dev=best, dev_R1=r1(dev, best), test_R1=r1(test, best), test_oracle_R1=r1(test, oracle), oracle_weights=oracle)
        print(t, json.dumps(out[t]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
