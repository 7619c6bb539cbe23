#!/bin/bash
# R7 call 1 (session 4): fp16 residual stream + 16-byte RoPE/KV write, same-call A/B against the f32
# stream (DJINN_CUDA_F32_RESIDUAL=1 DJINN_CUDA_ROPE_KV_V1=1 = the session-3 path of the same binary),
# plus correctness for both arms.
# (First version of the code, never committed: there the fp16 stream ran on every step,
# the 16-byte RoPE was the default and DJINN_CUDA_ROPE_KV_V1=1 / DJINN_CUDA_NORM_ROWS8=1 selected the
# 4-byte RoPE / the 16-byte RMSNorm; the committed code renamed these, see NOTES-cuda.md Session 4.)
set -o pipefail
cd "$(dirname "$0")"
L=$OUT/call1.log
date -u | tee $L
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv 2>&1 | tee -a $L
OLD="DJINN_CUDA_F32_RESIDUAL=1 DJINN_CUDA_ROPE_KV_V1=1"
for arm in new old; do
  E=""; [ $arm = old ] && E="$OLD"
  for m in tiny tiny-gqa; do
    echo "== cuda-vs-cpu $m ($arm)" | tee -a $L
    env $E timeout 60 ./djinn engine check cuda-vs-cpu --weights ../../engine/tests/data/$m 2>&1 | tail -1 | tee -a $L
  done
done
for m in tiny-gqa llama2-7b; do
  echo "== consistency $m (new)" | tee -a $L
  timeout 150 ./djinn engine check consistency --model $m 2>&1 | grep -E "PASS|FAIL|rror" | tee -a $L
done
echo "== cuda_forward (new)" | tee -a $L
R=$(cd ../.. && pwd); mkdir -p /work; ln -sfn "$R" /work/wt-resid
timeout 120 ./cuda_forward 2>&1 | grep -E "^test |test result|FAIL|panick|skip" | tee -a $L
B="--prefill 512,2048,4096 --batches 1,8,64 --contexts 512,2048"
for i in 1 2; do
  for arm in new old rows8; do
    [ $arm = rows8 ] && [ $i = 2 ] && continue
    E=""; [ $arm = old ] && E="$OLD"; [ $arm = rows8 ] && E="DJINN_CUDA_NORM_ROWS8=1"
    echo "== bench $arm round $i ($E)" | tee -a $L
    env $E timeout 120 ./djinn engine bench --out $OUT/b_${arm}_$i $B 2>&1 | grep -E "prefill  |decode_step|profile prefill|tuning|GEMM m=" | tee -a $L
  done
done
date -u | tee -a $L
cd $OUT && tar czf runs.tgz b_* && rm -rf b_*
