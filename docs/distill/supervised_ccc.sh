#!/bin/bash
# Supervised distillation on CCC, as measured in the README: teacher ccc_cross, students trained
# by labels only and by KL at several weights, all at one budget (150 updates of 16 examples,
# 16 x 16 in-batch pairs, seed 1, otherwise the ccc_poly16 / ccc_bi recipe). Batches of 16, not
# the zoo's 32, so that the teacher scores 38k pairs rather than 154k on 2 CPU cores; students
# with the same seed see the same batches, so every distilled student after the first reuses the
# cached teacher scores (also the later variants: temperature 2, margin-mse). The
# poly-encoder's weight is chosen on CCC valid, then all are
# evaluated on test. Finished steps are skipped on a second run.
#
#     bash docs/distill/supervised_ccc.sh [OUT_DIR (runs/distill_sup)] [DATAPATH (data)]
#
# needs `python -m parlai_poly.zoo build ccc_cross -dp DATAPATH` first.
set -e
cd "$(dirname "$0")/../.."
. .venv/bin/activate
D=${1:-runs/distill_sup}
DP=${2:-data}
TEACHER=$DP/models/parlai_poly/ccc_cross/model
COMMON="-t parlai_poly.tasks.ccc -dp $DP --text-truncate 64 --label-truncate 32 -bs 16 \
 --max-train-steps 150 --warmup-updates 20 --validation-every-n-epochs -1 --validation-max-exs 64 \
 --short-final-eval true --log-every-n-secs 60 --seed 1"
DISTILL="--distill-teacher $TEACHER --distill-loss kl --distill-cache-dir $D/teacher_cache"

train() {  # RUN ARCH [options...]
  local run=$1 arch=$2; shift 2
  [ -f "$D/$run/model" ] && return
  mkdir -p "$D/$run"
  /usr/bin/time -f "$run: %e s train" parlai train_model -m parlai_poly.agents:$arch \
    -mf "$D/$run/model" $COMMON "$@"
}

evaluate() {  # RUN DATATYPE [EXAMPLES (1024)] -> D/RUN.json (test, 1024), else D/DATATYPE[EXAMPLES]_RUN.json
  local run=$1 split=$2 n=${3:-1024} report=$D/$1.json
  [ "$split" = valid ] && report=$D/valid_$1.json
  [ "$n" != 1024 ] && report=$D/$split${n}_$1.json
  [ -f "$report" ] || parlai eval_model -mf "$D/$run/model" -t parlai_poly.tasks.ccc -dp "$DP" \
    --datatype "$split" --num-examples "$n" -bs 32 --report-filename "$report"
}

train poly_kl poly --poly-n-codes 16 $DISTILL --distill-weight 0.5
train poly_kl_w0.8 poly --poly-n-codes 16 $DISTILL --distill-weight 0.8
train poly_kl_w1.0 poly --poly-n-codes 16 $DISTILL --distill-weight 1.0
train poly_kl_t2 poly --poly-n-codes 16 $DISTILL --distill-weight 0.8 --distill-temperature 2
train poly_mmse poly --poly-n-codes 16 $DISTILL --distill-weight 0.8 --distill-loss margin-mse
train bi_kl bi $DISTILL --distill-weight 0.5
train poly poly --poly-n-codes 16
train bi bi
for run in poly poly_kl poly_kl_w0.8 poly_kl_w1.0 poly_kl_t2 poly_mmse; do evaluate $run valid; done
for run in poly poly_kl poly_kl_w0.8 poly_kl_t2 poly_mmse bi bi_kl; do evaluate $run test; done
for run in poly poly_kl_w0.8 poly_kl_t2 bi bi_kl; do evaluate $run test 4096; done
[ -f "$D/teacher.json" ] || parlai eval_model -mf "$TEACHER" -t parlai_poly.tasks.ccc -dp "$DP" \
  --datatype test --num-examples 1024 -bs 32 --report-filename "$D/teacher.json"
python -m benchmarks.distill_report --out "$D/report" --teacher "$D/teacher.json" \
  --labels-only poly="$D/poly.json" bi="$D/bi.json" \
  --distilled poly:kl="$D/poly_kl.json" poly:kl-w0.8="$D/poly_kl_w0.8.json" \
  poly:kl-w0.8-T2="$D/poly_kl_t2.json" poly:margin-mse-w0.8="$D/poly_mmse.json" bi:kl="$D/bi_kl.json"
