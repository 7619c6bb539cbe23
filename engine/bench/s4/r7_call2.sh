#!/bin/bash
# R7 call 2 (session 4), final code: fp16/bf16 residual stream for steps of >= 64 tokens (f32 below),
# 16-byte RMSNorm for the T residual; correctness, then a same-call A/B against the f32 stream
# (DJINN_CUDA_F32_RESIDUAL=1 = the session-3 path of the same binary), two rounds alternated.
set -o pipefail
cd "$(dirname "$0")"
L=$OUT/call2.log
date -u | tee $L
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv 2>&1 | tee -a $L
for arm in new f32 halfall; do
  E=""; [ $arm = f32 ] && E="DJINN_CUDA_F32_RESIDUAL=1"; [ $arm = halfall ] && E="DJINN_CUDA_HALF_RESIDUAL_MIN_TOKENS=1"
  for m in tiny tiny-gqa; do
    echo "== cuda-vs-cpu $m ($arm: $E)" | tee -a $L
    env $E timeout 60 ./djinn engine check cuda-vs-cpu --weights ../../engine/tests/data/$m 2>&1 | tail -1 | tee -a $L
  done
done
for m in tiny-gqa llama2-7b; do
  echo "== consistency $m (new)" | tee -a $L
  timeout 150 ./djinn engine check consistency --model $m 2>&1 | grep -E "PASS|FAIL|rror" | tee -a $L
done
R=$(cd ../.. && pwd); mkdir -p /work; ln -sfn "$R" /work/wt-resid
for t in cuda_forward swap_backend; do
  echo "== test binary $t" | tee -a $L
  timeout 120 ./$t 2>&1 | grep -E "^test |test result|FAIL|panick|skip" | tee -a $L
done
B="--prefill 512,2048,4096 --batches 1,8,64 --contexts 512,2048"
for i in 1 2; do
  for arm in new f32 halfall rope16; do
    [ $i = 2 ] && { [ $arm = halfall ] || [ $arm = rope16 ]; } && continue
    E=""; B2="$B"
    [ $arm = f32 ] && E="DJINN_CUDA_F32_RESIDUAL=1"
    [ $arm = halfall ] && E="DJINN_CUDA_HALF_RESIDUAL_MIN_TOKENS=1"
    [ $arm = rope16 ] && { E="DJINN_CUDA_ROPE_KV_16B=1"; B2="--prefill 2048 --batches 1 --contexts 512"; }
    echo "== bench $arm round $i ($E)" | tee -a $L
    env $E timeout 120 ./djinn engine bench --out $OUT/b_${arm}_$i $B2 2>&1 | grep -E "prefill  |decode_step|profile prefill|tuning" | tee -a $L
  done
done
date -u | tee -a $L
cd $OUT && tar czf runs.tgz b_* && rm -rf b_*
