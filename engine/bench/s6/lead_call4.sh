#!/bin/bash
# Lead's call 4 (session 6) on the final code: the legacy-stream syncs (poison / wipe / start-up uploads
# finish before the non-blocking streams run) and the CTA-scope peer release of the opt-in 2-CTA GEMM on
# top of call 2's engine. Every correctness check and GPU test binary, a same-call A/B of prefill 2048
# (pruned vs whole last layer, three rounds); the binary is kept in /tmp/smol for the SmolLM2 calls
# (the GGUF is larger than one carry: two parts, two calls).
set -o pipefail
cd "$(dirname "$0")"
L=$OUT/call4.log
date -u | tee $L
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv 2>&1 | tee -a $L
lscpu | grep 'Model name' | tee -a $L
mkdir -p /tmp/smol && cp ./djinn /tmp/smol/
R=$(cd ../.. && pwd); mkdir -p /work; [ -e /work/main ] || ln -s "$R" /work/main
for m in tiny tiny-gqa gqa-hd128; do
  echo "== cuda-vs-cpu $m" | tee -a $L
  timeout 60 ./djinn engine check cuda-vs-cpu --weights $m 2>&1 | tail -1 | tee -a $L
done
for m in gqa-hd128 llama2-7b; do
  echo "== consistency $m" | tee -a $L
  timeout 240 ./djinn engine check consistency --model $m 2>&1 | grep -E "PASS|FAIL|rror|layer 0:" | tee -a $L
  echo "consistency $m exit ${PIPESTATUS[0]}" | tee -a $L
done
echo "== GPU test binaries" | tee -a $L
for t in cuda_forward swap_cuda swap_backend; do
  echo "-- $t" | tee -a $L
  timeout 150 ./$t 2>&1 | grep -E "^test |test result|FAIL|panick|skip" | tee -a $L
done
echo "== A/B prefill 512/2048/4096: pruned (default) vs whole last layer, three rounds" | tee -a $L
for i in 1 2 3; do
  for arm in pruned full; do
    case $arm in pruned) E="";; full) E="DJINN_CUDA_FULL_LAST_LAYER=1";; esac
    echo "-- $arm $i ($E)" | tee -a $L
    env $E timeout 90 ./djinn engine bench --out /tmp/ab_${arm}_$i --prefill 512,2048,4096 --batches 1 --contexts 512 2>&1 | grep -E "prefill  |profile prefill" | tee -a $L
  done
done
(cd /tmp && tar czf $OUT/ab4.tgz ab_*)
date -u | tee -a $L
