#!/usr/bin/env python3
"""HF transformers on the same card as `djinn engine bench`: the engine's model presets (Llama-2-7B by
default; Llama-3.1-8B with its RoPE scaling, Qwen2.5-7B with q/k/v biases), random weights, SDPA
attention.

Two peers, side by side:
  - hf-eager: `model.generate` with the default dynamic KV cache (what most users run);
  - hf-static-compile: a static KV cache with `generate`'s own torch.compile (CompileConfig
    mode="reduce-overhead", fullgraph=True: CUDA graphs) -- the strongest recipe a user can run with
    transformers alone.

Decode: ms per generated token = median interval between successive logits-processor calls inside
`generate` (each interval is one decode step: forward, sampling, bookkeeping), synchronised. HF
eager at batch 1 is launch-bound (its step time follows the host CPU), so it is timed over
`EAGER_B1_CALLS` generate calls of `EAGER_B1_STEPS` steps each (median over all intervals), and the
host CPU model and library versions are printed with the figures.
Prefill: one forward over the prompt (logits of the last token only where supported).

Writes a JSON list of rows in the same schema as the engine bench (floors and ratios included), so
`djinn engine bench --hf-results FILE` prints them beside its own rows.

Usage: python3 hf_bench.py OUT.json [--quick] [--eager-only]
       python3 hf_bench.py OUT.json --model llama3.1-8b --dtype bf16 --decode 1:2048,1:32768,8:8192 \
           --prefill 8192,32768 --chunks 2048@32768,2048@100000 [--compile-contexts 2048,32768]
With --model, only the given shapes run (decode B:CONTEXT, prefill from empty, CHUNK@CACHED chunks on
a cached context: the cache of CACHED tokens is built once and cropped back after each timed chunk),
and static cache + torch.compile runs decode batch 1 at each --compile-contexts. Rows that fail (out
of memory, a compile error) are printed and skipped.
"""
import json
import statistics
import sys
import time

import torch

DATASHEET_BW, MEASURED_BW = 3.35e12, 3.0e12
DATASHEET_FLOPS, MEASURED_FLOPS = 989e12, 790e12

# Must match engine::config::ModelConfig's presets.
PRESETS = {
    "llama2-7b": dict(hidden=4096, inter=11008, layers=32, heads=32, kv_heads=32, vocab=32000, theta=1e4,
                      positions=4096, eps=1e-5),
    "llama3.1-8b": dict(hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8, vocab=128256, theta=5e5,
                        positions=131072, eps=1e-5,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192)),
    "qwen2.5-7b": dict(hidden=3584, inter=18944, layers=28, heads=28, kv_heads=4, vocab=152064, theta=1e6,
                       positions=32768, eps=1e-6, qkv_bias=True),
}
SHAPE = PRESETS["llama2-7b"]


def linear_params_per_layer(shape):
    head_dim = shape["hidden"] // shape["heads"]
    qkv = shape["hidden"] * (shape["heads"] + 2 * shape["kv_heads"]) * head_dim
    return qkv + shape["hidden"] * shape["hidden"] + 3 * shape["hidden"] * shape["inter"]


def weight_bytes_per_step(shape):
    """Bytes of every weight a decode step reads (all but the embedding table), 2 bytes each."""
    return 2 * (shape["layers"] * (linear_params_per_layer(shape) + 2 * shape["hidden"]) + shape["hidden"]
                + shape["vocab"] * shape["hidden"])


