//! `djinn engine bench`: decode-step and prefill timings of the CUDA forward, each printed beside
//! its hardware floor and the ratio to it.
//!
//! Floors: a decode step must read every weight except the embedding table once plus the KV of
//! every sequence (memory-bound); a prefill must do 2 FLOPs per weight per token plus causal
//! attention (compute-bound). Rates: the H100 SXM datasheet (3.35 TB/s, 989 TFLOP/s dense fp16) and
//! the rates measured on our H100 (3.0 TB/s device copy, ~790 TFLOP/s cuBLAS fp16 on random data).

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::batch::SeqStep;
use crate::cuda::{CudaError, CudaModel, DecodeGemm};

pub const DATASHEET_BANDWIDTH_BYTES_PER_S: f64 = 3.35e12;
pub const MEASURED_BANDWIDTH_BYTES_PER_S: f64 = 3.0e12;
pub const DATASHEET_FP16_FLOP_PER_S: f64 = 989e12;
pub const MEASURED_FP16_FLOP_PER_S: f64 = 790e12;

/// One measured configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchRow {
    pub system: String,
    pub kind: String,
    pub batch: usize,
    /// Decode: tokens each sequence attends to (its new token included). Prefill: prompt tokens
    /// (the chunk's for a chunk on a cached context).
    pub tokens: usize,
    /// Prefill chunks: tokens already in the KV cache under the chunk (0 otherwise).
    #[serde(default)]
    pub cached_tokens: usize,
    pub ms_p50: f64,
    pub ms_mean: f64,
    pub ms_min: f64,
    pub reps: usize,
    pub tokens_per_s: f64,
    pub bytes_moved_min: f64,
    pub flops: f64,
    pub floor_ms_datasheet: f64,
    pub floor_ms_measured_rates: f64,
    /// ms_p50 / floor_ms_datasheet.
    pub ratio_to_datasheet_floor: f64,
    pub ratio_to_measured_floor: f64,
    /// Decode rows: what ran the linear layers of 2-32 sequence steps (`DecodeGemm::label`);
    /// empty for prefill rows.
    #[serde(default)]
    pub decode_gemm: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Command line, card, driver and git commit of the run.
    pub provenance: crate::probe::provenance::Provenance,
    /// The prefill attention kernel the run used.
    pub prefill_attention: String,
    pub device: String,
    pub model: String,
    pub dtype: String,
    pub kv_blocks: usize,
    pub kv_block_bytes: usize,
    pub cuda_graphs: bool,
    pub rows: Vec<BenchRow>,
}

/// Bytes a decode step must read at least: all weights but the embedding table, plus the KV.
pub fn decode_bytes(model: &CudaModel, batch: usize, context: usize) -> f64 {
    let c = &model.config;
    let weight_params = weight_params(model)
        - if c.tie_word_embeddings {
            0
        } else {
            c.vocab_size * c.hidden_size
        };
    let elem = model.options.dtype.size_bytes();
    (weight_params * elem + batch * context * c.kv_bytes_per_token(model.options.dtype)) as f64
}

fn weight_params(model: &CudaModel) -> usize {
    let c = &model.config;
    let hd = c.head_dim();
    let per_layer = c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * hd
        + c.hidden_size * c.num_attention_heads * hd
        + 3 * c.hidden_size * c.intermediate_size
        + 2 * c.hidden_size;
    let lm_head = if c.tie_word_embeddings {
        0
    } else {
        c.vocab_size * c.hidden_size
    };
    c.vocab_size * c.hidden_size + per_layer * c.num_hidden_layers + c.hidden_size + lm_head
}

/// FLOPs of a prefill of `n` tokens: the work the step needs. Every layer's K and V for every
/// token, and the last layer's output at the last token only (the logits read nothing else; the
/// engine prunes the rest, see `CudaModel::set_prune_last_layer`). 2 FLOPs per linear weight per
/// token it is applied to (no LM head: only the last token's logits) plus causal attention (QK^T
/// and PV over n^2/2 pairs in the first layers, n pairs for the last row of the last layer).
pub fn prefill_flops(model: &CudaModel, n: usize) -> f64 {
    chunk_flops(model, 0, n)
}

