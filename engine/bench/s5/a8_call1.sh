#!/bin/bash
# A8 call 1 (session 5): prefill attention v7p (persistent v7) as the default; correctness of the
# default in this call, then a same-call A/B (v7p / today's v7 / v7 3-stage ping-pong, three rounds
# alternated) and a per-phase trace of v7p (diagnostic build, layer 0).
set -o pipefail
cd "$(dirname "$0")"
L=$OUT/a8_call1.log
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
echo "== consistency gqa-hd128, DJINN_CUDA_PREFILL_V7S3_PINGPONG=1" | tee -a $L
PP=1
DJINN_CUDA_PREFILL_V7S3_PINGPONG=1 timeout 30 ./djinn engine check consistency --model gqa-hd128 2>&1 | grep -E "PASS|FAIL|rror" | tee -a $L || { echo "pp3: TIMEOUT/FAIL" | tee -a $L; PP=0; }
echo "== consistency gqa-hd128, DJINN_CUDA_PREFILL_V7_OLD=1 (the new batched check on today's v7)" | tee -a $L
DJINN_CUDA_PREFILL_V7_OLD=1 timeout 30 ./djinn engine check consistency --model gqa-hd128 2>&1 | grep -E "wgmma|FAIL|rror" | tee -a $L
echo "== A/B prefill: v7p (default) vs v7 (DJINN_CUDA_PREFILL_V7_OLD=1) vs v7 3-stage ping-pong, three rounds alternated" | tee -a $L
for i in 1 2 3; do
  for arm in p old pp3; do
    case $arm in p) E=""; [ $OK = 1 ] || continue;; old) E="DJINN_CUDA_PREFILL_V7_OLD=1";; pp3) E="DJINN_CUDA_PREFILL_V7S3_PINGPONG=1"; [ $PP = 1 ] || continue;; esac
    echo "-- $arm $i ($E)" | tee -a $L
    env $E timeout 60 ./djinn engine bench --out /tmp/ab_${arm}_$i --prefill 512,2048,4096 --batches 1 --contexts 512 2>&1 | grep -E "prefill  |profile prefill" | tee -a $L
  done
done
if [ $OK = 1 ]; then
  echo "== trace of v7p (DJINN_CUDA_ATTN_TRACE=1, diagnostic build), prefill 2048 and 4096" | tee -a $L
  DJINN_CUDA_ATTN_TRACE=1 timeout 60 ./djinn engine bench --out /tmp/tr2048 --prefill 2048 --batches 1 --contexts 512 > $OUT/trace2048.txt 2>&1
  grep -E "prefill  |profile prefill" $OUT/trace2048.txt | tee -a $L
  DJINN_CUDA_ATTN_TRACE=1 timeout 60 ./djinn engine bench --out /tmp/tr4096 --prefill 4096 --batches 1 --contexts 512 > $OUT/trace4096.txt 2>&1
  grep -E "prefill  |profile prefill" $OUT/trace4096.txt | tee -a $L
  (cd $OUT && gzip trace2048.txt trace4096.txt)
fi
(cd /tmp && tar czf $OUT/a8_call1_bench.tgz ab_* 2>/dev/null)
date -u | tee -a $L
