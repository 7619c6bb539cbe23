#!/bin/bash
# Lead's call 3 (session 5): the duplicates mend (one env parser and one setter for the step-size
# thresholds, one later-turn step in the consistency checks) re-run on the GPU.
set -o pipefail
cd "$(dirname "$0")"
L=$OUT/call3.log
date -u | tee $L
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv 2>&1 | tee -a $L
for m in gqa-hd128 llama2-7b; do
  echo "== consistency $m" | tee -a $L
  timeout 240 ./djinn engine check consistency --model $m 2>&1 | grep -E "PASS|FAIL|rror" | tee -a $L
  echo "consistency $m exit ${PIPESTATUS[0]}" | tee -a $L
done
echo "== bad threshold value (must exit non-zero naming the variable)" | tee -a $L
DJINN_CUDA_OWN_GATE_UP_MIN_TOKENS=abc timeout 60 ./djinn engine check cuda-vs-cpu --weights gqa-hd128 2>&1 | tail -2 | tee -a $L
echo "exit ${PIPESTATUS[0]}" | tee -a $L
echo "== prefill 2048 (default)" | tee -a $L
timeout 60 ./djinn engine bench --out /tmp/b3 --prefill 2048 --batches 1 --contexts 512 2>&1 | grep -E "prefill  " | tee -a $L
date -u | tee -a $L
