#!/usr/bin/env bash
# Whether the residual head lets the cross-encoder gain on ccc_bi: the ccc_cross recipe (random
# batches of 8 in 2 length groups, responses at 64, linear decay to 0 at the last update) from
# the installed ccc_bi, STEPS updates each (default 600) on the same batches (seed 1):
#   bias8         the recipe's head (--cross-head segment-cosine --cross-segment-attention-bias -8):
#                 the control
#   residual      --cross-head residual at the recipe's lr 1e-5: ccc_bi's score, frozen, plus a
#                 linear term on the pair read with full attention
#   residual_5e5  the same at 5e-5, sentence-transformers' CrossEncoder rate
#   bias8_bs16    the recipe's head in batches of 16 (15 negatives each, as the paper's
#                 cross-encoder trained): 4 times the pairs an update, so give it STEPS/2 or less
# Each run validates once, at STEPS, and its last update is compared (as the recipe keeps it).
# Then each and ccc_bi are paired on PAIRED_SAMPLE (2,000) valid examples drawn over all valid
# conversations with seed 1, which the runs' validations (400, seed 0) and ccc_bi's own did not
# choose anything by (OUT/paired). A finished run is skipped when rerun.
#   WAYS="bias8 residual" DATAPATH=data_fixed bash benchmarks/cross_residual_probe.sh [OUT]
set -eu
cd "$(dirname "$0")/.."
out=${1:-runs/cross_residual}
datapath=${DATAPATH:-data}
steps=${STEPS:-600}
bi=$datapath/models/parlai_poly/ccc_bi
ways=(${WAYS:-bias8 residual residual_5e5})
for way in "${ways[@]}"; do
  dir=$out/$way
  [ -e "$dir/done" ] && continue
  mkdir -p "$dir"
  lr=1e-5 bs=8
  case $way in
    bias8) head=(--cross-head segment-cosine --cross-segment-attention-bias=-8) ;;
    residual) head=(--cross-head residual) ;;
    residual_5e5) head=(--cross-head residual) lr=5e-5 ;;
    bias8_bs16) head=(--cross-head segment-cosine --cross-segment-attention-bias=-8) bs=16 ;;
    *) echo "unknown way $way: choose among bias8 residual residual_5e5 bias8_bs16" >&2; exit 2 ;;
  esac
  .venv/bin/parlai train_model -m parlai_poly.agents:cross "${head[@]}" -t parlai_poly.tasks.ccc -dp "$datapath" \
    -mf "$dir/model" --init-model "$bi/model" -lr $lr --text-truncate 64 --label-truncate 64 -bs $bs \
    --length-groups 2 --max-train-steps $((steps + 1)) --lr-scheduler linear --warmup-updates 100 \
    --validation-every-n-steps "$steps" --ccc-eval-sample 400 -vmt mrr -vmm max --save-every-n-secs 300 \
    --log-every-n-secs 120 --seed 1 > "$dir/train.log" 2>&1
  touch "$dir/done"
done
models=()
for way in "${ways[@]}"; do models+=("$out/$way/model"); done
.venv/bin/python -m parlai_poly.evaluate "$bi/model" "${models[@]}" -t parlai_poly.tasks.ccc -dt valid \
  -dp "$datapath" --out "$out/paired" -- --ccc-eval-sample "${PAIRED_SAMPLE:-2000}" --ccc-eval-seed 1
