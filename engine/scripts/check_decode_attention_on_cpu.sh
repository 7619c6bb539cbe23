#!/usr/bin/env bash
# The decode attention kernels (engine/src/cuda/kernels/decode_attention.cu) run on the CPU with a
# small SIMT emulator (engine/scripts/simt/: one thread per CUDA thread, warp shuffles through
# barriers, "half" stored as the top 16 bits of a float), so a machine without a GPU can check the
# per-query-head and per-KV-head kernels and their split merge against a plain softmax(q K^T) V.
# Needs g++ with C++20. Usage (repository root): engine/scripts/check_decode_attention_on_cpu.sh
# Exit status 0 when every case is within 0.02 (the 8-bit-mantissa output rounding is ~0.004).
# About 4 minutes on 2 cores (a thread per CUDA thread).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
kernels=$here/../src/cuda/kernels
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat "$kernels/common.cu" "$kernels/decode_attention.cu" >"$work/kernels.cu"
# head_dim, block size, query heads, KV heads, longest context: MHA, groups of 2, 4, 7 and 8.
for shape in "32 4 4 4 37" "32 4 8 2 37" "64 16 8 1 50" "128 16 32 8 77" "128 16 28 4 300"; do
    set -- $shape
    g++ -std=c++20 -O1 -pthread -w -I"$here/simt" -DKERNELS="\"$work/kernels.cu\"" \
        -DHEAD_DIM=$1 -DBLOCK_SIZE=$2 -DNH=$3 -DNKV=$4 -DGQA_GROUP=$(($3 / $4)) -DLEN0=$5 -DUSE_BF16=0 \
        "$here/simt/main.cpp" -o "$work/check"
    echo "== head_dim $1, block $2, $3 query heads over $4 KV heads, contexts $5, 1 and $((2 * $2 + 1))"
    "$work/check"
done
