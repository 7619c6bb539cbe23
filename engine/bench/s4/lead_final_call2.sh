#!/bin/bash
# Lead's second call (session 4): v7 (3 stages) is now the default prefill attention on sm_90.
# Correctness of the new default, the full engine bench on it, and a same-call A/B of prefill:
# v7 (default) vs v6 (DJINN_CUDA_PREFILL_V6=1) vs the session-3 path (v6 + f32 residual), two
# rounds alternated, plus one round of the 2-stage / ping-pong v7 variants.
set -o pipefail
cd "$(dirname "$0")"
L=$OUT/final2.log
date -u | tee $L
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv 2>&1 | tee -a $L
R=$(cd ../.. && pwd); mkdir -p /work; [ -e /work/main ] || ln -s "$R" /work/main
echo "== consistency llama2-7b (default: v7)" | tee -a $L
timeout 150 ./djinn engine check consistency --model llama2-7b 2>&1 | grep -E "PASS|FAIL|rror" | tee -a $L
for m in tiny-gqa gqa-hd128; do
  echo "== cuda-vs-cpu $m (default)" | tee -a $L
  timeout 60 ./djinn engine check cuda-vs-cpu --weights $m 2>&1 | tail -1 | tee -a $L
done
echo "-- cuda_forward (default)" | tee -a $L
timeout 60 ./cuda_forward 2>&1 | grep -E "^test |test result|FAIL|panick" | tee -a $L
mkdir -p /tmp/b
echo "== engine bench (all cases, default path: v7)" | tee -a $L
timeout 150 ./djinn engine bench --out /tmp/b 2>&1 | tee -a $L
(cd /tmp/b && tar czf $OUT/bench2.tgz .)
echo "== A/B prefill: v7 (default) vs v6 vs session-3 path (v6 + f32 residual), two rounds alternated" | tee -a $L
for i in 1 2; do
  for arm in v7 v6 s3; do
    case $arm in v7) E="";; v6) E="DJINN_CUDA_PREFILL_V6=1";; s3) E="DJINN_CUDA_PREFILL_V6=1 DJINN_CUDA_F32_RESIDUAL=1";; esac
    echo "-- $arm $i ($E)" | tee -a $L
    env $E timeout 60 ./djinn engine bench --out /tmp/ab_${arm}_$i --prefill 512,2048,4096 --batches 1 --contexts 512 2>&1 | grep -E "prefill  |profile prefill" | tee -a $L
  done
done
for v in V7_STAGES2 V7_PINGPONG; do
  echo "-- $v (DJINN_CUDA_PREFILL_$v=1)" | tee -a $L
  env DJINN_CUDA_PREFILL_$v=1 timeout 60 ./djinn engine bench --out /tmp/ab_$v --prefill 512,2048,4096 --batches 1 --contexts 512 2>&1 | grep -E "prefill  |profile prefill" | tee -a $L
done
date -u | tee -a $L
