#!/bin/bash
# G8 call 1: own wgmma GEMM (gate_up, fused SiLU-mul) vs cuBLAS alone at real shapes, then the
# consistency checks (gqa-hd128, llama2-7b) and one round of the prefill A/B.
set -o pipefail
cd "$(dirname "$0")"
L=$OUT/call1.log
date -u | tee $L
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv 2>&1 | tee -a $L
echo "== own GEMM vs cuBLAS, f16, llama2-7b layer 0 gate_up" | tee -a $L
timeout 90 ./djinn engine gemm-search --own-gemm --rows 256,512,1024,2048,4096 --own-gemm-reps 20 2>&1 | tee -a $L
echo "== own GEMM vs cuBLAS, bf16" | tee -a $L
timeout 60 ./djinn engine gemm-search --own-gemm --dtype bf16 --rows 2048 --own-gemm-reps 20 2>&1 | tee -a $L
echo "== consistency gqa-hd128" | tee -a $L
timeout 60 ./djinn engine check consistency --model gqa-hd128 2>&1 | grep -E "PASS|FAIL|rror|anic" | tee -a $L
echo "== consistency llama2-7b" | tee -a $L
timeout 150 ./djinn engine check consistency --model llama2-7b 2>&1 | grep -E "PASS|FAIL|rror|anic" | tee -a $L
for arm in own cublas; do
  case $arm in own) E="";; cublas) E="DJINN_CUDA_CUBLAS_GATE_UP=1";; esac
  echo "-- $arm ($E)" | tee -a $L
  env $E timeout 70 ./djinn engine bench --out /tmp/ab_$arm --prefill 512,2048,4096 --batches 1 --contexts 512 2>&1 | grep -E "prefill  |profile prefill|rror|anic" | tee -a $L
done
date -u | tee -a $L
