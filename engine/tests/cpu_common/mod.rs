//! Helpers shared by the CPU backend tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use engine::weights::{gguf_name_of_hf, permute_hf_rope_rows, WeightSet};

/// Golden logits tolerance for the fp32 CPU forward against HF transformers (fp32, eager):
/// |ours - golden| <= ABS + REL * |golden|. The golden files keep 7 significant digits, and two
/// fp32 implementations that sum in different orders differ by a few 1e-6 on O(1..10) logits
/// (measured: at most 2.2e-6 on tiny and tiny-gqa).
pub const GOLDEN_ABS_TOLERANCE: f32 = 2e-5;
pub const GOLDEN_REL_TOLERANCE: f32 = 2e-5;

/// Two CPU forwards of the same tokens that batch them differently (prefill vs decode, one
/// sequence vs several) differ only by GEMM summation order: a few 1e-7 on O(1) logits.
pub const CONSISTENCY_ABS_TOLERANCE: f32 = 1e-5;

pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("data")
}

pub struct GoldenSequence {
    pub tokens: Vec<u32>,
    /// Logits of every position, `tokens.len()` rows.
    pub logits: Vec<Vec<f32>>,
}

pub fn load_golden(preset: &str) -> Vec<GoldenSequence> {
    let path = data_dir().join(preset).join("golden.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|seq| GoldenSequence {
            tokens: seq["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap() as u32)
                .collect(),
            logits: seq["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|row| {
                    row.as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_f64().unwrap() as f32)
                        .collect()
                })
                .collect(),
        })
        .collect()
}

pub fn load_tiny(preset: &str) -> WeightSet {
    WeightSet::from_hf_dir(&data_dir().join(preset))
        .unwrap_or_else(|e| panic!("loading {preset}: {e}"))
}

/// Largest violation ratio of |a - b| <= abs + rel * |b| (<= 1 means within tolerance), and the
/// largest absolute difference.
pub fn compare(actual: &[f32], expected: &[f32], abs: f32, rel: f32) -> (f32, f32) {
    assert_eq!(actual.len(), expected.len());
    let mut worst_ratio = 0.0f32;
    let mut worst_abs = 0.0f32;
    for (a, b) in actual.iter().zip(expected) {
        let diff = (a - b).abs();
        assert!(diff.is_finite(), "non-finite value: {a} vs {b}");
        worst_abs = worst_abs.max(diff);
        worst_ratio = worst_ratio.max(diff / (abs + rel * b.abs()));
    }
    (worst_ratio, worst_abs)
}

pub fn assert_rows_close(actual: &[f32], expected: &[f32], abs: f32, what: &str) {
    let (ratio, worst) = compare(actual, expected, abs, 0.0);
    assert!(ratio <= 1.0, "{what}: max |diff| {worst:e} exceeds {abs:e}");
}

/// The SmolLM2 GGUF, or None (with the reason printed) when it is not on this machine.
pub fn smollm2_gguf() -> Option<PathBuf> {
    let path = match std::env::var_os("DJINN_SMOLLM2_GGUF") {
        Some(path) => PathBuf::from(path),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("target")
            .join("models")
            .join("SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    if path.is_file() {
        Some(path)
    } else {
        println!(
            "SKIPPED: SmolLM2 GGUF not found at {} (run engine/scripts/fetch_smollm2.sh or set DJINN_SMOLLM2_GGUF)",
            path.display()
        );
        None
    }
}

/// A directory for this test's files under cargo's per-target temp dir.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// GGUF metadata of a llama model as llama.cpp's converter writes it.
pub fn llama_metadata(weights: &WeightSet) -> Vec<(String, Value)> {
    let c = &weights.config;
    vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.name".into(), Value::String(c.name.clone())),
        (
            "llama.embedding_length".into(),
            Value::U32(c.hidden_size as u32),
        ),
        (
            "llama.feed_forward_length".into(),
            Value::U32(c.intermediate_size as u32),
        ),
        (
            "llama.block_count".into(),
            Value::U32(c.num_hidden_layers as u32),
        ),
        (
            "llama.attention.head_count".into(),
            Value::U32(c.num_attention_heads as u32),
        ),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(c.num_key_value_heads as u32),
        ),
        (
            "llama.rope.freq_base".into(),
            Value::F32(c.rope_theta as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(c.rms_norm_eps as f32),
        ),
        (
            "llama.context_length".into(),
            Value::U32(c.max_position_embeddings as u32),
        ),
        (
            "llama.rope.dimension_count".into(),
            Value::U32(c.head_dim() as u32),
        ),
    ]
}

/// Writes `weights` as a llama.cpp-style GGUF: GGUF names, Q/K rows permuted like the converter,
/// each tensor stored as `dtype_of(hf_name)`; `skip` names HF tensors to leave out and
/// `metadata` is written as given.
pub fn write_gguf(
    path: &Path,
    weights: &WeightSet,
    metadata: &[(String, Value)],
    dtype_of: &dyn Fn(&str) -> GgmlDType,
    skip: &[&str],
) {
    let config = &weights.config;
    let head_dim = config.head_dim();
    let mut qtensors: Vec<(String, QTensor)> = Vec::new();
    for (hf_name, tensor) in &weights.tensors {
        if skip.contains(&hf_name.as_str()) {
            continue;
        }
        let mut data = tensor.data.clone();
        if hf_name.ends_with("q_proj.weight") {
            data = permute_hf_rope_rows(
                &data,
                config.num_attention_heads,
                head_dim,
                config.hidden_size,
            );
        } else if hf_name.ends_with("k_proj.weight") {
            data = permute_hf_rope_rows(
                &data,
                config.num_key_value_heads,
                head_dim,
                config.hidden_size,
            );
        }
        let t = Tensor::from_vec(data, tensor.shape.as_slice(), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype_of(hf_name)).unwrap();
        qtensors.push((gguf_name_of_hf(hf_name).unwrap(), q));
    }
    let metadata_refs: Vec<(&str, &Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &metadata_refs, &tensor_refs).unwrap();
}
