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

/// How RoPE frequencies are rescaled for long contexts (HF `rope_scaling` / `rope_parameters`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "rope_type")]
pub enum RopeScaling {
    /// Plain RoPE: `theta^(-2i/d)`.
    #[default]
    None,
    /// Llama 3.1's scaling: long wavelengths divided by `factor`, short ones kept, a smooth
    /// blend in between (HF `_compute_llama3_parameters`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

impl RopeScaling {
    /// Applies the scaling to one plain inverse frequency `f = theta^(-2i/d)`.
    pub fn scale(&self, inv_freq: f64) -> f64 {
        match *self {
            RopeScaling::None => inv_freq,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: original,
            } => {
                let original = original as f64;
                let wavelength = std::f64::consts::TAU / inv_freq;
                // Wavelengths are compared with the original context: those much shorter than it
                // (high frequencies) never saw longer positions and stay; much longer ones are
                // stretched by `factor`; in between, a linear blend in `original / wavelength`.
                if wavelength < original / high {
                    inv_freq
                } else if wavelength > original / low {
                    inv_freq / factor
                } else {
                    let smooth = (original / wavelength - low) / (high - low);
                    (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
                }
            }
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
    /// RoPE frequency scaling (Llama 3.1) or none.
    #[serde(default)]
    pub rope_scaling: RopeScaling,
    /// Biases on the q, k and v projections (Qwen2; o_proj and the MLP have none).
    #[serde(default)]
    pub qkv_bias: bool,
}

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// RoPE inverse frequencies `theta^(-2i/d)` for `i < d/2`, scaled by `rope_scaling`, in f64
    /// (the CPU reference rounds them to f32 as HF does; the CUDA table is built from f64).
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let hd = self.head_dim();
        (0..hd / 2)
            .map(|i| {
                let plain = 1.0 / self.rope_theta.powf((2 * i) as f64 / hd as f64);
                self.rope_scaling.scale(plain)
            })
            .collect()
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
            rope_scaling: RopeScaling::None,
            qkv_bias: false,
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
            rope_scaling: RopeScaling::None,
            qkv_bias: false,
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
            rope_scaling: RopeScaling::None,
            qkv_bias: false,
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

    /// Llama-3.1-8B: 32 layers, hidden 4096, 32 query heads over 8 KV heads, MLP 14336, vocab
    /// 128256, theta 500000 with Llama-3 frequency scaling (x8 beyond 8192 positions), 131072
    /// positions.
    pub fn llama3_1_8b() -> Self {
        ModelConfig {
            name: "llama3.1-8b".into(),
            hidden_size: 4096,
            intermediate_size: 14336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            vocab_size: 128256,
            rope_theta: 500000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 131072,
            tie_word_embeddings: false,
            rope_scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
            qkv_bias: false,
        }
    }

    /// Qwen2.5-7B: 28 layers, hidden 3584, 28 query heads over 4 KV heads, MLP 18944, vocab
    /// 152064, theta 1e6, 32768 positions, biases on q/k/v.
    pub fn qwen2_5_7b() -> Self {
        ModelConfig {
            name: "qwen2.5-7b".into(),
            hidden_size: 3584,
            intermediate_size: 18944,
            num_hidden_layers: 28,
            num_attention_heads: 28,
            num_key_value_heads: 4,
            vocab_size: 152064,
            rope_theta: 1_000_000.0,
            rms_norm_eps: 1e-6,
            max_position_embeddings: 32768,
            tie_word_embeddings: false,
            rope_scaling: RopeScaling::None,
            qkv_bias: true,
        }
    }

    /// `tiny-gqa` with Llama-3 RoPE scaling over a 64-token original context, so positions of a
    /// short test already fall in the scaled and blended frequency bands.
    pub fn tiny_gqa_llama3() -> Self {
        ModelConfig {
            name: "tiny-gqa-llama3".into(),
            rope_theta: 500000.0,
            rope_scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64,
            },
            ..Self::tiny_gqa()
        }
    }

