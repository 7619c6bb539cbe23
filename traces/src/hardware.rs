//! Model and card descriptions (TOML): what a GPU profile is derived from.
//!
//! A model description is a Llama-family transformer's shape (the fields of a Hugging Face
//! `config.json` that decide memory and arithmetic); a card description is a GPU's memory, compute
//! and host link, each figure from a public specification sheet and, where known, as measured.
//! `calibration::derive` turns a (model, card) pair into a [`crate::GpuProfile`].

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::io::{parse_toml, read_text, TraceError};

/// The element types a model's weights and KV cache can be stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Fp32,
    Fp16,
    Bf16,
    Fp8,
}

impl Dtype {
    pub fn bytes(self) -> u64 {
        match self {
            Dtype::Fp32 => 4,
            Dtype::Fp16 | Dtype::Bf16 => 2,
            Dtype::Fp8 => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::Fp32 => "fp32",
            Dtype::Fp16 => "fp16",
            Dtype::Bf16 => "bf16",
            Dtype::Fp8 => "fp8",
        }
    }
}

/// Llama-3-style RoPE frequency scaling (`rope_scaling` with `rope_type = "llama3"` in HF configs):
/// wavelengths beyond `original_max_position_embeddings / low_freq_factor` are stretched by
/// `factor`, those under `.. / high_freq_factor` kept, and the band between interpolated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeScaling {
    /// Only "llama3" is known.
    pub kind: String,
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: u32,
}

/// A Llama-family decoder: RMSNorm, rotary attention with grouped KV heads, gated MLP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub schema_version: u32,
    /// Short name (`llama3.1-8b`), used in profile names and on the command line.
    pub name: String,
    /// Where the shape comes from (the released checkpoint).
    pub source: String,
    pub layers: u32,
    pub hidden_size: u32,
    /// Query heads.
    pub heads: u32,
    /// Key/value heads (= `heads` for multi-head attention, fewer for grouped-query attention).
    pub kv_heads: u32,
    pub head_dim: u32,
    /// Width of the gated MLP (`intermediate_size`).
    pub intermediate_size: u32,
    pub vocab_size: u32,
    /// Weights and KV cache element type.
    pub dtype: Dtype,
    /// The longest context the model was trained for (`max_position_embeddings`).
    pub max_context_tokens: u32,
    pub rope_theta: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// Biases on the Q, K and V projections (Qwen2).
    #[serde(default)]
    pub qkv_bias: bool,
    /// The output projection shares the input embedding's matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

/// Upper bounds that keep every derived product inside u64 and reject typos early.
const LAYERS_MAX: u32 = 1024;
const WIDTH_MAX: u32 = 1 << 20;
const HEADS_MAX: u32 = 4096;
const VOCAB_MAX: u32 = 1 << 22;

impl ModelSpec {
    pub fn from_toml_str(path: &Path, text: &str) -> Result<Self, TraceError> {
        let spec: ModelSpec = parse_toml(path, text)?;
        spec.validate(path)?;
        Ok(spec)
    }

    pub fn read(path: &Path) -> Result<Self, TraceError> {
        Self::from_toml_str(path, &read_text(path)?)
    }

    /// Parameters of one layer: attention projections (with biases if any), gated MLP, two norms.
    fn layer_parameters(&self) -> u64 {
        let (h, d) = (self.hidden_size as u64, self.head_dim as u64);
        let q = self.heads as u64 * d;
        let kv = self.kv_heads as u64 * d;
        let bias = if self.qkv_bias { q + 2 * kv } else { 0 };
        let attention = h * q + 2 * h * kv + q * h + bias;
        let mlp = 3 * h * self.intermediate_size as u64;
        attention + mlp + 2 * h
    }

    /// Every parameter, the input embedding and (untied) output projection included.
    pub fn parameters(&self) -> u64 {
        let embedding = self.vocab_size as u64 * self.hidden_size as u64;
        let output = if self.tie_word_embeddings {
            0
        } else {
            embedding
        };
        self.layers as u64 * self.layer_parameters() + embedding + output + self.hidden_size as u64
    }

    pub fn weight_bytes(&self) -> u64 {
        self.parameters() * self.dtype.bytes()
    }

    /// KV cache of one token: a key and a value vector per KV head per layer.
    pub fn kv_bytes_per_token(&self) -> u64 {
        self.layers as u64 * self.kv_heads as u64 * self.head_dim as u64 * 2 * self.dtype.bytes()
    }

