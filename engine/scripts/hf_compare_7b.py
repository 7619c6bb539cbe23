#!/usr/bin/env python3
"""Compare the CUDA engine's logits for the `llama2-7b` preset with HF transformers on the same weights.

Step 1 (engine, on the GPU machine):
    djinn engine check hf-dump --model llama2-7b --out DIR
  writes DIR/config.json + DIR/model.safetensors (the engine's own fp16 random weights, generated on
  the GPU) and DIR/engine_logits.json: the engine's logits for a fixed 32-token prompt, once as
  token-by-token decode steps at positions 24..31 (after a 24-token prefill) and once as the last
  token of a one-shot prefill; and the last token's logits of a long prompt (2048 tokens by default,
  `--long N`) run as one prefill: the benchmark's prefill path (large-step GEMMs, the wgmma attention,
  the residual stream in fp16, the pruned last layer).
Step 2 (this script, same machine, after the engine process has exited):
    python3 hf_compare_7b.py DIR [OUT.json]
  loads DIR into LlamaForCausalLM, runs the prompt in fp16 and in fp32 (the same fp16 weights upcast:
  the reference), and reports for the engine and for HF-fp16, each against HF-fp32: max |diff|,
  relative L2 error, cosine similarity and argmax agreement.

Pass, for the short prompt's rows and (where dumped) the long prompt's row alike: the engine's relative
L2 error against HF-fp32 is at most max(2 x HF-fp16's own error, 1e-2), and its argmax agrees with
HF-fp32 wherever HF-fp32's top-2 gap exceeds 2x the engine's max |diff|.
Exit status 1 on failure.
"""
import json
import sys
from pathlib import Path

import torch


def metrics(candidate, reference):
    d = (candidate - reference).abs()
    return dict(
        max_abs_diff=d.max().item(),
        rel_l2=((candidate - reference).norm() / reference.norm()).item(),
        cosine=torch.nn.functional.cosine_similarity(candidate, reference, dim=-1).min().item(),
        argmax_equal=int((candidate.argmax(-1) == reference.argmax(-1)).sum().item()),
        rows=int(reference.shape[0]),
    )


def main():
    d = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else d / "hf_compare.json"
    from transformers import LlamaForCausalLM

    eng = json.load(open(d / "engine_logits.json"))
    prompt = torch.tensor([eng["prompt"]], device="cuda")
    positions = eng["decode_positions"]
    engine_rows = torch.tensor(eng["decode_logits"] + [eng["prefill_last_logits"]], device="cuda").squeeze(1)
    engine_rows = engine_rows.reshape(len(positions) + 1, -1)
    row_positions = positions + [len(eng["prompt"]) - 1]

    long_prompt = eng.get("long_prompt") or []
    long_rows = eng.get("long_prefill_last_logits")
    model = LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float16, attn_implementation="eager").cuda().eval()
    with torch.no_grad():
        hf16 = model(prompt).logits[0].float()[row_positions]
        hf16_long = model(torch.tensor([long_prompt], device="cuda")).logits[0, -1:].float() if long_rows else None
        model = model.float()
        hf32 = model(prompt).logits[0][row_positions]
        hf32_long = model(torch.tensor([long_prompt], device="cuda")).logits[0, -1:] if long_rows else None
    groups = [("short", engine_rows, hf16, hf32, row_positions)]
    if long_rows:
        long_engine = torch.tensor(long_rows, device="cuda").reshape(1, -1)
        groups.append((f"long ({len(long_prompt)}-token prefill)", long_engine, hf16_long, hf32_long, [len(long_prompt) - 1]))
    res = dict(device=torch.cuda.get_device_name(), engine_device=eng.get("device"), groups={})
    passed = True
    for name, eng_rows, h16, h32, pos in groups:
        g = dict(engine_vs_hf32=metrics(eng_rows, h32), hf16_vs_hf32=metrics(h16, h32), engine_vs_hf16=metrics(eng_rows, h16),
                 positions=pos, logit_std=h32.std().item())
        top2 = h32.topk(2, dim=-1).values
        gap = (top2[:, 0] - top2[:, 1])
        clear = gap > 2 * g["engine_vs_hf32"]["max_abs_diff"]
        agree = (eng_rows.argmax(-1) == h32.argmax(-1))
        g["argmax_clear_rows"] = int(clear.sum().item())
        g["argmax_clear_rows_agreeing"] = int((agree & clear).sum().item())
        limit = max(2 * g["hf16_vs_hf32"]["rel_l2"], 1e-2)
        g["rel_l2_limit"] = limit
        g["passed"] = bool(g["engine_vs_hf32"]["rel_l2"] <= limit and g["argmax_clear_rows_agreeing"] == g["argmax_clear_rows"])
        passed &= g["passed"]
        res["groups"][name] = g
        print(f"== {name} prompt, rows at positions {pos[0]}..{pos[-1]}")
        for k in ("engine_vs_hf32", "hf16_vs_hf32", "engine_vs_hf16"):
            m = g[k]
            print(f"{k:<16} max|diff| {m['max_abs_diff']:.4f}  rel L2 {m['rel_l2']:.2e}  min cosine {m['cosine']:.6f}  argmax equal {m['argmax_equal']}/{m['rows']}")
        print(f"logit std {g['logit_std']:.3f}; argmax agreement on rows with a clear top-2 gap: "
              f"{g['argmax_clear_rows_agreeing']}/{g['argmax_clear_rows']}; rel L2 limit {limit:.2e}; {'PASS' if g['passed'] else 'FAIL'}")
    res["passed"] = bool(passed)
    print("PASS" if res["passed"] else "FAIL", "llama2-7b CUDA engine vs HF transformers (fp32 reference on the same fp16 weights)")
    json.dump(res, open(out, "w"), indent=1)
    sys.exit(0 if res["passed"] else 1)


if __name__ == "__main__":
    main()
