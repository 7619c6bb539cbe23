//! Model shapes (Llama family) and the KV block layout shared by the CPU and CUDA backends.

use serde::{Deserialize, Serialize};

/// Element type of weights and KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    Bf16,
}

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }
}

/// Shape of a Llama-family decoder (field names follow HF `config.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub name: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub vocab_size: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// KV bytes one token occupies across all layers (K and V).
    pub fn kv_bytes_per_token(&self, dtype: DType) -> usize {
        2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim() * dtype.size_bytes()
    }

    /// Llama-2-7B: 32 layers, hidden 4096, 32 heads (MHA), MLP 11008, vocab 32000.
    pub fn llama2_7b() -> Self {
        ModelConfig {
            name: "llama2-7b".into(),
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 32,
            vocab_size: 32000,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 4096,
            tie_word_embeddings: false,
        }
    }

    /// SmolLM2-135M: 30 layers, hidden 576, 9 heads, 3 KV heads (GQA), tied embeddings.
    pub fn smollm2_135m() -> Self {
        ModelConfig {
            name: "smollm2-135m".into(),
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            vocab_size: 49152,
            rope_theta: 100000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
        }
    }

    /// A tiny multi-head model for tests (fits in kilobytes).
    pub fn tiny() -> Self {
        ModelConfig {
            name: "tiny".into(),
            hidden_size: 64,
            intermediate_size: 160,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 4,
            vocab_size: 256,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 512,
            tie_word_embeddings: false,
        }
    }

    /// A tiny grouped-query model for tests (4 query heads share 2 KV heads).
    pub fn tiny_gqa() -> Self {
        ModelConfig {
            name: "tiny-gqa".into(),
            num_key_value_heads: 2,
            ..Self::tiny()
        }
    }

    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "llama2-7b" => Some(Self::llama2_7b()),
            "smollm2-135m" => Some(Self::smollm2_135m()),
            "tiny" => Some(Self::tiny()),
            "tiny-gqa" => Some(Self::tiny_gqa()),
            _ => None,
        }
    }

    pub const PRESET_NAMES: [&'static str; 4] = ["llama2-7b", "smollm2-135m", "tiny", "tiny-gqa"];
}

/// Block-major KV layout: `[block][layer][K|V][kv_head][token_in_block][head_dim]`.
///
/// Why block-major: one block (all layers, K and V) is one contiguous range, so swapping an
/// agent's context moves `blocks` large pieces (8 MiB per 16-token block for Llama-2-7B fp16)
/// instead of `blocks x layers x 2` small ones, which PCIe handles at full rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub block_size_tokens: usize,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl KvLayout {
    pub fn new(config: &ModelConfig, block_size_tokens: usize) -> Self {
        KvLayout {
            block_size_tokens,
            num_layers: config.num_hidden_layers,
            num_kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim(),
        }
    }

    /// Elements in one block (all layers, K and V).
    pub fn block_elems(&self) -> usize {
        self.num_layers * 2 * self.num_kv_heads * self.block_size_tokens * self.head_dim
    }

    /// `block_elems`, or None when it overflows (a block size read from the command line).
    pub fn checked_block_elems(&self) -> Option<usize> {
        [2, self.num_kv_heads, self.block_size_tokens, self.head_dim]
            .into_iter()
            .try_fold(self.num_layers, usize::checked_mul)
    }

    /// Elements of one (layer, K-or-V) slab inside a block.
    pub fn slab_elems(&self) -> usize {
        self.num_kv_heads * self.block_size_tokens * self.head_dim
    }

    /// Element offset of `(block, layer, kv (0 = K, 1 = V), head, token_in_block, dim 0)`.
    pub fn offset(
        &self,
        block: usize,
        layer: usize,
        kv: usize,
        head: usize,
        token_in_block: usize,
    ) -> usize {
        debug_assert!(layer < self.num_layers && kv < 2 && head < self.num_kv_heads);
        debug_assert!(token_in_block < self.block_size_tokens);
        (((block * self.num_layers + layer) * 2 + kv) * self.num_kv_heads + head)
            * self.block_size_tokens
            * self.head_dim
            + token_in_block * self.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama2_7b_kv_is_half_a_mebibyte_per_token() {
        assert_eq!(
            ModelConfig::llama2_7b().kv_bytes_per_token(DType::F16),
            512 * 1024
        );
    }

    #[test]
    fn block_major_offsets_are_dense_and_ordered() {
        let layout = KvLayout::new(&ModelConfig::tiny_gqa(), 16);
        assert_eq!(layout.offset(1, 0, 0, 0, 0), layout.block_elems());
        assert_eq!(layout.offset(0, 0, 1, 0, 0), layout.slab_elems());
        assert_eq!(layout.offset(0, 0, 0, 0, 1), layout.head_dim);
    }
}
