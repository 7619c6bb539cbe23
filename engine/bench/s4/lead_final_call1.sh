#!/bin/bash
# Lead's final call (session 4) on the merged main (R7 fp16 residual, G7 search off by default, A7 v7
# opt-in): correctness of the default path, v7 verification, GPU test binaries, the full engine bench
# with the HF peers in the same call, then a same-call A/B of prefill attention v6 (default) vs v7.
# Steps are in priority order and log straight to $OUT, so a cut-off call still returns its log.
set -o pipefail
cd "$(dirname "$0")"
L=$OUT/final.log
date -u | tee $L
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv 2>&1 | tee -a $L
lscpu | grep 'Model name' | tee -a $L
R=$(cd ../.. && pwd); mkdir -p /work; [ -e /work/main ] || ln -s "$R" /work/main
for m in tiny tiny-gqa gqa-hd128; do
  echo "== cuda-vs-cpu $m" | tee -a $L
  timeout 60 ./djinn engine check cuda-vs-cpu --weights $m 2>&1 | tail -1 | tee -a $L
done
echo "== consistency tiny-gqa" | tee -a $L
timeout 60 ./djinn engine check consistency --model tiny-gqa 2>&1 | grep -E "PASS|FAIL|rror" | tee -a $L
echo "== consistency llama2-7b (default: v6 attention)" | tee -a $L
timeout 150 ./djinn engine check consistency --model llama2-7b 2>&1 | grep -E "PASS|FAIL|rror" | tee -a $L
echo "== consistency llama2-7b, DJINN_CUDA_PREFILL_V7=1" | tee -a $L
DJINN_CUDA_PREFILL_V7=1 timeout 150 ./djinn engine check consistency --model llama2-7b 2>&1 | grep -E "PASS|FAIL|rror" | tee -a $L || echo "V7 7B: TIMEOUT/FAIL" | tee -a $L
echo "== consistency gqa-hd128, DJINN_CUDA_PREFILL_V7=1" | tee -a $L
DJINN_CUDA_PREFILL_V7=1 timeout 40 ./djinn engine check consistency --model gqa-hd128 2>&1 | grep -E "PASS|FAIL|rror" | tee -a $L || echo "V7 gqa: TIMEOUT/FAIL" | tee -a $L
echo "== GPU test binaries" | tee -a $L
for t in cuda_forward swap_cuda swap_backend; do
  echo "-- $t" | tee -a $L
  timeout 150 ./$t 2>&1 | grep -E "^test |test result|FAIL|panick|skip" | tee -a $L
done
echo "-- cuda_forward, DJINN_CUDA_PREFILL_V7=1" | tee -a $L
DJINN_CUDA_PREFILL_V7=1 timeout 60 ./cuda_forward 2>&1 | grep -E "^test |test result|FAIL|panick" | tee -a $L
mkdir -p /tmp/b
echo "== engine bench (all cases, default path)" | tee -a $L
timeout 150 ./djinn engine bench --out /tmp/b 2>&1 | tee -a $L
echo "== HF transformers bench (same card, same call)" | tee -a $L
timeout 240 python3 hf_bench.py /tmp/b/hf_bench.json 2>&1 | grep -v -i warn | tee -a $L
python3 bench_side_by_side.py /tmp/b/engine_bench.json /tmp/b/hf_bench.json /tmp/b/side_by_side 2>&1 | tee -a $L
(cd /tmp/b && tar czf $OUT/bench.tgz .)
echo "== A/B prefill attention: v6 (default) vs v7 (DJINN_CUDA_PREFILL_V7=1), two rounds alternated" | tee -a $L
for i in 1 2; do
  for arm in v7 v6; do
    E=""; [ $arm = v7 ] && E="DJINN_CUDA_PREFILL_V7=1"
    echo "-- $arm $i" | tee -a $L
    env $E timeout 60 ./djinn engine bench --out /tmp/ab_${arm}_$i --prefill 512,2048,4096 --batches 1 --contexts 512 2>&1 | grep -E "prefill  |profile prefill" | tee -a $L
  done
done
for v in V7_STAGES2 V7_PINGPONG; do
  echo "== consistency gqa-hd128, DJINN_CUDA_PREFILL_$v=1 (2-stage deadlock fix)" | tee -a $L
  env DJINN_CUDA_PREFILL_$v=1 timeout 25 ./djinn engine check consistency --model gqa-hd128 2>&1 | grep -E "PASS|FAIL|rror" | tee -a $L || echo "$v: TIMEOUT/FAIL" | tee -a $L
done
date -u | tee -a $L
