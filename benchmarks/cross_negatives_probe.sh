#!/usr/bin/env bash
# Which negatives ccc_cross should train on: the ccc_cross recipe from the installed ccc_bi for
# 600 updates with the batch's other labels (random) and with --hard-negatives 7 (the 7 of 63
# random train responses that ccc_bi scores highest), then each paired with ccc_bi on the same
# 800 valid examples drawn over all valid conversations (docs/zoo/cross_negatives_probe/).
# Needs ccc_bi built with its responses (python -m parlai_poly.zoo build ccc_bi -dp data).
# ParlAI stops at --max-train-steps 601 after the validation due at 600: each run's installed
# model is the better of its 300 and 600 updates by valid MRR. A finished run is skipped.
#   ORDER="hard random" DATAPATH=data bash benchmarks/cross_negatives_probe.sh [OUT]
set -u
cd "$(dirname "$0")/.."
out=${1:-runs/cross_negatives}
datapath=${DATAPATH:-data}
bi=$datapath/models/parlai_poly/ccc_bi
for run in ${ORDER:-hard random}; do
  dir=$out/$run
  [ -e "$dir/done" ] && continue
  mkdir -p "$dir"
  extra=()
  [ "$run" = hard ] && extra=(--hard-negatives 7 --hard-negatives-pool 63 --retrieve-model-file "$bi/model"
    --fixed-candidates-path "$bi/responses.txt")
  .venv/bin/parlai train_model -m parlai_poly.agents:cross -t parlai_poly.tasks.ccc -dp "$datapath" -mf "$dir/model" \
    --init-model "$bi/model" --cross-head segment-cosine --cross-segment-attention-bias=-8 \
    -lr 1e-5 --text-truncate 64 --label-truncate 32 -bs 8 --dynamic-batching batchsort --max-train-steps 601 \
    --warmup-updates 100 --validation-every-n-steps 300 --ccc-eval-sample 400 -vmt mrr -vmm max \
    --save-every-n-secs 300 --log-every-n-secs 120 --seed 1 "${extra[@]}" > "$dir/train.log" 2>&1 && touch "$dir/done"
done
models=()
for run in hard random; do [ -e "$out/$run/done" ] && models+=("$out/$run/model"); done
.venv/bin/python -m parlai_poly.evaluate "$bi/model" "${models[@]}" \
  -t parlai_poly.tasks.ccc -dt valid -dp "$datapath" --out "$out/paired" -- --ccc-eval-sample 800