    /// `tiny-gqa` with biases on the q, k and v projections (the Qwen2 attention).
    pub fn tiny_gqa_bias() -> Self {
        ModelConfig {
            name: "tiny-gqa-bias".into(),
            rms_norm_eps: 1e-6,
            qkv_bias: true,
            ..Self::tiny_gqa()
        }
    }

    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "llama2-7b" => Some(Self::llama2_7b()),
            "llama3.1-8b" => Some(Self::llama3_1_8b()),
            "qwen2.5-7b" => Some(Self::qwen2_5_7b()),
            "smollm2-135m" => Some(Self::smollm2_135m()),
            "tiny" => Some(Self::tiny()),
            "tiny-gqa" => Some(Self::tiny_gqa()),
            "tiny-gqa-llama3" => Some(Self::tiny_gqa_llama3()),
            "tiny-gqa-bias" => Some(Self::tiny_gqa_bias()),
            _ => None,
        }
    }

    pub const PRESET_NAMES: [&'static str; 8] = [
        "llama2-7b",
        "llama3.1-8b",
        "qwen2.5-7b",
        "smollm2-135m",
        "tiny",
        "tiny-gqa",
        "tiny-gqa-llama3",
        "tiny-gqa-bias",
    ];
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
    fn a_llama3_8b_block_is_one_contiguous_range_of_two_mebibytes() {
        // The swap engine copies block b as the byte range [b, b + 1) x block bytes: every K and V
        // vector of every layer and KV head of the block must lie inside it, and fill it.
        let layout = KvLayout::new(&ModelConfig::llama3_1_8b(), 16);
        let elems = layout.block_elems();
        assert_eq!(elems * DType::F16.size_bytes(), 2 << 20);
        assert_eq!(layout.slab_elems() * DType::F16.size_bytes(), 32 << 10);
        for block in [0usize, 7, 2687] {
            let mut starts = Vec::new();
            for layer in 0..layout.num_layers {
                for kv in 0..2 {
                    for head in 0..layout.num_kv_heads {
                        for token in 0..layout.block_size_tokens {
                            starts.push(layout.offset(block, layer, kv, head, token));
                        }
                    }
                }
            }
            starts.sort_unstable();
            let expected: Vec<usize> = (0..elems / layout.head_dim)
                .map(|i| block * elems + i * layout.head_dim)
                .collect();
            assert_eq!(
                starts, expected,
                "block {block} fills its own range exactly"
            );
        }
    }

    #[test]
    fn gqa_presets_have_the_published_kv_sizes() {
        // Llama-3.1-8B: 32 layers x 8 KV heads x 128 dims x K,V x 2 bytes = 128 KiB per token, so a
        // 42k-token (43008) context is 5.25 GiB; Qwen2.5-7B: 28 x 4 x 128 x 2 x 2 = 56 KiB.
        let llama = ModelConfig::llama3_1_8b();
        assert_eq!(llama.kv_bytes_per_token(DType::Bf16), 128 * 1024);
        assert_eq!(
            43008 * llama.kv_bytes_per_token(DType::F16),
            21 * (1 << 30) / 4
        );
        assert_eq!(llama.head_dim(), 128);
        let qwen = ModelConfig::qwen2_5_7b();
        assert_eq!(qwen.head_dim(), 128);
        assert_eq!(qwen.kv_bytes_per_token(DType::F16), 56 * 1024);
        for name in ModelConfig::PRESET_NAMES {
            assert_eq!(ModelConfig::preset(name).unwrap().name, name);
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_stretches_low_and_blends_between() {
        let config = ModelConfig::llama3_1_8b();
        let plain = ModelConfig {
            rope_scaling: RopeScaling::None,
            ..config.clone()
        }
        .rope_inv_freq();
        let scaled = config.rope_inv_freq();
        let (low_wavelen, high_wavelen) = (8192.0, 8192.0 / 4.0);
        let mut bands = [0usize; 3];
        for (f, s) in plain.iter().zip(&scaled) {
            let wavelength = std::f64::consts::TAU / f;
            if wavelength < high_wavelen {
                assert_eq!(s, f);
                bands[0] += 1;
            } else if wavelength > low_wavelen {
                assert!((s * 8.0 / f - 1.0).abs() < 1e-12);
                bands[1] += 1;
            } else {
                assert!(*s < *f && *s > f / 8.0, "{s} vs {f}");
                bands[2] += 1;
            }
        }
        // Every band is populated for head_dim 128 and theta 500000.
        assert!(bands.iter().all(|n| *n > 0), "{bands:?}");
        // The frequencies stay ordered (a blend never crosses a neighbour).
        assert!(scaled.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn block_major_offsets_are_dense_and_ordered() {
        let layout = KvLayout::new(&ModelConfig::tiny_gqa(), 16);
        assert_eq!(layout.offset(1, 0, 0, 0, 0), layout.block_elems());
        assert_eq!(layout.offset(0, 0, 1, 0, 0), layout.slab_elems());
        assert_eq!(layout.offset(0, 0, 0, 0, 1), layout.head_dim);
    }
}
