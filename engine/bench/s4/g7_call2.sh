#!/bin/bash
# G7 call 2 (session 4): search at 512/2048/4096 with the in-forward comparison at 2048, correctness
# with the searched table, same-call A/B (searched table vs session-3 tuning), gap diagnostics.
set -o pipefail
cd "$(dirname "$0")"
L=$OUT/call2.log
D=../../engine/tests/data
date -u | tee $L
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv 2>&1 | tee -a $L
echo "== gemm-search" | tee -a $L
timeout 240 ./djinn engine gemm-search --rows 512,2048,4096 --max-screened 300 --heat-ms 1000 --rounds 4 --in-forward-rows 2048 --in-forward-arms 4 --in-forward-rounds 3 --out $OUT/gemm_configs.tsv 2>&1 | tee -a $L
export DJINN_CUDA_GEMM_TABLE=$OUT/gemm_configs.tsv
echo "== correctness with the searched table" | tee -a $L
for m in tiny tiny-gqa; do
  timeout 60 ./djinn engine check cuda-vs-cpu --weights $D/$m 2>&1 | tail -1 | tee -a $L
done
timeout 150 ./djinn engine check consistency --model llama2-7b 2>&1 | grep -E "PASS|FAIL|rror|table|falling" | tee -a $L
R=$(cd ../.. && pwd); mkdir -p /work; ln -sfn "$R" /work/wt-gemm
timeout 120 ./cuda_forward 2>&1 | grep -E "^test |test result|FAIL|panick" | tee -a $L
echo "== A/B: searched table (new) vs session-3 tuning (v1), alternated, two rounds" | tee -a $L
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv -lms 250 > $OUT/smi.csv 2>&1 &
SMI=$!
for i in 1 2; do
  for arm in new v1; do
    echo "-- $arm $i" | tee -a $L
    if [ $arm = v1 ]; then V=1; else V=0; fi
    DJINN_CUDA_GEMM_TUNE_V1=$V timeout 90 ./djinn engine bench --out $OUT/ab_${arm}_$i --prefill 512,2048,4096 --batches 1,64 --contexts 2048 2>&1 | grep -E "prefill  |decode_step|profile prefill|tuning|table" | tee -a $L
  done
done
echo "== gap diagnostics (prefill 2048, events around each step, hot profile right after)" | tee -a $L
for arm in new v1; do
  echo "-- $arm" | tee -a $L
  if [ $arm = v1 ]; then V=1; else V=0; fi
  DJINN_CUDA_GEMM_TUNE_V1=$V DJINN_BENCH_PREFILL_GAP=1 timeout 90 ./djinn engine bench --out $OUT/gap_$arm --prefill 2048 --batches 1 --contexts 512 2>&1 | grep -E "prefill|gap" | tee -a $L
done
kill $SMI
date -u | tee -a $L
tar czf $OUT/runs.tgz -C $OUT ab_new_1 ab_new_2 ab_v1_1 ab_v1_2 gap_new gap_v1 2>&1 | tee -a $L
rm -rf $OUT/ab_* $OUT/gap_*
ls -la $OUT | tee -a $L
