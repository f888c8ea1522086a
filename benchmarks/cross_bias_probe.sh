#!/usr/bin/env bash
# Where ccc_cross's learned attention bias across the pair should start: the ccc_cross recipe
# from the installed ccc_bi with --cross-segment-attention-bias -2 and -8, then both and ccc_bi
# paired on the same 400 valid examples (docs/zoo/cross_bias_probe/). Needs ccc_bi built
# (python -m parlai_poly.zoo build ccc_bi -dp data). Each run validates once, at 150 updates:
# ParlAI stops at --max-train-steps 300 before the validation due there, so the model compared
# is each run's model after 150 updates. A finished run is skipped when rerun.
set -u
cd "$(dirname "$0")/.."
out=${1:-runs/cross_bias}
for bias in -2 -8; do
  dir=$out/b${bias#-}
  [ -e "$dir/done" ] && continue
  mkdir -p "$dir"
  .venv/bin/parlai train_model -m parlai_poly.agents:cross -t parlai_poly.tasks.ccc -dp data -mf "$dir/model" \
    --init-model zoo:parlai_poly/ccc_bi/model --cross-head segment-cosine --cross-segment-attention-bias=$bias \
    -lr 1e-5 --text-truncate 64 --label-truncate 32 -bs 8 --dynamic-batching batchsort --max-train-steps 300 \
    --warmup-updates 100 --validation-every-n-steps 150 --ccc-eval-sample 400 -vmt mrr -vmm max \
    --save-every-n-secs 300 --log-every-n-secs 120 --seed 1 > "$dir/train.log" 2>&1 && touch "$dir/done"
done
.venv/bin/python -m parlai_poly.evaluate data/models/parlai_poly/ccc_bi/model "$out/b2/model" "$out/b8/model" \
  -t parlai_poly.tasks.ccc -dt valid -dp data --out "$out/paired" -- --ccc-eval-sample 400
.venv/bin/python -m parlai_poly.evaluate "$out/paired/b8__model.jsonl" "$out/paired/b2__model.jsonl" -dt valid --out "$out/b8_vs_b2"
