//! Config values checked against the file they came with, before anything is sized by them.
//!
//! A config is only a claim: `llama.block_count = 10^9` next to 21 tensors would make
//! `expected_shapes` list 9 * 10^9 names. Every shape field must therefore be explainable by the
//! tensors actually stored: the layer count by the number of tensors, and the parameters a field
//! implies by the bytes of the file at the smallest element size the format allows. The error names
//! the field as the file spells it.

use std::path::Path;

use super::WeightsError;
use crate::config::ModelConfig;

/// Longest context accepted: 2^24 positions is past every released Llama-family model and keeps
/// tables sized by the context (block tables, RoPE) small.
pub const MAX_POSITIONS: usize = 1 << 24;

/// What a file calls each config field.
pub(super) struct FieldNames {
    pub hidden_size: &'static str,
    pub intermediate_size: &'static str,
    pub num_hidden_layers: &'static str,
    pub num_attention_heads: &'static str,
    pub vocab_size: &'static str,
    pub max_position_embeddings: &'static str,
}

pub(super) const GGUF_FIELDS: FieldNames = FieldNames {
    hidden_size: "llama.embedding_length",
    intermediate_size: "llama.feed_forward_length",
    num_hidden_layers: "llama.block_count",
    num_attention_heads: "llama.attention.head_count",
    vocab_size: "llama.vocab_size",
    max_position_embeddings: "llama.context_length",
};

pub(super) const HF_FIELDS: FieldNames = FieldNames {
    hidden_size: "hidden_size",
    intermediate_size: "intermediate_size",
    num_hidden_layers: "num_hidden_layers",
    num_attention_heads: "num_attention_heads",
    vocab_size: "vocab_size",
    max_position_embeddings: "max_position_embeddings",
};

/// What the file actually stores.
pub(super) struct Stored {
    /// Bytes of the file (or of all shards).
    pub bytes: u64,
    /// The densest element type the format may use: `block_bytes` per `block_elems` elements.
    pub block_bytes: u64,
    pub block_elems: u64,
    /// Name of that type, for the message.
    pub densest: &'static str,
    /// What holds the bytes, for the message ("the file", "the 2 safetensors files").
    pub holder: String,
}

/// Checks the config's shape fields against the file: values the RoPE needs, the context limit,
/// and the parameters each shape field implies against the bytes stored.
pub(super) fn check_config_fits(
    config: &ModelConfig,
    fields: &FieldNames,
    path: &Path,
    stored: &Stored,
) -> Result<(), WeightsError> {
    let error = |field: &str, reason: String| WeightsError::Config {
        path: path.to_path_buf(),
        field: field.to_string(),
        reason,
    };
    if !config.head_dim().is_multiple_of(2) {
        return Err(error(
            fields.num_attention_heads,
            format!(
                "head size {} (hidden {} / {} heads) is odd; RoPE needs an even head size",
                config.head_dim(),
                config.hidden_size,
                config.num_attention_heads
            ),
        ));
    }
    if config.max_position_embeddings > MAX_POSITIONS {
        return Err(error(
            fields.max_position_embeddings,
            format!(
                "{} positions exceed the supported {MAX_POSITIONS}",
                config.max_position_embeddings
            ),
        ));
    }
    let hidden = config.hidden_size as u128;
    let vocab = config.vocab_size as u128;
    let mlp = config.intermediate_size as u128;
    let layers = config.num_hidden_layers as u128;
    let kv_rows = (config.num_key_value_heads * config.head_dim()) as u128;
    let heads = if config.tie_word_embeddings { 1 } else { 2 };
    // Per layer: two norms, Q and O (hidden x hidden), K and V (kv_rows x hidden), three MLP mats.
    let per_layer = hidden
        .checked_mul(2 + 2 * hidden)
        .and_then(|p| p.checked_add(kv_rows.checked_mul(2 * hidden)?))
        .and_then(|p| p.checked_add(mlp.checked_mul(3)?.checked_mul(hidden)?));
    let embeddings = vocab.checked_mul(hidden).and_then(|e| e.checked_mul(heads));
    let total = per_layer
        .and_then(|p| p.checked_mul(layers))
        .and_then(|p| p.checked_add(embeddings?))
        .and_then(|p| p.checked_add(hidden));
    // Each field is blamed for the first bound it breaks, the others being already explained.
    let claims = [
        (
            fields.hidden_size,
            config.hidden_size,
            Some(hidden),
            "elements of the final norm",
        ),
        (
            fields.vocab_size,
            config.vocab_size,
            embeddings,
            "parameters of the embeddings",
        ),
        (
            fields.intermediate_size,
            config.intermediate_size,
            mlp.checked_mul(3).and_then(|m| m.checked_mul(hidden)),
            "parameters of one layer's MLP",
        ),
        (
            fields.num_hidden_layers,
            config.num_hidden_layers,
            total,
            "parameters in all",
        ),
    ];
    for (field, value, elements, what) in claims {
        let bytes = elements
            .and_then(|e| e.checked_mul(stored.block_bytes as u128))
            .map(|b| b / stored.block_elems as u128);
        if bytes.is_none_or(|b| b > stored.bytes as u128) {
            let elements = elements.map_or_else(|| "more than 2^128".into(), |e| e.to_string());
            let bytes = bytes.map_or_else(|| "more than 2^128".into(), |b| b.to_string());
            return Err(error(
                field,
                format!(
                    "{value} implies {elements} {what}, at least {bytes} bytes even as {}, but {} {} {} bytes",
                    stored.densest,
                    stored.holder,
                    if stored.holder.ends_with("files") { "hold" } else { "holds" },
                    stored.bytes
                ),
            ));
        }
    }
    Ok(())
}