/// FLOPs of a prefill chunk of `n` tokens on top of `cached` tokens already in the KV cache: the
/// linear work of `prefill_flops`, and attention over `n * cached + n^2/2` (query, key) pairs in
/// every layer but the last, `cached + n` for the last row of the last layer.
pub fn chunk_flops(model: &CudaModel, cached: usize, n: usize) -> f64 {
    let c = &model.config;
    let hd = c.head_dim();
    let qkv = c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * hd;
    let rest = c.hidden_size * c.num_attention_heads * hd + 3 * c.hidden_size * c.intermediate_size;
    let (layers, n_f, cached_f) = (c.num_hidden_layers as f64, n as f64, cached as f64);
    let linear = 2.0 * (qkv as f64 * layers * n_f + rest as f64 * ((layers - 1.0) * n_f + 1.0));
    let attn_per_pair = 2.0 * 2.0 * (c.num_attention_heads * hd) as f64;
    let pairs = (layers - 1.0) * (n_f * cached_f + n_f * n_f / 2.0) + cached_f + n_f;
    linear + attn_per_pair * pairs
}

fn stats(mut times_ms: Vec<f64>) -> (f64, f64, f64) {
    times_ms.sort_by(|a, b| a.partial_cmp(b).expect("finite times"));
    let n = times_ms.len();
    let p50 = if n % 2 == 1 {
        times_ms[n / 2]
    } else {
        0.5 * (times_ms[n / 2 - 1] + times_ms[n / 2])
    };
    (p50, times_ms.iter().sum::<f64>() / n as f64, times_ms[0])
}

/// Times `reps` decode steps (after `warmup`) of `batch` sequences each attending to `context`
/// tokens; every sequence has its own blocks. Each step is the serving path: stage inputs, replay
/// the graph, read back the greedy tokens (wall time, synchronised).
pub fn bench_decode(
    model: &mut CudaModel,
    batch: usize,
    context: usize,
    warmup: usize,
    reps: usize,
) -> Result<BenchRow, CudaError> {
    let bs = model.options.block_size_tokens;
    let blocks_per_seq = context.div_ceil(bs);
    if batch * blocks_per_seq > model.kv_pool().num_blocks() {
        return Err(CudaError::BadInput(format!(
            "decode batch {batch} x context {context} needs {} KV blocks; the pool has {}",
            batch * blocks_per_seq,
            model.kv_pool().num_blocks()
        )));
    }
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|b| ((b * blocks_per_seq) as u32..((b + 1) * blocks_per_seq) as u32).collect())
        .collect();
    let mut tokens: Vec<[u32; 1]> = (0..batch)
        .map(|b| [(b as u32 * 7919 + 1) % model.config.vocab_size as u32])
        .collect();
    let mut times = Vec::with_capacity(reps);
    for rep in 0..warmup + reps {
        let steps: Vec<SeqStep<'_>> = (0..batch)
            .map(|b| SeqStep {
                block_table: &tables[b],
                context_len: context - 1,
                tokens: &tokens[b],
            })
            .collect();
        let start = Instant::now();
        let next = model.forward_greedy(&steps)?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        if rep >= warmup {
            times.push(ms);
        }
        for (t, n) in tokens.iter_mut().zip(next) {
            t[0] = n;
        }
    }
    let (p50, mean, min) = stats(times);
    let bytes = decode_bytes(model, batch, context);
    let flops = 2.0 * weight_params(model) as f64 * batch as f64;
    let floor_ds =
        (bytes / DATASHEET_BANDWIDTH_BYTES_PER_S).max(flops / DATASHEET_FP16_FLOP_PER_S) * 1e3;
    let floor_ms =
        (bytes / MEASURED_BANDWIDTH_BYTES_PER_S).max(flops / MEASURED_FP16_FLOP_PER_S) * 1e3;
    Ok(BenchRow {
        system: "djinn-cuda".into(),
        kind: "decode_step".into(),
        batch,
        tokens: context,
        cached_tokens: 0,
        ms_p50: p50,
        ms_mean: mean,
        ms_min: min,
        reps,
        tokens_per_s: batch as f64 / (p50 / 1e3),
        bytes_moved_min: bytes,
        flops,
        floor_ms_datasheet: floor_ds,
        floor_ms_measured_rates: floor_ms,
        ratio_to_datasheet_floor: p50 / floor_ds,
        ratio_to_measured_floor: p50 / floor_ms,
        decode_gemm: model.decode_gemm().label().into(),
    })
}

