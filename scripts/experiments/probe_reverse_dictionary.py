"""Probe: does SmolLM2-135M know which word a WordNet definition names (and back)?

Ranks each example's K first-stage candidates by a likelihood under the plain backbone
(no Retrv-R1 training) and reports R@1 against the first stage:

* ``word|def``: log P(" word" | "Definition: {def}\\nThe word for this is:");
* ``def|word``: log P(" {def}" | "Word: {word}\\nDefinition:").

For word2def the query is the word and each candidate a definition; for def2word the query
is the definition and each candidate a word (its first lemma). Scoring the *query* given
each candidate (the same target text for every candidate) is UPR's query likelihood
(Sachan et al., 2022): ``word|def`` for word2def, ``def|word`` for def2word. A hit counts
only when the positive was really among the first stage's K (rows whose positive the
example builder inserted count as misses), so R@1 is what ``retrv-r1 eval`` would report.

Usage: python scripts/experiments/probe_reverse_dictionary.py EXAMPLES.jsonl {def2word|word2def}
[--n N] [--scorers word|def,def|word] [--dump SCORES.jsonl]

``--dump`` writes every candidate's scores per query (with the first-stage cosine), the input
of ``fuse_query_likelihood.py``.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from retrv_r1_plugin.backbone import load_backbone, smollm2_source


def first_lemma(text: str) -> str:
    return text.split(",")[0].strip()


def score_pairs(tok, model, pairs: list[tuple[str, str]]) -> list[float]:
    """Summed log-probability of each target given its prompt, one padded batch."""
    prompts = [tok(p).input_ids for p, _ in pairs]
    targets = [tok(t).input_ids for _, t in pairs]
    seqs = [p + t for p, t in zip(prompts, targets)]
    width = max(map(len, seqs))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.no_grad():
        logp = model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
    return [sum(float(logp[i, len(p) + j - 1, t[j]]) for j in range(len(t))) for i, (p, t) in enumerate(zip(prompts, targets))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("examples")
    parser.add_argument("task", choices=["def2word", "word2def"])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--scorers", default="word|def,def|word")
    parser.add_argument("--dump", default=None)
    args = parser.parse_args()
    scorers = args.scorers.split(",")
    torch.set_num_threads(1)
    src, gguf = smollm2_source()
    bb = load_backbone(src, gguf_file=gguf)
    tok, model = bb.tokenizer, bb.model.eval()
    rows = [json.loads(line) for line in open(args.examples)][: args.n]
    hits = {"first stage": 0, **{k: 0 for k in scorers}}
    present = 0
    dump = open(args.dump, "w") if args.dump else None
    t0 = time.time()
    for row in rows:
        cands, pos = row["candidates"], row["positive"]
        genuine = not row.get("inserted_positive", False)
        present += genuine
        if args.task == "def2word":
            pairs = [(row["query_text"], first_lemma(c["text"])) for c in cands]
        else:
            pairs = [(c["text"], first_lemma(row["query_text"])) for c in cands]
        prompts = {
            "word|def": [(f"Definition: {d}\nThe word for this is:", " " + w) for d, w in pairs],
            "def|word": [(f"Word: {w}\nDefinition:", " " + d) for d, w in pairs],
        }
        scores = {"first stage": [-float(r) for r in range(len(cands))]}
        scores.update({k: score_pairs(tok, model, prompts[k]) for k in scorers})
        for key, s in scores.items():
            hits[key] += int(genuine and max(range(len(cands)), key=lambda j: s[j]) == pos)
        if dump:
            dump.write(json.dumps({"id": row["id"], "positive": pos, "genuine": genuine,
                                   "cosine": [c["score"] for c in cands],
                                   **{k: scores[k] for k in scorers}}) + "\n")
            dump.flush()
    print(json.dumps({"task": args.task, "queries": len(rows), "positive_in_top_k": present / len(rows), "seconds": round(time.time() - t0),
                      "R@1": {k: h / len(rows) for k, h in hits.items()}}))


if __name__ == "__main__":
    main()
