//! llama.cpp GGUF files (architecture `llama`): the header through the bounded reader in
//! `gguf_header.rs`, tensor data through candle-core's `gguf_file`.
//!
//! GGUF stores dims innermost-first; the reader reverses them, so a Linear weight comes out as
//! `[out, in]` like PyTorch. llama.cpp's converter permutes the rows of Q and K inside each head
//! (it pairs dims (2i, 2i+1) for its interleaved RoPE, where HF rotates halves (i, i + d/2));
//! `unpermute_gguf_rope_rows` undoes that so the HF-style forward is right.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::Device;

use super::fit::{check_config_fits, check_layer_count, Stored, GGUF_FIELDS};
use super::gguf_header::read_gguf_header;
use super::{HostTensor, WeightSet, WeightsError};
use crate::config::{ModelConfig, RopeScaling};

const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1";

/// A candle error's message without the backtrace candle attaches when RUST_BACKTRACE is set.
pub(crate) fn candle_message(error: &candle_core::Error) -> String {
    match error {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        other => other.to_string(),
    }
}

/// Reads the header of a GGUF file: metadata and tensor directory (no tensor data).
pub fn gguf_metadata(path: &Path) -> Result<Content, WeightsError> {
    read_gguf_header(path).map(|header| header.content)
}

/// Undoes llama.cpp's per-head row permutation of a Q or K weight `[heads * head_dim, in]`:
/// GGUF row `h * d + 2i + j` holds HF row `h * d + j * d/2 + i` (j in {0, 1}, i < d/2).
pub fn unpermute_gguf_rope_rows(
    data: &[f32],
    heads: usize,
    head_dim: usize,
    cols: usize,
) -> Vec<f32> {
    assert_eq!(data.len(), heads * head_dim * cols);
    assert!(head_dim.is_multiple_of(2));
    let half = head_dim / 2;
    let mut out = vec![0.0f32; data.len()];
    for head in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let gguf_row = head * head_dim + 2 * i + j;
                let hf_row = head * head_dim + j * half + i;
                out[hf_row * cols..(hf_row + 1) * cols]
                    .copy_from_slice(&data[gguf_row * cols..(gguf_row + 1) * cols]);
            }
        }
    }
    out
}

/// The inverse of `unpermute_gguf_rope_rows` (what llama.cpp's converter does); used by tests that
/// write GGUF files.
pub fn permute_hf_rope_rows(data: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    assert_eq!(data.len(), heads * head_dim * cols);
    let half = head_dim / 2;
    let mut out = vec![0.0f32; data.len()];
    for head in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let gguf_row = head * head_dim + 2 * i + j;
                let hf_row = head * head_dim + j * half + i;
                out[gguf_row * cols..(gguf_row + 1) * cols]
                    .copy_from_slice(&data[hf_row * cols..(hf_row + 1) * cols]);
            }
        }
    }
    out
}

/// GGUF <-> HF names of the model-level tensors.
const MODEL_TENSOR_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// GGUF <-> HF names of the per-layer tensors (after `blk.{i}.` / `model.layers.{i}.`).
const LAYER_TENSOR_NAMES: [(&str, &str); 9] = [
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
];

/// Which side of the name tables a lookup starts from.
#[derive(Clone, Copy)]
enum NameSide {
    Gguf,
    Hf,
}

impl NameSide {
    fn layer_prefix(self) -> &'static str {
        match self {
            NameSide::Gguf => "blk.",
            NameSide::Hf => "model.layers.",
        }
    }
}

/// Translate a tensor name from `from` to the other side, or None if it is not a Llama weight.
fn translate_tensor_name(name: &str, from: NameSide) -> Option<String> {
    let pick = |pair: &(&'static str, &'static str)| match from {
        NameSide::Gguf => (pair.0, pair.1),
        NameSide::Hf => (pair.1, pair.0),
    };
    if let Some((_, to)) = MODEL_TENSOR_NAMES
        .iter()
        .map(pick)
        .find(|(src, _)| *src == name)
    {
        return Some(to.to_string());
    }
    let rest = name.strip_prefix(from.layer_prefix())?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, to_part) = LAYER_TENSOR_NAMES
        .iter()
        .map(pick)
        .find(|(src, _)| *src == part)?;
    let to_prefix = match from {
        NameSide::Gguf => NameSide::Hf.layer_prefix(),
        NameSide::Hf => NameSide::Gguf.layer_prefix(),
    };
    Some(format!("{to_prefix}{layer}.{to_part}"))
}