/// A prefill's inputs for timing: a prompt of `n` spread-out token ids (multiplicative hashing, so
/// every run of the benchmark reads the same embeddings) on blocks 0, 1, 2, ... of the pool.
pub(crate) fn synthetic_prompt(model: &CudaModel, n: usize) -> (Vec<u32>, Vec<u32>) {
    let bs = model.options.block_size_tokens;
    let table: Vec<u32> = (0..n.div_ceil(bs) as u32).collect();
    let prompt: Vec<u32> = (0..n)
        .map(|i| ((i * 2654435761usize) % model.config.vocab_size) as u32)
        .collect();
    (table, prompt)
}

/// Times a prefill of `n` prompt tokens (one sequence, empty context), LM head on the last token.
pub fn bench_prefill(
    model: &mut CudaModel,
    n: usize,
    warmup: usize,
    reps: usize,
    gap: bool,
) -> Result<BenchRow, CudaError> {
    let (table, prompt) = synthetic_prompt(model, n);
    let mut times = Vec::with_capacity(reps);
    // With `gap`, where the wall-vs-GPU gap goes: the GPU span of each step (events before the
    // first and after the last enqueued work) and the host's enqueue time.
    let (mut spans, mut enqueues) = (Vec::new(), Vec::new());
    for rep in 0..warmup + reps {
        let step = SeqStep {
            block_table: &table,
            context_len: 0,
            tokens: &prompt,
        };
        let start = Instant::now();
        if gap {
            let (_, span_ms, enqueue_ms) = model.forward_greedy_timed(&[step])?;
            if rep >= warmup {
                spans.push(span_ms);
                enqueues.push(enqueue_ms);
            }
        } else {
            model.forward_greedy(&[step])?;
        }
        let ms = start.elapsed().as_secs_f64() * 1e3;
        if rep >= warmup {
            times.push(ms);
        }
    }
    if gap {
        let (wall_p50, _, _) = stats(times.clone());
        let (span_p50, _, span_min) = stats(spans);
        let (enq_p50, _, _) = stats(enqueues);
        // A profiled step right after the back-to-back prefills: the card is still hot.
        let hot = profile_prefill_once(model, n)?;
        let hot_total = hot
            .iter()
            .find(|(k, _)| k == "total")
            .map_or(f64::NAN, |p| p.1);
        println!(
            "prefill {n} gap: wall p50 {wall_p50:.3} ms, GPU span p50 {span_p50:.3} (min {span_min:.3}), wall - span {:.3} ms; host enqueue p50 {enq_p50:.3} ms; hot profiled step (event per kernel) sum {hot_total:.3} ms, span - hot sum {:.3} ms",
            wall_p50 - span_p50,
            span_p50 - hot_total
        );
        println!(
            "{}",
            format_profile(
                &format!("prefill {n} hot (right after the timed reps)"),
                &hot
            )
        );
    }
    Ok(prefill_row(model, "prefill", n, 0, times))
}

