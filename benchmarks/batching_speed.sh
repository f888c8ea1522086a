#!/usr/bin/env bash
# How long 40 updates of the ccc_bi recipe (batches of 64, contexts cut at 64 tokens, responses
# at 64) take through `parlai train_model` in each batch layout: batchsort, random batches,
# random batches in 2 and 3 length groups (--length-groups), batchsort in 2 groups. Start-up
# included; one run each, so run it with the cores quiet (runs no trainings beside it).
# Usage: bash benchmarks/batching_speed.sh [OUT] (default runs/batching_speed)
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
OUT=${1:-runs/batching_speed}
PARLAI=${PARLAI:-.venv/bin/parlai}
mkdir -p "$OUT"
declare -A LAYOUTS=(
  [batchsort]="--dynamic-batching batchsort"
  [random]=""
  [random_groups2]="--length-groups 2"
  [random_groups3]="--length-groups 3"
  [batchsort_groups2]="--dynamic-batching batchsort --length-groups 2"
)
for name in batchsort random random_groups2 random_groups3 batchsort_groups2; do
  rm -rf "$OUT/$name" && mkdir -p "$OUT/$name"  # ours, from an earlier run: start afresh
  $PARLAI train_model -m parlai_poly.agents:bi -t parlai_poly.tasks.ccc -dp data -mf "$OUT/$name/model" \
    --similarity cosine --similarity-scale 20 --freeze-embeddings false --text-truncate 64 --label-truncate 64 \
    --batchsize 64 --lr-scheduler linear --max-train-steps 40 --warmup-updates 100 -vtim -1 -veps -1 \
    --validation-max-exs 8 --short-final-eval true --ccc-eval-sample 8 --save-every-n-secs -1 \
    --log-every-n-secs 1000 --seed 1 ${LAYOUTS[$name]} > "$OUT/$name.log" 2>&1
  echo "$name: $(grep -o 'time elapsed:[0-9.]*' "$OUT/$name.log" | cut -d: -f2) s"
done
