#!/usr/bin/env bash
# Evaluates a digits checkpoint on the held-out test split (docs/benchmarks.md section 4).
# The first stage draws K=10 candidates at random (no image embedder exists offline): the
# "first stage" rows are chance level, and reranking has to see the digits to beat them.
# Usage: bash scripts/eval_default_digits.sh CHECKPOINT [RUN_DIR]
#   MODES="none icm" to also evaluate the ICM path of a checkpoint that has a trained ICM
#   (default: none, full tokens: the digits default reads each image as 4 tokens and ships no ICM).
#   SEEDS="0" / TASKS="text2image" for a subset; OUT=DIR to write the JSON elsewhere.
# The reasoning budget is the checkpoint's own (96 for the digits default).
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=$1; RUN=${2:-runs/digits}; MODES=${MODES:-none}; SEEDS=${SEEDS:-0 1 2}; TASKS=${TASKS:-text2image image2text}
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
IMG=$RUN/data/images; OUT=${OUT:-$RUN/eval}; mkdir -p "$OUT"
[ -f "$IMG/dataset_info.json" ] || $PY -m training.data.build_images --out "$IMG" --only digits
for t in $TASKS; do
  Q=$IMG/query/test/mbeir_digits-${t}_test.jsonl
  if [ "$t" = text2image ]; then P=$IMG/cand_pool/local/mbeir_digits-text2image_test_cand_pool.jsonl; else P=$IMG/cand_pool/local/mbeir_digits-image2text_cand_pool.jsonl; fi
  for s in $SEEDS; do  # random first stages over the same queries (three by default)
    common=(--mbeir-queries "$Q" --mbeir-pool "$P" --first-stage random --seed "$s" --top-k 10 --quiet)
    for m in $MODES; do
      name=$([ "$m" = none ] && echo full || echo icm)
      $PY -m retrv_r1_plugin.cli eval "${common[@]}" --model "$CKPT" --compression "$m" --output "$OUT/$t-$name-seed$s.json"
    done
  done
done
