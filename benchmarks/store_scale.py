"""How the embedded Qdrant store scales: indexing, re-indexing and search time, memory, disk.

``QdrantCandidateStore`` is embedded by default (qdrant-client's local mode: exact brute-force
search, SQLite persistence on disk) and takes ``url=`` for a Qdrant server. This benchmark
measures where the embedded mode stops being comfortable, so users know when to switch.

For every corpus size and both embedded locations (``:memory:`` and a ``path=`` folder):

* ``add``: indexing ``n`` new passages (batches of ``--batch-size``), passages per second;
* ``re-add``: the same call again (every point unchanged, so nothing is re-embedded or
  written: what a re-run of an interrupted indexing job costs);
* ``search``: p50 / p95 latency of ``search(query, top_k)`` over ``--queries`` queries;
* ``reopen`` (disk only): opening the folder again, which loads every point into memory;
* resident memory after indexing (process RSS growth) and the folder's size on disk.

The store's cost is isolated with a cheap deterministic embedder (``rand-384``: a 384-d unit
vector seeded by the text's hash, MiniLM's size); the default MiniLM embedder's own
throughput is measured separately on the same passages and reported as ``minilm_docs_per_s``,
so indexing time with it is roughly ``n / minilm_docs_per_s`` plus the ``add`` time.

    python benchmarks/store_scale.py                                  # 1k and 10k passages
    python benchmarks/store_scale.py --sizes 1000,10000,50000 --json benchmarks/results/store_scale_cpu.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrv_r1_plugin.store import QdrantCandidateStore  # noqa: E402
from retrv_r1_plugin.types import Candidate  # noqa: E402

WORDS = ("plant light water river city museum coffee rocket horse coin reef bread music "
         "engine forest winter harbour bridge library garden mountain island violin").split()


class RandomEmbedder:
    """A 384-d unit vector seeded by the text's hash: costs almost nothing, so timings are the store's."""

    name = "rand-384"
    dim = 384

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
            out[row] = np.random.default_rng(seed).standard_normal(self.dim)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    embed_queries = embed_texts


def passages(n: int, seed: int = 0) -> list[Candidate]:
    """``n`` distinct ~25-word passages with ids and a little metadata."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(WORDS), size=(n, 24))
    return [
        Candidate(f"passage {i}: " + " ".join(WORDS[j] for j in row), id=f"doc-{i}", metadata={"n": i, "source": "bench"})
        for i, row in enumerate(picks)
    ]


def rss_mb() -> float:
    """Resident memory of this process, in MB (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure(n: int, where: str, args: argparse.Namespace, workdir: Path) -> dict:
    cands = passages(n)
    queries = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(6)) for i in range(args.queries)]
    folder = workdir / f"store-{n}"
    shutil.rmtree(folder, ignore_errors=True)
    kwargs = {"location": ":memory:"} if where == "memory" else {"path": folder}
    rss_before = rss_mb()
    row: dict = {"n": n, "where": where}
    with QdrantCandidateStore(RandomEmbedder(), collection_name="bench", **kwargs) as store:
        start = time.perf_counter()
        store.add(cands, batch_size=args.batch_size, show_progress=False)
        row["add_s"] = time.perf_counter() - start
        row["add_per_s"] = n / row["add_s"]
        start = time.perf_counter()
        store.add(cands, batch_size=args.batch_size, show_progress=False)
        row["readd_unchanged_s"] = time.perf_counter() - start
        assert store.count() == n, (store.count(), n)
        latencies = []
        for q in queries:
            start = time.perf_counter()
            hits = store.search(q, top_k=args.top_k)
            latencies.append(1000 * (time.perf_counter() - start))
            assert len(hits) == min(args.top_k, n)
        row["search_p50_ms"] = statistics.median(latencies)
        row["search_p95_ms"] = percentile(latencies, 95)
        row["rss_growth_mb"] = rss_mb() - rss_before
    if where == "disk":
        row["disk_mb"] = folder_mb(folder)
        start = time.perf_counter()
        with QdrantCandidateStore(RandomEmbedder(), collection_name="bench", path=folder) as store:
            assert store.count() == n
            row["reopen_s"] = time.perf_counter() - start
        shutil.rmtree(folder, ignore_errors=True)
    return row


def minilm_docs_per_s(sample: int) -> float:
    """Throughput of the store's default text embedder (bundled all-MiniLM-L6-v2) on this machine."""
    from retrv_r1_plugin.store import TextEmbedder

    embedder = TextEmbedder()
    texts = [c.text for c in passages(sample, seed=1)]
    embedder.embed_texts(texts[:8])  # load and warm up
    start = time.perf_counter()
    embedder.embed_texts(texts)
    return sample / (time.perf_counter() - start)


def print_table(rows: list[dict], minilm: float | None) -> None:
    print("| passages | store | add (passages/s) | re-add unchanged s | search p50 / p95 ms | RSS growth MB | disk MB | reopen s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        disk = f"{r['disk_mb']:.0f}" if "disk_mb" in r else "-"
        reopen = f"{r['reopen_s']:.1f}" if "reopen_s" in r else "-"
        print(f"| {r['n']:,} | {r['where']} | {r['add_s']:.1f} s ({r['add_per_s']:,.0f}) | {r['readd_unchanged_s']:.1f} | "
              f"{r['search_p50_ms']:.1f} / {r['search_p95_ms']:.1f} | {r['rss_growth_mb']:.0f} | {disk} | {reopen} |")
    if minilm is not None:
        print(f"\nMiniLM (the default embedder) embeds {minilm:,.0f} passages/s here; add that time to 'add'.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,10000", help="corpus sizes, comma-separated (default 1000,10000)")
    p.add_argument("--where", default="memory,disk", help="embedded locations: memory, disk or both (default both)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--queries", type=int, default=50, help="timed searches per size (default 50)")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--minilm-sample", type=int, default=512, help="passages for the MiniLM throughput (0 skips it)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    wheres = [w for w in args.where.split(",") if w]
    if not sizes or any(s < 1 for s in sizes) or not set(wheres) <= {"memory", "disk"} or not wheres:
        p.error("--sizes takes positive ints and --where takes memory and/or disk")
    rows = []
    with tempfile.TemporaryDirectory(prefix="store-scale-") as tmp:
        for n in sizes:
            for where in wheres:
                rows.append(measure(n, where, args, Path(tmp)))
                print(f"  {n} {where}: add {rows[-1]['add_s']:.1f} s, search p50 {rows[-1]['search_p50_ms']:.1f} ms",
                      file=sys.stderr)
    minilm = minilm_docs_per_s(args.minilm_sample) if args.minilm_sample > 0 else None
    print_table(rows, minilm)
    if args.json:
        payload = {
            "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "minilm_docs_per_s": minilm,
            "rows": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
