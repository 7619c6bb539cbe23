//! The swap engine over the CPU backend: bit-exact round trips, busy blocks until poll, and an
//! agent's logits after swap-out / swap-in (or drop and recompute) against the never-swapped agent.

use std::time::Instant;

use engine::batch::{Logits, SeqStep};
use engine::config::ModelConfig;
use engine::cpu::CpuModel;
use engine::swap::cpu::CpuSwapEngine;
use engine::swap::{BlockPair, PoolSide, SwapDirection, SwapEngine, SwapError};
use engine::weights::WeightSet;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn pairs(gpu: &[u32], host: &[u32]) -> Vec<BlockPair> {
    gpu.iter()
        .zip(host)
        .map(|(&gpu_block, &host_block)| BlockPair {
            gpu_block,
            host_block,
        })
        .collect()
}

fn block(pool: &[f32], block_elems: usize, b: u32) -> &[f32] {
    &pool[b as usize * block_elems..(b as usize + 1) * block_elems]
}

#[test]
fn swap_out_then_in_to_other_blocks_is_bit_exact_and_leaves_other_blocks_alone() {
    let block_elems = 1000;
    let gpu_blocks = 32u32;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let original: Vec<f32> = (0..block_elems * gpu_blocks as usize)
        .map(|_| rng.gen::<f32>() - 0.5)
        .collect();
    let mut device = original.clone();
    let mut swap =
        CpuSwapEngine::<f32>::new(block_elems, gpu_blocks, 16, 8, Instant::now()).unwrap();

    let out_gpu = [9u32, 2, 3, 4, 30];
    let host = [15u32, 0, 1, 2, 7];
    let out = swap
        .submit(&mut device, 1, SwapDirection::Out, &pairs(&out_gpu, &host))
        .unwrap();
    // Copied, but not reported: still in flight and its blocks busy.
    assert_eq!(swap.in_flight_count(), 1);
    assert_eq!(swap.busy_swap_of_gpu_block(9), Some(out));
    let records = swap.poll().unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].bytes, (5 * block_elems * 4) as u64);
    assert_eq!(records[0].direction, SwapDirection::Out);
    assert_eq!(swap.busy_swap_of_gpu_block(9), None);
    for (&g, &h) in out_gpu.iter().zip(&host) {
        assert_eq!(
            swap.host_pool().block(h).unwrap(),
            block(&original, block_elems, g)
        );
    }

    for &g in &out_gpu {
        device[g as usize * block_elems..(g as usize + 1) * block_elems].fill(f32::NAN);
    }
    let back_gpu = [20u32, 21, 22, 0, 31];
    swap.submit(&mut device, 1, SwapDirection::In, &pairs(&back_gpu, &host))
        .unwrap();
    swap.poll().unwrap();
    for (&from, &to) in out_gpu.iter().zip(&back_gpu) {
        let got: Vec<u32> = block(&device, block_elems, to)
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let want: Vec<u32> = block(&original, block_elems, from)
            .iter()
            .map(|v| v.to_bits())
            .collect();
        assert_eq!(got, want, "block {from} -> host -> block {to}");
    }
    for b in (0..gpu_blocks).filter(|b| !out_gpu.contains(b) && !back_gpu.contains(b)) {
        assert_eq!(
            block(&device, block_elems, b),
            block(&original, block_elems, b),
            "block {b} changed"
        );
    }
}

#[test]
fn unreported_swaps_hold_their_blocks_against_swaps_and_drops() {
    let mut device = vec![0.0f32; 8 * 4];
    let mut swap = CpuSwapEngine::<f32>::new(4, 8, 8, 2, Instant::now()).unwrap();
    let first = swap
        .submit(&mut device, 1, SwapDirection::Out, &pairs(&[0, 1], &[0, 1]))
        .unwrap();
    let err = swap
        .submit(&mut device, 2, SwapDirection::In, &pairs(&[1], &[4]))
        .unwrap_err();
    assert!(
        matches!(err, SwapError::BlockBusy { side: PoolSide::Gpu, block: 1, swap_id } if swap_id == first),
        "{err}"
    );
    let err = swap
        .submit(&mut device, 2, SwapDirection::In, &pairs(&[5], &[0]))
        .unwrap_err();
    assert!(
        matches!(
            err,
            SwapError::BlockBusy {
                side: PoolSide::Host,
                block: 0,
                ..
            }
        ),
        "{err}"
    );
    assert!(matches!(
        swap.check_drop(&[0], &[]),
        Err(SwapError::BlockBusy { .. })
    ));
    swap.submit(&mut device, 3, SwapDirection::Out, &pairs(&[2], &[2]))
        .unwrap();
    let err = swap
        .submit(&mut device, 4, SwapDirection::Out, &pairs(&[3], &[3]))
        .unwrap_err();
    assert!(
        matches!(err, SwapError::TooManyInFlight { limit: 2 }),
        "{err}"
    );
    assert!(swap.is_complete(first).unwrap());
    assert!(matches!(
        swap.is_complete(99),
        Err(SwapError::UnknownSwap(99))
    ));
    assert_eq!(swap.poll().unwrap().len(), 2);
    assert!(swap.check_drop(&[0, 1], &[0, 1]).is_ok());
    assert!(swap
        .submit(&mut device, 2, SwapDirection::In, &pairs(&[1], &[4]))
        .is_ok());
}