/// HF name of a GGUF tensor name, or None if it is not a Llama weight.
pub fn hf_name_of_gguf(name: &str) -> Option<String> {
    translate_tensor_name(name, NameSide::Gguf)
}

/// GGUF name of an HF tensor name (inverse of `hf_name_of_gguf`).
pub fn gguf_name_of_hf(name: &str) -> Option<String> {
    translate_tensor_name(name, NameSide::Hf)
}

/// An integer metadata value of any width, if it is one and not negative.
pub(super) fn metadata_u64(value: &Value) -> Option<u64> {
    match value {
        Value::U8(v) => Some(*v as u64),
        Value::U16(v) => Some(*v as u64),
        Value::U32(v) => Some(*v as u64),
        Value::U64(v) => Some(*v),
        Value::I8(v) => u64::try_from(*v).ok(),
        Value::I16(v) => u64::try_from(*v).ok(),
        Value::I32(v) => u64::try_from(*v).ok(),
        Value::I64(v) => u64::try_from(*v).ok(),
        _ => None,
    }
}

fn metadata_f64(value: &Value) -> Option<f64> {
    match value {
        Value::F32(v) => Some(*v as f64),
        Value::F64(v) => Some(*v),
        other => metadata_u64(other).map(|v| v as f64),
    }
}

/// Builds the model config from `llama.*` metadata keys.
fn config_from_gguf(content: &Content, path: &Path) -> Result<ModelConfig, WeightsError> {
    let metadata = &content.metadata;
    let config_error = |key: &str, reason: String| WeightsError::Config {
        path: path.to_path_buf(),
        field: key.to_string(),
        reason,
    };
    let arch = match metadata.get("general.architecture") {
        Some(Value::String(arch)) => arch.clone(),
        Some(other) => {
            return Err(config_error(
                "general.architecture",
                format!("expected a string, found {other:?}"),
            ))
        }
        None => return Err(config_error("general.architecture", "missing".into())),
    };
    if arch != "llama" {
        return Err(config_error(
            "general.architecture",
            format!("only \"llama\" is supported, found \"{arch}\""),
        ));
    }
    let get_usize = |key: &str| -> Result<Option<usize>, WeightsError> {
        match metadata.get(key) {
            None => Ok(None),
            Some(value) => metadata_u64(value)
                .filter(|v| *v > 0)
                .map(|v| Some(v as usize))
                .ok_or_else(|| {
                    config_error(key, format!("expected a positive integer, found {value:?}"))
                }),
        }
    };
    let required = |key: &str| -> Result<usize, WeightsError> {
        get_usize(key)?.ok_or_else(|| config_error(key, "missing".into()))
    };
    let get_f64 = |key: &str| -> Result<Option<f64>, WeightsError> {
        match metadata.get(key) {
            None => Ok(None),
            Some(value) => metadata_f64(value)
                .filter(|v| v.is_finite() && *v > 0.0)
                .map(Some)
                .ok_or_else(|| {
                    config_error(key, format!("expected a positive number, found {value:?}"))
                }),
        }
    };
    if let Some(Value::String(scaling)) = metadata.get("llama.rope.scaling.type") {
        if scaling != "none" {
            return Err(config_error(
                "llama.rope.scaling.type",
                format!("RoPE scaling \"{scaling}\" is not supported"),
            ));
        }
    }
    let hidden_size = required("llama.embedding_length")?;
    let num_attention_heads = required("llama.attention.head_count")?;
    let num_key_value_heads =
        get_usize("llama.attention.head_count_kv")?.unwrap_or(num_attention_heads);
    if hidden_size % num_attention_heads != 0 || num_attention_heads % num_key_value_heads != 0 {
        return Err(config_error(
            "llama.attention.head_count",
            format!("heads {num_attention_heads} / kv heads {num_key_value_heads} do not divide hidden size {hidden_size}"),
        ));
    }
    let head_dim = hidden_size / num_attention_heads;
    if let Some(rope_dims) = get_usize("llama.rope.dimension_count")? {
        if rope_dims != head_dim {
            return Err(config_error(
                "llama.rope.dimension_count",
                format!("partial RoPE ({rope_dims} of {head_dim} dims) is not supported"),
            ));
        }
    }
    let embed_rows = content
        .tensor_infos
        .get("token_embd.weight")
        .and_then(|info| info.shape.dims().first().copied())
        .ok_or_else(|| WeightsError::MissingTensor {
            path: path.to_path_buf(),
            tensor: "token_embd.weight".into(),
        })?;
    let vocab_size = get_usize("llama.vocab_size")?.unwrap_or(embed_rows);
    let name = match metadata.get("general.name") {
        Some(Value::String(name)) => name.clone(),
        _ => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "gguf".into()),
    };
    Ok(ModelConfig {
        name,
        hidden_size,
        intermediate_size: required("llama.feed_forward_length")?,
        num_hidden_layers: required("llama.block_count")?,
        num_attention_heads,
        num_key_value_heads,
        vocab_size,
        rope_theta: get_f64("llama.rope.freq_base")?.unwrap_or(10000.0),
        rms_norm_eps: get_f64("llama.attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
        max_position_embeddings: get_usize("llama.context_length")?.unwrap_or(2048),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        // GGUF files of scaled-RoPE models carry a `rope_freqs.weight` tensor instead, which the
        // tensor directory check refuses as unexpected.
        rope_scaling: RopeScaling::None,
        qkv_bias: false,
    })
}

