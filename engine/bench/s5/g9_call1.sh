#!/bin/bash
# G9 call 1: the fused qkv GEMM (gemm_ws_qkv: RoPE on k + paged KV write in the epilogue, no
# rope_kv_write) as the default for prefill steps >= 512 tokens. Every correctness check with the
# committed binaries, then the prefill A/B: fused (default) vs cuBLAS qkv + rope_kv_write
# (DJINN_CUDA_CUBLAS_QKV=1), two rounds alternated.
set -o pipefail
cd "$(dirname "$0")"
L=$OUT/g9_call1.log
date -u | tee $L
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv 2>&1 | tee -a $L
R=$(cd ../.. && pwd); mkdir -p /work; ln -sfn "$R" /work/wt-qkv-s5
echo "== consistency gqa-hd128" | tee -a $L
timeout 60 ./djinn engine check consistency --model gqa-hd128 2>&1 | grep -E "PASS|FAIL|rror|anic|elements|qkv" | tee -a $L
echo "== consistency llama2-7b" | tee -a $L
timeout 170 ./djinn engine check consistency --model llama2-7b 2>&1 | grep -E "PASS|FAIL|rror|anic|elements|qkv" | tee -a $L
for m in tiny tiny-gqa gqa-hd128; do
  echo "== cuda-vs-cpu $m" | tee -a $L
  timeout 60 ./djinn engine check cuda-vs-cpu --weights $m 2>&1 | tail -1 | tee -a $L
done
echo "== cuda_forward" | tee -a $L
timeout 90 ./cuda_forward 2>&1 | grep -E "^test |test result|FAIL|panick" | tee -a $L
for i in 1 2; do
  for arm in fused cublas; do
    case $arm in fused) E="";; cublas) E="DJINN_CUDA_CUBLAS_QKV=1";; esac
    echo "-- $arm round $i ($E)" | tee -a $L
    env $E timeout 70 ./djinn engine bench --out /tmp/ab_${arm}_$i --prefill 512,2048,4096 --batches 1 --contexts 512 2>&1 | grep -E "prefill  |profile prefill|rror|anic" | tee -a $L
  done
done
(cd /tmp && tar czf $OUT/g9_call1_runs.tgz ab_*)
date -u | tee -a $L
