//! HF-layout checkpoints: `config.json` plus `model.safetensors`, or
//! `model.safetensors.index.json` naming shards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::fit::{check_config_fits, check_layer_count, Stored, HF_FIELDS};
use super::{with_power_of_two, HostTensor, WeightSet, WeightsError};
use crate::config::ModelConfig;

/// Buffers some HF checkpoints carry that are not weights (recomputed from the config).
const IGNORED_SUFFIXES: [&str; 1] = ["rotary_emb.inv_freq"];

/// Builds a `ModelConfig` from an HF Llama `config.json` value; `path` names the file in errors.
/// Defaults follow `transformers.LlamaConfig` where a field is optional.
pub fn config_from_hf_json(
    json: &Value,
    path: &Path,
    name: &str,
) -> Result<ModelConfig, WeightsError> {
    let field_error = |field: &str, reason: String| WeightsError::Config {
        path: path.to_path_buf(),
        field: field.to_string(),
        reason,
    };
    let object = json
        .as_object()
        .ok_or_else(|| field_error("<root>", "expected a JSON object".into()))?;
    let get_usize = |field: &str, default: Option<usize>| -> Result<usize, WeightsError> {
        match object.get(field) {
            None | Some(Value::Null) => default.ok_or_else(|| field_error(field, "missing".into())),
            Some(value) => value
                .as_u64()
                .filter(|v| *v > 0)
                .map(|v| v as usize)
                .ok_or_else(|| {
                    field_error(field, format!("expected a positive integer, found {value}"))
                }),
        }
    };
    let get_f64 = |field: &str, default: f64| -> Result<f64, WeightsError> {
        match object.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(value) => value
                .as_f64()
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| {
                    field_error(field, format!("expected a positive number, found {value}"))
                }),
        }
    };
    reject_unsupported_features(object, &field_error)?;
    let hidden_size = get_usize("hidden_size", None)?;
    let num_attention_heads = get_usize("num_attention_heads", None)?;
    let num_key_value_heads = get_usize("num_key_value_heads", Some(num_attention_heads))?;
    if hidden_size % num_attention_heads != 0 {
        return Err(field_error(
            "num_attention_heads",
            format!("{num_attention_heads} does not divide hidden_size {hidden_size}"),
        ));
    }
    if num_attention_heads % num_key_value_heads != 0 {
        return Err(field_error(
            "num_key_value_heads",
            format!(
                "{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"
            ),
        ));
    }
    if let Some(head_dim) = object.get("head_dim").and_then(Value::as_u64) {
        if head_dim as usize != hidden_size / num_attention_heads {
            return Err(field_error(
                "head_dim",
                format!(
                    "{head_dim} differs from hidden_size / num_attention_heads = {}; not supported",
                    hidden_size / num_attention_heads
                ),
            ));
        }
    }
    // transformers 5 writes `rope_parameters: {rope_type, rope_theta}` instead of top-level
    // `rope_theta`; only the default (unscaled) RoPE is supported.
    let rope_theta = match object.get("rope_parameters") {
        None | Some(Value::Null) => get_f64("rope_theta", 10000.0)?,
        Some(Value::Object(parameters)) => {
            match parameters.get("rope_type").and_then(Value::as_str) {
                None | Some("default") => {}
                Some(other) => {
                    return Err(field_error(
                        "rope_parameters.rope_type",
                        format!("RoPE type \"{other}\" is not supported; plain RoPE only"),
                    ))
                }
            }
            match parameters.get("rope_theta") {
                None | Some(Value::Null) => get_f64("rope_theta", 10000.0)?,
                Some(value) => value
                    .as_f64()
                    .filter(|v| v.is_finite() && *v > 0.0)
                    .ok_or_else(|| {
                        field_error(
                            "rope_parameters.rope_theta",
                            format!("expected a positive number, found {value}"),
                        )
                    })?,
            }
        }
        Some(other) => {
            return Err(field_error(
                "rope_parameters",
                format!("expected an object, found {other}"),
            ))
        }
    };
    let tie_word_embeddings = match object.get("tie_word_embeddings") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(tied)) => *tied,
        Some(other) => {
            return Err(field_error(
                "tie_word_embeddings",
                format!("expected a boolean, found {other}"),
            ))
        }
    };
    Ok(ModelConfig {
        name: name.to_string(),
        hidden_size,
        intermediate_size: get_usize("intermediate_size", None)?,
        num_hidden_layers: get_usize("num_hidden_layers", None)?,
        num_attention_heads,
        num_key_value_heads,
        vocab_size: get_usize("vocab_size", None)?,
        rope_theta,
        rms_norm_eps: get_f64("rms_norm_eps", 1e-6)?,
        max_position_embeddings: get_usize("max_position_embeddings", Some(2048))?,
        tie_word_embeddings,
    })
}