def kv_bytes_per_token(shape):
    return 2 * shape["layers"] * shape["kv_heads"] * (shape["hidden"] // shape["heads"]) * 2


EAGER_B1_CALLS, EAGER_B1_STEPS = 3, 32


def host_cpu_model():
    try:
        import subprocess

        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.strip().startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except Exception:  # noqa: BLE001 -- informational only
        pass
    return "unknown"


def row(system, kind, batch, tokens, times_ms, cached=0):
    """A result row in the engine bench's schema; floors as `djinn engine bench` computes them (linear
    2 x params per token, causal attention 2 x layers x hidden x pairs x 2)."""
    times_ms = sorted(times_ms)
    p50 = statistics.median(times_ms)
    layers, hidden = SHAPE["layers"], SHAPE["hidden"]
    if kind == "decode_step":
        bytes_moved = weight_bytes_per_step(SHAPE) + batch * tokens * kv_bytes_per_token(SHAPE)
        flops = 2.0 * (weight_bytes_per_step(SHAPE) / 2) * batch
        tps = batch / (p50 / 1e3)
    else:
        bytes_moved = weight_bytes_per_step(SHAPE) + (cached + tokens) * kv_bytes_per_token(SHAPE)
        pairs = tokens * cached + tokens * tokens / 2.0
        flops = 2.0 * layers * linear_params_per_layer(SHAPE) * tokens + 4.0 * pairs * hidden * layers
        tps = tokens / (p50 / 1e3)
    floor_ds = max(bytes_moved / DATASHEET_BW, flops / DATASHEET_FLOPS) * 1e3
    floor_ms = max(bytes_moved / MEASURED_BW, flops / MEASURED_FLOPS) * 1e3
    r = dict(
        system=system, kind=kind, batch=batch, tokens=tokens, cached_tokens=cached, ms_p50=p50,
        ms_mean=sum(times_ms) / len(times_ms), ms_min=times_ms[0], reps=len(times_ms),
        tokens_per_s=tps, bytes_moved_min=float(bytes_moved), flops=float(flops),
        floor_ms_datasheet=floor_ds, floor_ms_measured_rates=floor_ms,
        ratio_to_datasheet_floor=p50 / floor_ds, ratio_to_measured_floor=p50 / floor_ms,
    )
    on = f" on {cached:>6} cached" if cached else ""
    print(f"{system:<18} {kind:<13} batch {batch:>3} tokens {tokens:>6}{on}: {p50:9.3f} ms p50 (min {times_ms[0]:.3f}, "
          f"n={len(times_ms)}) | floor {floor_ds:.3f} ms (x{p50 / floor_ds:.2f}), {floor_ms:.3f} ms @measured (x{p50 / floor_ms:.2f})",
          flush=True)
    return r


class StepTimer:
    """Logits processor that records a synchronised timestamp at every decode step."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores):
        torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return scores


def decode_intervals(model, prompt, new_tokens, **generate_kwargs):
    from transformers import LogitsProcessorList

    timer = StepTimer()
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([timer]), pad_token_id=0, **generate_kwargs)
    stamps = timer.stamps
    # Interval i = decode step i (the first stamp closes the prefill); drop the first 3 (warm-up).
    return [(b - a) * 1e3 for a, b in zip(stamps[3:], stamps[4:])]


def time_prefill(model, n, reps):
    ids = torch.randint(0, SHAPE["vocab"], (1, n), device="cuda")
    times = []
    with torch.no_grad():
        for i in range(reps + 2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                model(ids, logits_to_keep=1)
            except TypeError:
                model(ids)
            torch.cuda.synchronize()
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
    return times


def main():
    if "--model" in sys.argv:
        return shapes_main()
    out_path = sys.argv[1]
    quick = "--quick" in sys.argv
    eager_only = "--eager-only" in sys.argv  # skip the static-cache + torch.compile peer
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}, "
          f"host CPU: {host_cpu_model()} ({__import__('os').cpu_count()} logical CPUs)", flush=True)
    cfg = LlamaConfig(hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["inter"],
                      num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
                      num_key_value_heads=SHAPE["kv_heads"], vocab_size=SHAPE["vocab"],
                      max_position_embeddings=SHAPE["positions"], rms_norm_eps=SHAPE["eps"], rope_theta=SHAPE["theta"])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.float16).eval()
    print(f"model built in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(1)

    def prompt(batch, ctx):
        # The first decode step attends to ctx tokens (ctx - 1 prompt tokens + the new one).
        return torch.randint(0, SHAPE["vocab"], (batch, ctx - 1), device="cuda", generator=gen)

    # Eager, dynamic cache.
    eager_cases = [(1, 512), (1, 2048)] + ([] if quick else [(8, 2048), (32, 2048)])
    for batch, ctx in eager_cases:
        try:
            if batch == 1:
                # The judged peer: several generate calls, median over all their intervals.
                p = prompt(batch, ctx)
                times = []
                for _ in range(EAGER_B1_CALLS):
                    times += decode_intervals(model, p, EAGER_B1_STEPS)
            else:
                times = decode_intervals(model, prompt(batch, ctx), 24)
            rows.append(row("hf-eager", "decode_step", batch, ctx, times))
        except Exception as e:  # noqa: BLE001 -- report and go on (e.g. out of memory)
            print(f"hf-eager decode batch {batch} ctx {ctx} failed: {type(e).__name__}: {e}", flush=True)
        torch.cuda.empty_cache()
    for n in [512, 2048] + ([] if quick else [4096]):
        try:
            rows.append(row("hf-eager", "prefill", 1, n, time_prefill(model, n, 5)))
        except Exception as e:  # noqa: BLE001
            print(f"hf-eager prefill {n} failed: {type(e).__name__}: {e}", flush=True)
        torch.cuda.empty_cache()
    json.dump(rows, open(out_path, "w"), indent=1)
    if eager_only:
        print(f"wrote {out_path}", flush=True)
        return

    # Static cache + torch.compile(mode="reduce-overhead"). Recent transformers compile the forward
    # inside `generate` when the cache is static (CompileConfig); compiling `model.forward` by hand
    # as well failed on transformers 5.17 ("accessing tensor output of CUDAGraphs that has been
    # overwritten", H100, 2026-11-27), so this uses generate's own compilation.
    try:
        from transformers import CompileConfig

        t0 = time.perf_counter()
        model.generation_config.cache_implementation = "static"
        model.generation_config.compile_config = CompileConfig(mode="reduce-overhead", fullgraph=True)
        p = prompt(1, 512)
        for _ in range(2):  # compile + record the graphs for these shapes
            decode_intervals(model, p, 64)
        print(f"torch.compile warm-up {time.perf_counter() - t0:.1f} s", flush=True)
        times = decode_intervals(model, p, 64) + decode_intervals(model, p, 64)
        rows.append(row("hf-static-compile", "decode_step", 1, 512, times))
    except Exception as e:  # noqa: BLE001
        print(f"hf-static-compile failed: {type(e).__name__}: {e}", flush=True)
    json.dump(rows, open(out_path, "w"), indent=1)
    print(f"wrote {out_path}", flush=True)


def build_model(name, dtype):
    """Random weights of a preset on the GPU (HF's own initialisation), SDPA attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = PRESETS[name]
    config = dict(
        model_type="qwen2" if shape.get("qkv_bias") else "llama", hidden_size=shape["hidden"],
        intermediate_size=shape["inter"], num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
        max_position_embeddings=shape["positions"], rms_norm_eps=shape["eps"], rope_theta=shape["theta"],
        rope_scaling=shape.get("rope_scaling"), tie_word_embeddings=False,
    )
    cfg = AutoConfig.for_model(**config)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype).eval()
    return model


def time_chunk(model, chunk, cached, reps):
    """A `chunk`-token prefill on top of `cached` tokens: the cache is built once (not timed) and
    cropped back to `cached` tokens after each timed forward."""
    vocab = SHAPE["vocab"]
    history = torch.randint(0, vocab, (1, cached), device="cuda")
    ids = torch.randint(0, vocab, (1, chunk), device="cuda")
    with torch.no_grad():
        cache = model(history, use_cache=True, logits_to_keep=1).past_key_values
        times = []
        for i in range(reps + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
            if i >= 1:
                times.append((time.perf_counter() - t0) * 1e3)
            cache.crop(cached)
    return times


def shapes_main():
    """`--model NAME`: the given shapes only (see the module doc)."""
    import argparse

    global SHAPE
    import transformers

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--model", choices=sorted(PRESETS), required=True)
    parser.add_argument("--dtype", choices=["f16", "bf16"], default="bf16")
    parser.add_argument("--decode", default="", help="B:CONTEXT,... (context includes the new token)")
    parser.add_argument("--prefill", default="", help="prompt lengths from empty")
    parser.add_argument("--chunks", default="", help="CHUNK@CACHED,...")
    parser.add_argument("--compile-contexts", default="", help="static cache + torch.compile decode, batch 1")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per generate call")
    args = parser.parse_args()
    SHAPE = PRESETS[args.model]
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}, "
          f"host CPU: {host_cpu_model()}; {args.model} {dtype}", flush=True)
    t0 = time.perf_counter()
    model = build_model(args.model, dtype)
    print(f"model built in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(1)

    def attempt(label, measure):
        try:
            rows.append(measure())
        except Exception as e:  # noqa: BLE001 -- report and go on (out of memory, compile errors)
            print(f"{label} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        torch.cuda.empty_cache()
        json.dump(rows, open(args.out, "w"), indent=1)

    for n in ints(args.prefill):
        attempt(f"hf-eager prefill {n}", lambda: row("hf-eager", "prefill", 1, n, time_prefill(model, n, 3)))
    for text in [c for c in args.chunks.split(",") if c]:
        chunk, cached = (int(x) for x in text.split("@"))
        attempt(f"hf-eager chunk {chunk} on {cached}",
                lambda: row("hf-eager", "prefill_chunk", 1, chunk, time_chunk(model, chunk, cached, 3), cached))
    for text in [c for c in args.decode.split(",") if c]:
        batch, ctx = (int(x) for x in text.split(":"))
        prompt = torch.randint(0, SHAPE["vocab"], (batch, ctx - 1), device="cuda", generator=gen)
        attempt(f"hf-eager decode batch {batch} ctx {ctx}",
                lambda: row("hf-eager", "decode_step", batch, ctx, decode_intervals(model, prompt, args.steps)))
    if ints(args.compile_contexts):
        from transformers import CompileConfig

        model.generation_config.cache_implementation = "static"
        model.generation_config.compile_config = CompileConfig(mode="reduce-overhead", fullgraph=True)
        for ctx in ints(args.compile_contexts):
            prompt = torch.randint(0, SHAPE["vocab"], (1, ctx - 1), device="cuda", generator=gen)

            def measure():
                decode_intervals(model, prompt, args.steps)  # compile + record the graphs
                return row("hf-static-compile", "decode_step", 1, ctx,
                           decode_intervals(model, prompt, args.steps) + decode_intervals(model, prompt, args.steps))

            attempt(f"hf-static-compile decode ctx {ctx}", measure)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
