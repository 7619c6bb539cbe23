#!/usr/bin/env python3
"""HF transformers on the same card as `djinn engine bench`: Llama-2-7B shape, random fp16 weights.

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
"""
import json
import statistics
import sys
import time

import torch

DATASHEET_BW, MEASURED_BW = 3.35e12, 3.0e12
DATASHEET_FLOPS, MEASURED_FLOPS = 989e12, 790e12
HIDDEN, INTER, LAYERS, HEADS, VOCAB = 4096, 11008, 32, 32, 32000
LINEAR_PARAMS_PER_LAYER = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER
WEIGHT_BYTES_PER_STEP = 2 * (LAYERS * (LINEAR_PARAMS_PER_LAYER + 2 * HIDDEN) + HIDDEN + VOCAB * HIDDEN)
KV_BYTES_PER_TOKEN = 2 * LAYERS * HIDDEN * 2


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


def row(system, kind, batch, tokens, times_ms):
    times_ms = sorted(times_ms)
    p50 = statistics.median(times_ms)
    if kind == "decode_step":
        bytes_moved = WEIGHT_BYTES_PER_STEP + batch * tokens * KV_BYTES_PER_TOKEN
        flops = 2.0 * (WEIGHT_BYTES_PER_STEP / 2) * batch
        tps = batch / (p50 / 1e3)
    else:
        bytes_moved = WEIGHT_BYTES_PER_STEP + tokens * KV_BYTES_PER_TOKEN
        flops = 2.0 * LAYERS * LINEAR_PARAMS_PER_LAYER * tokens + 2.0 * tokens * tokens * HIDDEN * LAYERS
        tps = tokens / (p50 / 1e3)
    floor_ds = max(bytes_moved / DATASHEET_BW, flops / DATASHEET_FLOPS) * 1e3
    floor_ms = max(bytes_moved / MEASURED_BW, flops / MEASURED_FLOPS) * 1e3
    r = dict(
        system=system, kind=kind, batch=batch, tokens=tokens, ms_p50=p50,
        ms_mean=sum(times_ms) / len(times_ms), ms_min=times_ms[0], reps=len(times_ms),
        tokens_per_s=tps, bytes_moved_min=float(bytes_moved), flops=float(flops),
        floor_ms_datasheet=floor_ds, floor_ms_measured_rates=floor_ms,
        ratio_to_datasheet_floor=p50 / floor_ds, ratio_to_measured_floor=p50 / floor_ms,
    )
    print(f"{system:<18} {kind:<12} batch {batch:>3} tokens {tokens:>5}: {p50:9.3f} ms p50 (min {times_ms[0]:.3f}, "
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
    ids = torch.randint(0, VOCAB, (1, n), device="cuda")
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
    out_path = sys.argv[1]
    quick = "--quick" in sys.argv
    eager_only = "--eager-only" in sys.argv  # skip the static-cache + torch.compile peer
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}, "
          f"host CPU: {host_cpu_model()} ({__import__('os').cpu_count()} logical CPUs)", flush=True)
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=HEADS, vocab_size=VOCAB, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      rope_theta=10000.0)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.float16).eval()
    print(f"model built in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(1)

    def prompt(batch, ctx):
        # The first decode step attends to ctx tokens (ctx - 1 prompt tokens + the new one).
        return torch.randint(0, VOCAB, (batch, ctx - 1), device="cuda", generator=gen)

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


if __name__ == "__main__":
    main()
