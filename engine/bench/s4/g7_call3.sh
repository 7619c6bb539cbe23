#!/bin/bash
# G7 call 3 (session 4): the committed binary with the shipped table (engine/data/gemm_configs.tsv,
# compiled in, no DJINN_CUDA_GEMM_TABLE): correctness, and a same-call A/B against the session-3
# tuning (DJINN_CUDA_GEMM_TUNE_V1=1), alternated, two rounds.
set -o pipefail
cd "$(dirname "$0")"
L=$OUT/call3.log
D=../../engine/tests/data
unset DJINN_CUDA_GEMM_TABLE
date -u | tee $L
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv 2>&1 | tee -a $L
for m in tiny tiny-gqa; do
  timeout 60 ./djinn engine check cuda-vs-cpu --weights $D/$m 2>&1 | tail -1 | tee -a $L
done
timeout 150 ./djinn engine check consistency --model llama2-7b 2>&1 | grep -E "PASS|FAIL|rror|table|falling" | tee -a $L
R=$(cd ../.. && pwd); mkdir -p /work; ln -sfn "$R" /work/wt-gemm
timeout 120 ./cuda_forward 2>&1 | grep -E "^test |test result|FAIL|panick" | tee -a $L
for i in 1 2; do
  for arm in new v1; do
    echo "-- $arm $i" | tee -a $L
    if [ $arm = v1 ]; then V=1; else V=0; fi
    DJINN_CUDA_GEMM_TUNE_V1=$V timeout 90 ./djinn engine bench --out $OUT/ab_${arm}_$i --prefill 512,2048,4096 --batches 1,64 --contexts 2048 2>&1 | grep -E "prefill  |decode_step|profile prefill|tuning|table" | tee -a $L
  done
done
date -u | tee -a $L
tar czf $OUT/runs3.tgz -C $OUT ab_new_1 ab_new_2 ab_v1_1 ab_v1_2 2>&1 | tee -a $L
rm -rf $OUT/ab_*
