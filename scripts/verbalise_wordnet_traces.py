"""WordNet traces that name the best candidate, then point at it (docs/benchmarks.md 4a).

The reasoning writes the positive candidate's text and then its label:
``Best match: organism, being <cand_1>.</think>``. With ``label_after_candidate`` the prompt
lists each candidate as ``<cand_i>: text <cand_i>``, so once the model has written a
candidate's text, the label after it is an induction-style copy from the context, as in the
digits recipe. What is left to learn is what a language model already does: write the
word (def2word) or the definition (word2def) that fits the query, helped by the candidates
it can see in full tokens. Traces whose positive text is longer than ``--max-words`` are
left out (the reasoning budget must hold the copy). Every trace closes ``</think>``.

    python scripts/verbalise_wordnet_traces.py OUT.jsonl EXAMPLES.jsonl [EXAMPLES.jsonl ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.cot import CoTTrace, write_traces  # noqa: E402
from training.examples import read_examples  # noqa: E402


def verbal_trace(example) -> CoTTrace:
    text = " ".join((example.candidates[example.positive].text or "").split())
    reasoning = f"Best match: {text} <cand_{example.positive + 1}>.</think>"
    return CoTTrace(example=example, reasoning=reasoning, answer=example.positive, teacher="verbalise")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("examples", nargs="+")
    parser.add_argument("--max-words", type=int, default=30)
    args = parser.parse_args()
    traces, skipped = [], 0
    for path in args.examples:
        for ex in read_examples(path):
            if len((ex.candidates[ex.positive].text or "").split()) > args.max_words:
                skipped += 1
                continue
            traces.append(verbal_trace(ex))
    write_traces(args.out, traces)
    print(f"{len(traces)} traces -> {args.out} ({skipped} with a positive longer than {args.max_words} words left out)")
    print(traces[0].reasoning)


if __name__ == "__main__":
    main()
