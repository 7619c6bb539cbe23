#!/bin/bash
# Lead's call 2 (session 5) on main 8598b51 (v7p attention + fused gate_up by default; G9's fused qkv
# off by default, DJINN_CUDA_OWN_QKV_MIN_TOKENS=512 turns it on). Correctness of the default path and of
# the fused qkv (its relaxed layer-0 pool check has not run on the GPU yet), GPU test binaries, the full
# engine bench with the HF peers in the same call, then a same-call A/B of prefill 2048 with the SM
# clock and board power sampled by nvidia-smi during every arm (the card runs at its 700 W cap).
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
  timeout 240 ./djinn engine check consistency --model $m 2>&1 | grep -E "PASS|FAIL|rror" | tee -a $L
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
echo "== A/B prefill 2048 with nvidia-smi sampling (20 ms): default vs fused qkv on vs session-4 path, two rounds" | tee -a $L
S=$OUT/smi_ab.csv; : > $S
for i in 1 2; do
  for arm in new qkv s4; do
    case $arm in new) E="";; qkv) E="DJINN_CUDA_OWN_QKV_MIN_TOKENS=512";;
      s4) E="DJINN_CUDA_CUBLAS_GATE_UP=1 DJINN_CUDA_PREFILL_V7_OLD=1";; esac
    echo "-- $arm $i ($E)" | tee -a $L
    nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv,noheader -lms 20 | sed "s/^/$arm $i, /" >> $S &
    P=$!
    env $E timeout 60 ./djinn engine bench --out /tmp/ab_${arm}_$i --prefill 2048 --batches 1 --contexts 512 2>&1 | grep -E "prefill  |profile prefill" | tee -a $L
    kill $P; wait $P 2>/dev/null
  done
done
date -u | tee -a $L
