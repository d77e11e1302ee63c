"""What caching the content tokens ``t_con`` in the store saves per rerank call.

``t_con`` (the ICM's compression of a candidate, ``t_con = ATT_1(e_con, T_c)``) does not
depend on the query, so it can be computed once at indexing time
(``model.encode_candidates`` + ``QdrantCandidateStore.put_content_tokens``) and fetched
with the first-stage results (``search(..., with_content_tokens=model.content_signature)``)
instead of being recomputed in every ``rank`` call. The relation tokens ``t_rel`` still
need the candidates' tokens and the query, so the candidates are still tokenized.

Setup: ``--n`` deterministic passages of about ``--candidate-tokens`` tokens in an embedded
Qdrant store; ``--queries`` queries; for every K and reasoning budget, each query is
searched and reranked twice, once without and once with the cached tokens (alternating
which goes first). ICM content computation is timed (and counted) by wrapping
``model.icm.content``. Budget 0 scores directly (isolates the ICM cost); a budget > 0
writes a fixed number of reasoning tokens (scripted, no inspections, so both variants
decode exactly the same). Reported numbers are per-query medians, in ms.

    python benchmarks/content_cache.py                         # SmolLM2-135M (GGUF from PyPI), CPU
    python benchmarks/content_cache.py --tiny                  # tiny random model, a few seconds
    python benchmarks/content_cache.py --ks 20,50 --json benchmarks/results/content_cache_cpu.json
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import random
import re
import statistics
import sys
import shutil
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

TOPICS = [
    "photosynthesis", "volcanoes", "ocean tides", "espresso", "the Apollo program", "coin collecting",
    "black and white photography", "cellular respiration", "the International Space Station", "glaciers",
    "honey bees", "the printing press", "jazz improvisation", "bridge engineering", "desert ecosystems",
    "vaccines", "chess openings", "wind turbines", "ancient Rome", "coral reefs",
]
SUBJECTS = ["Researchers", "Historians", "Engineers", "Students", "Field guides", "Textbooks", "Museum curators", "Enthusiasts"]
VERBS = ["describe", "explain", "measure", "document", "compare", "illustrate", "question", "summarise"]
DETAILS = [
    "how {t} changed over the last century", "the main processes behind {t}", "why {t} matters to everyday life",
    "the history and open problems of {t}", "common misconceptions about {t}", "the numbers that characterise {t}",
    "experiments that revealed how {t} works", "the vocabulary used when discussing {t}",
]
FILLERS = [
    "Careful observation over many years produced a large body of evidence.",
    "Several competing explanations were proposed before a consensus emerged.",
    "Modern instruments make it possible to record details that were invisible before.",
    "The topic is often introduced in schools with simple diagrams and examples.",
    "Local conditions can change the outcome in surprising ways.",
    "Some of the earliest written accounts are still quoted today.",
]


def passages(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` deterministic ``(topic, passage)`` pairs, long enough to be cut to a token length."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        sentences = []
        while len(" ".join(sentences)) < 1400:  # comfortably over 256 tokens of text
            sentences.append(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(DETAILS).format(t=topic)}.")
            sentences.append(rng.choice(FILLERS))
        out.append((topic, f"Passage {i} on {topic}. " + " ".join(sentences)))
    return out


def cut_to_tokens(tokenizer, text: str, length: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:length]
    return tokenizer.decode(ids)


class HashEmbedder:
    """A deterministic bag-of-words hashing embedder (fast first stage for ``--tiny`` runs)."""

    name = "hash-bow-256"
    dim = 256

    def embed_texts(self, texts: list[str]):
        import numpy as np

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"[a-z0-9]+", text.lower()):
                out[row, int(hashlib.md5(word.encode()).hexdigest()[:8], 16) % self.dim] += 1.0
        return out


class ContentCounter:
    """Wraps ``model.icm.content``: counts calls and candidate rows, and times them."""

    def __init__(self, model, cuda: bool) -> None:
        self.model = model
        self.cuda = cuda
        self.original = model.icm.content
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.rows = 0
        self.seconds = 0.0

    def __enter__(self) -> "ContentCounter":
        import torch

        def content(cand, cand_mask=None):
            if self.cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = self.original(cand, cand_mask)
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - start
            self.calls += 1
            self.rows += int(cand.shape[0])
            return out

        self.model.icm.content = content  # instance attribute shadows the method
        return self

    def __exit__(self, *exc) -> None:
        del self.model.icm.content


def build_model(args: argparse.Namespace):
    import torch

    from retrv_r1_plugin.model import RetrvR1Model

    overrides = dict(max_candidates=max(64, max(args.ks)), compression="icm")
    dtype = getattr(torch, args.dtype)
    if args.model:  # a checkpoint keeps its own index labels (max_candidates)
        model = RetrvR1Model.from_pretrained(args.model, device=args.device, dtype=dtype, compression="icm")
        if max(args.ks) > model.config.max_candidates:
            raise SystemExit(f"K={max(args.ks)} exceeds the model's max_candidates ({model.config.max_candidates})")
        return model, args.model
    if args.tiny:
        from retrv_r1_plugin.testing import build_tiny_text_backbone

        torch.manual_seed(0)
        model = RetrvR1Model.from_backbone(build_tiny_text_backbone(seed=0), **overrides).eval().to(args.device, dtype)
        return model, "tiny Qwen2 (random weights, built from config)"
    from retrv_r1_plugin.backbone import smollm2_source

    source, gguf = smollm2_source()
    model = RetrvR1Model.from_pretrained(source, gguf_file=gguf, device=args.device, dtype=dtype, **overrides)
    return model, "SmolLM2-135M-Instruct (untrained ICM: timings only)"


def ms(values: list[float]) -> float:
    return 1000.0 * statistics.median(values)


def run(args: argparse.Namespace) -> dict:
    import torch

    from retrv_r1_plugin.store import QdrantCandidateStore, point_id
    from retrv_r1_plugin.testing import scripted_generation
    from retrv_r1_plugin.types import Candidate

    cuda = args.device.startswith("cuda")
    model, description = build_model(args)
    print(f"model: {description}; device={args.device} dtype={args.dtype} threads={args.threads}", file=sys.stderr)
    tok = model.tokenizer
    corpus = [
        Candidate(text=cut_to_tokens(tok, text, args.candidate_tokens), id=f"p{i:04d}", metadata={"topic": topic})
        for i, (topic, text) in enumerate(passages(args.n))
    ]
    lengths = [len(tok(c.text, add_special_tokens=False)["input_ids"]) for c in corpus]
    rng = random.Random(1)
    queries = [f"What do {rng.choice(SUBJECTS).lower()} say about {TOPICS[(3 * q) % len(TOPICS)]}?" for q in range(args.queries)]

    embedder = HashEmbedder() if args.embedder == "hash" else None  # None: the store's MiniLM default
    store_dir = tempfile.mkdtemp(prefix="retrv-r1-content-cache-")
    atexit.register(shutil.rmtree, store_dir, ignore_errors=True)
    counter = ContentCounter(model, cuda)
    results: dict = {}
    with QdrantCandidateStore(embedder, path=store_dir, collection_name="content_cache") as store, counter:
        start = time.perf_counter()
        ids = store.add(corpus, show_progress=False)
        add_s = time.perf_counter() - start
        # One-time cost: t_con of the whole corpus, then writing it into the payloads.
        counter.reset()
        start = time.perf_counter()
        tokens = model.encode_candidates(corpus, batch_size=args.icm_batch_size)
        if cuda:
            torch.cuda.synchronize()
        encode_s = time.perf_counter() - start
        encode_calls = counter.calls
        start = time.perf_counter()
        signature = model.content_signature
        store.put_content_tokens(ids, tokens, signature)
        put_s = time.perf_counter() - start
        # What one cache entry costs: the raw tensor in its stored precision (float16 stays
        # float16, anything else is stored as float32), and the payload actually written
        # (base64 of those bytes plus the entry's other fields).
        from retrv_r1_plugin.store.qdrant import TOKENS_KEY

        stored_itemsize = 2 if tokens[0].dtype == torch.float16 else 4
        (point,) = store.client.retrieve(store.collection_name, [point_id(ids[0])], with_payload=[TOKENS_KEY])
        payload_bytes = len(json.dumps(point.payload[TOKENS_KEY]).encode())
        results["indexing"] = {
            "n": args.n,
            "embed_and_upsert_ms": 1000 * add_s,
            "encode_candidates_ms": 1000 * encode_s,
            "encode_candidates_ms_per_candidate": 1000 * encode_s / args.n,
            "encode_candidates_icm_content_calls": encode_calls,
            "put_content_tokens_ms": 1000 * put_s,
            "bytes_per_candidate": int(tokens[0].numel() * stored_itemsize),
            "payload_bytes_per_candidate": payload_bytes,
        }
        print(f"indexed {args.n} candidates: encode_candidates {1000 * encode_s:.0f} ms, "
              f"put_content_tokens {1000 * put_s:.0f} ms", file=sys.stderr)

        rows = []
        for k in args.ks:
            for budget in args.budgets:
                script = ["think"] * budget

                def one(query: str, cached: bool) -> dict:
                    t0 = time.perf_counter()
                    cands = store.search(query, top_k=k, with_content_tokens=signature if cached else None)
                    t1 = time.perf_counter()
                    have = sum(c.content_tokens is not None for c in cands)
                    counter.reset()
                    t2 = time.perf_counter()
                    result = model.rank(query, cands, reasoning_budget=budget, max_inspections=0,
                                        icm_batch_size=args.icm_batch_size)
                    if cuda:
                        torch.cuda.synchronize()
                    t3 = time.perf_counter()
                    return {"search_s": t1 - t0, "rank_s": t3 - t2, "content_s": counter.seconds,
                            "content_calls": counter.calls, "content_rows": counter.rows, "with_tokens": have,
                            "scores": result.scores, "generated": result.usage.generated_tokens}

                with scripted_generation(model, script):
                    one(queries[0], False), one(queries[0], True)  # warm up both paths
                    runs: dict[bool, list[dict]] = {False: [], True: []}
                    max_diff = 0.0
                    for qi, query in enumerate(queries):
                        order = (False, True) if qi % 2 == 0 else (True, False)
                        pair = {cached: one(query, cached) for cached in order}
                        for cached in (False, True):
                            runs[cached].append(pair[cached])
                        max_diff = max(max_diff, max(abs(a - b) for a, b in zip(pair[False]["scores"], pair[True]["scores"])))

                def summary(items: list[dict]) -> dict:
                    return {
                        "search_ms": ms([r["search_s"] for r in items]),
                        "icm_content_ms": ms([r["content_s"] for r in items]),
                        "rank_ms": ms([r["rank_s"] for r in items]),
                        "search_plus_rank_ms": ms([r["search_s"] + r["rank_s"] for r in items]),
                        "icm_content_calls": sum(r["content_calls"] for r in items),
                        "icm_content_rows": sum(r["content_rows"] for r in items),
                        "candidates_with_cached_tokens": sum(r["with_tokens"] for r in items),
                        "generated_tokens": statistics.median(r["generated"] for r in items),
                    }

                uncached, cached = summary(runs[False]), summary(runs[True])
                row = {
                    "k": k,
                    "reasoning_budget": budget,
                    "queries": len(queries),
                    "uncached": uncached,
                    "cached": cached,
                    "rank_speedup": uncached["rank_ms"] / cached["rank_ms"],
                    "end_to_end_speedup": uncached["search_plus_rank_ms"] / cached["search_plus_rank_ms"],
                    "rank_ms_saved": uncached["rank_ms"] - cached["rank_ms"],
                    "max_score_diff": max_diff,
                }
                rows.append(row)
                print(f"K={k} budget={budget}: rank {uncached['rank_ms']:.0f} -> {cached['rank_ms']:.0f} ms "
                      f"({row['rank_speedup']:.2f}x)", file=sys.stderr)
    results["results"] = rows
    results["model"] = description
    results["content_signature"] = signature
    results["mean_candidate_tokens"] = statistics.mean(lengths)
    return results


def print_table(payload: dict) -> None:
    idx = payload["indexing"]
    print(f"\nmodel: {payload['model']}; device={payload['device']} dtype={payload['dtype']} threads={payload['threads']}; "
          f"N={idx['n']} candidates of ~{payload['mean_candidate_tokens']:.0f} tokens; {payload['queries']} queries; "
          f"per-query medians in ms; budget > 0 = scripted reasoning tokens, no inspections\n")
    print(f"One-time indexing cost: encode_candidates {idx['encode_candidates_ms']:.0f} ms "
          f"({idx['encode_candidates_ms_per_candidate']:.2f} ms/candidate), put_content_tokens "
          f"{idx['put_content_tokens_ms']:.0f} ms, {idx['bytes_per_candidate']} bytes/candidate of tokens "
          f"({idx['payload_bytes_per_candidate']} bytes of payload) "
          f"(embedding + upsert: {idx['embed_and_upsert_ms']:.0f} ms)\n")
    header = ("| K | budget | ICM content ms (no cache) | ICM content ms (cached) | rank ms (no cache) | rank ms (cached) "
              "| rank speedup | search ms (no tokens) | search ms (+tokens) | search+rank speedup | ICM content calls (no cache / cached) "
              "| max score diff |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in payload["results"]:
        u, c = r["uncached"], r["cached"]
        print(f"| {r['k']} | {r['reasoning_budget']} | {u['icm_content_ms']:.1f} | {c['icm_content_ms']:.1f} | "
              f"{u['rank_ms']:.1f} | {c['rank_ms']:.1f} | {r['rank_speedup']:.2f}x | {u['search_ms']:.1f} | "
              f"{c['search_ms']:.1f} | {r['end_to_end_speedup']:.2f}x | {u['icm_content_calls']} / {c['icm_content_calls']} | "
              f"{r['max_score_diff']:.1e} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random model, hash embedder, small sizes (a quick run)")
    p.add_argument("--model", help="a Retrv-R1 checkpoint or backbone folder instead of SmolLM2")
    p.add_argument("--n", type=int, default=None, help="candidates indexed (default 100; --tiny 40)")
    p.add_argument("--ks", default=None, help="candidates reranked per query, comma-separated (default 20,50; --tiny 10,20)")
    p.add_argument("--budgets", default=None, help="reasoning budgets, comma-separated (default 0,16; --tiny 0,4)")
    p.add_argument("--queries", type=int, default=None, help="timed queries per (K, budget) (default 8; --tiny 3)")
    p.add_argument("--candidate-tokens", type=int, default=128)
    p.add_argument("--embedder", choices=["minilm", "hash"], default=None, help="first-stage embedder (default minilm; --tiny hash)")
    p.add_argument("--icm-batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    args.n = args.n or (40 if args.tiny else 100)
    args.ks = [int(k) for k in (args.ks or ("10,20" if args.tiny else "20,50")).split(",")]
    args.budgets = [int(b) for b in (args.budgets or ("0,4" if args.tiny else "0,16")).split(",")]
    args.queries = args.queries or (3 if args.tiny else 8)
    args.embedder = args.embedder or ("hash" if args.tiny else "minilm")
    if max(args.ks) > args.n:
        p.error(f"K ({max(args.ks)}) cannot exceed the number of candidates --n ({args.n})")

    import torch

    torch.set_num_threads(args.threads)
    payload = {
        "device": args.device, "dtype": args.dtype, "threads": args.threads, "candidate_tokens": args.candidate_tokens,
        "queries": args.queries, "embedder": args.embedder, "icm_batch_size": args.icm_batch_size, "tiny": args.tiny,
    }
    payload.update(run(args))
    print_table(payload)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
