#!/usr/bin/env bash
# Builds the digits training data both digits recipes read (resumable: skips what exists):
# RUN/data/images (M-BEIR layout), RUN/data/examples.jsonl (K=10, both directions) and
# RUN/data/cot.jsonl (programmatic traces).
# Usage: bash scripts/build_digits_data.sh [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/digits}
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
IMG=$RUN/data/images
mkdir -p "$RUN/data"
[ -f "$IMG/dataset_info.json" ] || $PY -m training.data.build_images --out "$IMG" --only digits
# No image embedder exists offline, so the first stage draws K=10 images at random (seeded;
# the missed positive is inserted); 40 draws per text query give varied negatives.
if [ ! -s "$RUN/data/examples.jsonl" ]; then
  for s in $(seq 0 39); do
    $PY -m training.cli data examples --mbeir-queries "$IMG/query/train/mbeir_digits-text2image_train.jsonl" \
      --mbeir-pool "$IMG/cand_pool/local/mbeir_digits-text2image_train_cand_pool.jsonl" --first-stage random --k 10 --seed "$s" \
      --out "$RUN/data/t2i-$s.jsonl"
  done
  $PY -m training.cli data examples --mbeir-queries "$IMG/query/train/mbeir_digits-image2text_train.jsonl" \
    --mbeir-pool "$IMG/cand_pool/local/mbeir_digits-image2text_cand_pool.jsonl" --first-stage random --k 10 --out "$RUN/data/i2t.jsonl"
  cat "$RUN"/data/t2i-*.jsonl "$RUN/data/i2t.jsonl" > "$RUN/data/examples.jsonl.tmp" && mv "$RUN/data/examples.jsonl.tmp" "$RUN/data/examples.jsonl"
fi
[ -s "$RUN/data/cot.jsonl" ] || $PY -m training.cli data cot --examples "$RUN/data/examples.jsonl" --out "$RUN/data/cot.jsonl" --teacher programmatic --max-inspections 1