#[test]
fn bad_block_ids_and_pool_sizes_are_errors() {
    let mut device = vec![0.0f32; 8 * 4];
    let mut swap = CpuSwapEngine::<f32>::new(4, 8, 8, 4, Instant::now()).unwrap();
    let err = swap
        .submit(&mut device, 1, SwapDirection::Out, &pairs(&[8], &[0]))
        .unwrap_err();
    assert!(
        err.to_string().contains("gpu block 8 is out of range"),
        "{err}"
    );
    let err = swap
        .submit(&mut device, 1, SwapDirection::Out, &pairs(&[1, 2], &[3, 3]))
        .unwrap_err();
    assert!(
        err.to_string().contains("host block 3 appears twice"),
        "{err}"
    );
    let mut short = vec![0.0f32; 7 * 4];
    let err = swap
        .submit(&mut short, 1, SwapDirection::Out, &pairs(&[1], &[1]))
        .unwrap_err();
    assert!(
        matches!(
            err,
            SwapError::PoolSizeMismatch {
                actual: 28,
                expected: 32,
                ..
            }
        ),
        "{err}"
    );
}

/// An agent of the CPU model: its prompt, the token it decodes next, and the logits of that step.
struct Agent {
    prompt: Vec<u32>,
    next_token: [u32; 1],
}

impl Agent {
    fn new(seed: u64, len: usize, vocab: usize) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Agent {
            prompt: (0..len).map(|_| rng.gen_range(0..vocab as u32)).collect(),
            next_token: [rng.gen_range(0..vocab as u32)],
        }
    }

    fn prefill(&self, model: &mut CpuModel, table: &[u32]) -> Logits {
        model
            .forward(&[SeqStep {
                block_table: table,
                context_len: 0,
                tokens: &self.prompt,
            }])
            .unwrap()
    }

    fn decode(&self, model: &mut CpuModel, table: &[u32]) -> Logits {
        model
            .forward(&[SeqStep {
                block_table: table,
                context_len: self.prompt.len(),
                tokens: &self.next_token,
            }])
            .unwrap()
    }
}

fn bits(logits: &Logits) -> Vec<u32> {
    logits.data.iter().map(|v| v.to_bits()).collect()
}

fn logits_survive_swap_and_drop(config: ModelConfig) {
    let weights = WeightSet::random(&config, 5);
    let mut model = CpuModel::new(&weights, 24, 16).unwrap();
    let block_elems = model.layout().block_elems();
    let mut swap = CpuSwapEngine::<f32>::new(block_elems, 24, 8, 4, Instant::now()).unwrap();
    let agent = Agent::new(1, 45, config.vocab_size);
    let other = Agent::new(2, 45, config.vocab_size);
    let table = [3u32, 7, 1];
    let table_back = [10u32, 4, 12];
    let table_recompute = [15u32, 16, 2];
    let host = [6u32, 0, 3];

    // Never swapped.
    agent.prefill(&mut model, &table);
    let reference = agent.decode(&mut model, &table);

    // Swapped out, its blocks reused by another agent, swapped back into other blocks.
    agent.prefill(&mut model, &table);
    swap.submit(
        model.kv_pool_mut(),
        1,
        SwapDirection::Out,
        &pairs(&table, &host),
    )
    .unwrap();
    swap.poll().unwrap();
    other.prefill(&mut model, &table);
    swap.submit(
        model.kv_pool_mut(),
        1,
        SwapDirection::In,
        &pairs(&table_back, &host),
    )
    .unwrap();
    swap.poll().unwrap();
    let swapped = agent.decode(&mut model, &table_back);
    assert_eq!(
        bits(&swapped),
        bits(&reference),
        "{}: logits after swap differ from never swapped",
        config.name
    );

    // Dropped and recomputed from the tokens into fresh blocks: the CPU forward is the reference
    // fp32 forward, so recomputation reproduces the same values within its tolerance (1e-5).
    swap.check_drop(&table_back, &host).unwrap();
    agent.prefill(&mut model, &table_recompute);
    let recomputed = agent.decode(&mut model, &table_recompute);
    let scale = reference.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = recomputed
        .data
        .iter()
        .zip(&reference.data)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff <= 1e-5 * scale.max(1.0),
        "{}: recomputed logits differ by {diff} (scale {scale})",
        config.name
    );
    // And the comparison can fail: a different context gives different logits.
    let other_logits = other.decode(&mut model, &table);
    assert_ne!(bits(&other_logits), bits(&reference));
}

#[test]
fn logits_after_swap_equal_never_swapped_and_recompute_matches_tiny() {
    logits_survive_swap_and_drop(ModelConfig::tiny());
}

#[test]
fn logits_after_swap_equal_never_swapped_and_recompute_matches_tiny_gqa() {
    logits_survive_swap_and_drop(ModelConfig::tiny_gqa());
}
