//! Running a planned grid on an engine (CPU or CUDA: any `PagedModel` with its swap engine) and
//! recording every timed step and copy in the records real runs write (`traces::StepRecord`,
//! `traces::SwapRecord`), so the fit reads a grid exactly as it reads a run.
//!
//! Block layout: a step's sequences take pool blocks from 0 up, one table each; copies beside a
//! step take blocks from the top of the pool down (swap-in destinations, then swap-out sources),
//! so a copy never touches a block the step reads. Host blocks are taken from 0 up.

use std::time::Instant;

use sim::ids::AgentId;

use super::plan::{GridPlan, GridShape, StepSpec};
use crate::batch::{PagedModel, SeqStep};
use crate::swap::backend::SwapExecutor;
use crate::swap::{BlockPair, SwapDirection};

/// What the grid measured.
#[derive(Debug, Default)]
pub struct GridRecords {
    pub steps: Vec<traces::StepRecord>,
    pub swaps: Vec<traces::SwapRecord>,
    /// Shapes the engine refused at run time (e.g. block rounding made them not fit), with why.
    pub skipped: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum GridError {
    #[error("{shape}: the forward failed: {message}")]
    Forward { shape: String, message: String },
    #[error("{shape}: the swap engine failed: {message}")]
    Swap { shape: String, message: String },
}

/// The block tables and tokens of one step: (table, context_len, tokens) per sequence.
struct StepInputs {
    seqs: Vec<(Vec<u32>, usize, Vec<u32>)>,
    blocks: usize,
}

fn token(i: usize, vocab: u32) -> u32 {
    ((i.wrapping_mul(2654435761)) % vocab.max(1) as usize) as u32
}

fn step_inputs(step: &StepSpec, block_size: usize, vocab: u32) -> StepInputs {
    let mut seqs = Vec::new();
    let mut next_block = 0u32;
    let mut seq = |context: usize, new: usize, salt: usize| {
        let blocks = (context + new).div_ceil(block_size) as u32;
        let table: Vec<u32> = (next_block..next_block + blocks).collect();
        next_block += blocks;
        let tokens: Vec<u32> = (0..new).map(|i| token(salt * 7919 + i, vocab)).collect();
        (table, context, tokens)
    };
    let (cached, batch, context) = match *step {
        StepSpec::Decode { batch, context } => (0, batch, context),
        StepSpec::Prefill { cached, .. } => (cached, 0, 0),
        StepSpec::Mixed {
            cached,
            batch,
            context,
            ..
        } => (cached, batch, context),
    };
    // Prefill sequences first (salts 1_000_000 + i keep their tokens apart from decode ones).
    for (i, tokens) in step.prefill_split().into_iter().enumerate() {
        seqs.push(seq(cached as usize, tokens as usize, 1_000_000 + i));
    }
    for b in 0..batch as usize {
        seqs.push(seq(context as usize - 1, 1, b + 1));
    }
    StepInputs {
        seqs,
        blocks: next_block as usize,
    }
}

/// The step record of one timed step of `step`.
fn record(step: &StepSpec, index: u64, start_ns: u64, duration_ns: u64) -> traces::StepRecord {
    let shape = step.shape();
    traces::StepRecord {
        step_index: index,
        start_ns,
        duration_ns,
        prefill_tokens: shape.prefill_tokens as u32,
        prefill_sequences: step.prefill_split().len() as u32,
        prefill_attention_pairs: shape.prefill_attention_pairs as u64,
        decode_batch: shape.decode_sequences as u32,
        decode_context_tokens: shape.decode_context_tokens as u64,
        ..traces::StepRecord::default()
    }
}

/// Block pairs of a copy of `tokens` tokens: device blocks counted down from `top`, host blocks
/// from `host_first` up.
fn pairs(tokens: u32, block_size: usize, top: &mut u32, host_first: &mut u32) -> Vec<BlockPair> {
    let n = (tokens as usize).div_ceil(block_size) as u32;
    let out = (0..n)
        .map(|i| BlockPair {
            gpu_block: *top - 1 - i,
            host_block: *host_first + i,
        })
        .collect();
    *top -= n;
    *host_first += n;
    out
}

/// Runs `plan` on `model` with `swap` (built over the model's pool, with its epoch at `epoch`).
/// `progress` sees (shapes done, shapes planned, label) before each shape.
pub fn run_grid<M, S>(
    model: &mut M,
    swap: &mut S,
    vocab: u32,
    block_bytes: u64,
    host_blocks: u32,
    plan: &GridPlan,
    epoch: Instant,
    mut progress: impl FnMut(usize, usize, &str),
) -> Result<GridRecords, GridError>
where
    M: PagedModel,
    S: SwapExecutor<Model = M>,
{
    let block_size = model.block_size_tokens();
    let pool_blocks = model.num_blocks();
    let mut out = GridRecords::default();
    let mut index = 0u64;
    for (i, shape) in plan.shapes.iter().enumerate() {
        let label = shape.label();
        progress(i, plan.shapes.len(), &label);
        let inputs = step_inputs(&shape.step, block_size, vocab);
        let copy_blocks = (shape.swap_in_tokens as usize).div_ceil(block_size)
            + (shape.swap_out_tokens as usize).div_ceil(block_size);
        if inputs.blocks + copy_blocks > pool_blocks || copy_blocks > host_blocks as usize {
            out.skipped.push(format!(
                "{label}: needs {} device blocks ({} for copies), the pool has {pool_blocks}",
                inputs.blocks + copy_blocks,
                copy_blocks
            ));
            continue;
        }
        for rep in 0..plan.warmup + plan.reps {
            let (in_bytes, out_bytes) =
                start_copies(model, swap, shape, block_size, block_bytes, &label)?;
            let steps: Vec<SeqStep<'_>> = inputs
                .seqs
                .iter()
                .map(|(table, context_len, tokens)| SeqStep {
                    block_table: table,
                    context_len: *context_len,
                    tokens,
                })
                .collect();
            let start = Instant::now();
            model
                .forward_greedy(&steps)
                .map_err(|e| GridError::Forward {
                    shape: label.clone(),
                    message: e.to_string(),
                })?;
            let duration_ns = start.elapsed().as_nanos() as u64;
            let done = swap.wait_all().map_err(|e| GridError::Swap {
                shape: label.clone(),
                message: e.to_string(),
            })?;
            if rep < plan.warmup {
                continue;
            }
            let start_ns = start.duration_since(epoch).as_nanos() as u64;
            let mut rec = record(&shape.step, index, start_ns, duration_ns);
            rec.swap_in_bytes_started = in_bytes;
            rec.swap_out_bytes_started = out_bytes;
            out.steps.push(rec);
            out.swaps.extend(done.iter().map(|s| s.to_trace()));
            index += 1;
        }
    }
    progress(plan.shapes.len(), plan.shapes.len(), "done");
    Ok(out)
}

/// Submits the copies that run beside `shape`'s step; returns the bytes started each way.
fn start_copies<M, S>(
    model: &mut M,
    swap: &mut S,
    shape: &GridShape,
    block_size: usize,
    block_bytes: u64,
    label: &str,
) -> Result<(u64, u64), GridError>
where
    M: PagedModel,
    S: SwapExecutor<Model = M>,
{
    let mut top = model.num_blocks() as u32;
    let mut host = 0u32;
    let mut bytes = [0u64; 2];
    for (k, (tokens, direction)) in [
        (shape.swap_in_tokens, SwapDirection::In),
        (shape.swap_out_tokens, SwapDirection::Out),
    ]
    .into_iter()
    .enumerate()
    {
        if tokens == 0 {
            continue;
        }
        let p = pairs(tokens, block_size, &mut top, &mut host);
        swap.submit_for(model, k as AgentId, direction, &p)
            .map_err(|e| GridError::Swap {
                shape: label.to_string(),
                message: e.to_string(),
            })?;
        bytes[k] = p.len() as u64 * block_bytes;
    }
    Ok((bytes[0], bytes[1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_inputs_give_each_sequence_its_own_blocks() {
        let step = StepSpec::Mixed {
            chunk: 20,
            cached: 12,
            seqs: 1,
            batch: 2,
            context: 17,
        };
        let inputs = step_inputs(&step, 16, 256);
        assert_eq!(inputs.seqs.len(), 3);
        assert_eq!(inputs.seqs[0].0, vec![0, 1]);
        assert_eq!((inputs.seqs[0].1, inputs.seqs[0].2.len()), (12, 20));
        assert_eq!(inputs.seqs[1].0, vec![2, 3]);
        assert_eq!((inputs.seqs[1].1, inputs.seqs[1].2.len()), (16, 1));
        assert_eq!(inputs.blocks, 6);
        let rec = record(&step, 0, 0, 5);
        assert_eq!(rec.prefill_attention_pairs, 20 * 12 + 20 * 21 / 2);
        assert_eq!(rec.decode_context_tokens, 34);
    }

    #[test]
    fn a_shared_chunk_gives_each_prefill_sequence_its_share_and_blocks() {
        let step = StepSpec::Mixed {
            chunk: 10,
            cached: 16,
            seqs: 3,
            batch: 1,
            context: 5,
        };
        let inputs = step_inputs(&step, 16, 256);
        let lens: Vec<(usize, usize)> = inputs.seqs.iter().map(|s| (s.1, s.2.len())).collect();
        assert_eq!(lens, vec![(16, 4), (16, 3), (16, 3), (4, 1)]);
        // 16 + 4 tokens take two blocks each; the decode sequence one: no block is shared.
        assert_eq!(inputs.seqs[2].0, vec![4, 5]);
        assert_eq!(inputs.blocks, 7);
        let rec = record(&step, 0, 0, 5);
        assert_eq!(rec.prefill_sequences, 3);
        assert_eq!(rec.prefill_tokens, 10);
        // Each sequence's pairs: 4 x 16 + 4 x 5 / 2, then twice 3 x 16 + 3 x 4 / 2.
        assert_eq!(rec.prefill_attention_pairs, 64 + 10 + 2 * (48 + 6));
        assert_eq!(step.shape().sequences, 4.0);
        assert_eq!(step.kv_tokens(), 10 + 3 * 16 + 5);
    }
}
