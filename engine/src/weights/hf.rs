//! HF-layout checkpoints: `config.json` plus `model.safetensors`, or
//! `model.safetensors.index.json` naming shards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::fit::{check_config_fits, check_layer_count, Stored, HF_FIELDS, MAX_POSITIONS};
use super::{with_power_of_two, HostTensor, WeightSet, WeightsError};
use crate::config::{ModelConfig, RopeScaling};

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
    let (rope_theta, rope_scaling) = rope_from_json(object, &field_error)?;
    if let RopeScaling::Llama3 {
        original_max_position_embeddings,
        ..
    } = rope_scaling
    {
        if original_max_position_embeddings > MAX_POSITIONS {
            return Err(field_error(
                "rope_scaling.original_max_position_embeddings",
                format!("{original_max_position_embeddings} exceeds the {MAX_POSITIONS} positions supported"),
            ));
        }
    }
    // Qwen2 is Llama with biases on q/k/v (and none elsewhere).
    let qkv_bias = object.get("model_type").and_then(Value::as_str) == Some("qwen2");
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
        rope_scaling,
        qkv_bias,
    })
}

/// A positive finite number of a JSON object, or `default` when absent; `field` names it in errors.
fn positive_f64(
    object: &serde_json::Map<String, Value>,
    key: &str,
    field: &str,
    default: Option<f64>,
    field_error: &dyn Fn(&str, String) -> WeightsError,
) -> Result<f64, WeightsError> {
    match object.get(key) {
        None | Some(Value::Null) => {
            default.ok_or_else(|| field_error(field, "missing (needed by this RoPE type)".into()))
        }
        Some(value) => value
            .as_f64()
            .filter(|v| v.is_finite() && *v > 0.0)
            .ok_or_else(|| {
                field_error(field, format!("expected a positive number, found {value}"))
            }),
    }
}

/// RoPE theta and scaling. Classic configs: top-level `rope_theta` and `rope_scaling` (null or
/// `{rope_type | type, factor, ...}`); transformers 5: `rope_parameters` holding both. Only the
/// default RoPE and Llama 3's scaling are implemented; any other type is refused by name.
fn rope_from_json(
    object: &serde_json::Map<String, Value>,
    field_error: &dyn Fn(&str, String) -> WeightsError,
) -> Result<(f64, RopeScaling), WeightsError> {
    let top_theta = positive_f64(
        object,
        "rope_theta",
        "rope_theta",
        Some(10000.0),
        field_error,
    )?;
    let (section, parameters) = match (object.get("rope_parameters"), object.get("rope_scaling")) {
        (Some(Value::Object(parameters)), _) => ("rope_parameters", Some(parameters)),
        (Some(Value::Null) | None, Some(Value::Object(scaling))) => ("rope_scaling", Some(scaling)),
        (Some(Value::Null) | None, Some(Value::Null) | None) => {
            return Ok((top_theta, RopeScaling::None))
        }
        (Some(other), _) => {
            return Err(field_error(
                "rope_parameters",
                format!("expected an object, found {other}"),
            ))
        }
        (_, Some(other)) => {
            return Err(field_error(
                "rope_scaling",
                format!("expected an object or null, found {other}"),
            ))
        }
    };
    let parameters = parameters.expect("set in every arm that reaches here");
    let named = |key: &str| format!("{section}.{key}");
    let theta = positive_f64(
        parameters,
        "rope_theta",
        &named("rope_theta"),
        Some(top_theta),
        field_error,
    )?;
    // Older configs spell the key `type`.
    let (type_key, rope_type) = match (parameters.get("rope_type"), parameters.get("type")) {
        (Some(value), _) => ("rope_type", value),
        (None, Some(value)) => ("type", value),
        (None, None) => ("rope_type", &Value::Null),
    };
    match rope_type {
        Value::Null => Ok((theta, RopeScaling::None)),
        Value::String(name) if name == "default" => Ok((theta, RopeScaling::None)),
        Value::String(name) if name == "llama3" => {
            let get = |key: &str| positive_f64(parameters, key, &named(key), None, field_error);
            let (factor, low, high) = (
                get("factor")?,
                get("low_freq_factor")?,
                get("high_freq_factor")?,
            );
            if high <= low {
                return Err(field_error(
                    &named("high_freq_factor"),
                    format!("{high} must exceed low_freq_factor {low}"),
                ));
            }
            let original_field = named("original_max_position_embeddings");
            let original = parameters
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .filter(|v| *v > 0)
                .ok_or_else(|| {
                    field_error(&original_field, "expected a positive integer".into())
                })?;
            Ok((
                theta,
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: usize::try_from(original)
                        .unwrap_or(usize::MAX),
                },
            ))
        }
        other => Err(field_error(
            &named(type_key),
            format!("RoPE type {other} is not supported; \"default\" and \"llama3\" are"),
        )),
    }
}

