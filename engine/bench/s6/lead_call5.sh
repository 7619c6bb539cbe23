#!/bin/bash
# Lead's call 5 (session 6): SmolLM2-135M-Instruct (Q4_1 GGUF, reassembled from call 4's part and this
# one, sha256 checked) on the final code: greedy chat continuation on the CPU and on the GPU (coherent and
# identical), and the scripted CUDA-vs-CPU logit comparison on the same GGUF.
set -o pipefail
cd "$(dirname "$0")"
L=$OUT/call5.log
date -u | tee $L
nvidia-smi --query-gpu=name,driver_version --format=csv 2>&1 | tee -a $L
G=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
cat /tmp/smol/part_a part_b > $G
sha256sum $G | tee -a $L
echo "expected b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53" | tee -a $L
for b in cpu cuda; do
  echo "== generate --backend $b" | tee -a $L
  timeout 120 /tmp/smol/djinn engine generate --gguf $G --backend $b --chat --prompt "What is the capital of France?" --steps 32 > /tmp/smol/gen_$b.txt 2>/tmp/smol/gen_$b.err
  echo "exit $?" | tee -a $L
  cat /tmp/smol/gen_$b.txt | tee -a $L
done
cmp /tmp/smol/gen_cpu.txt /tmp/smol/gen_cuda.txt && echo "CPU and CUDA continuations identical" | tee -a $L
echo "== generate --backend cuda, a longer answer (64 steps)" | tee -a $L
for b in cpu cuda; do
  timeout 120 /tmp/smol/djinn engine generate --gguf $G --backend $b --chat --prompt "Write two sentences about the ocean." --steps 64 > /tmp/smol/long_$b.txt 2>/dev/null
done
cat /tmp/smol/long_cuda.txt | tee -a $L
cmp /tmp/smol/long_cpu.txt /tmp/smol/long_cuda.txt && echo "CPU and CUDA continuations identical (64 steps)" | tee -a $L
echo "== check cuda-vs-cpu on the GGUF" | tee -a $L
timeout 200 /tmp/smol/djinn engine check cuda-vs-cpu --weights $G 2>&1 | tail -4 | tee -a $L
echo "exit ${PIPESTATUS[0]}" | tee -a $L
date -u | tee -a $L
