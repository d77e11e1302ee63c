#!/usr/bin/env bash
# Evaluates a text checkpoint that answers after a short reasoning (its own default budget and
# compression) and directly (budget 0), on the held-out WordNet test splits, both sets in
# parallel (one core each). Usage: bash scripts/experiments/eval_text_reasoning.sh CKPT OUT_DIR [N]
set -euo pipefail
cd "$(dirname "$0")/../.."
CKPT=$1; OUT=$2; N=${3:-100}; RUN=${RUN:-runs/default}
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
mkdir -p "$OUT"
for t in def2word word2def; do
  (
    common=(--beir "$RUN/data/wordnet/wordnet-$t" --split test --top-k 20 --max-queries "$N" --store "$OUT/qdrant-$t" --quiet --model "$CKPT")
    $PY -m retrv_r1_plugin.cli eval "${common[@]}" --output "$OUT/$t-reasoning.json"
    $PY -m retrv_r1_plugin.cli eval "${common[@]}" --reasoning-budget 0 --output "$OUT/$t-direct.json"
  ) > "$OUT/$t.log" 2>&1 &
done
wait
