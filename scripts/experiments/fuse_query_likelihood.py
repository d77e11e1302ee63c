"""Fuse the backbone's query likelihood with the first-stage cosine; is +0.15 R@1 in reach?

Reads the per-candidate score dumps of ``probe_reverse_dictionary.py --dump`` for a tuning
split and a test split, picks the fusion weight on the tuning split, and reports R@1 and
MRR@10 on the test split. Fusion: per query, z-normalise both scores and rank by
``z(likelihood) + w * z(cosine)``; ``w = 0`` is the likelihood alone, a large ``w`` the
first stage. As in ``retrv-r1 eval``, a query whose positive was not among the first stage's
K scores zero.

Usage: python scripts/experiments/fuse_query_likelihood.py DEV_DUMP TEST_DUMP SCORER [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics

WEIGHTS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 1000.0]


def _z(xs: list[float]) -> list[float]:
    mu, sd = statistics.fmean(xs), statistics.pstdev(xs) or 1.0
    return [(x - mu) / sd for x in xs]


def metrics(rows: list[dict], scorer: str, w: float) -> dict[str, float]:
    r1 = mrr = 0.0
    for row in rows:
        if not row["genuine"]:
            continue
        fused = [a + w * b for a, b in zip(_z(row[scorer]), _z(row["cosine"]))]
        rank = sorted(range(len(fused)), key=lambda j: -fused[j]).index(row["positive"])
        r1 += rank == 0
        mrr += 1.0 / (rank + 1) if rank < 10 else 0.0
    return {"R@1": r1 / len(rows), "MRR@10": mrr / len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dev")
    parser.add_argument("test")
    parser.add_argument("scorer")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dev = [json.loads(line) for line in open(args.dev)]
    test = [json.loads(line) for line in open(args.test)]
    sweep = {w: (metrics(dev, args.scorer, w), metrics(test, args.scorer, w)) for w in WEIGHTS}
    best = max(WEIGHTS, key=lambda w: (sweep[w][0]["R@1"], sweep[w][0]["MRR@10"]))
    print(f"{'w':>7} | dev R@1 | dev MRR@10 | test R@1 | test MRR@10")
    for w, (d, t) in sweep.items():
        print(f"{w:>7g} | {d['R@1']:.3f}   | {d['MRR@10']:.3f}      | {t['R@1']:.3f}    | {t['MRR@10']:.3f}{'  <- picked on dev' if w == best else ''}")
    first = sweep[1000.0][1]
    result = {"scorer": args.scorer, "dev_queries": len(dev), "test_queries": len(test), "picked_weight": best,
              "test": {"first stage": first, "likelihood": sweep[0.0][1], "fused": sweep[best][1]},
              "fused_gain_R@1": round(sweep[best][1]["R@1"] - first["R@1"], 3)}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
