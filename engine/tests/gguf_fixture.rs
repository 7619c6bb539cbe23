//! The checked-in tiny GGUF (`engine/tests/data/tiny-chat-q8-q4-f16.gguf`): how it is written,
//! that it is still exactly what the writer produces, and that it loads end to end (weights,
//! tokenizer, chat template, a greedy generation).
//!
//! Content: a 2-layer Llama (hidden 32, 4 query heads sharing 2 KV heads, MLP 64, tied
//! embeddings) with seeded random weights stored as Q8_0 (embeddings), F16 (layer 0), Q4_0
//! (layer 1 attention), Q4_1 (layer 1 MLP) and F32 (norms); a byte-level BPE vocabulary of 3
//! special tokens (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, ids 0-2 as in SmolLM2), the
//! 256 byte tokens and 8 merges; and SmolLM2-Instruct's chat template. The fuzz test and the
//! command-line tests read it, so it is small (about 30 KB). Rewrite it with
//! `DJINN_FIXTURE_UPDATE=1 cargo test -p engine --test gguf_fixture`.

mod cpu_common;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use cpu_common::{data_dir, llama_metadata, temp_dir, write_gguf};
use engine::batch::generate_greedy;
use engine::config::ModelConfig;
use engine::cpu::CpuModel;
use engine::tokenizer::{gpt2_byte_to_char, ChatMessage, Tokenizer};
use engine::weights::WeightSet;

const FIXTURE: &str = "tiny-chat-q8-q4-f16.gguf";
const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const MERGES: [(&str, &str); 8] = [
    ("u", "s"),
    ("us", "e"),
    ("use", "r"),
    ("Ġ", "w"),
    ("o", "r"),
    ("Ġw", "or"),
    ("l", "d"),
    ("Ġwor", "ld"),
];

fn config() -> ModelConfig {
    ModelConfig {
        name: "tiny-chat".into(),
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        vocab_size: SPECIALS.len() + 256 + MERGES.len(),
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 256,
        tie_word_embeddings: true,
        rope_scaling: Default::default(),
        qkv_bias: false,
    }
}

fn dtype_of(hf_name: &str) -> GgmlDType {
    if hf_name.ends_with("norm.weight") {
        GgmlDType::F32
    } else if hf_name == "model.embed_tokens.weight" {
        GgmlDType::Q8_0
    } else if hf_name.starts_with("model.layers.0.") {
        GgmlDType::F16
    } else if hf_name.contains("self_attn") {
        GgmlDType::Q4_0
    } else {
        GgmlDType::Q4_1
    }
}

/// `tokenizer.*` metadata as llama.cpp's converter writes it for SmolLM2.
fn tokenizer_metadata() -> Vec<(String, Value)> {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    tokens.extend(gpt2_byte_to_char().iter().map(char::to_string));
    tokens.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    let token_type = (0..tokens.len())
        .map(|id| Value::I32(if id < SPECIALS.len() { 3 } else { 1 }))
        .collect();
    let template =
        std::fs::read_to_string(data_dir().join("chat/smollm2-135m-instruct.jinja")).unwrap();
    let strings = |items: Vec<String>| Value::Array(items.into_iter().map(Value::String).collect());
    vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        ("tokenizer.ggml.tokens".into(), strings(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(token_type)),
        (
            "tokenizer.ggml.merges".into(),
            strings(MERGES.iter().map(|(a, b)| format!("{a} {b}")).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.chat_template".into(), Value::String(template)),
    ]
}

/// Writes the fixture's bytes to `path`.
fn write_fixture(path: &std::path::Path) {
    let weights = WeightSet::random(&config(), 2024);
    let mut metadata = llama_metadata(&weights);
    metadata.extend(tokenizer_metadata());
    write_gguf(path, &weights, &metadata, &dtype_of, &[]);
}

#[test]
fn checked_in_fixture_is_what_the_writer_writes() {
    let fresh = temp_dir("gguf_fixture").join(FIXTURE);
    write_fixture(&fresh);
    let checked_in = data_dir().join(FIXTURE);
    if std::env::var("DJINN_FIXTURE_UPDATE").is_ok_and(|v| v == "1") {
        std::fs::copy(&fresh, &checked_in).unwrap();
    }
    let expected = std::fs::read(&checked_in).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (DJINN_FIXTURE_UPDATE=1 writes it)",
            checked_in.display()
        )
    });
    assert!(
        std::fs::read(&fresh).unwrap() == expected,
        "{} differs from what the writer produces now; rewrite it with DJINN_FIXTURE_UPDATE=1 if the change is meant",
        checked_in.display()
    );
}

#[test]
fn fixture_loads_and_generates_with_its_chat_template() {
    let path = data_dir().join(FIXTURE);
    let weights = WeightSet::from_gguf(&path).unwrap();
    // The epsilon went through an f32 in the file.
    assert!((weights.config.rms_norm_eps - 1e-5).abs() < 1e-12);
    let loaded = ModelConfig {
        rms_norm_eps: 1e-5,
        ..weights.config.clone()
    };
    assert_eq!(loaded, config());
    let tokenizer = Tokenizer::from_gguf(&path).unwrap();
    assert_eq!(tokenizer.vocab_size(), config().vocab_size);
    let prompt = tokenizer
        .apply_chat_template(&[ChatMessage::new("user", "Hello world")], true)
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tokenizer.encode(&prompt).unwrap();
    assert_eq!(ids[0], 1, "starts with <|im_start|>");
    assert!(ids.contains(&tokenizer.token_id("Ġworld").unwrap()));
    let mut model = CpuModel::new(&weights, 8, 16).unwrap();
    let generated = generate_greedy(&mut model, &ids, 4, &[2]).unwrap();
    assert!(
        !generated.is_empty()
            && generated
                .iter()
                .all(|t| (*t as usize) < config().vocab_size)
    );
}
