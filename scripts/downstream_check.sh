#!/usr/bin/env bash
# The downstream learning check of the README: synthesise 512 images, pre-train `tiny` for 200 steps, fine-tune
# every task from its last checkpoint with the default hyper-parameters, evaluate each on its default split,
# and print the table next to the trivial baselines. About an hour on 2 CPU cores.
#   bash scripts/downstream_check.sh [OUT]       (default OUT: downstream-check)
set -euo pipefail
OUT=${1:-downstream-check}
FASTVLP=${FASTVLP:-fastvlp}
PYTHON=${PYTHON:-python}
DATA=$OUT/data
[ -d "$DATA/coco" ] || $FASTVLP data synth --out "$DATA" --num-images 512
$FASTVLP pretrain --preset tiny --data "$DATA" --out "$OUT/pretrain" --max-steps 200 --batch-size 8 --device cpu
INIT=$OUT/pretrain/checkpoints/step-200
for spec in vqa:300 nlvr2:400 caption:400 retrieval:400 detection:800; do
  task=${spec%%:*}; steps=${spec##*:}
  $FASTVLP finetune --task "$task" --init "$INIT" --data "$DATA" --out "$OUT/$task" --max-steps "$steps" \
    --batch-size 16 --device cpu
  $FASTVLP evaluate --task "$task" --checkpoint "$OUT/$task/checkpoints/step-$steps" --data "$DATA" --device cpu \
    --out "$OUT/$task.eval.json"
done
$PYTHON "$(dirname "$0")/downstream_table.py" "$OUT" "$DATA"
