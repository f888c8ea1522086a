#!/usr/bin/env bash
# Poly-encoder codes variants at equal updates on CCC, against a bi-encoder trained alike,
# and that bi-encoder trained on length-sorted batches (bi_batchsort: less padding).
#
#   bash benchmarks/codes_variants.sh [OUT]          (default runs/codes_variants)
#   python benchmarks/codes_report.py [OUT]          the table (README) from what finished
#
# Each variant: STEPS updates of batch 32 (bfloat16 where the CPU has it), contexts 64 tokens,
# responses 32, seed 1; its codes' diversity before training on 256 valid examples (seed 1),
# then R@1/20, MRR and diversity on SAMPLE valid examples (seed 0) spread over all valid
# conversations. Resumable: a variant with its results file is skipped, a half-trained one
# continues from its checkpoint. About 10 minutes a variant on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
# 2 OpenMP threads that spin while waiting lose several-fold to any other job on 2 cores
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
OUT=${1:-runs/codes_variants}
DP=${DATAPATH:-data}
STEPS=${STEPS:-400}
SAMPLE=${SAMPLE:-800}
PY=${PYTHON:-.venv/bin/python}
PARLAI=${PARLAI:-.venv/bin/parlai}
INPUTS="--text-truncate 64 --label-truncate 32"

declare -A VARIANTS=(
  [bi]="-m parlai_poly.agents:bi"
  [bi_batchsort]="-m parlai_poly.agents:bi --dynamic-batching batchsort"
  [poly16_normal]="-m parlai_poly.agents:poly --poly-n-codes 16"
  [poly16_uniform]="-m parlai_poly.agents:poly --poly-n-codes 16 --codes-init uniform"
  [poly16_orth10]="-m parlai_poly.agents:poly --poly-n-codes 16 --codes-init orthogonal --codes-init-scale 10"
  [poly16_orth10_lr20]="-m parlai_poly.agents:poly --poly-n-codes 16 --codes-init orthogonal --codes-init-scale 10 --codes-lr-multiplier 20"
  [poly16_sqrt]="-m parlai_poly.agents:poly --poly-n-codes 16 --codes-attention-type sqrt"
  [poly16_multihead]="-m parlai_poly.agents:poly --poly-n-codes 16 --codes-attention-type multihead"
  [poly16_nfirst]="-m parlai_poly.agents:poly --poly-n-codes 16 --polyencoder-type n_first"
)
ORDER=${ORDER:-"bi poly16_normal poly16_uniform poly16_orth10 poly16_orth10_lr20 poly16_sqrt poly16_multihead poly16_nfirst"}

for name in $ORDER; do
  dir="$OUT/$name"
  args=${VARIANTS[$name]}
  mkdir -p "$dir"
  if [ -f "$dir/summary.json" ]; then echo "== $name: done"; continue; fi
  echo "== $name: $args"
  if [[ $args == *agents:poly* ]] && [ ! -f "$dir/init/summary.json" ]; then
    # the codes before any update (a start drawn alike, not the training run's own draw)
    rest=${args#-m }
    agent=${rest%% *}
    $PY -m parlai_poly.evaluate "agent:$agent" -dp "$DP" -dt valid --ccc-eval-sample 256 --ccc-eval-seed 1 \
      --out "$dir/init" -- ${rest#"$agent"} $INPUTS > "$dir/init.log" 2>&1
  fi
  $PARLAI train_model -t parlai_poly.tasks.ccc -dp "$DP" $args -mf "$dir/model" -bs 32 $INPUTS \
    --max-train-steps "$STEPS" --seed 1 -vtim -1 -veps -1 --validation-max-exs 32 --short-final-eval true \
    --log-every-n-steps 50 --save-every-n-secs 120 > "$dir/train.log" 2>&1
  $PY -m parlai_poly.evaluate "$dir/model" -dp "$DP" -dt valid --ccc-eval-sample "$SAMPLE" \
    --out "$dir" > "$dir/eval.log" 2>&1
  tail -3 "$dir/eval.log"
done
