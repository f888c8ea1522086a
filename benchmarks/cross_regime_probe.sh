#!/usr/bin/env bash
# Why the ccc_cross recipe moves a cross-encoder started as ccc_bi below ccc_bi: its cross-encoder
# or its training regime (batches of 8 in batchsort order at lr 1e-5)? From the installed ccc_bi,
# 600 updates each on the same batches (seed 1):
#   bi8      the bi-encoder itself trained on as the cross recipe trains (the control: if it
#            falls as the cross-encoder does, the regime is what lowers it)
#   bi8_2e6  the same at lr 2e-6
#   cross_start  the recipe's cross-encoder before training (one update at lr 1e-12): with
#            responses cut at 32 it starts 1.4 points R@1/20 below ccc_bi, at 64 level with it
#   cross    the recipe (--cross-segment-attention-bias -8)
#   cross_2e6  the recipe at lr 2e-6
#   cross_kl the recipe with ccc_bi as its teacher (--distill-loss kl --distill-weight 0.5):
#            the cross-encoder held near the bi-encoder's ranking while it learns from labels
#   WAY_random   any of the ways on random batches (no --dynamic-batching): whether batchsort's
#            batches of similar lengths (and so similar negatives) are what lowers it
# Cross ways cut responses at CROSS_RESPONSES tokens (32, as the earlier probes; ccc_bi and the
# ccc_cross recipe now read 64). Then each is paired with ccc_bi on the same 800 valid examples
# drawn over all valid conversations (OUT/paired). ParlAI stops at --max-train-steps 601 after the validation due at
# 600: each run's installed model is the better of its 300 and 600 updates by valid MRR. A
# finished run is skipped when rerun. PAIRED_SEED=1 PAIRED_SAMPLE=2000 pairs them on examples the
# validations (400 drawn with seed 0) did not choose the kept update by, so ccc_bi's own
# update, kept on a valid sample drawn with seed 0 too, gets no head start (OUT/paired_2000_seed1).
#   WAYS="bi8 cross_2e6" DATAPATH=data bash benchmarks/cross_regime_probe.sh [OUT]
set -u
cd "$(dirname "$0")/.."
out=${1:-runs/cross_regime}
datapath=${DATAPATH:-data}
bi=$datapath/models/parlai_poly/ccc_bi
ways=(${WAYS:-bi8 cross_2e6})
for way in "${ways[@]}"; do
  dir=$out/$way
  [ -e "$dir/done" ] && continue
  mkdir -p "$dir"
  case $way in
    bi8*) model=(-m parlai_poly.agents:bi --similarity cosine --similarity-scale 20 --label-truncate 64) ;;
    cross*) model=(-m parlai_poly.agents:cross --cross-head segment-cosine --cross-segment-attention-bias=-8
      --label-truncate "${CROSS_RESPONSES:-32}") ;;
    *) echo "unknown way $way: choose among bi8 bi8_2e6 cross_start cross cross_2e6 cross_kl, each also with _random" >&2; exit 2 ;;
  esac
  lr=1e-5 steps=601 warmup=100 batching=batchsort
  [[ $way == *_random ]] && batching=None
  [[ $way == *_2e6* ]] && lr=2e-6
  [[ $way == cross_start* ]] && lr=1e-12 steps=1 warmup=0
  [[ $way == cross_kl* ]] && model+=(--distill-teacher "$bi/model" --distill-loss kl --distill-weight 0.5)
  .venv/bin/parlai train_model "${model[@]}" -t parlai_poly.tasks.ccc -dp "$datapath" -mf "$dir/model" \
    --init-model "$bi/model" -lr $lr --text-truncate 64 -bs 8 --dynamic-batching $batching --max-train-steps $steps \
    --warmup-updates $warmup --validation-every-n-steps 300 --ccc-eval-sample 400 -vmt mrr -vmm max \
    --save-every-n-secs 300 --log-every-n-secs 120 --seed 1 > "$dir/train.log" 2>&1 && touch "$dir/done"
done
models=()
paired_suffix=$([ "${PAIRED_SEED:-0}" = 0 ] && [ "${PAIRED_SAMPLE:-800}" = 800 ] || echo "_${PAIRED_SAMPLE:-800}_seed${PAIRED_SEED:-0}")
for way in "${ways[@]}"; do [ -e "$out/$way/done" ] && models+=("$out/$way/model"); done
.venv/bin/python -m parlai_poly.evaluate "$bi/model" "${models[@]}" \
  -t parlai_poly.tasks.ccc -dt valid -dp "$datapath" --out "$out/paired$paired_suffix" -- --ccc-eval-sample "${PAIRED_SAMPLE:-800}" \
  --ccc-eval-seed "${PAIRED_SEED:-0}"