/// The Llama variants the forward does not implement (other architectures, RoPE scaling, biases,
/// other activations) are refused by name rather than loaded and computed wrongly.
fn reject_unsupported_features(
    object: &serde_json::Map<String, Value>,
    field_error: &dyn Fn(&str, String) -> WeightsError,
) -> Result<(), WeightsError> {
    if let Some(model_type) = object.get("model_type") {
        if model_type.as_str() != Some("llama") {
            return Err(field_error(
                "model_type",
                format!("only \"llama\" is supported, found {model_type}"),
            ));
        }
    }
    if let Some(scaling) = object.get("rope_scaling") {
        if !scaling.is_null() {
            return Err(field_error(
                "rope_scaling",
                format!("RoPE scaling is not supported (found {scaling}); plain RoPE only"),
            ));
        }
    }
    if let Some(Value::Bool(true)) = object.get("attention_bias") {
        return Err(field_error(
            "attention_bias",
            "attention biases are not supported".into(),
        ));
    }
    if let Some(Value::Bool(true)) = object.get("mlp_bias") {
        return Err(field_error(
            "mlp_bias",
            "MLP biases are not supported".into(),
        ));
    }
    if let Some(act) = object.get("hidden_act") {
        if act.as_str() != Some("silu") {
            return Err(field_error(
                "hidden_act",
                format!("only \"silu\" is supported, found {act}"),
            ));
        }
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<Vec<u8>, WeightsError> {
    std::fs::read(path).map_err(|error| WeightsError::Io {
        path: path.to_path_buf(),
        error,
    })
}

fn parse_json(path: &Path) -> Result<Value, WeightsError> {
    let bytes = read_file(path)?;
    serde_json::from_slice(&bytes).map_err(|e| WeightsError::Parse {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

pub(super) fn load_hf_dir(dir: &Path) -> Result<WeightSet, WeightsError> {
    let config_path = dir.join("config.json");
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "hf".into());
    let config = config_from_hf_json(&parse_json(&config_path)?, &config_path, &name)?;

    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let shard_files: Vec<PathBuf> = if single.exists() {
        vec![single.clone()]
    } else if index.exists() {
        let index_json = parse_json(&index)?;
        let weight_map = index_json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| WeightsError::Config {
                path: index.clone(),
                field: "weight_map".into(),
                reason: "missing or not an object".into(),
            })?;
        let mut files: Vec<PathBuf> = Vec::new();
        for (tensor, file) in weight_map {
            let file = file.as_str().ok_or_else(|| WeightsError::Config {
                path: index.clone(),
                field: format!("weight_map.{tensor}"),
                reason: "expected a file name".into(),
            })?;
            let file = dir.join(file);
            if !files.contains(&file) {
                files.push(file);
            }
        }
        files.sort();
        files
    } else {
        return Err(WeightsError::Io {
            path: single,
            error: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no model.safetensors nor model.safetensors.index.json in the directory",
            ),
        });
    };

    let mut stored_bytes = 0u64;
    for file in &shard_files {
        let metadata = std::fs::metadata(file).map_err(|error| WeightsError::Io {
            path: file.clone(),
            error,
        })?;
        stored_bytes = stored_bytes.saturating_add(metadata.len());
    }
    let stored = Stored {
        bytes: stored_bytes,
        block_bytes: 2,
        block_elems: 1,
        densest: "F16",
        holder: match shard_files.len() {
            1 => "model.safetensors".to_string(),
            n => format!("the {n} safetensors files"),
        },
    };

    let mut tensors = BTreeMap::new();
    for (index, file) in shard_files.iter().enumerate() {
        let bytes = read_file(file)?;
        let safetensors = SafeTensors::deserialize(&bytes).map_err(|e| WeightsError::Parse {
            path: file.clone(),
            reason: safetensors_reason(&bytes, &e),
        })?;
        // Once the first file has proved to be safetensors (so a corrupt file is reported as
        // such), and before any tensor is converted.
        if index == 0 {
            check_config_fits(&config, &HF_FIELDS, &config_path, &stored)?;
        }
        for (tensor_name, view) in safetensors.tensors() {
            if IGNORED_SUFFIXES
                .iter()
                .any(|suffix| tensor_name.ends_with(suffix))
            {
                continue;
            }
            // A tied checkpoint may still carry a copy of the embeddings as lm_head: HF ignores it.
            if config.tie_word_embeddings && tensor_name == "lm_head.weight" {
                continue;
            }
            let data = to_f32(view.dtype(), view.data()).ok_or_else(|| {
                WeightsError::UnsupportedDtype {
                    path: file.clone(),
                    tensor: tensor_name.clone(),
                    dtype: format!("{:?}", view.dtype()),
                    supported: "F32, F16, BF16",
                }
            })?;
            tensors.insert(tensor_name, HostTensor::new(view.shape().to_vec(), data));
        }
    }
    check_layer_count(&config, &HF_FIELDS, &config_path, tensors.len())?;
    let weights = WeightSet { config, tensors };
    let source = if shard_files.len() == 1 {
        &shard_files[0]
    } else {
        &index
    };
    weights.validate(source)?;
    Ok(weights)
}

/// Size of the JSON header of a safetensors file, and the most the format allows (the
/// safetensors crate's limit).
const SAFETENSORS_MAX_HEADER: u64 = 100_000_000;

/// What is wrong with a safetensors file, in words: the header length is checked here (the
/// library only names the error), the rest is the library's verdict explained.
fn safetensors_reason(bytes: &[u8], error: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    let file_len = bytes.len() as u64;
    let Some(prefix) = bytes.first_chunk::<8>() else {
        return format!(
            "the file has {file_len} bytes, fewer than the 8-byte header length that starts a safetensors file"
        );
    };
    let header_len = u64::from_le_bytes(*prefix);
    if header_len > file_len - 8 {
        return format!(
            "header length {} exceeds the file size of {file_len} bytes (not a safetensors file, or truncated)",
            with_power_of_two(header_len)
        );
    }
    if header_len > SAFETENSORS_MAX_HEADER {
        return format!(
            "header length {} exceeds the {SAFETENSORS_MAX_HEADER} bytes the format allows",
            with_power_of_two(header_len)
        );
    }
    match error {
        E::InvalidHeader => "the JSON header is not valid UTF-8".into(),
        E::InvalidHeaderStart | E::InvalidHeaderDeserialization | E::JsonError(_) => {
            "the header is not the JSON object of tensor entries the format requires".into()
        }
        E::InvalidOffset(tensor) => format!(
            "tensor `{tensor}`: its data offsets do not start where the previous tensor's end"
        ),
        E::TensorInvalidInfo => {
            "a tensor's byte range does not match its shape and element type".into()
        }
        E::ValidationOverflow => "a tensor's shape overflows 64 bits".into(),
        E::MetadataIncompleteBuffer => format!(
            "the tensors cover a different number of bytes than the {} after the header",
            file_len - 8 - header_len
        ),
        other => format!("{other:?}"),
    }
}

/// Little-endian safetensors bytes to f32, or None for an unsupported dtype.
fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    match dtype {
        Dtype::F32 => Some(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        Dtype::F16 => Some(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        Dtype::BF16 => Some(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        _ => None,
    }
}

impl WeightSet {
    /// Writes `config.json` and `model.safetensors` (f32) into `dir` in HF layout, so HF
    /// transformers (and `from_hf_dir`) read back exactly these weights.
    pub fn save_hf_dir(&self, dir: &Path) -> Result<(), WeightsError> {
        std::fs::create_dir_all(dir).map_err(|error| WeightsError::Io {
            path: dir.to_path_buf(),
            error,
        })?;
        let config = &self.config;
        let config_json = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "vocab_size": config.vocab_size,
            "rope_theta": config.rope_theta,
            "rms_norm_eps": config.rms_norm_eps,
            "max_position_embeddings": config.max_position_embeddings,
            "tie_word_embeddings": config.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "rope_scaling": null,
            "torch_dtype": "float32",
        });
        let config_path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&config_json).expect("a JSON value serialises");
        std::fs::write(&config_path, text).map_err(|error| WeightsError::Io {
            path: config_path,
            error,
        })?;
        let byte_buffers: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(name, t)| {
                let bytes = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
                (name.clone(), t.shape.clone(), bytes)
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = byte_buffers
            .iter()
            .map(|(name, shape, bytes)| {
                let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)
                    .expect("shape and byte count agree by construction");
                (name.clone(), view)
            })
            .collect();
        let path = dir.join("model.safetensors");
        safetensors::serialize_to_file(views, &None, &path).map_err(|e| WeightsError::Parse {
            path: path.clone(),
            reason: e.to_string(),
        })
    }
}
