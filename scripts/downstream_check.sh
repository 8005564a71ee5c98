#!/usr/bin/env bash
# The downstream learning check of the README: synthesise 512 images, pre-train `tiny` for 200 steps, fine-tune
# every task from its last checkpoint with the default hyper-parameters, evaluate each on its default split,
# and print the table next to the trivial baselines. About an hour on 2 CPU cores.
#   bash scripts/downstream_check.sh [OUT]       (default OUT: downstream-check)
# The README's figures use the defaults. To test longer schedules (on a GPU, say), SCALE multiplies every
# step count, and DEVICE and NUM_WORKERS are passed to each command:
#   DEVICE=cuda SCALE=10 NUM_WORKERS=8 bash scripts/downstream_check.sh OUT
# SEEDS fine-tunes every task once per seed (the first seed's run keeps the plain names); the table then
# gives each seed's result and their mean, since one seed's figure moves by about 0.01:
#   SEEDS="0 1 2" bash scripts/downstream_check.sh OUT
set -euo pipefail
OUT=${1:-downstream-check}
# The bootstrap's environment when it is not active: the repository's .venv/.
VENV_BIN=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin
if ! command -v fastvlp >/dev/null 2>&1 && [ -x "$VENV_BIN/fastvlp" ]; then
  FASTVLP=${FASTVLP:-$VENV_BIN/fastvlp}
  PYTHON=${PYTHON:-$VENV_BIN/python}
fi
FASTVLP=${FASTVLP:-fastvlp}
PYTHON=${PYTHON:-python}
DEVICE=${DEVICE:-cpu}
SCALE=${SCALE:-1}
NUM_WORKERS=${NUM_WORKERS:-0}
SEEDS=${SEEDS:-0}
for seed in $SEEDS; do
  case $seed in ''|*[!0-9]*) echo "SEEDS: expected non-negative integers, got '$SEEDS'" >&2; exit 2;; esac
done
FIRST_SEED=${SEEDS%% *}
case $SCALE in ''|*[!0-9]*|0) echo "SCALE: expected a positive integer, got '$SCALE'" >&2; exit 2;; esac
DATA=$OUT/data
[ -d "$DATA/coco" ] || $FASTVLP data synth --out "$DATA" --num-images 512
PRETRAIN_STEPS=$((200 * SCALE))
$FASTVLP pretrain --preset tiny --data "$DATA" --out "$OUT/pretrain" --max-steps "$PRETRAIN_STEPS" --batch-size 8 \
  --device "$DEVICE" --num-workers "$NUM_WORKERS"
INIT=$OUT/pretrain/checkpoints/step-$PRETRAIN_STEPS
for spec in vqa:300 nlvr2:400 caption:400 retrieval:400 detection:800; do
  task=${spec%%:*}; steps=$((${spec##*:} * SCALE))
  for seed in $SEEDS; do
    name=$task; [ "$seed" = "$FIRST_SEED" ] || name=$task.seed$seed
    $FASTVLP finetune --task "$task" --init "$INIT" --data "$DATA" --out "$OUT/$name" --max-steps "$steps" \
      --batch-size 16 --device "$DEVICE" --num-workers "$NUM_WORKERS" --seed "$seed"
    predictions=(); [ "$task" = vqa ] && predictions=(--predictions "$OUT/$name.predictions.json")
    $FASTVLP evaluate --task "$task" --checkpoint "$OUT/$name/checkpoints/step-$steps" --data "$DATA" \
      --device "$DEVICE" --out "$OUT/$name.eval.json" "${predictions[@]}"
  done
done
$PYTHON "$(dirname "$0")/downstream_table.py" "$OUT" "$DATA"
