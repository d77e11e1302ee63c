"""Probe: a naming-trace checkpoint scored by constrained naming (docs/benchmarks.md 4a'').

The naming recipe (4a') trains the reasoning ``Best match: <text> <cand_N>.</think>``. Greedy
decoding commits to the first token of a name; here every candidate is scored instead by the
log-probability the model gives to naming it: log P(" <text_i> <cand_i>" | prompt, "Best match:"),
teacher-forced from one shared prefix (the Retrv-R1 prompt in full tokens). Reports R@1 and
MRR@10 of the summed and the per-token mean log-probability, and of the first token alone,
against the first stage; a hit counts only when the positive was really among the first
stage's K, as in ``retrv-r1 eval``.

Usage: python scripts/experiments/constrained_naming.py CKPT EXAMPLES.jsonl [--n N] [--dump F]
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from retrv_r1_plugin import Candidate, RetrvR1Model
from retrv_r1_plugin.tokens import tokenize_trusted


def mrr10(scores: list[float], pos: int) -> float:
    order = sorted(range(len(scores)), key=lambda j: -scores[j])
    rank = order.index(pos)
    return 1.0 / (rank + 1) if rank < 10 else 0.0


@torch.inference_mode()
def naming_scores(model: RetrvR1Model, query: str, texts: list[str]) -> dict[str, list[float]]:
    bb, tok = model.backbone, model.tokenizer
    prompt, _, _ = model.prepare(query, [Candidate(text=t) for t in texts], compression="none", think=True, reasoning_budget=64)
    state = {"cache": bb.new_cache(), "next_pos": 0, "chunks": []}
    model.decoder._prefill(prompt, state)
    head = tokenize_trusted(tok, "Best match:")
    model.decoder._run(model.builder.text_chunk(head[:-1]), state)  # the last head token runs with each candidate
    out: dict[str, list[float]] = {"sum": [], "mean": [], "first": []}
    for i, text in enumerate(texts):
        full = tokenize_trusted(tok, "Best match: " + " ".join(text.split()) + f" <cand_{i + 1}>")
        assert full[: len(head)] == head, "the head tokenises differently inside the trace"
        cont = full[len(head):]
        cache = copy.deepcopy(state["cache"])
        ids = torch.tensor([head[-1]] + cont[:-1], dtype=torch.long)
        pos, _ = bb.positions(ids, [], state["next_pos"])
        logits, _ = bb.forward(bb.embed_ids(ids).unsqueeze(0), pos, cache, logits="all")
        logp = logits[0].float().log_softmax(-1)
        tgt = torch.tensor(cont)
        per = logp[torch.arange(len(cont)), tgt]
        out["sum"].append(float(per.sum()))
        out["mean"].append(float(per.mean()))
        out["first"].append(float(per[0]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("examples")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--dump", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = RetrvR1Model.from_pretrained(args.checkpoint)
    model.backbone.model.eval()
    rows = [json.loads(line) for line in open(args.examples)][: args.n]
    keys = ["first stage", "sum", "mean", "first"]
    hits = {k: 0 for k in keys}
    mrr = {k: 0.0 for k in keys}
    dump = open(args.dump, "w") if args.dump else None
    t0 = time.time()
    for row in rows:
        texts = [c["text"] for c in row["candidates"]]
        pos, genuine = row["positive"], not row.get("inserted_positive", False)
        scores = {"first stage": [-float(r) for r in range(len(texts))], **naming_scores(model, row["query_text"], texts)}
        for k in keys:
            best = max(range(len(texts)), key=lambda j: scores[k][j])
            hits[k] += int(genuine and best == pos)
            mrr[k] += mrr10(scores[k], pos) if genuine else 0.0
        if dump:
            dump.write(json.dumps({"id": row["id"], "positive": pos, "genuine": genuine,
                                   "cosine": [c["score"] for c in row["candidates"]], **{k: scores[k] for k in keys[1:]}}) + "\n")
            dump.flush()
    n = len(rows)
    print(json.dumps({"examples": args.examples, "queries": n, "seconds_per_query": round((time.time() - t0) / n, 2),
                      "R@1": {k: hits[k] / n for k in keys}, "MRR@10": {k: round(mrr[k] / n, 3) for k in keys}}))


if __name__ == "__main__":
    main()
