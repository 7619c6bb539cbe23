//! The CPU reference forward (candle-core, f32) over a paged KV pool.
//!
//! This is the backend CI trusts: it is written for clarity, not speed, and follows HF
//! transformers' `LlamaForCausalLM` (eager attention, fp32) step by step: RMSNorm
//! (`w * x / sqrt(mean(x^2) + eps)`), RoPE with HF's rotate_half pairing (dims `i` and
//! `i + head_dim/2`; Llama-3 frequency scaling when configured), q/k/v biases where the model has
//! them (Qwen2), causal attention with GQA (query head `h` reads KV head
//! `h / (heads / kv_heads)`), SiLU-gated MLP. GEMMs go through candle; attention, RoPE and the KV
//! writes are plain loops over the pool so that the paged addressing is explicit.
//!
//! KV pool: one `Vec<f32>` of `num_blocks * layout.block_elems()` elements in the block-major
//! `KvLayout` (`[block][layer][K|V][kv_head][token_in_block][head_dim]`), so a block is one
//! contiguous range that the swap engine can copy whole (`blocks`, `blocks_mut`).

use std::collections::HashSet;

use candle_core::{Device, Tensor};

pub use crate::batch::SeqStep;
use crate::batch::{Logits, PagedModel};
use crate::config::{KvLayout, ModelConfig};
use crate::weights::{HostTensor, WeightSet};

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("the batch is empty")]
    EmptyBatch,
    #[error("sequence {seq}: no new tokens")]
    NoNewTokens { seq: usize },
    #[error("sequence {seq}: token {token} is outside the vocabulary of {vocab_size}")]
    TokenOutOfVocab {
        seq: usize,
        token: u32,
        vocab_size: usize,
    },
    #[error("sequence {seq}: {tokens} tokens need {needed_blocks} blocks but the block table has {table_blocks}")]
    BlockTableTooShort {
        seq: usize,
        tokens: usize,
        needed_blocks: usize,
        table_blocks: usize,
    },
    #[error("sequence {seq}: block id {block} is outside the pool of {num_blocks} blocks")]
    BlockOutOfPool {
        seq: usize,
        block: u32,
        num_blocks: usize,
    },
    #[error("sequence {seq}: {tokens} tokens exceed the model's {max_positions} positions")]
    TooManyPositions {
        seq: usize,
        tokens: usize,
        max_positions: usize,
    },
    #[error(
        "sequences {first} and {second} both write KV slot {slot} of block {block} in one step"
    )]
    OverlappingWrites {
        first: usize,
        second: usize,
        block: u32,
        slot: usize,
    },
    #[error("block range {first}..{end} is outside the pool of {num_blocks} blocks")]
    BlockRangeOutOfPool {
        first: usize,
        end: usize,
        num_blocks: usize,
    },
    #[error("block data has {found} elements, expected a whole number of blocks of {block_elems}")]
    BlockDataSize { found: usize, block_elems: usize },
    #[error(transparent)]
    PoolTooLarge(#[from] PoolMemoryError),
    #[error("block size must be at least one token")]
    ZeroBlockSize,
    #[error("weights: {0}")]
    Weights(String),
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Host memory is too small for the KV pools asked for (checked before anything is allocated).
#[derive(Debug, thiserror::Error)]
#[error("{pools}: {needed} bytes needed, but {available}")]
pub struct PoolMemoryError {
    /// Each pool: "the KV pool (1 block of 196608000000 bytes)".
    pools: String,
    needed: String,
    /// How much there is and where the number came from.
    available: String,
}

/// Bytes a caller may still allocate: MemAvailable of /proc/meminfo, None where it is not there.
fn available_host_memory() -> Option<u64> {
    crate::swap::host_pool::HostMemory::read().map(|memory| memory.mem_available_bytes)
}

/// Checks that KV pools of `block_bytes`-byte blocks fit in the host memory available now, before
/// any of them is allocated; `pools` names each pool (for the message) with its block count. The
/// arithmetic is checked; where /proc/meminfo is missing, the allocator is asked to reserve the
/// total (and the reservation is dropped at once), which still refuses impossible sizes.
pub fn check_pools_fit_in_memory(
    block_bytes: u64,
    pools: &[(&str, u64)],
) -> Result<(), PoolMemoryError> {
    let describe = || {
        pools
            .iter()
            .map(|(name, blocks)| {
                let noun = if *blocks == 1 { "block" } else { "blocks" };
                format!("{name} ({blocks} {noun} of {block_bytes} bytes)")
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let needed = pools.iter().try_fold(0u64, |sum, (_, blocks)| {
        blocks.checked_mul(block_bytes)?.checked_add(sum)
    });
    let Some(needed) = needed else {
        return Err(PoolMemoryError {
            pools: describe(),
            needed: "more than 2^64".into(),
            available: "no machine has that much memory".into(),
        });
    };
    let refused = |available: String| PoolMemoryError {
        pools: describe(),
        needed: needed.to_string(),
        available,
    };
    match available_host_memory() {
        Some(available) if needed > available => Err(refused(format!(
            "only {available} bytes of memory are available (MemAvailable in /proc/meminfo)"
        ))),
        Some(_) => Ok(()),
        None => {
            let reservable = usize::try_from(needed)
                .ok()
                .is_some_and(|n| Vec::<u8>::new().try_reserve_exact(n).is_ok());
            if reservable {
                Ok(())
            } else {
                Err(refused("the allocator refused that much memory".into()))
            }
        }
    }
}

struct CpuLayer {
    input_norm: Tensor,
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Tensor,
    /// q, k, v biases (Qwen2), added to the projections' outputs before RoPE.
    qkv_bias: Option<[Tensor; 3]>,
    o_proj: Tensor,
    post_attention_norm: Tensor,
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
}

/// A Llama model on the CPU with its paged KV pool.
pub struct CpuModel {
    config: ModelConfig,
    layout: KvLayout,
    num_blocks: usize,
    embed_tokens: Tensor,
    layers: Vec<CpuLayer>,
    final_norm: Tensor,
    lm_head: Tensor,
    /// RoPE inverse frequencies, f32 as HF computes them.
    inv_freq: Vec<f32>,
    kv_pool: Vec<f32>,
}

fn to_tensor(tensor: &HostTensor) -> Result<Tensor, CpuError> {
    Ok(Tensor::from_slice(
        &tensor.data,
        tensor.shape.as_slice(),
        &Device::Cpu,
    )?)
}

impl CpuModel {
    /// Builds the model from validated weights and allocates a zeroed KV pool of `num_blocks`
    /// blocks of `block_size_tokens` tokens.
    pub fn new(
        weights: &WeightSet,
        num_blocks: usize,
        block_size_tokens: usize,
    ) -> Result<CpuModel, CpuError> {
        if block_size_tokens == 0 {
            return Err(CpuError::ZeroBlockSize);
        }
        weights
            .validate(std::path::Path::new("<weights given to CpuModel>"))
            .map_err(|e| CpuError::Weights(e.to_string()))?;
        let config = weights.config.clone();
        let layout = KvLayout::new(&config, block_size_tokens);
        let block_bytes = layout
            .checked_block_elems()
            .and_then(|elems| elems.checked_mul(4))
            .ok_or_else(|| PoolMemoryError {
                pools: format!("the KV pool (blocks of {block_size_tokens} tokens)"),
                needed: "more than 2^64".into(),
                available: "no machine has that much memory".into(),
            })?;
        check_pools_fit_in_memory(block_bytes as u64, &[("the KV pool", num_blocks as u64)])?;
        // Fits in memory, so the element count fits in usize.
        let pool_elems = num_blocks * layout.block_elems();
        let get = |name: &str| to_tensor(&weights.tensors[name]);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for layer in 0..config.num_hidden_layers {
            let p = format!("model.layers.{layer}");
            layers.push(CpuLayer {
                input_norm: get(&format!("{p}.input_layernorm.weight"))?,
                q_proj: get(&format!("{p}.self_attn.q_proj.weight"))?,
                k_proj: get(&format!("{p}.self_attn.k_proj.weight"))?,
                v_proj: get(&format!("{p}.self_attn.v_proj.weight"))?,
                qkv_bias: if config.qkv_bias {
                    Some([
                        get(&format!("{p}.self_attn.q_proj.bias"))?,
                        get(&format!("{p}.self_attn.k_proj.bias"))?,
                        get(&format!("{p}.self_attn.v_proj.bias"))?,
                    ])
                } else {
                    None
                },
                o_proj: get(&format!("{p}.self_attn.o_proj.weight"))?,
                post_attention_norm: get(&format!("{p}.post_attention_layernorm.weight"))?,
                gate_proj: get(&format!("{p}.mlp.gate_proj.weight"))?,
                up_proj: get(&format!("{p}.mlp.up_proj.weight"))?,
                down_proj: get(&format!("{p}.mlp.down_proj.weight"))?,
            });
        }
        // HF: 1 / theta^(arange(0, d, 2) / d) in f32, scaled (Llama 3) before use.
        let inv_freq = config
            .rope_inv_freq()
            .into_iter()
            .map(|f| f as f32)
            .collect();
        Ok(CpuModel {
            embed_tokens: get("model.embed_tokens.weight")?,
            final_norm: get("model.norm.weight")?,
            lm_head: to_tensor(weights.lm_head())?,
            layers,
            inv_freq,
            kv_pool: vec![0.0; pool_elems],
            num_blocks,
            layout,
            config,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// The whole pool, block-major.
    pub fn kv_pool(&self) -> &[f32] {
        &self.kv_pool
    }

    pub fn kv_pool_mut(&mut self) -> &mut [f32] {
        &mut self.kv_pool
    }

    fn block_range(
        &self,
        first_block: u32,
        count: usize,
    ) -> Result<std::ops::Range<usize>, CpuError> {
        let first = first_block as usize;
        let end = first
            .checked_add(count)
            .filter(|end| *end <= self.num_blocks)
            .ok_or(CpuError::BlockRangeOutOfPool {
                first,
                end: first.saturating_add(count),
                num_blocks: self.num_blocks,
            })?;
        let block_elems = self.layout.block_elems();
        Ok(first * block_elems..end * block_elems)
    }

    /// Blocks `first_block..first_block + count` as one contiguous slice (for swap-out).
    pub fn blocks(&self, first_block: u32, count: usize) -> Result<&[f32], CpuError> {
        let range = self.block_range(first_block, count)?;
        Ok(&self.kv_pool[range])
    }

    /// Blocks `first_block..first_block + count` as one mutable slice (for swap-in).
    pub fn blocks_mut(&mut self, first_block: u32, count: usize) -> Result<&mut [f32], CpuError> {
        let range = self.block_range(first_block, count)?;
        Ok(&mut self.kv_pool[range])
    }

    /// Copies whole blocks out of the pool into `dst` (a whole number of blocks).
    pub fn read_blocks(&self, first_block: u32, dst: &mut [f32]) -> Result<(), CpuError> {
        let count = self.whole_blocks(dst.len())?;
        dst.copy_from_slice(self.blocks(first_block, count)?);
        Ok(())
    }

    /// Copies whole blocks from `src` (a whole number of blocks) into the pool.
    pub fn write_blocks(&mut self, first_block: u32, src: &[f32]) -> Result<(), CpuError> {
        let count = self.whole_blocks(src.len())?;
        self.blocks_mut(first_block, count)?.copy_from_slice(src);
        Ok(())
    }

    fn whole_blocks(&self, elems: usize) -> Result<usize, CpuError> {
        let block_elems = self.layout.block_elems();
        if !elems.is_multiple_of(block_elems) {
            return Err(CpuError::BlockDataSize {
                found: elems,
                block_elems,
            });
        }
        Ok(elems / block_elems)
    }

    /// The batched paged forward: logits of each sequence's last new token (`rows == batch.len()`).
    pub fn forward(&mut self, batch: &[SeqStep<'_>]) -> Result<Logits, CpuError> {
        self.forward_rows(batch, false)
    }

    /// Like `forward`, but returns the logits of every new token: rows are sequence 0's new
    /// tokens in order, then sequence 1's, and so on.
    pub fn forward_every_token(&mut self, batch: &[SeqStep<'_>]) -> Result<Logits, CpuError> {
        self.forward_rows(batch, true)
    }

    fn validate_batch(&self, batch: &[SeqStep<'_>]) -> Result<(), CpuError> {
        if batch.is_empty() {
            return Err(CpuError::EmptyBatch);
        }
        let block_size = self.layout.block_size_tokens;
        let mut written: HashSet<(u32, usize)> = HashSet::new();
        let mut writer_of: Vec<((u32, usize), usize)> = Vec::new();
        for (seq, step) in batch.iter().enumerate() {
            if step.tokens.is_empty() {
                return Err(CpuError::NoNewTokens { seq });
            }
            if let Some(&token) = step
                .tokens
                .iter()
                .find(|t| **t as usize >= self.config.vocab_size)
            {
                return Err(CpuError::TokenOutOfVocab {
                    seq,
                    token,
                    vocab_size: self.config.vocab_size,
                });
            }
            let end = step.end_len();
            if end > self.config.max_position_embeddings {
                return Err(CpuError::TooManyPositions {
                    seq,
                    tokens: end,
                    max_positions: self.config.max_position_embeddings,
                });
            }
            let needed_blocks = end.div_ceil(block_size);
            if step.block_table.len() < needed_blocks {
                return Err(CpuError::BlockTableTooShort {
                    seq,
                    tokens: end,
                    needed_blocks,
                    table_blocks: step.block_table.len(),
                });
            }
            if let Some(&block) = step.block_table[..needed_blocks]
                .iter()
                .find(|b| **b as usize >= self.num_blocks)
            {
                return Err(CpuError::BlockOutOfPool {
                    seq,
                    block,
                    num_blocks: self.num_blocks,
                });
            }
            for position in step.context_len..end {
                let slot = (
                    step.block_table[position / block_size],
                    position % block_size,
                );
                if !written.insert(slot) {
                    let first = writer_of
                        .iter()
                        .find(|(s, _)| *s == slot)
                        .map(|(_, q)| *q)
                        .unwrap_or(seq);
                    return Err(CpuError::OverlappingWrites {
                        first,
                        second: seq,
                        block: slot.0,
                        slot: slot.1,
                    });
                }
                writer_of.push((slot, seq));
            }
        }
        Ok(())
    }

    fn forward_rows(
        &mut self,
        batch: &[SeqStep<'_>],
        every_token: bool,
    ) -> Result<Logits, CpuError> {
        self.validate_batch(batch)?;
        let config = &self.config;
        let hidden = config.hidden_size;
        let heads = config.num_attention_heads;
        let kv_heads = config.num_key_value_heads;
        let head_dim = config.head_dim();
        let group = heads / kv_heads;
        let eps = config.rms_norm_eps;
        let block_size = self.layout.block_size_tokens;

        // Flatten the batch: token t of the step belongs to sequence seq_of[t] at position_of[t].
        let mut token_ids: Vec<u32> = Vec::new();
        let mut position_of: Vec<usize> = Vec::new();
        let mut seq_of: Vec<usize> = Vec::new();
        for (seq, step) in batch.iter().enumerate() {
            for (i, &token) in step.tokens.iter().enumerate() {
                token_ids.push(token);
                position_of.push(step.context_len + i);
                seq_of.push(seq);
            }
        }
        let total_tokens = token_ids.len();
        let ids = Tensor::from_vec(token_ids, total_tokens, &Device::Cpu)?;
        let mut x = self.embed_tokens.index_select(&ids, 0)?;

        // cos/sin per token, shared by all layers: HF computes (position * inv_freq) in f32.
        let half = head_dim / 2;
        let mut cos = vec![0.0f32; total_tokens * half];
        let mut sin = vec![0.0f32; total_tokens * half];
        for (t, &position) in position_of.iter().enumerate() {
            for i in 0..half {
                let angle = position as f32 * self.inv_freq[i];
                cos[t * half + i] = (angle as f64).cos() as f32;
                sin[t * half + i] = (angle as f64).sin() as f32;
            }
        }
        let rope = |data: &mut [f32], heads_in_row: usize| {
            for t in 0..total_tokens {
                for head in 0..heads_in_row {
                    let v = &mut data[(t * heads_in_row + head) * head_dim..][..head_dim];
                    for i in 0..half {
                        let (c, s) = (cos[t * half + i], sin[t * half + i]);
                        let (a, b) = (v[i], v[i + half]);
                        v[i] = a * c - b * s;
                        v[i + half] = b * c + a * s;
                    }
                }
            }
        };
        let scale = 1.0 / (head_dim as f32).sqrt();
        let layout = self.layout;

        for (layer_index, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.input_norm, eps)?;
            let project = |weight: &Tensor, bias: Option<&Tensor>| -> Result<Vec<f32>, CpuError> {
                let out = h.matmul(&weight.t()?)?;
                match bias {
                    Some(bias) => flat(&out.broadcast_add(bias)?),
                    None => flat(&out),
                }
            };
            let bias = |i: usize| layer.qkv_bias.as_ref().map(|b| &b[i]);
            let mut q = project(&layer.q_proj, bias(0))?;
            let mut k = project(&layer.k_proj, bias(1))?;
            let v = project(&layer.v_proj, bias(2))?;
            rope(&mut q, heads);
            rope(&mut k, kv_heads);

            // Write the new tokens' K and V into their blocks.
            for t in 0..total_tokens {
                let step = &batch[seq_of[t]];
                let position = position_of[t];
                let block = step.block_table[position / block_size] as usize;
                for kv_head in 0..kv_heads {
                    let src = (t * kv_heads + kv_head) * head_dim;
                    let k_at = layout.offset(block, layer_index, 0, kv_head, position % block_size);
                    let v_at = layout.offset(block, layer_index, 1, kv_head, position % block_size);
                    self.kv_pool[k_at..k_at + head_dim].copy_from_slice(&k[src..src + head_dim]);
                    self.kv_pool[v_at..v_at + head_dim].copy_from_slice(&v[src..src + head_dim]);
                }
            }

            // Causal attention over the paged context: token t sees positions 0..=position_of[t].
            let mut attention = vec![0.0f32; total_tokens * heads * head_dim];
            let mut scores: Vec<f32> = Vec::new();
            for t in 0..total_tokens {
                let step = &batch[seq_of[t]];
                let visible = position_of[t] + 1;
                for head in 0..heads {
                    let kv_head = head / group;
                    let query = &q[(t * heads + head) * head_dim..][..head_dim];
                    scores.clear();
                    for j in 0..visible {
                        let block = step.block_table[j / block_size] as usize;
                        let k_at = layout.offset(block, layer_index, 0, kv_head, j % block_size);
                        let key = &self.kv_pool[k_at..k_at + head_dim];
                        let dot: f32 = query.iter().zip(key).map(|(a, b)| a * b).sum();
                        scores.push(dot * scale);
                    }
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut denominator = 0.0f32;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        denominator += *s;
                    }
                    let out = &mut attention[(t * heads + head) * head_dim..][..head_dim];
                    for (j, weight) in scores.iter().enumerate() {
                        let block = step.block_table[j / block_size] as usize;
                        let v_at = layout.offset(block, layer_index, 1, kv_head, j % block_size);
                        let value = &self.kv_pool[v_at..v_at + head_dim];
                        let weight = weight / denominator;
                        for (o, v) in out.iter_mut().zip(value) {
                            *o += weight * v;
                        }
                    }
                }
            }
            let attention =
                Tensor::from_vec(attention, (total_tokens, heads * head_dim), &Device::Cpu)?;
            x = (x + attention.matmul(&layer.o_proj.t()?)?)?;

            let h = rms_norm(&x, &layer.post_attention_norm, eps)?;
            let gate = h.matmul(&layer.gate_proj.t()?)?;
            let up = h.matmul(&layer.up_proj.t()?)?;
            let mlp = (gate.silu()? * up)?.matmul(&layer.down_proj.t()?)?;
            x = (x + mlp)?;
        }

        let rows: Vec<u32> = if every_token {
            (0..total_tokens as u32).collect()
        } else {
            // The last new token of each sequence.
            let mut last = Vec::with_capacity(batch.len());
            let mut end = 0usize;
            for step in batch {
                end += step.tokens.len();
                last.push((end - 1) as u32);
            }
            last
        };
        let row_count = rows.len();
        let x = x.index_select(&Tensor::from_vec(rows, row_count, &Device::Cpu)?, 0)?;
        debug_assert_eq!(x.dims(), &[row_count, hidden]);
        let x = rms_norm(&x, &self.final_norm, eps)?;
        let logits = x.matmul(&self.lm_head.t()?)?;
        Ok(Logits {
            rows: row_count,
            vocab: self.config.vocab_size,
            data: flat(&logits)?,
        })
    }
}

/// HF LlamaRMSNorm in f32: `w * x / sqrt(mean(x^2) + eps)` per row.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor, CpuError> {
    let rms = (x.sqr()?.mean_keepdim(1)? + eps)?.sqrt()?;
    Ok(x.broadcast_div(&rms)?.broadcast_mul(weight)?)
}

fn flat(tensor: &Tensor) -> Result<Vec<f32>, CpuError> {
    Ok(tensor.flatten_all()?.to_vec1::<f32>()?)
}

impl PagedModel for CpuModel {
    type Error = CpuError;

    fn forward(&mut self, batch: &[SeqStep<'_>]) -> Result<Logits, CpuError> {
        CpuModel::forward(self, batch)
    }

    fn block_size_tokens(&self) -> usize {
        self.layout.block_size_tokens
    }

    fn num_blocks(&self) -> usize {
        self.num_blocks
    }
}
