#!/bin/bash
# Lead's call 2 (session 6) on the final engine (pruned last layer by default): correctness (checks,
# GPU test binaries), the full engine bench with the HF peers in the same call, a same-call A/B of
# prefill 2048 (pruned vs whole last layer, three rounds, SM clock / power sampled), then the 7B
# engine-vs-HF-transformers logit comparison on the same weights (short prompt + a 2048-token prefill).
set -o pipefail
cd "$(dirname "$0")"
L=$OUT/call2.log
date -u | tee $L
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv 2>&1 | tee -a $L
lscpu | grep 'Model name' | tee -a $L
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
mkdir -p /tmp/b2
echo "== engine bench (all cases, default path)" | tee -a $L
timeout 200 ./djinn engine bench --out /tmp/b2 2>&1 | tee -a $L
echo "== HF transformers bench (same card, same call)" | tee -a $L
timeout 260 python3 hf_bench.py /tmp/b2/hf_bench.json --quick 2>&1 | grep -v -i warn | tee -a $L
python3 bench_side_by_side.py /tmp/b2/engine_bench.json /tmp/b2/hf_bench.json /tmp/b2/side_by_side 2>&1 | tee -a $L
(cd /tmp/b2 && tar czf $OUT/bench2.tgz .)
echo "== A/B prefill 2048: pruned (default) vs whole last layer, three rounds, nvidia-smi every 50 ms" | tee -a $L
mkdir -p /tmp/smi
for i in 1 2 3; do
  for arm in pruned full; do
    case $arm in pruned) E="";; full) E="DJINN_CUDA_FULL_LAST_LAYER=1";; esac
    echo "-- $arm $i ($E)" | tee -a $L
    nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv,noheader -lms 50 -f /tmp/smi/${arm}_$i.csv &
    P=$!
    env $E timeout 60 ./djinn engine bench --out /tmp/ab_${arm}_$i --prefill 2048 --batches 1 --contexts 512 2>&1 | grep -E "prefill  |profile prefill" | tee -a $L
    kill $P; wait $P 2>/dev/null
  done
done
(cd /tmp && tar czf $OUT/ab2.tgz ab_* smi)
echo "== llama2-7b engine vs HF transformers on the same weights (hf-dump + hf_compare_7b.py)" | tee -a $L
timeout 150 ./djinn engine check hf-dump --model llama2-7b --out /tmp/hf7b 2>&1 | tail -3 | tee -a $L
timeout 200 python3 hf_compare_7b.py /tmp/hf7b $OUT/hf_compare_7b.json 2>&1 | grep -v -i warn | tee -a $L
echo "hf_compare exit ${PIPESTATUS[0]}" | tee -a $L
date -u | tee -a $L
