#!/bin/bash
# Lead's third call (session 4): the host-side refactor after call 2 (one synthetic prompt for the
# prefill benchmarks and gemm-search; one configuration step in the cuBLASLt search) runs.
set -o pipefail
cd "$(dirname "$0")"
L=$OUT/final3.log
date -u | tee $L
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv 2>&1 | tee -a $L
echo "== engine bench prefill" | tee -a $L
timeout 90 ./djinn engine bench --out /tmp/b3 --prefill 512,2048 --batches 1 --contexts 512 2>&1 | grep -E "prefill  |decode_step|profile prefill" | tee -a $L
echo "== gemm-search at 512 rows (short)" | tee -a $L
timeout 120 ./djinn engine gemm-search --rows 512 --out /tmp/g.tsv --max-screened 40 --hot-finalists 2 --heat-ms 300 2>&1 | tail -8 | cut -c1-400 | tee -a $L
wc -l /tmp/g.tsv | tee -a $L
date -u | tee -a $L