/// The Llama variants the forward does not implement (other architectures, o_proj and MLP biases,
/// other activations) are refused by name rather than loaded and computed wrongly.
fn reject_unsupported_features(
    object: &serde_json::Map<String, Value>,
    field_error: &dyn Fn(&str, String) -> WeightsError,
) -> Result<(), WeightsError> {
    if let Some(model_type) = object.get("model_type") {
        if !matches!(model_type.as_str(), Some("llama" | "qwen2")) {
            return Err(field_error(
                "model_type",
                format!("only \"llama\" and \"qwen2\" are supported, found {model_type}"),
            ));
        }
    }
    // Qwen2's sliding window (off in released 7B configs) is not implemented.
    if let Some(Value::Bool(true)) = object.get("use_sliding_window") {
        return Err(field_error(
            "use_sliding_window",
            "sliding-window attention is not supported".into(),
        ));
    }
    if let Some(Value::Array(types)) = object.get("layer_types") {
        if let Some(other) = types.iter().find(|t| t.as_str() != Some("full_attention")) {
            return Err(field_error(
                "layer_types",
                format!("only \"full_attention\" layers are supported, found {other}"),
            ));
        }
    }
    // Llama's `attention_bias` puts a bias on o_proj too, which the forward does not have.
    if let Some(Value::Bool(true)) = object.get("attention_bias") {
        return Err(field_error(
            "attention_bias",
            "Llama attention biases (q/k/v/o) are not supported; q/k/v biases come with model_type \"qwen2\"".into(),
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

/// The HF `config.json` of `config` (`torch_dtype` as given): a Llama, or a Qwen2 when the
/// q/k/v projections have biases; Llama-3 RoPE scaling in the classic `rope_scaling` object, which
/// transformers 4 and 5 both read.
pub fn hf_config_json(config: &ModelConfig, torch_dtype: &str) -> Value {
    let mut json = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim(),
        "vocab_size": config.vocab_size,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "rope_scaling": null,
        "torch_dtype": torch_dtype,
    });
    if let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    } = config.rope_scaling
    {
        json["rope_scaling"] = serde_json::json!({
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings,
        });
    }
    if config.qkv_bias {
        let object = json.as_object_mut().expect("built as an object");
        object.remove("attention_bias");
        object.remove("mlp_bias");
        object.insert(
            "architectures".into(),
            serde_json::json!(["Qwen2ForCausalLM"]),
        );
        object.insert("model_type".into(), "qwen2".into());
        object.insert("use_sliding_window".into(), false.into());
        object.insert("sliding_window".into(), Value::Null);
        object.insert("max_window_layers".into(), config.num_hidden_layers.into());
    }
    json
}

impl WeightSet {
    /// Writes `config.json` and `model.safetensors` (f32) into `dir` in HF layout, so HF
    /// transformers (and `from_hf_dir`) read back exactly these weights.
    pub fn save_hf_dir(&self, dir: &Path) -> Result<(), WeightsError> {
        std::fs::create_dir_all(dir).map_err(|error| WeightsError::Io {
            path: dir.to_path_buf(),
            error,
        })?;
        let config_json = hf_config_json(&self.config, "float32");
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
