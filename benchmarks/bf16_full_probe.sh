#!/usr/bin/env bash
# Whether --precision bf16-full (the backbone trained wholly in bfloat16) learns as --precision
# bf16 (autocast) does: the ccc_bi recipe from MiniLM for STEPS updates (300) in each, the same
# seed and batches, then both paired on the whole CCC valid split (14,541 examples, CIs by
# conversation bootstrap; OUT/paired). A finished run is skipped when rerun.
#   STEPS=300 DATAPATH=data bash benchmarks/bf16_full_probe.sh [OUT]
set -u
cd "$(dirname "$0")/.."
out=${1:-runs/bf16_full_probe}
datapath=${DATAPATH:-data}
steps=${STEPS:-300}
for precision in bf16 bf16-full; do
  dir=$out/$precision
  [ -e "$dir/done" ] && continue
  mkdir -p "$dir"
  .venv/bin/parlai train_model -m parlai_poly.agents:bi -t parlai_poly.tasks.ccc -dp "$datapath" -mf "$dir/model" \
    --precision $precision --text-truncate 64 --label-truncate 64 --similarity cosine --similarity-scale 20 \
    --freeze-embeddings false -bs 64 -lr 5e-5 --lr-scheduler linear --warmup-updates 100 \
    --distinct-batch-candidates true --length-groups 2 --max-train-steps $((steps + 1)) \
    --validation-every-n-steps $steps --ccc-eval-sample 400 -vmt mrr -vmm max \
    --save-every-n-secs 300 --log-every-n-secs 120 --seed 1 > "$dir/train.log" 2>&1 && touch "$dir/done"
done
[ -e "$out/bf16/done" ] && [ -e "$out/bf16-full/done" ] || exit 1
.venv/bin/python -m parlai_poly.evaluate "$out/bf16/model" "$out/bf16-full/model" \
  -t parlai_poly.tasks.ccc -dt valid -dp "$datapath" --out "$out/paired"
