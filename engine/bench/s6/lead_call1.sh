#!/bin/bash
# Lead's call 1 (session 6): the pruned last layer of prefill steps (attention as a decode batch,
# o_proj and MLP on each sequence's last row only). Correctness first (new consistency check (9):
# pruned == whole last layer), GPU test binaries, then a same-call A/B of prefill 512/2048/4096:
# default (pruned) vs DJINN_CUDA_FULL_LAST_LAYER=1, and pruned + fused qkv, three rounds alternated,
# SM clock / power sampled by nvidia-smi.
set -o pipefail
cd "$(dirname "$0")"
L=$OUT/call1.log
date -u | tee $L
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv 2>&1 | tee -a $L
R=$(cd ../.. && pwd); mkdir -p /work; [ -e /work/main ] || ln -s "$R" /work/main
for m in tiny tiny-gqa gqa-hd128; do
  echo "== cuda-vs-cpu $m" | tee -a $L
  timeout 60 ./djinn engine check cuda-vs-cpu --weights $m 2>&1 | tail -1 | tee -a $L
done
for m in gqa-hd128 llama2-7b; do
  echo "== consistency $m" | tee -a $L
  timeout 240 ./djinn engine check consistency --model $m 2>&1 | grep -E "PASS|FAIL|rror" | tee -a $L
  echo "consistency $m exit ${PIPESTATUS[0]}" | tee -a $L
done
echo "== GPU test binaries" | tee -a $L
for t in cuda_forward swap_backend; do
  echo "-- $t" | tee -a $L
  timeout 150 ./$t 2>&1 | grep -E "^test |test result|FAIL|panick|skip" | tee -a $L
done
echo "== A/B prefill: pruned (default) vs whole last layer vs pruned + fused qkv, three rounds" | tee -a $L
S=$OUT/smi_ab.csv; : > $S
for i in 1 2 3; do
  for arm in pruned full qkv; do
    case $arm in pruned) E="";; full) E="DJINN_CUDA_FULL_LAST_LAYER=1";;
      qkv) E="DJINN_CUDA_OWN_QKV_MIN_TOKENS=512";; esac
    echo "-- $arm $i ($E)" | tee -a $L
    nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv,noheader -lms 50 | sed "s/^/$arm $i, /" >> $S &
    P=$!
    env $E timeout 90 ./djinn engine bench --out /tmp/ab_${arm}_$i --prefill 512,2048,4096 --batches 1 --contexts 512 2>&1 | grep -E "prefill  |profile prefill" | tee -a $L
    kill $P; wait $P 2>/dev/null
  done
done
(cd /tmp && tar czf $OUT/ab_runs.tgz ab_*)
date -u | tee -a $L