    /// Matmul FLOPs of one token: a multiply-add (2 FLOPs) per weight it passes through. The input
    /// embedding is a lookup, not a product, so it is left out; a tied output projection still
    /// multiplies.
    pub fn matmul_flops_per_token(&self) -> u64 {
        let embedding = self.vocab_size as u64 * self.hidden_size as u64;
        let products = self.parameters()
            - if self.tie_word_embeddings {
                0
            } else {
                embedding
            };
        2 * products
    }

    /// Attention FLOPs of one (query token, context token) pair: per layer and query head, a
    /// multiply-add per dimension for the score (Q.K) and one for the weighted value.
    pub fn attention_flops_per_pair(&self) -> u64 {
        4 * self.layers as u64 * self.heads as u64 * self.head_dim as u64
    }

    pub fn validate(&self, path: &Path) -> Result<(), TraceError> {
        let fail = |field: &str, message: String| Err(TraceError::invalid(path, field, message));
        crate::check_schema_version(path, self.schema_version)?;
        if self.name.trim().is_empty() {
            return fail("name", "must not be empty".into());
        }
        for (field, v, max) in [
            ("layers", self.layers, LAYERS_MAX),
            ("hidden_size", self.hidden_size, WIDTH_MAX),
            ("heads", self.heads, HEADS_MAX),
            ("kv_heads", self.kv_heads, HEADS_MAX),
            ("head_dim", self.head_dim, WIDTH_MAX),
            ("intermediate_size", self.intermediate_size, WIDTH_MAX),
            ("vocab_size", self.vocab_size, VOCAB_MAX),
            (
                "max_context_tokens",
                self.max_context_tokens,
                crate::workload::CONTEXT_TOKENS_MAX,
            ),
        ] {
            if v == 0 || v > max {
                return fail(field, format!("must be in 1..={max}, got {v}"));
            }
        }
        if self.heads % self.kv_heads != 0 {
            return fail(
                "kv_heads",
                format!(
                    "must divide heads ({}) for grouped-query attention, got {}",
                    self.heads, self.kv_heads
                ),
            );
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return fail(
                "rope_theta",
                format!("must be a finite number > 0, got {}", self.rope_theta),
            );
        }
        if let Some(r) = &self.rope_scaling {
            self.validate_rope_scaling(path, r)?;
        }
        Ok(())
    }

    fn validate_rope_scaling(&self, path: &Path, r: &RopeScaling) -> Result<(), TraceError> {
        let fail = |field: &str, message: String| {
            Err(TraceError::invalid(
                path,
                format!("rope_scaling.{field}"),
                message,
            ))
        };
        if r.kind != "llama3" {
            return fail("kind", format!("unknown kind `{}` (known: llama3)", r.kind));
        }
        for (field, v) in [
            ("factor", r.factor),
            ("low_freq_factor", r.low_freq_factor),
            ("high_freq_factor", r.high_freq_factor),
        ] {
            if !(v.is_finite() && v >= 1.0) {
                return fail(field, format!("must be a finite number >= 1, got {v}"));
            }
        }
        if r.high_freq_factor <= r.low_freq_factor {
            return fail(
                "high_freq_factor",
                format!(
                    "must exceed low_freq_factor ({}), got {}",
                    r.low_freq_factor, r.high_freq_factor
                ),
            );
        }
        let original = r.original_max_position_embeddings;
        if original == 0 || original > self.max_context_tokens {
            return fail(
                "original_max_position_embeddings",
                format!(
                    "must be in 1..=max_context_tokens ({}), got {original}",
                    self.max_context_tokens
                ),
            );
        }
        Ok(())
    }
}

/// One figure of a card: the specification sheet's, and the measured one where it was measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Figure {
    pub spec: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<f64>,
}

/// One direction of the host link.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkFigure {
    /// Bytes per second, this direction alone.
    pub spec: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<f64>,
    /// Fixed cost of one copy (launch and completion), nanoseconds.
    pub latency_ns: u64,
}

/// A GPU as the cost model sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardSpec {
    pub schema_version: u32,
    /// Short name (`h100-sxm`), used on the command line.
    pub name: String,
    /// The device name the driver reports (a profile's `gpu_name`).
    pub gpu_name: String,
    /// Prefix of derived profile names (`h100-80gb`).
    pub label: String,
    /// Where the figures come from: specification sheets, and how the measured ones were taken.
    pub source: String,
    /// Device memory, bytes (measured: what the driver reports as total).
    pub memory_bytes: Figure,
    /// Device memory bandwidth, bytes/s (measured: a device-to-device copy, read + write).
    pub memory_bandwidth_bytes_per_s: Figure,
    /// Dense fp16/bf16 tensor-core FLOP/s (spec: without sparsity; measured: a large GEMM).
    pub dense_flops_per_s: Figure,
    /// FLOP/s attention kernels reach (lower than GEMM: softmax and short reductions). Absent =
    /// the derivation's default share of the dense figure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_flops_per_s: Option<f64>,
    /// What connects the card to host memory (`PCIe Gen5 x16`, `NVLink-C2C`).
    pub host_link: String,
    pub host_to_device: LinkFigure,
    pub device_to_host: LinkFigure,
}

