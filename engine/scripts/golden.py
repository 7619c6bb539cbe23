#!/usr/bin/env python3
"""Golden data for the engine's CPU forward, from an independent implementation:
HF transformers' LlamaForCausalLM / Qwen2ForCausalLM (fp32, eager attention).

Versions that produced the committed files (pip, CPU):
    python 3.11.7, torch 2.15.0, transformers 5.24.0, safetensors 0.8.0, gguf 0.19.0, numpy 2.4.6

Usage (from the repository root):
    python3 engine/scripts/golden.py                      # every tiny preset -> engine/tests/data/<preset>/
    python3 engine/scripts/golden.py --only tiny-gqa-bias # one preset
    python3 engine/scripts/golden.py --smollm2-gguf PATH  # also engine/tests/data/smollm2/golden.json

For each tiny preset it writes, under engine/tests/data/<preset>/:
    config.json        HF config (classic layout: rope_theta and rope_scaling at top level; a Qwen2
                       config for the preset with q/k/v biases)
    model.safetensors  the weights (tiny in F16, tiny-gqa in BF16, to exercise both loaders and stay
                       small; the model runs in fp32 on exactly these rounded values)
    golden.json        fixed token sequences and the logits of every position

Weight scaling matches engine::weights::WeightSet::random (embeddings N(0,1), Linear N(0,1/fan_in),
q/k/v biases N(0, 0.25)) so the logits are O(1), except that the RMSNorm weights are 1 + 0.1 N(0,1)
(not 1) so that a forward that ignores them fails the test.

tiny-gqa-llama3 has Llama-3 RoPE scaling over an original context of 64 positions: with head_dim 16
and theta 500000 its 8 frequencies fall in all three bands (kept, blended, divided by the factor),
and its third sequence (160 tokens) runs past the original context.

The SmolLM2 mode loads the Q4_1 GGUF through transformers' GGUF support (its own dequantiser, from
the `gguf` package, and its own tokenizer conversion) and records the token ids of fixed strings,
the top logits after a chat prompt and the greedy continuation.
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

# Must match engine::config::ModelConfig::tiny() / tiny_gqa() / tiny_gqa_llama3() / tiny_gqa_bias().
PRESETS = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        storage_dtype=torch.float16,
        seed=1,
    ),
    "tiny-gqa": dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        storage_dtype=torch.bfloat16,
        seed=2,
    ),
}
# The GQA variants: tiny-gqa with one feature each.
PRESETS["tiny-gqa-llama3"] = dict(
    PRESETS["tiny-gqa"],
    rope_theta=500000.0,
    rope_scaling=dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    ),
    seed=3,
    sequence_lengths=[7, 40, 160],
)
PRESETS["tiny-gqa-bias"] = dict(PRESETS["tiny-gqa"], rms_norm_eps=1e-6, qkv_bias=True, seed=4)

# Logits of every position are kept, so the 40-token sequence covers every prefix length up to 40
# (crossing 16-token block boundaries twice); the 7-token one is a second, independent sequence.
SEQUENCE_LENGTHS = [7, 40]


def make_weights(preset, generator):
    hidden = preset["hidden_size"]
    head_dim = hidden // preset["num_attention_heads"]
    q_rows = preset["num_attention_heads"] * head_dim
    kv_rows = preset["num_key_value_heads"] * head_dim
    mlp = preset["intermediate_size"]
    vocab = preset["vocab_size"]

    def linear(out_features, in_features):
        return torch.randn(out_features, in_features, generator=generator) / in_features**0.5

    def norm():
        return 1.0 + 0.1 * torch.randn(hidden, generator=generator)

    weights = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=generator)}
    for layer in range(preset["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        weights[f"{p}.input_layernorm.weight"] = norm()
        weights[f"{p}.self_attn.q_proj.weight"] = linear(q_rows, hidden)
        weights[f"{p}.self_attn.k_proj.weight"] = linear(kv_rows, hidden)
        weights[f"{p}.self_attn.v_proj.weight"] = linear(kv_rows, hidden)
        if preset.get("qkv_bias"):
            weights[f"{p}.self_attn.q_proj.bias"] = 0.5 * torch.randn(q_rows, generator=generator)
            weights[f"{p}.self_attn.k_proj.bias"] = 0.5 * torch.randn(kv_rows, generator=generator)
            weights[f"{p}.self_attn.v_proj.bias"] = 0.5 * torch.randn(kv_rows, generator=generator)
        weights[f"{p}.self_attn.o_proj.weight"] = linear(hidden, q_rows)
        weights[f"{p}.post_attention_layernorm.weight"] = norm()
        weights[f"{p}.mlp.gate_proj.weight"] = linear(mlp, hidden)
        weights[f"{p}.mlp.up_proj.weight"] = linear(mlp, hidden)
        weights[f"{p}.mlp.down_proj.weight"] = linear(hidden, mlp)
    weights["model.norm.weight"] = norm()
    if not preset["tie_word_embeddings"]:
        weights["lm_head.weight"] = linear(vocab, hidden)
    # Round to the storage dtype first, so fp32 HF runs on exactly the stored values.
    return {name: w.to(preset["storage_dtype"]) for name, w in weights.items()}


def config_json(preset):
    keys = [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "rope_theta",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
    ]
    config = {key: preset[key] for key in keys}
    config.update(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        rope_scaling=preset.get("rope_scaling"),
        torch_dtype="float32",
    )
    if preset.get("qkv_bias"):
        # Qwen2: q/k/v biases are part of the architecture (no attention_bias key).
        del config["attention_bias"], config["mlp_bias"]
        config.update(
            architectures=["Qwen2ForCausalLM"],
            model_type="qwen2",
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=preset["num_hidden_layers"],
        )
    return config


def hf_model(config):
    """The HF model for a config.json dict, fp32 eager. transformers 5 takes RoPE settings as
    `rope_parameters` (theta included); older versions take `rope_theta` + `rope_scaling`."""
    import inspect

    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen = config["model_type"] == "qwen2"
    config_class, model_class = (Qwen2Config, Qwen2ForCausalLM) if qwen else (LlamaConfig, LlamaForCausalLM)
    kwargs = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype", "model_type")}
    if "rope_parameters" in inspect.signature(config_class.__init__).parameters:
        parameters = dict(kwargs.pop("rope_scaling") or {"rope_type": "default"})
        parameters["rope_theta"] = kwargs.pop("rope_theta")
        kwargs["rope_parameters"] = parameters
    hf_config = config_class(**kwargs)
    hf_config._attn_implementation = "eager"
    return model_class(hf_config).to(torch.float32).eval()


def rounded(values):
    # 7 significant digits: below the fp32 tolerance the tests use, and keeps the JSON small.
    return [float(f"{v:.7g}") for v in values]


def write_tiny(name, out_dir):
    preset = PRESETS[name]
    generator = torch.Generator().manual_seed(preset["seed"])
    weights = make_weights(preset, generator)
    directory = os.path.join(out_dir, name)
    os.makedirs(directory, exist_ok=True)
    config = config_json(preset)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(directory, "model.safetensors"))

    model = hf_model(config)
    missing, unexpected = model.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()}, strict=True)
    assert not missing and not unexpected, (missing, unexpected)

    token_generator = torch.Generator().manual_seed(1000 + preset["seed"])
    sequences = []
    for length in preset.get("sequence_lengths", SEQUENCE_LENGTHS):
        tokens = torch.randint(0, preset["vocab_size"], (length,), generator=token_generator)
        with torch.no_grad():
            logits = model(tokens[None, :]).logits[0]
        sequences.append(
            {
                "tokens": tokens.tolist(),
                "logits": [rounded(row.tolist()) for row in logits],
            }
        )
    golden = {
        "source": f"HF transformers {type(model).__name__}, fp32, eager attention (engine/scripts/golden.py)",
        "versions": versions(),
        "preset": name,
        "sequences": sequences,
    }
    with open(os.path.join(directory, "golden.json"), "w") as f:
        json.dump(golden, f, separators=(",", ":"))
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    print(f"{name}: wrote {directory} ({size / 1024:.0f} KiB)")


def versions():
    import safetensors
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


# Strings whose token ids the Rust tokenizer must reproduce.
TOKENIZER_STRINGS = [
    "Hello world!",
    "The capital of France is Paris.",
    "I'm sure you've seen it, haven't you?",
    "In 2024, 1234 people paid $56.78 each.",
    "def main():\n    print('hi')\n\n\nreturn 0",
    "  leading spaces and trailing   ",
    "naïve café, Zürich and 東京",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
]
CHAT_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
GREEDY_STEPS = 24


def write_smollm2(gguf_path, out_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, file_name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file_name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file_name, dtype=torch.float32)
    model.config._attn_implementation = "eager"
    model.eval()

    encodings = [
        {"text": text, "ids": tokenizer(text, add_special_tokens=False)["input_ids"]} for text in TOKENIZER_STRINGS
    ]
    prompt_ids = tokenizer(CHAT_PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0, -1]
        top = torch.topk(logits, 10)
        generated = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=GREEDY_STEPS, do_sample=False, eos_token_id=None
        )[0, len(prompt_ids) :].tolist()
    import gguf

    golden = {
        "source": "HF transformers from the GGUF (its own dequantiser and tokenizer), fp32, eager (engine/scripts/golden.py)",
        "versions": {**versions(), "gguf": gguf.__version__ if hasattr(gguf, "__version__") else "unknown"},
        "gguf_file": file_name,
        "gguf_bytes": os.path.getsize(gguf_path),
        "encodings": encodings,
        "chat_prompt": CHAT_PROMPT,
        "chat_prompt_ids": prompt_ids,
        "last_logits_top_ids": top.indices.tolist(),
        "last_logits_top_values": rounded(top.values.tolist()),
        "greedy_ids": generated,
        "greedy_text": tokenizer.decode(generated),
    }
    target = os.path.join(out_dir, "smollm2")
    os.makedirs(target, exist_ok=True)
    with open(os.path.join(target, "golden.json"), "w") as f:
        json.dump(golden, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"smollm2: wrote {target}/golden.json; greedy: {golden['greedy_text']!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out", default=os.path.join(here, "..", "tests", "data"))
    parser.add_argument("--smollm2-gguf", help="also write SmolLM2 golden data from this GGUF file")
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--only", choices=sorted(PRESETS), action="append", help="tiny presets to write (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if not args.skip_tiny:
        for name in args.only or PRESETS:
            write_tiny(name, args.out)
    if args.smollm2_gguf:
        write_smollm2(args.smollm2_gguf, args.out)


if __name__ == "__main__":
    main()
