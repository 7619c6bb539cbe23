#!/usr/bin/env python3
"""Writes a small grouped-query Llama checkpoint with head_dim 128 (config.json + bf16
model.safetensors) for `djinn engine check cuda-vs-cpu --weights DIR`: the tiny test models have
head_dim 16, so they never reach the head_dim-128 wgmma prefill kernels (v6 / v7); this one does,
on the GQA path (2 query heads share 1 KV head). Pure Python, seeded, deterministic.

usage: make_gqa_hd128.py OUT_DIR
"""
import json
import os
import random
import struct
import sys

HIDDEN, HEADS, KV_HEADS, INTER, LAYERS, VOCAB = 256, 2, 1, 512, 2, 256
HEAD_DIM = HIDDEN // HEADS


def bf16_bytes(values):
    # Round to nearest even on the top 16 bits of the f32 pattern.
    out = bytearray()
    for v in values:
        bits = struct.unpack("<I", struct.pack("<f", v))[0]
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        out += struct.pack("<H", bits & 0xFFFF)
    return bytes(out)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make_gqa_hd128.py OUT_DIR")
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(20261127)
    tensors = []

    def linear(name, rows, cols):
        a = (3.0 / cols) ** 0.5  # uniform, variance 1 / in_features
        tensors.append((name, [rows, cols], [rng.uniform(-a, a) for _ in range(rows * cols)]))

    def norm(name):
        tensors.append((name, [HIDDEN], [rng.uniform(0.9, 1.1) for _ in range(HIDDEN)]))

    a = 3.0 ** 0.5
    tensors.append(("model.embed_tokens.weight", [VOCAB, HIDDEN], [rng.uniform(-a, a) for _ in range(VOCAB * HIDDEN)]))
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        norm(p + "input_layernorm.weight")
        linear(p + "self_attn.q_proj.weight", HEADS * HEAD_DIM, HIDDEN)
        linear(p + "self_attn.k_proj.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        linear(p + "self_attn.v_proj.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        linear(p + "self_attn.o_proj.weight", HIDDEN, HEADS * HEAD_DIM)
        norm(p + "post_attention_layernorm.weight")
        linear(p + "mlp.gate_proj.weight", INTER, HIDDEN)
        linear(p + "mlp.up_proj.weight", INTER, HIDDEN)
        linear(p + "mlp.down_proj.weight", HIDDEN, INTER)
    norm("model.norm.weight")
    linear("lm_head.weight", VOCAB, HIDDEN)

    header, blobs, offset = {}, [], 0
    for name, shape, values in tensors:
        blob = bf16_bytes(values)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    head += b" " * ((8 - len(head) % 8) % 8)
    with open(os.path.join(out_dir, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)
    config = {
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-05,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rope_scaling": None,
        "torch_dtype": "bfloat16",
    }
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


if __name__ == "__main__":
    main()