/// Times a prefill chunk of `n` tokens on top of `cached` tokens of one sequence whose KV is
/// already in the pool (blocks 0, 1, 2, ...; the benchmark fills the pool with random KV first):
/// the step of a chunked prefill of a long history. Each rep rewrites the chunk's own KV.
pub fn bench_prefill_chunk(
    model: &mut CudaModel,
    cached: usize,
    n: usize,
    warmup: usize,
    reps: usize,
) -> Result<BenchRow, CudaError> {
    let bs = model.options.block_size_tokens;
    let blocks = (cached + n).div_ceil(bs);
    if blocks > model.kv_pool().num_blocks() {
        return Err(CudaError::BadInput(format!(
            "a {n}-token chunk on {cached} cached tokens needs {blocks} KV blocks; the pool has {}",
            model.kv_pool().num_blocks()
        )));
    }
    let (table, prompt) = synthetic_prompt(model, cached + n);
    let mut times = Vec::with_capacity(reps);
    for rep in 0..warmup + reps {
        let step = SeqStep {
            block_table: &table,
            context_len: cached,
            tokens: &prompt[cached..],
        };
        let start = Instant::now();
        model.forward_greedy(&[step])?;
        if rep >= warmup {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(prefill_row(model, "prefill_chunk", n, cached, times))
}

/// The row of a prefill of `n` tokens on `cached` cached tokens, timed `times_ms`, beside its
/// floor: FLOPs (`chunk_flops`) or the weights and KV read, whichever is slower.
fn prefill_row(
    model: &CudaModel,
    kind: &str,
    n: usize,
    cached: usize,
    times_ms: Vec<f64>,
) -> BenchRow {
    let reps = times_ms.len();
    let (p50, mean, min) = stats(times_ms);
    let flops = chunk_flops(model, cached, n);
    let bytes = decode_bytes(model, 1, cached + n);
    let floor_ds =
        (flops / DATASHEET_FP16_FLOP_PER_S).max(bytes / DATASHEET_BANDWIDTH_BYTES_PER_S) * 1e3;
    let floor_ms =
        (flops / MEASURED_FP16_FLOP_PER_S).max(bytes / MEASURED_BANDWIDTH_BYTES_PER_S) * 1e3;
    BenchRow {
        system: "djinn-cuda".into(),
        kind: kind.into(),
        batch: 1,
        tokens: n,
        cached_tokens: cached,
        ms_p50: p50,
        ms_mean: mean,
        ms_min: min,
        reps,
        tokens_per_s: n as f64 / (p50 / 1e3),
        bytes_moved_min: bytes,
        flops,
        floor_ms_datasheet: floor_ds,
        floor_ms_measured_rates: floor_ms,
        ratio_to_datasheet_floor: p50 / floor_ds,
        ratio_to_measured_floor: p50 / floor_ms,
        decode_gemm: String::new(),
    }
}

/// Runs the whole grid: prefills from empty, prefill chunks on cached contexts (over a pool of
/// random KV), then decode at each batch x context (configurations that do not fit the pool are
/// reported on stderr and skipped). `on_row` sees each row as it
/// is measured (for printing).
pub fn run_grid(
    model: &mut CudaModel,
    grid: &BenchGrid,
    mut on_row: impl FnMut(&BenchRow),
) -> Result<Vec<BenchRow>, CudaError> {
    let mut rows = Vec::new();
    for &n in &grid.prefill_lengths {
        // Long prefills take seconds: fewer reps.
        let (warmup, reps) = if n >= 16384 { (1, 3) } else { (2, 7) };
        let row = bench_prefill(model, n, warmup, reps, grid.prefill_gap)?;
        on_row(&row);
        rows.push(row);
    }
    model.fill_kv_random(0x5eed, 1.0)?;
    for &(n, cached) in &grid.chunks {
        match bench_prefill_chunk(model, cached, n, 1, 5) {
            Ok(row) => {
                on_row(&row);
                rows.push(row);
            }
            Err(CudaError::BadInput(why)) => {
                eprintln!("skipped prefill chunk {n} on {cached} cached tokens: {why}")
            }
            Err(e) => return Err(e),
        }
    }
    let chosen = model.decode_gemm();
    let arms = if grid.decode_gemm_arms.is_empty() {
        vec![chosen]
    } else {
        grid.decode_gemm_arms.clone()
    };
    for &context in &grid.decode_contexts {
        for &batch in &grid.decode_batches {
            let reps = if batch * context >= 32 * 2048 { 20 } else { 50 };
            // The arms of one configuration back to back (the card in the same state); the
            // first warm-up step of each arm captures its decode graph.
            for &arm in &arms {
                model.set_decode_gemm(arm);
                match bench_decode(model, batch, context, 5, reps) {
                    Ok(row) => {
                        on_row(&row);
                        rows.push(row);
                    }
                    Err(CudaError::BadInput(why)) => {
                        eprintln!("skipped decode batch {batch} context {context}: {why}")
                    }
                    Err(e) => {
                        model.set_decode_gemm(chosen);
                        return Err(e);
                    }
                }
            }
        }
    }
    model.set_decode_gemm(chosen);
    Ok(rows)
}

/// One line per decode configuration timed under more than one `DecodeGemm` setting: each
/// setting's p50 and its ratio to the measured-rates floor, and each against the first.
pub fn format_decode_gemm_pairs(rows: &[BenchRow]) -> Vec<String> {
    let decode: Vec<&BenchRow> = rows.iter().filter(|r| r.kind == "decode_step").collect();
    let mut lines = Vec::new();
    let mut seen: Vec<(usize, usize)> = Vec::new();
    for first in &decode {
        let key = (first.batch, first.tokens);
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        let arms: Vec<&&BenchRow> = decode
            .iter()
            .filter(|r| (r.batch, r.tokens) == key)
            .collect();
        if arms.len() < 2 {
            continue;
        }
        let parts: Vec<String> = arms
            .iter()
            .map(|r| {
                format!(
                    "{} {:.3} ms (x{:.2} floor, x{:.3} of {})",
                    r.decode_gemm,
                    r.ms_p50,
                    r.ratio_to_measured_floor,
                    r.ms_p50 / first.ms_p50,
                    first.decode_gemm
                )
            })
            .collect();
        lines.push(format!(
            "decode batch {:>3} tokens {:>6}, floor {:.3} ms @3.0TB/s: {}",
            key.0,
            key.1,
            first.floor_ms_measured_rates,
            parts.join(" | ")
        ));
    }
    lines
}

/// What `run_grid` measures.
#[derive(Clone, Debug, Default)]
pub struct BenchGrid {
    /// Prefills from an empty context, one sequence each.
    pub prefill_lengths: Vec<usize>,
    /// Prefill chunks (tokens, cached tokens under them), one sequence each.
    pub chunks: Vec<(usize, usize)>,
    pub decode_batches: Vec<usize>,
    /// Tokens each decoding sequence attends to, its new token included.
    pub decode_contexts: Vec<usize>,
    /// Time each prefill's GPU span and host enqueue time, and profile one hot prefill.
    pub prefill_gap: bool,
    /// Time every decode configuration under each of these settings in turn (empty: the model's
    /// own setting only).
    pub decode_gemm_arms: Vec<DecodeGemm>,
}

/// One line per row: figure, floor, ratio.
pub fn format_row(row: &BenchRow) -> String {
    let cached = if row.cached_tokens > 0 {
        format!(" on {:>6} cached", row.cached_tokens)
    } else {
        String::new()
    };
    let arm = if row.decode_gemm.is_empty() {
        String::new()
    } else {
        format!(" [{}]", row.decode_gemm)
    };
    format!(
        "{:<12} {:<13} batch {:>3} tokens {:>6}{cached}{arm}: {:>9.3} ms p50 (mean {:.3}, min {:.3}, n={}) {:>10.0} tok/s | floor {:.3} ms @3.35TB/s+989TF (x{:.2}), {:.3} ms @3.0TB/s+790TF (x{:.2})",
        row.system,
        row.kind,
        row.batch,
        row.tokens,
        row.ms_p50,
        row.ms_mean,
        row.ms_min,
        row.reps,
        row.tokens_per_s,
        row.floor_ms_datasheet,
        row.ratio_to_datasheet_floor,
        row.floor_ms_measured_rates,
        row.ratio_to_measured_floor
    )
}

/// GPU time per category (eager launches with an event after each kernel / GEMM) of one decode step
/// of `batch` sequences attending to `context` tokens.
pub fn profile_decode(
    model: &mut CudaModel,
    batch: usize,
    context: usize,
) -> Result<Vec<(String, f64)>, CudaError> {
    let bs = model.options.block_size_tokens;
    let blocks_per_seq = context.div_ceil(bs);
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|b| ((b * blocks_per_seq) as u32..((b + 1) * blocks_per_seq) as u32).collect())
        .collect();
    let tokens: Vec<[u32; 1]> = (0..batch).map(|b| [b as u32 + 1]).collect();
    let steps: Vec<SeqStep<'_>> = (0..batch)
        .map(|b| SeqStep {
            block_table: &tables[b],
            context_len: context - 1,
            tokens: &tokens[b],
        })
        .collect();
    super::profile::profile_step(model, &steps)?; // warm (cuBLAS heuristics, caches)
    super::profile::profile_step(model, &steps)
}

/// GPU time per category of one prefill of `n` tokens, no warm-up step (so a hot card stays hot).
pub fn profile_prefill_once(
    model: &mut CudaModel,
    n: usize,
) -> Result<Vec<(String, f64)>, CudaError> {
    let (table, prompt) = synthetic_prompt(model, n);
    super::profile::profile_step(
        model,
        &[SeqStep {
            block_table: &table,
            context_len: 0,
            tokens: &prompt,
        }],
    )
}

/// GPU time per category of a prefill of `n` tokens.
pub fn profile_prefill(model: &mut CudaModel, n: usize) -> Result<Vec<(String, f64)>, CudaError> {
    let (table, prompt) = synthetic_prompt(model, n);
    let step = SeqStep {
        block_table: &table,
        context_len: 0,
        tokens: &prompt,
    };
    super::profile::profile_step(model, &[step])?;
    super::profile::profile_step(model, &[step])
}

pub fn format_profile(label: &str, profile: &[(String, f64)]) -> String {
    let parts: Vec<String> = profile.iter().map(|(k, v)| format!("{k} {v:.3}")).collect();
    format!(
        "profile {label} (GPU ms, eager launches): {}",
        parts.join(", ")
    )
}