impl CardSpec {
    pub fn from_toml_str(path: &Path, text: &str) -> Result<Self, TraceError> {
        let spec: CardSpec = parse_toml(path, text)?;
        spec.validate(path)?;
        Ok(spec)
    }

    pub fn read(path: &Path) -> Result<Self, TraceError> {
        Self::from_toml_str(path, &read_text(path)?)
    }

    /// True when every figure the cost model uses was measured on the card.
    pub fn fully_measured(&self) -> bool {
        self.memory_bytes.measured.is_some()
            && self.memory_bandwidth_bytes_per_s.measured.is_some()
            && self.dense_flops_per_s.measured.is_some()
            && self.host_to_device.measured.is_some()
            && self.device_to_host.measured.is_some()
    }

    pub fn validate(&self, path: &Path) -> Result<(), TraceError> {
        crate::check_schema_version(path, self.schema_version)?;
        for (field, v) in [("name", &self.name), ("label", &self.label)] {
            if v.trim().is_empty() {
                return Err(TraceError::invalid(path, field, "must not be empty"));
            }
        }
        let positive = |field: &str, v: f64| -> Result<(), TraceError> {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(TraceError::invalid(
                    path,
                    field,
                    format!("must be a finite number > 0, got {v}"),
                ))
            }
        };
        let figures = [
            ("memory_bytes", &self.memory_bytes),
            (
                "memory_bandwidth_bytes_per_s",
                &self.memory_bandwidth_bytes_per_s,
            ),
            ("dense_flops_per_s", &self.dense_flops_per_s),
        ];
        for (field, f) in figures {
            positive(&format!("{field}.spec"), f.spec)?;
            if let Some(m) = f.measured {
                positive(&format!("{field}.measured"), m)?;
            }
        }
        // 2^53 bytes (8 PiB): beyond it a byte count in f64 is no longer exact.
        if self.memory_bytes.spec > (1u64 << 53) as f64 {
            return Err(TraceError::invalid(
                path,
                "memory_bytes.spec",
                format!("must be at most 2^53, got {}", self.memory_bytes.spec),
            ));
        }
        if let Some(a) = self.attention_flops_per_s {
            positive("attention_flops_per_s", a)?;
        }
        for (field, l) in [
            ("host_to_device", &self.host_to_device),
            ("device_to_host", &self.device_to_host),
        ] {
            positive(&format!("{field}.spec"), l.spec)?;
            if let Some(m) = l.measured {
                positive(&format!("{field}.measured"), m)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA2: &str = r#"
schema_version = 1
name = "m"
source = "test"
layers = 32
hidden_size = 4096
heads = 32
kv_heads = 32
head_dim = 128
intermediate_size = 11008
vocab_size = 32000
dtype = "fp16"
max_context_tokens = 4096
rope_theta = 10000.0
"#;

    #[test]
    fn llama2_shape_gives_its_published_parameter_count() {
        let m = ModelSpec::from_toml_str(Path::new("m.toml"), LLAMA2).unwrap();
        assert_eq!(m.parameters(), 6_738_415_616);
        assert_eq!(m.kv_bytes_per_token(), 512 * 1024);
        assert_eq!(m.attention_flops_per_pair(), 524_288);
    }

    #[test]
    fn kv_heads_that_do_not_divide_heads_are_named() {
        let text = LLAMA2.replace("kv_heads = 32", "kv_heads = 5");
        let err = ModelSpec::from_toml_str(Path::new("m.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("m.toml") && err.contains("kv_heads"), "{err}");
    }

    #[test]
    fn zero_or_huge_sizes_and_unknown_fields_are_named() {
        for (from, to, field) in [
            ("layers = 32", "layers = 0", "layers"),
            ("vocab_size = 32000", "vocab_size = 99999999", "vocab_size"),
            ("dtype = \"fp16\"", "dtype = \"int3\"", "`int3`"),
            ("rope_theta = 10000.0", "rope_theta = -1.0", "rope_theta"),
            ("layers = 32", "layers = 32\nlayerz = 1", "layerz"),
        ] {
            let text = LLAMA2.replace(from, to);
            let err = ModelSpec::from_toml_str(Path::new("m.toml"), &text)
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{to}: {err}");
        }
    }
}
