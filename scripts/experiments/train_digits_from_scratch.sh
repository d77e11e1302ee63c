#!/usr/bin/env bash
# EXPERIMENT, superseded by scripts/train_default_digits.sh (a grafted SmolLM2 LM). A small Qwen2.5-VL
# model (vision tower + mRoPE LM, built from config, random init) trained entirely from scratch
# by the project's stages on scikit-learn digits (text -> image and image -> text).
# STATUS: EXPERIMENTAL. On the project's 2-core CPU this chain has not yet produced a model
# above chance on shuffled K=10 candidates (the warm-up learns digit classification; with the
# scaled init K=2 subsets reach 0.80 training accuracy in 2,000 steps, K=4 and K=10 stayed
# near chance in the steps run), so no checkpoint is bundled. Measurements and next steps:
# docs/benchmarks.md, section 4b.
# Usage: bash scripts/experiments/train_digits_from_scratch.sh [RUN_DIR]   (resumable: re-run to continue)
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN=${1:-runs/digits}
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
bash scripts/build_digits_data.sh "$RUN"   # images, K=10 examples (random first stage), programmatic traces
# Warm-up data: the image -> caption traces with the ten captions in digit order (learn to see),
# and text -> caption traces in random orders (learn to match a query to a candidate and answer
# with its label: the circuit the shuffled tasks need, which a random LM lacks).
[ -s "$RUN/data/cot-warmup.jsonl" ] || $PY - "$RUN" <<'PY'
import random, sys
from training.cot import CoTTrace, read_traces, write_traces
from training.data.build_images import DIGIT_TEMPLATES, digit_caption
from training.examples import CandidateRecord, TrainingExample
run = sys.argv[1]
traces = [t for t in read_traces(f"{run}/data/cot.jsonl") if t.example.id.startswith("digits-i2t")]
out = [t.permuted(sorted(range(t.example.k), key=lambda i: t.example.candidates[i].id)) for t in traces]
rng = random.Random(0)
captions = [CandidateRecord(id=f"digits-cap-{d}", text=digit_caption(d)) for d in range(10)]
for rep in range(20):
    for d in range(10):
        for t in range(len(DIGIT_TEMPLATES)):
            ex = TrainingExample(id=f"digits-t2t-{d}-{t}-{rep}", query_text=digit_caption(d, t), candidates=captions, positive=d)
            out.append(CoTTrace(example=ex, reasoning="", answer=d, teacher="direct").permuted(rng.sample(range(10), 10)))
rng.shuffle(out)
write_traces(f"{run}/data/cot-warmup.jsonl", out)
PY
resume() { [ -d "$1" ] && ls "$1" | grep -q '^checkpoint-' && echo --resume || true; }
stage() {  # stage NAME KIND INIT DATA
  [ -d "$RUN/$1/final" ] || $PY -m training.cli train "$2" --config "training/configs/digits.$1.yaml" --set init_from="$3" \
    --set data="$4" --set output_dir="$RUN/$1" $(resume "$RUN/$1")
}
stage warmup sft tiny:qwen2_5_vl:0:2:scaled "$RUN/data/cot-warmup.jsonl"        # 1. learn to see, learn to point
stage sft_full sft "$RUN/warmup/final" "$RUN/data/cot.jsonl"            # 2. match and point, full tokens
stage icm sft "$RUN/sft_full/final" "$RUN/data/cot.jsonl"               # 3. ICM alone, LM frozen
stage sft sft "$RUN/icm/final" "$RUN/data/cot.jsonl"                    # 4. joint SFT in ICM mode
stage rl rl "$RUN/sft/final" "$RUN/data/examples.jsonl"                 # 5. GRPO
echo "done: $RUN/rl/final"
