#!/usr/bin/env bash
# How ccc_cross should read across the pair: the ccc_cross recipe from the installed ccc_bi
# with --cross-segment-gate 0 (gate0), or with --cross-head reader (reader: the texts read apart
# plus a token that reads both), against --cross-segment-attention-bias -8 (bias8, the recipe's),
# 600 updates each on the same batches (seed 1), then each and ccc_bi paired on the same 400
# valid examples (--out, default runs/cross_gate; WAYS="gate0 bias8" by default, the way compared
# with bias8 first). Needs ccc_bi built (python -m
# parlai_poly.zoo build ccc_bi -dp data). Each run validates once, at 600 updates (ParlAI
# stops at --max-train-steps 601 before a validation due there), so the model compared is each
# run's model after 600 updates. A finished run is skipped when rerun.
set -u
cd "$(dirname "$0")/.."
out=${1:-runs/cross_gate}
steps=${STEPS:-600}
ways=(${WAYS:-gate0 bias8})
for way in "${ways[@]}"; do
  dir=$out/$way
  [ -e "$dir/done" ] && continue
  mkdir -p "$dir"
  case $way in
    gate0) opening=(--cross-head segment-cosine --cross-segment-gate 0) ;;
    bias8) opening=(--cross-head segment-cosine --cross-segment-attention-bias=-8) ;;
    reader) opening=(--cross-head reader) ;;
  esac
  .venv/bin/parlai train_model -m parlai_poly.agents:cross -t parlai_poly.tasks.ccc -dp data -mf "$dir/model" \
    --init-model zoo:parlai_poly/ccc_bi/model "${opening[@]}" \
    -lr 1e-5 --text-truncate 64 --label-truncate 32 -bs 8 --dynamic-batching batchsort --max-train-steps $((steps + 1)) \
    --warmup-updates 100 --validation-every-n-steps "$steps" --ccc-eval-sample 400 -vmt mrr -vmm max \
    --save-every-n-secs 300 --log-every-n-secs 120 --seed 1 > "$dir/train.log" 2>&1 && touch "$dir/done"
done
way=${ways[0]}
.venv/bin/python -m parlai_poly.evaluate data/models/parlai_poly/ccc_bi/model "$out/bias8/model" "$out/$way/model" \
  -t parlai_poly.tasks.ccc -dt valid -dp data --out "$out/paired" -- --ccc-eval-sample 400
.venv/bin/python -m parlai_poly.evaluate "$out/paired/bias8__model.jsonl" "$out/paired/${way}__model.jsonl" -dt valid --out "$out/${way}_vs_bias8"
