#!/bin/bash
# A7: ready-to-run verification of prefill attention v7 (not run: A7's device budget was spent).
# Binary = branch attn-s4 commit with v6 default, v7 opt-in. Run from the repo root with carry
# [".carry/A7"]: bash .carry/A7/verify_v7.sh. Each step has a short timeout; the 2-stage variants
# (their deadlock fix is untested) come after the 3-stage one, so a hang there costs <= 40 s each.
set -o pipefail
cd "$(dirname "$0")"
L=$OUT/verify_v7.log
date -u | tee $L
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv 2>&1 | tee -a $L
R=$(cd ../.. && pwd); mkdir -p /work; ln -sfn "$R" /work/wt-attn
for v in V7 V7_STAGES2 V7_PINGPONG; do
  echo "== consistency gqa-hd128 DJINN_CUDA_PREFILL_$v=1" | tee -a $L
  env DJINN_CUDA_PREFILL_$v=1 timeout 40 ./djinn engine check consistency --model gqa-hd128 2>&1 | grep -E "PASS|FAIL|rror" | tee -a $L || echo "TIMEOUT/FAIL $v" | tee -a $L
done
echo "== consistency llama2-7b DJINN_CUDA_PREFILL_V7=1" | tee -a $L
DJINN_CUDA_PREFILL_V7=1 timeout 120 ./djinn engine check consistency --model llama2-7b 2>&1 | grep -E "PASS|FAIL|rror" | tee -a $L
for m in tiny tiny-gqa gqa-hd128; do
  echo "== cuda-vs-cpu $m (V7)" | tee -a $L
  DJINN_CUDA_PREFILL_V7=1 timeout 40 ./djinn engine check cuda-vs-cpu --weights $m 2>&1 | tail -1 | tee -a $L
done
echo "== cuda_forward (V7)" | tee -a $L
DJINN_CUDA_PREFILL_V7=1 timeout 90 ./cuda_forward 2>&1 | grep -E "^test |test result|FAIL|panick" | tee -a $L
echo "== A/B prefill (two rounds, alternated)" | tee -a $L
for i in 1 2; do
  for arm in v7 v6; do
    E=""; [ $arm = v7 ] && E="DJINN_CUDA_PREFILL_V7=1"
    echo "-- $arm $i" | tee -a $L
    env $E timeout 60 ./djinn engine bench --out $OUT/ab_${arm}_$i --prefill 512,2048,4096 --batches 1 --contexts 512 2>&1 | grep -E "prefill  |profile prefill" | tee -a $L
  done
done
date -u | tee -a $L
cd $OUT && tar czf ab_runs.tgz ab_* && rm -rf ab_*
