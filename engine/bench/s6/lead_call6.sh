#!/bin/bash
# Lead's call 6 (session 6): the card's power during back-to-back prefills, from NVML's energy counter (not
# nvidia-smi's 1-second power average): pruned (default) vs whole last layer, two rounds, prefill 2048 only.
set -o pipefail
cd "$(dirname "$0")"
L=$OUT/call6.log
date -u | tee $L
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv 2>&1 | tee -a $L
mkdir -p /tmp/e
for i in 1 2; do
  for arm in pruned full; do
    case $arm in pruned) E="";; full) E="DJINN_CUDA_FULL_LAST_LAYER=1";; esac
    echo "-- $arm $i ($E)" | tee -a $L
    env $E timeout 90 python3 energy_probe.py /tmp/e/${arm}_$i.csv -- ./djinn engine bench --out /tmp/e/b_${arm}_$i --prefill 2048 --batches 1 --contexts 512 2>&1 | grep -E "prefill  |energy probe" | tee -a $L
  done
done
(cd /tmp && tar czf $OUT/energy.tgz e)
date -u | tee -a $L
