#!/usr/bin/env bash
# Redraws the report's plots (docs/benchmarks.png, docs/benchmarks-digits.png) from the eval
# JSON in benchmarks/results/. Needs the [train] extra (matplotlib).
# Usage: bash benchmarks/make_plots.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
W=benchmarks/results/wordnet
$PY benchmarks/plot_report.py --out docs/benchmarks.png \
  "first stage=$W/def2word-icm.json:first_stage" "Retrv-R1 ICM=$W/def2word-icm.json:reranked" \
  "Retrv-R1 full tokens=$W/def2word-full.json:reranked" "zero-shot SmolLM2=$W/def2word-zeroshot.json:reranked" \
  "first stage=$W/word2def-icm.json:first_stage" "Retrv-R1 ICM=$W/word2def-icm.json:reranked" \
  "Retrv-R1 full tokens=$W/word2def-full.json:reranked" "zero-shot SmolLM2=$W/word2def-zeroshot.json:reranked"
D=benchmarks/results/digits
$PY benchmarks/plot_report.py --out docs/benchmarks-digits.png \
  "first stage (random)=$D/default-image2text-full-seed0.json:first_stage" \
  "Retrv-R1 full tokens=$D/default-image2text-full-seed0.json:reranked" \
  "zero-shot graft=$D/default-image2text-zeroshot-seed0.json:reranked" \
  "first stage (random)=$D/default-text2image-full-seed0.json:first_stage" \
  "Retrv-R1 full tokens=$D/default-text2image-full-seed0.json:reranked" \
  "zero-shot graft=$D/default-text2image-zeroshot-seed0.json:reranked"
