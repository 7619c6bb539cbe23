#!/usr/bin/env bash
# GPU validation of the engine at Llama-3.1-8B / Qwen2.5-7B scale on one H100 (~19 min in all; ONLY,
# below, runs it in parts of under 10 minutes each).
#
# Usage (repository root, after `cargo build --release --features cuda`):
#   engine/scripts/gpu_validate_scale.sh target/release/djinn OUT_DIR
# Environment: PYTHON (default python3, with torch + transformers + safetensors for the HF steps);
# SKIP_CARGO_TESTS=1 skips step 1 (it builds the CUDA test binaries with cargo); ONLY=a,b,c runs
# only the named steps (e.g. ONLY=engine-run, then the rest by name).
#
# Steps, in order, each bounded by `timeout` (its log in OUT_DIR/<step>.log, one line per step in
# OUT_DIR/summary.txt with its exit status and seconds; a failed step does not stop the others):
#   1. cuda-tests: cargo's CUDA forward tests (tiny presets against the CPU, Llama-3 scaling and
#      q/k/v biases included; decode attention per KV head for groups of 4 and 7 against the CPU;
#      a 480-token chunked context; the start-up KV demand refusal; shared prefix blocks
#      bit-identical to unshared execution through a hit, a swap, a drop and the publisher's end)
#      and the CUDA engine behind the run loop (swaps, greedy tokens against a recompute).
#   2. check-*: `engine check cuda-vs-cpu` on the tiny GQA presets (fp16 and bf16), and
#      `engine check consistency` (every optional path against its reference, decode attention per
#      KV head against per query head included) on llama3.1-8b and qwen2.5-7b with random weights.
#   3. hf-bench then bench: HF transformers (SDPA, bf16; static cache + torch.compile at batch 1)
#      and `engine bench --model llama3.1-8b`: decode at batch 1/8/32 x context 2k/8k/32k/128k
#      (shapes that do not fit the card are skipped and said so), prefill 8k and 32k, a 2k chunk
#      on 32k and on 100k cached tokens, each beside its floor; HF rows printed beside the engine's.
#      bench-decode-per-query-head: the same decode rows with the per-query-head decode attention
#      (the kernel before the per-KV-head one), to measure what reading KV once per KV head gives.
#   4. hf-dump + hf-compare: the engine's logits on its own random llama3.1-8b weights against HF
#      (fp32 reference): a short prompt, a 32k-token prefill and 8 decode steps at 32k context.
#   5. swap-bench: swaps of 42k-token (43008, 5.25 GiB) llama3.1-8b contexts, 4 agents per direction.
#   6. engine-run: `djinn engine run` of coding-agent at real token counts on llama3.1-8b
#      (engine/scripts/workloads/coding-agent-h100-run.toml: 24 agents, 4-10 calls each, a 2,048-token
#      prefix shared by all) with djinn, vllm, swap and pin, each against its simulated twin on the
#      derived llama3.1-8b x h100-sxm profile (--compare-sim): turn latency P50/P99, TTFT, decode step,
#      swap GB/s, swap and drop counts, prefix hits. Simulated at 100-115 s a policy: ~8 min in all.
set -u
if [ $# -ne 2 ]; then
    echo "usage: $0 DJINN_BINARY OUT_DIR" >&2
    exit 2
fi
BIN=$1
OUT=$2
PY=${PYTHON:-python3}
if [ ! -x "$BIN" ]; then
    echo "$BIN: not an executable djinn binary" >&2
    exit 2
fi
mkdir -p "$OUT"
: >"$OUT/summary.txt"
failed=0

# step NAME SECONDS COMMAND...: runs COMMAND under `timeout`, output to OUT/NAME.log.
step() {
    local name=$1 limit=$2
    shift 2
    if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then
        return 0
    fi
    echo "== $name (at most ${limit} s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    [ $rc -eq 0 ] || failed=1
    echo "$name rc=$rc $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    tail -n 25 "$OUT/$name.log"
}

{
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv,noheader 2>&1
    "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' 2>&1
} >"$OUT/provenance.txt"
cat "$OUT/provenance.txt"

if [ "${SKIP_CARGO_TESTS:-0}" != 1 ]; then
    step cuda-tests 300 cargo test --release --features cuda -p engine --test cuda_forward \
        --test swap_backend -- --nocapture
fi
for preset in tiny-gqa-llama3 tiny-gqa-bias; do
    for dtype in f16 bf16; do
        step "check-cuda-vs-cpu-$preset-$dtype" 60 "$BIN" engine check cuda-vs-cpu \
            --weights "engine/tests/data/$preset" --dtype "$dtype"
    done
done
step check-consistency-llama3.1-8b 60 "$BIN" engine check consistency --model llama3.1-8b --dtype bf16
step check-consistency-qwen2.5-7b 60 "$BIN" engine check consistency --model qwen2.5-7b --dtype bf16

step hf-bench 150 "$PY" engine/scripts/hf_bench.py "$OUT/hf_bench.json" --model llama3.1-8b --dtype bf16 \
    --decode 1:2048,1:32768,8:8192,32:2048 --prefill 8192,32768 --chunks 2048@32768 --compile-contexts 2048
hf_results=()
[ -s "$OUT/hf_bench.json" ] && hf_results=(--hf-results "$OUT/hf_bench.json")
step bench 150 "$BIN" engine bench --model llama3.1-8b --dtype bf16 \
    --prefill 8192,32768 --chunks 2048@32768,2048@100000 \
    --batches 1,8,32 --contexts 2048,8192,32768,131072 "${hf_results[@]}" --out "$OUT/bench"

step bench-decode-per-query-head 120 "$BIN" engine bench --model llama3.1-8b --dtype bf16 \
    --prefill 512 --batches 1,8,32 --contexts 2048,8192,32768,131072 \
    --decode-attention per-query-head --out "$OUT/bench-decode-per-query-head"

step hf-dump 90 "$BIN" engine check hf-dump --model llama3.1-8b --dtype bf16 \
    --long 32768 --long-decode 8 --out "$OUT/hf-dump"
step hf-compare 150 "$PY" engine/scripts/hf_compare_long.py "$OUT/hf-dump" "$OUT/hf_compare_long.json"
# The checkpoint is 16 GB of random weights: keep the logits and the comparison only.
rm -f "$OUT/hf-dump/model.safetensors"

step swap-bench 120 "$BIN" engine swap-bench --model llama3.1-8b --agents 4 --agent-context 43008 \
    --reps 3 --decode none --out "$OUT/swap"

step engine-run 540 "$BIN" engine run --backend cuda --model llama3.1-8b --card h100-sxm \
    -w engine/scripts/workloads/coding-agent-h100-run.toml --agents 24 \
    -p djinn -p vllm -p swap -p pin --compare-sim --out "$OUT/engine-run"

echo "== summary"
cat "$OUT/summary.txt"
exit $failed
