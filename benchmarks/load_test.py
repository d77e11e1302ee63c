"""Load test: throughput and latency of concurrent reranking.

For each number of concurrent clients (threads; default 1, 2, 4, 8) every client sends
``--requests`` rerank calls, one after the other, all clients starting together. Reported
per level: throughput (queries/s over the level's wall time) and p50/p95/max latency of
single calls. Every result is also checked against the same call made alone beforehand
(greedy decoding must give identical scores under load); mismatches are reported.

Calls on one ``RetrvR1Model`` are serialised by its lock, so with one model more clients
add queueing, not throughput; ``--replicas R`` loads R copies and spreads clients over them.

    python benchmarks/load_test.py                         # tiny random Qwen2 model, CPU
    python benchmarks/load_test.py --requests 50 --k 16 --budget 16 --json benchmarks/results/load_cpu.json
    python benchmarks/load_test.py --model path/to/retrv-r1 --device cuda --replicas 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PASSAGES = [
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar.",
    "The rocket launched from the pad and climbed into the blue sky.",
    "Chlorophyll in leaves absorbs light for photosynthesis.",
    "A cup of coffee is served in a white mug.",
    "Plants need light to grow and produce oxygen.",
    "The cat slept on the sofa all afternoon.",
    "Paris is the capital and largest city of France.",
    "Bread is baked from a dough of flour and water.",
    "Coral reefs are built by colonies of tiny animals.",
    "The stock market closed higher after the announcement.",
]
QUERIES = [
    "how do plants make sugar?",
    "space launch",
    "hot drinks",
    "capital of France",
    "pets sleeping",
    "baking bread",
    "ocean life",
    "finance news",
]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of ``values``."""
    if not values:
        return float("nan")
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def build_models(args):
    import torch

    from retrv_r1_plugin.model import RetrvR1Model

    models = []
    for i in range(args.replicas):
        if args.model:
            models.append(RetrvR1Model.from_pretrained(args.model, device=args.device))
        else:
            from retrv_r1_plugin.testing import build_tiny_text_backbone

            torch.manual_seed(args.seed)  # same weights in every replica
            backbone = build_tiny_text_backbone(seed=args.seed)
            model = RetrvR1Model.from_backbone(backbone, max_candidates=max(16, args.k)).eval()
            models.append(model.to(args.device))
    return models


def request(i: int, k: int) -> tuple[str, list[str]]:
    """The ``i``-th request: a query and ``k`` candidates (deterministic, varied)."""
    query = QUERIES[i % len(QUERIES)]
    cands = [PASSAGES[(i * 3 + j) % len(PASSAGES)] + f" (item {j})" for j in range(k)]
    return query, cands


def run_level(models, clients: int, args, reference: dict[int, list[float]]) -> dict:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    mismatches = [0] * clients
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)
    kwargs = dict(reasoning_budget=args.budget, compression=args.compression, max_inspections=args.max_inspections)

    def client(c: int) -> None:
        model = models[c % len(models)]
        barrier.wait()
        for r in range(args.requests):
            i = c * args.requests + r
            query, cands = request(i, args.k)
            start = time.perf_counter()
            try:
                result = model.rank(query, cands, **kwargs)
            except Exception as exc:  # reported, never hidden
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies[c].append(time.perf_counter() - start)
            if result.scores != reference[i % len(reference)]:
                mismatches[c] += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    flat = [x for per in latencies for x in per]
    return {
        "clients": clients,
        "requests": len(flat),
        "errors": len(errors),
        "error_examples": errors[:3],
        "mismatches": sum(mismatches),
        "wall_s": wall,
        "throughput_qps": len(flat) / wall if wall > 0 else float("nan"),
        "latency_p50_ms": percentile(flat, 50) * 1000,
        "latency_p95_ms": percentile(flat, 95) * 1000,
        "latency_mean_ms": (sum(flat) / len(flat) * 1000) if flat else float("nan"),
        "latency_max_ms": max(flat) * 1000 if flat else float("nan"),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8], help="concurrent client counts to test")
    parser.add_argument("--requests", type=int, default=20, help="requests per client at each level")
    parser.add_argument("--k", type=int, default=8, help="candidates per request")
    parser.add_argument("--budget", type=int, default=8, help="reasoning budget (tokens the model writes)")
    parser.add_argument("--max-inspections", type=int, default=1)
    parser.add_argument("--compression", choices=["icm", "none"], default="icm")
    parser.add_argument("--model", default=None, help="a Retrv-R1 checkpoint (default: a tiny random Qwen2 model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--replicas", type=int, default=1, help="model copies; clients are spread over them")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before measuring")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results as JSON to this path")
    args = parser.parse_args(argv)
    if min(args.clients) < 1 or args.requests < 1 or args.k < 1 or args.replicas < 1:
        parser.error("--clients, --requests, --k and --replicas must be >= 1")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    models = build_models(args)
    kwargs = dict(reasoning_budget=args.budget, compression=args.compression, max_inspections=args.max_inspections)
    for i in range(args.warmup):
        for model in models:
            model.rank(*request(i, args.k), **kwargs)
    distinct = max(args.clients) * args.requests
    reference = {i: models[0].rank(*request(i, args.k), **kwargs).scores for i in range(distinct)}

    levels = [run_level(models, c, args, reference) for c in args.clients]
    report = {
        "benchmark": "load_test",
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "device": str(models[0].device),
            "model": args.model or "tiny random Qwen2 (retrv_r1_plugin.testing, hidden 64, 2 layers)",
        },
        "levels": levels,
    }
    print(
        f"model: {report['environment']['model']}; device {report['environment']['device']}; K={args.k}; "
        f"reasoning budget {args.budget}; {args.compression}; replicas {args.replicas}; "
        f"torch threads {torch.get_num_threads()}; {args.requests} requests per client"
    )
    header = f"{'clients':>7} {'requests':>8} {'q/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'errors':>6} {'mismatch':>8}"
    print(header)
    print("-" * len(header))
    for lv in levels:
        print(
            f"{lv['clients']:>7} {lv['requests']:>8} {lv['throughput_qps']:>8.1f} {lv['latency_p50_ms']:>8.1f} "
            f"{lv['latency_p95_ms']:>8.1f} {lv['latency_max_ms']:>8.1f} {lv['errors']:>6} {lv['mismatches']:>8}"
        )
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")
    return report


if __name__ == "__main__":
    report = main()
    sys.exit(1 if any(lv["errors"] or lv["mismatches"] for lv in report["levels"]) else 0)
