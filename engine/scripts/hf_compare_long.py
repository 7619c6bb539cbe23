#!/usr/bin/env python3
"""Compare the CUDA engine's logits with HF transformers on the same random weights, for any preset
the engine can export (Llama, Llama-3 RoPE scaling, Qwen2 q/k/v biases), including a long prompt
and decode steps at its context.

Step 1 (engine, on the GPU machine), e.g. a 32k-token prefill and 8 decode steps at 32k context:
    djinn engine check hf-dump --model llama3.1-8b --dtype bf16 --long 32768 --long-decode 8 --out DIR
  writes DIR/config.json + DIR/model.safetensors (the engine's own random weights, generated on the
  GPU) and DIR/engine_logits.json: a short prompt's logits (decode steps at positions 24..31 after a
  24-token prefill, and the last token of a one-shot prefill), the last token's logits of the long
  prompt (prefilled in chunks of `long_prefill_chunk_tokens`), and one row per decode step after it
  (teacher-forced: the prompt continues with `long_decode_tokens`).
Step 2 (this script, same machine, after the engine process has exited):
    python3 hf_compare_long.py DIR [OUT.json]
  loads DIR with AutoModelForCausalLM (SDPA attention: eager attention at 32k would need a
  32k x 32k score matrix per head), runs the prompts in the checkpoint's dtype and in fp32 (the same
  weights upcast: the reference), and reports, for the engine and for HF in the checkpoint's dtype,
  each against HF-fp32: max |diff|, relative L2 error, cosine similarity and argmax agreement. The
  long prompt plus its decode tokens run as one HF forward that keeps the logits of the last
  `decode steps + 1` positions, which are the prefill's last row and each decode step's row.

Pass, per group: the engine's relative L2 error against HF-fp32 is at most max(2 x HF's own error in
the checkpoint dtype, 1e-2), and its argmax agrees with HF-fp32 wherever HF-fp32's top-2 gap exceeds
2x the engine's max |diff| (the criterion of hf_compare_7b.py). Exit status 1 on failure.
"""
import json
import sys
import time
from pathlib import Path

import torch

from hf_compare_7b import metrics


def forward_rows(model, tokens, keep, chunk=1024):
    """Logits (float32) of the last `keep` positions of a forward over `tokens`, fed in chunks of
    `chunk` tokens through HF's KV cache: SDPA with a cache and an explicit mask runs the math
    kernel, whose score matrix for a 32k-token prompt in one piece would be 128 GiB in fp32."""
    from transformers import DynamicCache

    ids = torch.tensor([tokens], device="cuda")
    n = ids.shape[1]
    cache = DynamicCache()
    rows = []
    with torch.no_grad():
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            wanted = end - max(start, n - keep)
            out = model(ids[:, start:end], past_key_values=cache, use_cache=True,
                        logits_to_keep=max(wanted, 1))
            if wanted > 0:
                rows.append(out.logits[0, -wanted:].float())
    return torch.cat(rows)


def judge(name, eng_rows, low, ref, positions):
    g = dict(engine_vs_hf32=metrics(eng_rows, ref), hf_low_vs_hf32=metrics(low, ref),
             engine_vs_hf_low=metrics(eng_rows, low), positions=positions, logit_std=ref.std().item())
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * g["engine_vs_hf32"]["max_abs_diff"]
    agree = eng_rows.argmax(-1) == ref.argmax(-1)
    g["argmax_clear_rows"] = int(clear.sum().item())
    g["argmax_clear_rows_agreeing"] = int((agree & clear).sum().item())
    limit = max(2 * g["hf_low_vs_hf32"]["rel_l2"], 1e-2)
    g["rel_l2_limit"] = limit
    g["passed"] = bool(g["engine_vs_hf32"]["rel_l2"] <= limit
                       and g["argmax_clear_rows_agreeing"] == g["argmax_clear_rows"])
    print(f"== {name}, rows at positions {positions[0]}..{positions[-1]}")
    for k in ("engine_vs_hf32", "hf_low_vs_hf32", "engine_vs_hf_low"):
        m = g[k]
        print(f"{k:<16} max|diff| {m['max_abs_diff']:.4f}  rel L2 {m['rel_l2']:.2e}  "
              f"min cosine {m['cosine']:.6f}  argmax equal {m['argmax_equal']}/{m['rows']}")
    print(f"logit std {g['logit_std']:.3f}; argmax agreement on rows with a clear top-2 gap: "
          f"{g['argmax_clear_rows_agreeing']}/{g['argmax_clear_rows']}; rel L2 limit {limit:.2e}; "
          f"{'PASS' if g['passed'] else 'FAIL'}", flush=True)
    return g


def main():
    d = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else d / "hf_compare_long.json"
    import transformers
    from transformers import AutoModelForCausalLM

    eng = json.load(open(d / "engine_logits.json"))
    vocab = len(eng["prefill_last_logits"])
    prompt = eng["prompt"]
    short_positions = eng["decode_positions"] + [len(prompt) - 1]
    short_engine = torch.tensor(eng["decode_logits"] + [eng["prefill_last_logits"]], device="cuda").reshape(-1, vocab)
    long_prompt = eng.get("long_prompt") or []
    long_decode = eng.get("long_decode_tokens") or []
    long_engine = None
    if eng.get("long_prefill_last_logits"):
        long_engine = torch.tensor([eng["long_prefill_last_logits"]] + eng.get("long_decode_logits", []),
                                   device="cuda").reshape(-1, vocab)
    long_tokens = long_prompt + long_decode
    long_positions = list(range(len(long_prompt) - 1, len(long_tokens)))

    low_dtype = torch.bfloat16 if eng.get("dtype") == "Bf16" else torch.float16
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(d, dtype=low_dtype, attn_implementation="sdpa").cuda().eval()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}; "
          f"{type(model).__name__} {low_dtype} loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    runs = {}
    for label in ("low", "fp32"):
        if label == "fp32":
            model = model.float()
        t0 = time.perf_counter()
        # The short prompt: all positions, then the rows the engine dumped.
        short = forward_rows(model, prompt, len(prompt))[short_positions]
        long_rows = forward_rows(model, long_tokens, len(long_positions)) if long_engine is not None else None
        torch.cuda.synchronize()
        print(f"HF {label}: forwards in {time.perf_counter() - t0:.1f} s", flush=True)
        runs[label] = (short, long_rows)
    res = dict(device=torch.cuda.get_device_name(), engine_device=eng.get("device"), dtype=eng.get("dtype"),
               transformers=transformers.__version__, torch=torch.__version__, groups={})
    res["groups"]["short"] = judge("short prompt", short_engine, runs["low"][0], runs["fp32"][0], short_positions)
    if long_engine is not None:
        name = (f"long prompt ({len(long_prompt)}-token prefill in chunks of {eng.get('long_prefill_chunk_tokens')}, "
                f"then {len(long_decode)} decode steps)")
        res["groups"]["long"] = judge(name, long_engine, runs["low"][1], runs["fp32"][1], long_positions)
    res["passed"] = all(g["passed"] for g in res["groups"].values())
    print("PASS" if res["passed"] else "FAIL", "CUDA engine vs HF transformers (fp32 reference on the same weights)")
    json.dump(res, open(out, "w"), indent=1)
    sys.exit(0 if res["passed"] else 1)


if __name__ == "__main__":
    main()
