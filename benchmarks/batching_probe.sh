#!/usr/bin/env bash
# issue 16: why the sentence-transformers peer still leads ccc_bi (cosine recipe), and how large a
# batch helps. Ways our training reads CCC differently from the peer, and larger batches, on the
# cosine recipe, each 25,600 examples (400 updates of 64 unless named; lr decaying linearly to 0
# at the last update), seed 1, all paired on the same 800 valid examples (seed 0):
#   parlai_batchsort   the ccc_bi recipe: ParlAI draws episodes with replacement (an epoch sees
#                      ~63% of distinct examples) and batchsort groups similar lengths (7x as many
#                      examples beside a copy of their own label: 0.65% against 0.11%,
#                      benchmarks/batch_duplicates.py)
#   batchsort          every episode once per pass (--ccc-train-order shuffled, the new default)
#   shuffled           that, in plain batches (no batchsort)
#   batchsort_clip1    batchsort, with the gradient norm clipped at 1.0 (sentence-transformers')
#                      instead of ParlAI's 0.1
#   batchsort_bs128    batchsort in batches of 128 (127 negatives) for 200 updates: the same
#   batchsort_bs256    25,600 examples; 256 for 100 updates (warm-up: the same examples too)
#   batchsort_distinct batchsort, a label that comes twice in a batch one candidate
#                      (--distinct-batch-candidates: no copy of its own label among an example's
#                      negatives, as sentence-transformers' no-duplicates batches)
#   shuffled_distinct  plain batches, distinct candidates, encoded in 2 length groups: the
#                      peer's batches (negatives of every length) at less of random batches' padding
# Usage: bash benchmarks/batching_probe.sh [OUT] (default runs/batching_probe); ORDER=... runs a
# subset; EVAL_SAMPLE=N pairs them on N valid examples (default 800).
# Resumable: a run with its .done marker is skipped. About 20 minutes a run on 2 cores.
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
OUT=${1:-runs/batching_probe}
PY=${PYTHON:-.venv/bin/python}
PARLAI=${PARLAI:-.venv/bin/parlai}
mkdir -p $OUT
declare -A VARIANTS=(
  [parlai_batchsort]="--ccc-train-order parlai --dynamic-batching batchsort"
  [batchsort]="--dynamic-batching batchsort"
  [shuffled]=""
  [batchsort_clip1]="--dynamic-batching batchsort --gradient-clip 1.0"
  [batchsort_bs128]="--dynamic-batching batchsort --batchsize 128 --max-train-steps 200 --warmup-updates 50"
  [batchsort_bs256]="--dynamic-batching batchsort --batchsize 256 --max-train-steps 100 --warmup-updates 25"
  [batchsort_distinct]="--dynamic-batching batchsort --distinct-batch-candidates true"
  [shuffled_distinct]="--distinct-batch-candidates true --length-groups 2"
)
ORDER=${ORDER:-"parlai_batchsort batchsort shuffled batchsort_bs128 batchsort_bs256"}
for name in $ORDER; do
  mf=$OUT/$name
  [ -f $mf.done ] || $PARLAI train_model -m parlai_poly.agents:bi -t parlai_poly.tasks.ccc -dp data \
    -mf $mf --similarity cosine --similarity-scale 20 --freeze-embeddings false \
    --text-truncate 64 --label-truncate 64 --batchsize 64 --lr-scheduler linear --max-train-steps 400 \
    --warmup-updates 100 -vtim -1 -veps -1 --validation-max-exs 64 --short-final-eval true \
    --save-every-n-secs 300 --log-every-n-secs 120 --seed 1 ${VARIANTS[$name]} >> $mf.log 2>&1 && touch $mf.done
done
models=$(for name in $ORDER; do [ -f $OUT/$name.done ] && echo $OUT/$name; done)
$PY -m parlai_poly.evaluate $models -t parlai_poly.tasks.ccc -dt valid -dp data --out $OUT/paired \
  -- --ccc-eval-sample ${EVAL_SAMPLE:-800} > $OUT/paired.log 2>&1
tail -12 $OUT/paired.log