pub(super) fn load_gguf(path: &Path) -> Result<WeightSet, WeightsError> {
    let header = read_gguf_header(path)?;
    let content = &header.content;
    let config = config_from_gguf(content, path)?;
    // Q4_0 is the densest supported type: 18 bytes per block of 32 elements.
    let stored = Stored {
        bytes: header.file_len,
        block_bytes: 18,
        block_elems: 32,
        densest: "Q4_0",
        holder: "the file".into(),
    };
    check_config_fits(&config, &GGUF_FIELDS, path, &stored)?;
    check_layer_count(&config, &GGUF_FIELDS, path, content.tensor_infos.len())?;
    check_directory(content, &config, path)?;
    let head_dim = config.head_dim();

    let file = File::open(path).map_err(|error| WeightsError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    let mut reader = BufReader::new(file);
    // Sorted so errors and loading order do not depend on HashMap order.
    let infos: BTreeMap<&String, _> = content.tensor_infos.iter().collect();
    let mut tensors = BTreeMap::new();
    for (gguf_name, info) in infos {
        let hf_name = hf_name_of_gguf(gguf_name).expect("check_directory named every tensor");
        let shape = info.shape.dims().to_vec();
        let candle_error = |e: candle_core::Error| WeightsError::Parse {
            path: path.to_path_buf(),
            reason: format!("tensor `{gguf_name}`: {}", candle_message(&e)),
        };
        // The header reader checked that the data lies inside the file, so this reads at most
        // the file's size.
        let qtensor = info
            .read(&mut reader, content.tensor_data_offset, &Device::Cpu)
            .map_err(candle_error)?;
        let mut data = qtensor
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(candle_error)?;
        // Q and K rows are permuted per head (shapes were checked by `check_directory`).
        let heads_for_unpermute = if hf_name.ends_with("self_attn.q_proj.weight") {
            Some(config.num_attention_heads)
        } else if hf_name.ends_with("self_attn.k_proj.weight") {
            Some(config.num_key_value_heads)
        } else {
            None
        };
        if let Some(heads) = heads_for_unpermute {
            data = unpermute_gguf_rope_rows(&data, heads, head_dim, config.hidden_size);
        }
        tensors.insert(hf_name, HostTensor::new(shape, data));
    }
    let weights = WeightSet { config, tensors };
    weights.validate(path).map_err(rename_tensor_in_error)?;
    Ok(weights)
}

/// Checks the tensor directory before any data is read: every tensor is a Llama weight of a
/// supported type with the shape the config gives it, and none is missing.
fn check_directory(
    content: &Content,
    config: &ModelConfig,
    path: &Path,
) -> Result<(), WeightsError> {
    let expected: HashMap<String, Vec<usize>> =
        WeightSet::expected_shapes(config).into_iter().collect();
    let infos: BTreeMap<&String, _> = content.tensor_infos.iter().collect();
    for (gguf_name, info) in &infos {
        let hf_name = hf_name_of_gguf(gguf_name)
            .filter(|hf| expected.contains_key(hf))
            .ok_or_else(|| WeightsError::UnexpectedTensor {
                path: path.to_path_buf(),
                tensor: gguf_name.to_string(),
                model: config.name.clone(),
            })?;
        match info.ggml_dtype {
            GgmlDType::F32
            | GgmlDType::F16
            | GgmlDType::BF16
            | GgmlDType::Q8_0
            | GgmlDType::Q4_0
            | GgmlDType::Q4_1 => {}
            other => {
                return Err(WeightsError::UnsupportedDtype {
                    path: path.to_path_buf(),
                    tensor: gguf_name.to_string(),
                    dtype: format!("{other:?}"),
                    supported: SUPPORTED_TYPES,
                })
            }
        }
        let found = info.shape.dims().to_vec();
        if found != expected[&hf_name] {
            return Err(WeightsError::WrongShape {
                path: path.to_path_buf(),
                tensor: format!("{gguf_name} (HF {hf_name})"),
                expected: expected[&hf_name].clone(),
                found,
            });
        }
    }
    if let Some((missing, _)) = expected
        .iter()
        .filter(|(hf, _)| {
            gguf_name_of_hf(hf).is_none_or(|g| !content.tensor_infos.contains_key(&g))
        })
        .min_by_key(|(hf, _)| hf.as_str())
    {
        return Err(rename_tensor_in_error(WeightsError::MissingTensor {
            path: path.to_path_buf(),
            tensor: missing.clone(),
        }));
    }
    Ok(())
}

/// Errors from `validate` name HF tensors; for a GGUF file add the name the file uses.
fn rename_tensor_in_error(error: WeightsError) -> WeightsError {
    let with_gguf = |tensor: String| match gguf_name_of_hf(&tensor) {
        Some(gguf) => format!("{gguf} (HF {tensor})"),
        None => tensor,
    };
    match error {
        WeightsError::MissingTensor { path, tensor } => WeightsError::MissingTensor {
            path,
            tensor: with_gguf(tensor),
        },
        WeightsError::WrongShape {
            path,
            tensor,
            expected,
            found,
        } => WeightsError::WrongShape {
            path,
            tensor: with_gguf(tensor),
            expected,
            found,
        },
        WeightsError::NonFinite { path, tensor } => WeightsError::NonFinite {
            path,
            tensor: with_gguf(tensor),
        },
        other => other,
    }
}

/// Metadata map type of a GGUF file (for the tokenizer).
pub type GgufMetadata = HashMap<String, Value>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_round_trips_and_matches_llama_cpp_pairing() {
        let heads = 2;
        let head_dim = 4;
        let cols = 3;
        let hf: Vec<f32> = (0..heads * head_dim * cols).map(|v| v as f32).collect();
        let gguf = permute_hf_rope_rows(&hf, heads, head_dim, cols);
        // HF rows (0, 2) of head 0 (a rotate_half pair) become adjacent GGUF rows 0 and 1.
        assert_eq!(&gguf[0..3], &hf[0..3]);
        assert_eq!(&gguf[3..6], &hf[6..9]);
        assert_eq!(unpermute_gguf_rope_rows(&gguf, heads, head_dim, cols), hf);
    }

    #[test]
    fn names_map_both_ways() {
        for hf in [
            "model.embed_tokens.weight",
            "model.layers.3.self_attn.k_proj.weight",
            "model.layers.12.mlp.down_proj.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "lm_head.weight",
        ] {
            let gguf = gguf_name_of_hf(hf).unwrap();
            assert_eq!(hf_name_of_gguf(&gguf).as_deref(), Some(hf));
        }
        assert_eq!(hf_name_of_gguf("blk.x.attn_q.weight"), None);
    }
}
