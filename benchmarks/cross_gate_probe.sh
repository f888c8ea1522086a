#!/usr/bin/env bash
# How ccc_cross should open the attention across the pair: the ccc_cross recipe from the
# installed ccc_bi with --cross-segment-gate 0 against --cross-segment-attention-bias -8 (the
# recipe's), 600 updates each on the same batches (seed 1), then both and ccc_bi paired on the
# same 400 valid examples (--out, default runs/cross_gate). Needs ccc_bi built (python -m
# parlai_poly.zoo build ccc_bi -dp data). Each run validates once, at 600 updates (ParlAI
# stops at --max-train-steps 601 before a validation due there), so the model compared is each
# run's model after 600 updates. A finished run is skipped when rerun.
set -u
cd "$(dirname "$0")/.."
out=${1:-runs/cross_gate}
steps=${STEPS:-600}
for way in gate0 bias8; do
  dir=$out/$way
  [ -e "$dir/done" ] && continue
  mkdir -p "$dir"
  case $way in
    gate0) opening=(--cross-segment-gate 0) ;;
    bias8) opening=(--cross-segment-attention-bias=-8) ;;
  esac
  .venv/bin/parlai train_model -m parlai_poly.agents:cross -t parlai_poly.tasks.ccc -dp data -mf "$dir/model" \
    --init-model zoo:parlai_poly/ccc_bi/model --cross-head segment-cosine "${opening[@]}" \
    -lr 1e-5 --text-truncate 64 --label-truncate 32 -bs 8 --dynamic-batching batchsort --max-train-steps $((steps + 1)) \
    --warmup-updates 100 --validation-every-n-steps "$steps" --ccc-eval-sample 400 -vmt mrr -vmm max \
    --save-every-n-secs 300 --log-every-n-secs 120 --seed 1 > "$dir/train.log" 2>&1 && touch "$dir/done"
done
.venv/bin/python -m parlai_poly.evaluate data/models/parlai_poly/ccc_bi/model "$out/bias8/model" "$out/gate0/model" \
  -t parlai_poly.tasks.ccc -dt valid -dp data --out "$out/paired" -- --ccc-eval-sample 400
.venv/bin/python -m parlai_poly.evaluate "$out/paired/bias8__model.jsonl" "$out/paired/gate0__model.jsonl" -dt valid --out "$out/gate0_vs_bias8"
