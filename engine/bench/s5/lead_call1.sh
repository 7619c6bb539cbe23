#!/bin/bash
# Lead's call 1 (session 5) on merged main c1dfae7: A8's v7p persistent attention (default) + G8's own
# gate_up GEMM with SiLU-mul fused (default for steps >= 512 tokens). Correctness of the default path,
# GPU test binaries, the full engine bench, then a same-call A/B of prefill 2048 against each change
# switched off and against the session-4 path (both off), two rounds alternated.
set -o pipefail
cd "$(dirname "$0")"
L=$OUT/call1.log
date -u | tee $L
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv 2>&1 | tee -a $L
lscpu | grep 'Model name' | tee -a $L
R=$(cd ../.. && pwd); mkdir -p /work; [ -e /work/main ] || ln -s "$R" /work/main
for m in tiny tiny-gqa gqa-hd128; do
  echo "== cuda-vs-cpu $m" | tee -a $L
  timeout 60 ./djinn engine check cuda-vs-cpu --weights $m 2>&1 | tail -1 | tee -a $L
done
for m in gqa-hd128 llama2-7b; do
  echo "== consistency $m" | tee -a $L
  timeout 200 ./djinn engine check consistency --model $m 2>&1 | grep -E "PASS|FAIL|rror" | tee -a $L
done
echo "== GPU test binaries" | tee -a $L
for t in cuda_forward swap_cuda swap_backend; do
  echo "-- $t" | tee -a $L
  timeout 150 ./$t 2>&1 | grep -E "^test |test result|FAIL|panick|skip" | tee -a $L
done
mkdir -p /tmp/b
echo "== engine bench (all cases, default path)" | tee -a $L
timeout 200 ./djinn engine bench --out /tmp/b 2>&1 | tee -a $L
(cd /tmp/b && tar czf $OUT/bench1.tgz .)
echo "== A/B prefill 2048: default vs cuBLAS gate_up vs v7 attention vs session-4 path, two rounds" | tee -a $L
for i in 1 2; do
  for arm in new cublas_gu v7_old s4; do
    case $arm in new) E="";; cublas_gu) E="DJINN_CUDA_CUBLAS_GATE_UP=1";; v7_old) E="DJINN_CUDA_PREFILL_V7_OLD=1";;
      s4) E="DJINN_CUDA_CUBLAS_GATE_UP=1 DJINN_CUDA_PREFILL_V7_OLD=1";; esac
    echo "-- $arm $i ($E)" | tee -a $L
    env $E timeout 60 ./djinn engine bench --out /tmp/ab_${arm}_$i --prefill 2048 --batches 1 --contexts 512 2>&1 | grep -E "prefill  |profile prefill" | tee -a $L
  done
done
date -u | tee -a $L
