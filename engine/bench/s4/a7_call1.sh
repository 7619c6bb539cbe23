#!/bin/bash
# NOTE (A7, after the call): the switch names in this script are those of the call-1 binary, where
# v7 with 2 stages was the default. The committed code renames them: v6 is the default again,
# DJINN_CUDA_PREFILL_V7=1 is the 3-stage kernel (this script's V7_STAGES3 arm),
# DJINN_CUDA_PREFILL_V7_STAGES2=1 the 2-stage one (this script's default v7 arm, which hung),
# DJINN_CUDA_PREFILL_V7_PINGPONG=1 unchanged (2 stages + ping-pong, hung).
# A7 call 1: correctness of the v7 prefill attention (GQA head_dim 128 vs CPU f32, consistency incl.
# v7 == v4 on 2048 tokens and on an unaligned later turn, 7B), then a same-call A/B of v6 / v7 /
# v7 3-stage / v7 ping-pong (prefill 512 / 2048 / 4096, two rounds, alternated).
set -o pipefail
cd "$(dirname "$0")"
L=$OUT/call1.log
date -u | tee $L
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv 2>&1 | tee -a $L
echo "== cuda-vs-cpu gqa-hd128 (v7 default)" | tee -a $L
if ! timeout 45 ./djinn engine check cuda-vs-cpu --weights gqa-hd128 2>&1 | tail -4 | tee -a $L; then
  echo "ABORT: v7 failed or hung on gqa-hd128" | tee -a $L
  DJINN_CUDA_PREFILL_V6=1 timeout 45 ./djinn engine check cuda-vs-cpu --weights gqa-hd128 2>&1 | tail -2 | tee -a $L
  exit 1
fi
echo "== cuda-vs-cpu gqa-hd128 (v6)" | tee -a $L
DJINN_CUDA_PREFILL_V6=1 timeout 45 ./djinn engine check cuda-vs-cpu --weights gqa-hd128 2>&1 | tail -1 | tee -a $L
for v in V7_STAGES3 V7_PINGPONG; do
  echo "== cuda-vs-cpu gqa-hd128 ($v)" | tee -a $L
  env DJINN_CUDA_PREFILL_$v=1 timeout 45 ./djinn engine check cuda-vs-cpu --weights gqa-hd128 2>&1 | tail -1 | tee -a $L
done
for m in tiny tiny-gqa; do
  echo "== cuda-vs-cpu $m" | tee -a $L
  timeout 45 ./djinn engine check cuda-vs-cpu --weights $m 2>&1 | tail -1 | tee -a $L
done
echo "== consistency gqa-hd128 (v7)" | tee -a $L
timeout 60 ./djinn engine check consistency --model gqa-hd128 2>&1 | grep -E "PASS|FAIL|rror" | tee -a $L
echo "== consistency llama2-7b (v7)" | tee -a $L
timeout 150 ./djinn engine check consistency --model llama2-7b 2>&1 | grep -E "PASS|FAIL|rror" | tee -a $L
echo "== cuda_forward" | tee -a $L
R=$(cd ../.. && pwd); mkdir -p /work; ln -sfn "$R" /work/wt-attn
[ -x ./cuda_forward ] && timeout 120 ./cuda_forward 2>&1 | grep -E "^test |test result|FAIL|panick" | tee -a $L
echo "== A/B prefill (two rounds, arms alternated)" | tee -a $L
for i in 1 2; do
  ARMS="v7 v6 v7s3 v7pp"; [ $i = 2 ] && ARMS="v6 v7"
  for arm in $ARMS; do
    case $arm in
      v7) E="" ;; v6) E="DJINN_CUDA_PREFILL_V6=1" ;;
      v7s3) E="DJINN_CUDA_PREFILL_V7_STAGES3=1" ;; v7pp) E="DJINN_CUDA_PREFILL_V7_PINGPONG=1" ;;
    esac
    echo "-- $arm $i" | tee -a $L
    env $E timeout 90 ./djinn engine bench --out $OUT/ab_${arm}_$i --prefill 512,2048,4096 --batches 1 --contexts 512 2>&1 | grep -E "prefill  |profile prefill" | tee -a $L
  done
done
date -u | tee -a $L
cd $OUT && tar czf ab_runs.tgz ab_* && rm -rf ab_*
