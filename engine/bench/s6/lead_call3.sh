#!/bin/bash
# Lead's call 3 (session 6): the 2-CTA multicast own GEMM (opt-in, DJINN_CUDA_OWN_GEMM_CLUSTER=1) with the
# peer release at CTA scope (CUTLASS's form) instead of session 5's .release.cluster on every consumer warp's
# arrive. Standalone timing against one CTA per tile and cuBLAS (both arrive forms), correctness of the cluster
# path, then a same-call A/B of prefill 2048 (default vs clusters), three rounds.
set -o pipefail
cd "$(dirname "$0")"
L=$OUT/call3.log
date -u | tee $L
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv 2>&1 | tee -a $L
R=$(cd ../.. && pwd); mkdir -p /work; [ -e /work/main ] || ln -s "$R" /work/main
for v in 0 1; do
  echo "== gemm-search --own-gemm, DJINN_CUDA_OWN_GEMM_PEER_ARRIVE_CLUSTER=$v" | tee -a $L
  env DJINN_CUDA_OWN_GEMM_PEER_ARRIVE_CLUSTER=$v timeout 120 ./djinn engine gemm-search --own-gemm --rows 512,2048,4096 2>&1 | grep -v "^ *memory" | tail -25 | tee -a $L
done
echo "== A/B prefill: default vs 2-CTA clusters (CTA-scope peer release), three rounds" | tee -a $L
for i in 1 2 3; do
  for arm in default c2; do
    case $arm in default) E="";; c2) E="DJINN_CUDA_OWN_GEMM_CLUSTER=1";; esac
    echo "-- $arm $i ($E)" | tee -a $L
    env $E timeout 90 ./djinn engine bench --out /tmp/ab_${arm}_$i --prefill 512,2048,4096 --batches 1 --contexts 512 2>&1 | grep -E "prefill  |profile prefill" | tee -a $L
  done
done
echo "== consistency llama2-7b (cluster checks included)" | tee -a $L
DJINN_CUDA_OWN_GEMM_CLUSTER=1 timeout 240 ./djinn engine check consistency --model llama2-7b 2>&1 | grep -E "PASS|FAIL|rror" | tee -a $L
echo "consistency exit ${PIPESTATUS[0]}" | tee -a $L
date -u | tee -a $L