/// Checks that every layer the config claims could have a tensor in the file, so that
/// `expected_shapes` stays as small as the file's directory. (A layer has 9 tensors; this bound is
/// looser so that a file missing a few tensors is reported by name by `validate`.)
pub(super) fn check_layer_count(
    config: &ModelConfig,
    fields: &FieldNames,
    path: &Path,
    tensors_in_file: usize,
) -> Result<(), WeightsError> {
    if config.num_hidden_layers > tensors_in_file {
        return Err(WeightsError::Config {
            path: path.to_path_buf(),
            field: fields.num_hidden_layers.to_string(),
            reason: format!(
                "{} layers (9 tensors each), but the file holds only {tensors_in_file} tensors",
                config.num_hidden_layers
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16(bytes: u64) -> Stored {
        Stored {
            bytes,
            block_bytes: 2,
            block_elems: 1,
            densest: "F16",
            holder: "the file".into(),
        }
    }

    #[test]
    fn each_field_is_blamed_for_the_bytes_it_implies() {
        let config = ModelConfig::tiny();
        let exact = {
            let elements: usize = crate::weights::WeightSet::expected_shapes(&config)
                .iter()
                .map(|(_, shape)| shape.iter().product::<usize>())
                .sum();
            elements as u64 * 2
        };
        let path = Path::new("m.safetensors");
        let fits = f16(exact);
        check_config_fits(&config, &HF_FIELDS, path, &fits).unwrap();
        let short = f16(exact - 1);
        let err = check_config_fits(&config, &HF_FIELDS, path, &short).unwrap_err();
        assert!(
            matches!(&err, WeightsError::Config { field, .. } if field == "num_hidden_layers"),
            "{err}"
        );

        for (field, change) in [
            (
                "hidden_size",
                &(|c: &mut ModelConfig| c.hidden_size = 1 << 62) as &dyn Fn(&mut ModelConfig),
            ),
            ("vocab_size", &|c: &mut ModelConfig| c.vocab_size = 1 << 40),
            ("intermediate_size", &|c: &mut ModelConfig| {
                c.intermediate_size = usize::MAX
            }),
            ("num_hidden_layers", &|c: &mut ModelConfig| {
                c.num_hidden_layers = 1_000_000_000
            }),
        ] {
            let mut bad = config.clone();
            change(&mut bad);
            let err = check_config_fits(&bad, &HF_FIELDS, path, &fits).unwrap_err();
            assert!(
                matches!(&err, WeightsError::Config { field: f, .. } if f == field),
                "{field}: {err}"
            );
        }
        let err = check_layer_count(
            &ModelConfig {
                num_hidden_layers: usize::MAX,
                ..config
            },
            &GGUF_FIELDS,
            path,
            21,
        )
        .unwrap_err();
        assert!(err.to_string().contains("llama.block_count"), "{err}");
    }
}
