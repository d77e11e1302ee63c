"""Digits traces (docs/benchmarks.md 4c) whose reasoning first names what each
image shows, then answers by copying, so a grafted text LM that can name digits (stage 1,
``align: vision``) turns cross-modal matching into text matching.

text -> image: ``<cand_1> three <cand_1>, <cand_2> seven <cand_2>, ... The query asks for
seven <cand_2>.</think>`` (the label on both sides of each name: the final label is an
induction-style copy of the token after the earlier "seven"). image -> text: ``The query
shows seven.</think>`` (the candidates are captions; the answer is text matching). Every
trace closes ``</think>`` itself, as CoT traces do (``training/cot.py``), so stage 3's format
reward can be earned.

    python scripts/verbalise_digit_traces.py RUN_DIR   # writes RUN_DIR/data/cot-verbal.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.cot import CoTTrace, read_traces, write_traces  # noqa: E402
from training.data.build_images import DIGIT_WORDS  # noqa: E402


def main(run: str) -> None:
    pools = Path(run) / "data" / "images" / "cand_pool" / "local"
    label = {}
    for pool in pools.glob("*.jsonl"):
        for line in pool.read_text().splitlines():
            rec = json.loads(line)
            label[rec["did"]] = rec["label"]
    out = []
    for t in read_traces(Path(run) / "data" / "cot.jsonl"):
        ex = t.example
        target = label[ex.candidates[ex.positive].id]
        if ex.query_image:  # image -> caption
            reasoning = f"The query shows {DIGIT_WORDS[target]}."
        else:
            names = ", ".join(f"<cand_{i + 1}> {DIGIT_WORDS[label[c.id]]} <cand_{i + 1}>" for i, c in enumerate(ex.candidates))
            reasoning = f"{names}. The query asks for {DIGIT_WORDS[target]} <cand_{ex.positive + 1}>."
        reasoning += "</think>"  # the model closes its reasoning itself (the format GRPO rewards)
        out.append(CoTTrace(example=ex, reasoning=reasoning, answer=ex.positive, teacher="verbalise"))
    path = Path(run) / "data" / "cot-verbal.jsonl"
    write_traces(path, out)
    print(len(out), "traces ->", path)
    print(out[0].reasoning)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/digits")
