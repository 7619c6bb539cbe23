//! Model weights on the host, in HF names and PyTorch layout, whatever file they came from.
//!
//! Sources: seeded random initialisation (`WeightSet::random`), HF-layout safetensors checkpoints
//! with `config.json` (`WeightSet::from_hf_dir`), and llama.cpp GGUF files
//! (`WeightSet::from_gguf`). Every loader ends in `WeightSet::validate`, so a backend can take
//! any `WeightSet` and trust that each tensor it needs is present with the right shape.

mod fit;
mod gguf;
mod gguf_header;
mod hf;
mod random;

pub use fit::MAX_POSITIONS;
pub use gguf::{
    gguf_metadata, gguf_name_of_hf, hf_name_of_gguf, permute_hf_rope_rows,
    unpermute_gguf_rope_rows, GgufMetadata,
};
pub use gguf_header::{read_gguf_header, GgufHeader};
pub use hf::{config_from_hf_json, hf_config_json};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::ModelConfig;

/// One tensor in row-major PyTorch layout (a Linear weight is `[out_features, in_features]`).
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape {shape:?} vs {} elements",
            data.len()
        );
        HostTensor { shape, data }
    }

    pub fn elem_count(&self) -> usize {
        self.data.len()
    }
}

/// Why weights could not be built or loaded. Every variant names the file (or source) and, where
/// one is to blame, the tensor or field.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    // The io error is part of the message, not a `source`, so error chains print it once.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: field `{field}`: {reason}")]
    Config {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error("{path}: cannot parse: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("{path}: tensor `{tensor}` is missing")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    WrongShape {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor `{tensor}` has element type {dtype}, which is not supported (supported: {supported})")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
        supported: &'static str,
    },
    #[error("{path}: tensor `{tensor}` holds non-finite values")]
    NonFinite { path: PathBuf, tensor: String },
    #[error("{path}: unexpected tensor `{tensor}` (not part of a {model} Llama model)")]
    UnexpectedTensor {
        path: PathBuf,
        tensor: String,
        model: String,
    },
}

/// A size read from a file, with its power of two when it is one: "2^60" says more than digits.
pub(crate) fn with_power_of_two(value: u64) -> String {
    if value.is_power_of_two() && value >= 1 << 10 {
        format!("{value} (2^{})", value.trailing_zeros())
    } else {
        value.to_string()
    }
}

/// A full set of Llama weights in HF names (q/k/v biases present when `config.qkv_bias`;
/// `lm_head.weight` absent when the embeddings are tied).
#[derive(Clone, Debug)]
pub struct WeightSet {
    pub config: ModelConfig,
    pub tensors: BTreeMap<String, HostTensor>,
}

impl WeightSet {
    /// Seeded random weights (see `random.rs` for the scaling).
    pub fn random(config: &ModelConfig, seed: u64) -> WeightSet {
        random::random_weights(config, seed)
    }

    /// An HF checkpoint: a directory with `config.json` and `model.safetensors` or
    /// `model.safetensors.index.json` + shards. F32, F16 and BF16 tensors are read as f32.
    pub fn from_hf_dir(dir: &Path) -> Result<WeightSet, WeightsError> {
        hf::load_hf_dir(dir)
    }

    /// A llama.cpp GGUF file (llama architecture); F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors are
    /// dequantised to f32 and the Q/K rows are put back in HF (rotate_half) order.
    pub fn from_gguf(path: &Path) -> Result<WeightSet, WeightsError> {
        gguf::load_gguf(path)
    }

    /// Loads by looking at the path: a `.gguf` file, or an HF directory (or a file inside one).
    pub fn load(path: &Path) -> Result<WeightSet, WeightsError> {
        if path.extension().is_some_and(|ext| ext == "gguf") {
            return Self::from_gguf(path);
        }
        if path.is_file() {
            if let Some(parent) = path.parent() {
                return Self::from_hf_dir(parent);
            }
        }
        Self::from_hf_dir(path)
    }

    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.get(name)
    }

    /// The output projection: `lm_head.weight`, or the embeddings when they are tied.
    pub fn lm_head(&self) -> &HostTensor {
        let name = if self.config.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        &self.tensors[name]
    }

    /// Every tensor a Llama model of `config` needs, with its shape, in HF names.
    pub fn expected_shapes(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
        let hidden = config.hidden_size;
        let head_dim = config.head_dim();
        let q_rows = config.num_attention_heads * head_dim;
        let kv_rows = config.num_key_value_heads * head_dim;
        let mlp = config.intermediate_size;
        let mut shapes = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![config.vocab_size, hidden],
        )];
        for layer in 0..config.num_hidden_layers {
            let p = format!("model.layers.{layer}");
            shapes.push((format!("{p}.input_layernorm.weight"), vec![hidden]));
            shapes.push((format!("{p}.self_attn.q_proj.weight"), vec![q_rows, hidden]));
            shapes.push((
                format!("{p}.self_attn.k_proj.weight"),
                vec![kv_rows, hidden],
            ));
            shapes.push((
                format!("{p}.self_attn.v_proj.weight"),
                vec![kv_rows, hidden],
            ));
            if config.qkv_bias {
                shapes.push((format!("{p}.self_attn.q_proj.bias"), vec![q_rows]));
                shapes.push((format!("{p}.self_attn.k_proj.bias"), vec![kv_rows]));
                shapes.push((format!("{p}.self_attn.v_proj.bias"), vec![kv_rows]));
            }
            shapes.push((format!("{p}.self_attn.o_proj.weight"), vec![hidden, q_rows]));
            shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![hidden]));
            shapes.push((format!("{p}.mlp.gate_proj.weight"), vec![mlp, hidden]));
            shapes.push((format!("{p}.mlp.up_proj.weight"), vec![mlp, hidden]));
            shapes.push((format!("{p}.mlp.down_proj.weight"), vec![hidden, mlp]));
        }
        shapes.push(("model.norm.weight".to_string(), vec![hidden]));
        if !config.tie_word_embeddings {
            shapes.push((
                "lm_head.weight".to_string(),
                vec![config.vocab_size, hidden],
            ));
        }
        shapes
    }

    /// Checks that every expected tensor is present with its shape and finite values, and that
    /// nothing else is there. `source` names the file in the error.
    pub fn validate(&self, source: &Path) -> Result<(), WeightsError> {
        let expected = Self::expected_shapes(&self.config);
        for (name, shape) in &expected {
            let tensor = self
                .tensors
                .get(name)
                .ok_or_else(|| WeightsError::MissingTensor {
                    path: source.to_path_buf(),
                    tensor: name.clone(),
                })?;
            if &tensor.shape != shape {
                return Err(WeightsError::WrongShape {
                    path: source.to_path_buf(),
                    tensor: name.clone(),
                    expected: shape.clone(),
                    found: tensor.shape.clone(),
                });
            }
            if tensor.data.iter().any(|v| !v.is_finite()) {
                return Err(WeightsError::NonFinite {
                    path: source.to_path_buf(),
                    tensor: name.clone(),
                });
            }
        }
        if self.tensors.len() != expected.len() {
            let unexpected = self
                .tensors
                .keys()
                .find(|name| !expected.iter().any(|(e, _)| e == *name))
                .expect("more tensors than expected means one is unexpected");
            return Err(WeightsError::UnexpectedTensor {
                path: source.to_path_buf(),
                tensor: unexpected.clone(),
                model: self.config.name.clone(),
            });
        }
        Ok(())
    }

    /// Total parameter count.
    pub fn param_count(&self) -> usize {
        self.tensors.values().map(HostTensor::elem_count).sum()
    }
}
