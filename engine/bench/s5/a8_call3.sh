#!/bin/bash
# A8 call 3 (session 5): the final default (v7p with v7's softmax, the kernel of call 1; the lean
# softmax behind DJINN_CUDA_PREFILL_V7P_LEAN=1): correctness in this call, a two-round A/B against
# today's v7 (DJINN_CUDA_PREFILL_V7_OLD=1), and a diagnostic trace of the loop without its softmax
# (DJINN_CUDA_ATTN_DIAG=1, wrong results by design) next to the normal trace.
set -o pipefail
cd "$(dirname "$0")"
L=$OUT/a8_call3.log
date -u | tee $L
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv 2>&1 | tee -a $L
R=$(cd ../.. && pwd); mkdir -p /work; ln -sfn "$R" /work/wt-attn-s5
echo "== consistency gqa-hd128 (default: v7p)" | tee -a $L
timeout 40 ./djinn engine check consistency --model gqa-hd128 2>&1 | grep -E "PASS|FAIL|rror" | tee -a $L || echo "gqa: TIMEOUT/FAIL" | tee -a $L
echo "== consistency llama2-7b (default: v7p)" | tee -a $L
timeout 120 ./djinn engine check consistency --model llama2-7b 2>&1 | grep -E "PASS|FAIL|rror" | tee -a $L || echo "7B: TIMEOUT/FAIL" | tee -a $L
for m in tiny-gqa gqa-hd128; do
  echo "== cuda-vs-cpu $m (default)" | tee -a $L
  timeout 60 ./djinn engine check cuda-vs-cpu --weights $m 2>&1 | tail -1 | tee -a $L
done
echo "-- cuda_forward (default)" | tee -a $L
timeout 60 ./cuda_forward 2>&1 | grep -E "^test |test result|FAIL|panick" | tee -a $L
echo "== A/B prefill: v7p (default) vs v7 (DJINN_CUDA_PREFILL_V7_OLD=1), two rounds alternated" | tee -a $L
for i in 1 2; do
  for arm in p old; do
    case $arm in p) E="";; old) E="DJINN_CUDA_PREFILL_V7_OLD=1";; esac
    echo "-- $arm $i ($E)" | tee -a $L
    env $E timeout 60 ./djinn engine bench --out /tmp/ab_${arm}_$i --prefill 512,2048,4096 --batches 1 --contexts 512 2>&1 | grep -E "prefill  |profile prefill" | tee -a $L
  done
done
echo "== traces (layer 0, prefill 2048): v7p, then v7p without softmax (DJINN_CUDA_ATTN_DIAG=1)" | tee -a $L
DJINN_CUDA_ATTN_TRACE=1 timeout 60 ./djinn engine bench --out /tmp/tr --prefill 2048 --batches 1 --contexts 512 > $OUT/trace2048.txt 2>&1
grep -E "prefill  |profile prefill" $OUT/trace2048.txt | tee -a $L
DJINN_CUDA_ATTN_DIAG=1 DJINN_CUDA_ATTN_TRACE=1 timeout 60 ./djinn engine bench --out /tmp/trd --prefill 2048 --batches 1 --contexts 512 > $OUT/trace2048_nosoftmax.txt 2>&1
grep -E "prefill  |profile prefill" $OUT/trace2048_nosoftmax.txt | tee -a $L
(cd $OUT && gzip trace2048.txt trace2048_nosoftmax.txt)
(cd /tmp && tar czf $OUT/a8_call3_bench.tgz ab_* 2>/dev/null)
date -u | tee -a $L
