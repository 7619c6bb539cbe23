#!/bin/bash
# Lead's call 7 (session 6) on ba11feb (the duplicates mend: one wrapper for finishing legacy-stream work):
# the swap test binaries and checks that go through it, the CUDA forward tests, and consistency on gqa-hd128.
set -o pipefail
cd "$(dirname "$0")"
L=$OUT/call7.log
date -u | tee $L
nvidia-smi --query-gpu=name,driver_version --format=csv 2>&1 | tee -a $L
R=$(cd ../.. && pwd); mkdir -p /work; [ -e /work/main ] || ln -s "$R" /work/main
for t in cuda_forward swap_cuda swap_backend; do
  echo "-- $t" | tee -a $L
  timeout 150 ./$t 2>&1 | grep -E "^test |test result|FAIL|panick|skip" | tee -a $L
done
echo "== swap-check" | tee -a $L
timeout 120 ./djinn engine swap-check 2>&1 | tail -4 | tee -a $L
echo "swap-check exit ${PIPESTATUS[0]}" | tee -a $L
echo "== consistency gqa-hd128" | tee -a $L
timeout 120 ./djinn engine check consistency --model gqa-hd128 2>&1 | grep -cE "PASS" | tee -a $L
timeout 120 ./djinn engine check consistency --model gqa-hd128 2>&1 | grep -E "FAIL|rror" | tee -a $L
echo "== cuda-vs-cpu tiny-gqa" | tee -a $L
timeout 60 ./djinn engine check cuda-vs-cpu --weights tiny-gqa 2>&1 | tail -1 | tee -a $L
date -u | tee -a $L
