#!/bin/bash
# G8 call 3 (final): the fused gate_up GEMM (one CTA per tile, TMA-store epilogue) as the default
# for prefill steps of >= 512 tokens. Own GEMM vs cuBLAS alone, every correctness check with the
# committed binaries, and the prefill A/B: own (default) vs cuBLAS + silu_mul
# (DJINN_CUDA_CUBLAS_GATE_UP=1) vs the 2-CTA cluster variant with its grid from the occupancy API
# (DJINN_CUDA_OWN_GEMM_CLUSTER=1), two rounds alternated.
set -o pipefail
cd "$(dirname "$0")"
L=$OUT/call3.log
date -u | tee $L
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv 2>&1 | tee -a $L
R=$(cd ../.. && pwd); mkdir -p /work; ln -sfn "$R" /work/wt-gemm-s5
echo "== own GEMM vs cuBLAS, f16, llama2-7b layer 0 gate_up" | tee -a $L
timeout 60 ./djinn engine gemm-search --own-gemm --rows 512,2048,4096 --own-gemm-reps 20 2>&1 | tee -a $L
echo "== own GEMM vs cuBLAS, bf16" | tee -a $L
timeout 60 ./djinn engine gemm-search --own-gemm --dtype bf16 --rows 2048 --own-gemm-reps 20 2>&1 | tee -a $L
echo "== consistency gqa-hd128" | tee -a $L
timeout 60 ./djinn engine check consistency --model gqa-hd128 2>&1 | grep -E "PASS|FAIL|rror|anic" | tee -a $L
echo "== consistency llama2-7b" | tee -a $L
timeout 150 ./djinn engine check consistency --model llama2-7b 2>&1 | grep -E "PASS|FAIL|rror|anic" | tee -a $L
echo "== consistency llama2-7b, fused GEMM checks with DJINN_CUDA_OWN_GEMM_CLUSTER=1" | tee -a $L
DJINN_CUDA_OWN_GEMM_CLUSTER=1 timeout 150 ./djinn engine check consistency --model llama2-7b 2>&1 | grep -E "gate_up|FAIL|rror|anic" | tee -a $L
for m in tiny tiny-gqa gqa-hd128; do
  echo "== cuda-vs-cpu $m" | tee -a $L
  timeout 60 ./djinn engine check cuda-vs-cpu --weights $m 2>&1 | tail -1 | tee -a $L
done
echo "== cuda_forward" | tee -a $L
timeout 90 ./cuda_forward 2>&1 | grep -E "^test |test result|FAIL|panick" | tee -a $L
for i in 1 2; do
  for arm in own cublas own_c2; do
    case $arm in own) E="";; cublas) E="DJINN_CUDA_CUBLAS_GATE_UP=1";; own_c2) E="DJINN_CUDA_OWN_GEMM_CLUSTER=1";; esac
    echo "-- $arm round $i ($E)" | tee -a $L
    env $E timeout 70 ./djinn engine bench --out /tmp/ab_${arm}_$i --prefill 512,2048,4096 --batches 1 --contexts 512 2>&1 | grep -E "prefill  |profile prefill|rror|anic" | tee -a $L
  done
done
(cd /tmp && tar czf $OUT/call3_runs.tgz ab_*)
date -u | tee -a $L
