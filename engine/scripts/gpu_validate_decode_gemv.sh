#!/usr/bin/env bash
# GPU validation of the multi-row streaming GEMV (`--decode-gemm gemv`, decode steps of 2-32
# sequences) on one card, in one command (repository root; a few minutes on an H100):
#   engine/scripts/gpu_validate_decode_gemv.sh DJINN_BIN OUT_DIR [TEST_BIN...]
# DJINN_BIN is `target/release/djinn` built with `--features cuda`. A GPU machine without Rust gets
# the test binaries prebuilt: `cargo test --release -p engine --features cuda --test cuda_batch_gemv
# --test cuda_forward --no-run` prints their paths; pass them as TEST_BIN (run from `engine/`, as
# cargo runs them). Without TEST_BIN the tests are built and run with cargo.
# Steps (log of each in OUT_DIR/<step>.log, one line per step in OUT_DIR/summary.txt with its exit
# status; a failed step does not stop the others; the script exits 1 if any failed):
#   1. kernel-tests (test-<binary> per TEST_BIN): engine/tests/cuda_batch_gemv.rs: the kernel against cuBLAS on Llama-3.1-8B's
#      shapes (m 2/3/5/8/17/32, every output kind, gate_up with SiLU fused, an odd n, a k off the
#      32-element groups) in bf16 and fp16, and decode batches 2-32 of a random model on it against
#      cuBLAS; then engine/tests/cuda_forward.rs (the consistency checks now include decode batches
#      2/3/8 on it against cuBLAS on the tiny models).
#   2. consistency: `djinn engine check consistency` on llama3.1-8b bf16 (random weights), which
#      ends with decode batches 2, 3 and 8 on the multi-row GEMV against cuBLAS.
#   3. bench: `djinn engine bench` on llama3.1-8b bf16, decode batches 1-32 at contexts 512 and 2048,
#      every row timed with cuBLAS and with the multi-row GEMV back to back, printed side by side
#      with the ratio of each to the measured-rates floor (OUT_DIR/engine_bench.json and .csv).
set -u
if [ $# -lt 2 ]; then
    echo "usage: $0 DJINN_BIN OUT_DIR [TEST_BIN...]" >&2
    exit 2
fi
BIN=$(realpath "$1")
OUT=$(realpath -m "$2")
shift 2
[ -x "$BIN" ] || { echo "$BIN: not an executable" >&2; exit 2; }
mkdir -p "$OUT" || exit 2
: > "$OUT/summary.txt"
failed=0
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || failed=1
}
if [ $# -gt 0 ]; then
    for t in "$@"; do
        # cargo runs test binaries from their crate's folder: the tests find their data there.
        step "test-$(basename "$t")" 900 env -C engine "$(realpath "$t")" --nocapture --test-threads 1
    done
else
    step kernel-tests 900 cargo test --release -p engine --features cuda \
        --test cuda_batch_gemv --test cuda_forward -- --nocapture --test-threads 1
fi
step consistency 600 "$BIN" engine check consistency --model llama3.1-8b --dtype bf16
step bench 600 "$BIN" engine bench --model llama3.1-8b --dtype bf16 --prefill 512 \
    --batches 1,2,4,8,16,32 --contexts 512,2048 --decode-gemm-arms cublas,gemv --out "$OUT"
grep -h "^decode batch" "$OUT/bench.log" | tee "$OUT/decode_gemm_side_by_side.txt"
exit $failed
