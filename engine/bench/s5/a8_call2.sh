#!/bin/bash
# Note: this call ran commit 9c3ffd7, where the default was the lean softmax and DJINN_CUDA_PREFILL_V7P_PLAIN=1
# chose the call-1 kernel; from 79f081e on the call-1 kernel is the default again and the lean one is
# DJINN_CUDA_PREFILL_V7P_LEAN=1 (V7P_PLAIN no longer exists).
# A8 call 2 (session 5): v7p with the shorter softmax chains (default) vs v7p with v7's softmax
# (DJINN_CUDA_PREFILL_V7P_PLAIN=1, the default of call 1) vs today's v7 (DJINN_CUDA_PREFILL_V7_OLD=1):
# correctness of all three in this call (incl. the new batched-prefill check), three A/B rounds
# alternated, and the per-phase trace of the default (diagnostic build, layer 0).
set -o pipefail
cd "$(dirname "$0")"
L=$OUT/a8_call2.log
date -u | tee $L
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv 2>&1 | tee -a $L
R=$(cd ../.. && pwd); mkdir -p /work; ln -sfn "$R" /work/wt-attn-s5
OK=1
echo "== consistency gqa-hd128 (default: v7p)" | tee -a $L
timeout 40 ./djinn engine check consistency --model gqa-hd128 2>&1 | grep -E "PASS|FAIL|rror" | tee -a $L
RC=${PIPESTATUS[0]}
[ $RC -eq 0 ] || { echo "v7p gqa-hd128 consistency: TIMEOUT/FAIL rc=$RC" | tee -a $L; OK=0; }
if [ $OK = 1 ]; then
  echo "== consistency llama2-7b (default: v7p)" | tee -a $L
  timeout 120 ./djinn engine check consistency --model llama2-7b 2>&1 | grep -E "PASS|FAIL|rror" | tee -a $L || echo "v7p 7B: TIMEOUT/FAIL" | tee -a $L
fi
for m in tiny-gqa gqa-hd128; do
  echo "== cuda-vs-cpu $m (default)" | tee -a $L
  timeout 60 ./djinn engine check cuda-vs-cpu --weights $m 2>&1 | tail -1 | tee -a $L
done
echo "-- cuda_forward (default)" | tee -a $L
timeout 60 ./cuda_forward 2>&1 | grep -E "^test |test result|FAIL|panick" | tee -a $L
for v in V7P_PLAIN V7_OLD; do
  echo "== consistency llama2-7b, DJINN_CUDA_PREFILL_$v=1 (wgmma checks)" | tee -a $L
  env DJINN_CUDA_PREFILL_$v=1 timeout 120 ./djinn engine check consistency --model llama2-7b 2>&1 | grep -E "wgmma|FAIL|rror" | grep -v "^consistency:" | tee -a $L || echo "$v 7B: TIMEOUT/FAIL" | tee -a $L
  echo "== consistency gqa-hd128, DJINN_CUDA_PREFILL_$v=1 (wgmma checks)" | tee -a $L
  env DJINN_CUDA_PREFILL_$v=1 timeout 30 ./djinn engine check consistency --model gqa-hd128 2>&1 | grep -E "wgmma|FAIL|rror" | grep -v "^consistency:" | tee -a $L || echo "$v gqa: TIMEOUT/FAIL" | tee -a $L
done
echo "== A/B prefill: v7p (default) vs v7p plain softmax vs v7 (today's), three rounds alternated" | tee -a $L
for i in 1 2 3; do
  for arm in p p1 old; do
    case $arm in p) E=""; [ $OK = 1 ] || continue;; p1) E="DJINN_CUDA_PREFILL_V7P_PLAIN=1";; old) E="DJINN_CUDA_PREFILL_V7_OLD=1";; esac
    echo "-- $arm $i ($E)" | tee -a $L
    env $E timeout 60 ./djinn engine bench --out /tmp/ab_${arm}_$i --prefill 512,2048,4096 --batches 1 --contexts 512 2>&1 | grep -E "prefill  |profile prefill" | tee -a $L
  done
done
if [ $OK = 1 ]; then
  echo "== trace of v7p (DJINN_CUDA_ATTN_TRACE=1, diagnostic build), prefill 2048" | tee -a $L
  DJINN_CUDA_ATTN_TRACE=1 timeout 60 ./djinn engine bench --out /tmp/tr2048 --prefill 2048 --batches 1 --contexts 512 > $OUT/trace2048.txt 2>&1
  grep -E "prefill  |profile prefill" $OUT/trace2048.txt | tee -a $L
  DJINN_CUDA_PREFILL_V7P_PLAIN=1 DJINN_CUDA_ATTN_TRACE=1 timeout 60 ./djinn engine bench --out /tmp/tr2048p1 --prefill 2048 --batches 1 --contexts 512 > $OUT/trace2048_plain.txt 2>&1
  grep -E "prefill  |profile prefill" $OUT/trace2048_plain.txt | tee -a $L
  (cd $OUT && gzip trace2048.txt trace2048_plain.txt)
fi
(cd /tmp && tar czf $OUT/a8_call2_bench.tgz ab_* 2>/dev/null)
date -u | tee -a $L
