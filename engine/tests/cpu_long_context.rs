//! Long-ish contexts on the CPU reference for the GQA presets (Llama-3 RoPE scaling, q/k/v biases):
//! paged decode over many small, scattered blocks and chunked prefill on top of a cached context
//! both reproduce one whole-sequence prefill. The contexts (480 tokens) run far past the 64-token
//! original context of `tiny-gqa-llama3`, so the scaled frequencies are the ones in use.

mod cpu_common;

use cpu_common::*;
use engine::batch::SeqStep;
use engine::config::ModelConfig;
use engine::cpu::CpuModel;
use engine::weights::WeightSet;

const CONTEXT: usize = 480;
/// Small blocks: a 480-token sequence spans 120 of them.
const BLOCK: usize = 4;

fn tokens(seed: u32) -> Vec<u32> {
    (0..CONTEXT as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 7) % 256)
        .collect()
}

/// A scattered block table: block i of the sequence is pool block (i * 37 + 5) mod pool, a
/// permutation for a pool size coprime with 37.
fn scattered_table(blocks: usize, pool: usize) -> Vec<u32> {
    (0..blocks).map(|i| ((i * 37 + 5) % pool) as u32).collect()
}

/// Runs `sequence` as `cuts` (chunk lengths, then single-token decode steps for the rest) and
/// compares each step's last-token logits with row `end - 1` of the whole prefill.
fn check_steps_match_whole_prefill(preset: &str, cuts: &[usize]) {
    let config = ModelConfig::preset(preset).unwrap();
    let weights = WeightSet::random(&config, 41);
    let sequence = tokens(3);
    let pool = CONTEXT.div_ceil(BLOCK) + 3; // 123, coprime with 37
    let table = scattered_table(CONTEXT.div_ceil(BLOCK), pool);

    let mut whole = CpuModel::new(&weights, pool, BLOCK).unwrap();
    let reference = whole
        .forward_every_token(&[SeqStep {
            block_table: &table,
            context_len: 0,
            tokens: &sequence,
        }])
        .unwrap();

    let mut model = CpuModel::new(&weights, pool, BLOCK).unwrap();
    let mut at = 0;
    let mut steps = cuts.to_vec();
    steps.extend(std::iter::repeat_n(1, CONTEXT - cuts.iter().sum::<usize>()));
    for n in steps {
        let logits = model
            .forward(&[SeqStep {
                block_table: &table,
                context_len: at,
                tokens: &sequence[at..at + n],
            }])
            .unwrap();
        at += n;
        assert_rows_close(
            logits.row(0),
            reference.row(at - 1),
            CONSISTENCY_ABS_TOLERANCE,
            &format!("{preset}: step ending at {at}"),
        );
    }
    assert_eq!(at, CONTEXT);
}

#[test]
fn chunked_prefill_on_a_cached_context_then_decode_match_one_prefill() {
    // 300 tokens cached by a first chunk, a 150-token chunk on top, 30 decode steps over 120 blocks.
    for preset in ["tiny-gqa-llama3", "tiny-gqa-bias"] {
        check_steps_match_whole_prefill(preset, &[300, 150]);
    }
}

#[test]
fn many_small_chunks_match_one_prefill() {
    // Chunks that start and end mid-block.
    check_steps_match_whole_prefill("tiny-gqa-llama3", &[7, 61, 130, 3, 250]);
}

#[test]
fn batched_decode_of_long_and_short_contexts_matches_each_alone() {
    // One sequence at 479 cached tokens decodes beside one at 20: each equals its own run.
    let config = ModelConfig::tiny_gqa_llama3();
    let weights = WeightSet::random(&config, 43);
    let (long, short) = (tokens(5), tokens(9));
    let long_blocks = CONTEXT.div_ceil(BLOCK);
    let pool = long_blocks + 8;
    let long_table: Vec<u32> = (0..long_blocks as u32).rev().collect();
    let short_table: Vec<u32> = (long_blocks as u32..pool as u32).collect();
    let mut model = CpuModel::new(&weights, pool, BLOCK).unwrap();
    // Cache both contexts.
    model
        .forward(&[
            SeqStep {
                block_table: &long_table,
                context_len: 0,
                tokens: &long[..CONTEXT - 1],
            },
            SeqStep {
                block_table: &short_table,
                context_len: 0,
                tokens: &short[..19],
            },
        ])
        .unwrap();
    let batched = model
        .forward(&[
            SeqStep {
                block_table: &long_table,
                context_len: CONTEXT - 1,
                tokens: &long[CONTEXT - 1..],
            },
            SeqStep {
                block_table: &short_table,
                context_len: 19,
                tokens: &short[19..20],
            },
        ])
        .unwrap();
    for (row, (sequence, table)) in [(&long[..], &long_table), (&short[..20], &short_table)]
        .into_iter()
        .enumerate()
    {
        let mut alone = CpuModel::new(&weights, pool, BLOCK).unwrap();
        let expected = alone
            .forward(&[SeqStep {
                block_table: table,
                context_len: 0,
                tokens: sequence,
            }])
            .unwrap();
        assert_rows_close(
            batched.row(row),
            expected.row(0),
            CONSISTENCY_ABS_TOLERANCE,
            &format!("sequence {row}"),
        );
    }
}

#[test]
fn positions_past_the_model_context_are_refused() {
    let config = ModelConfig::tiny_gqa_llama3();
    let weights = WeightSet::random(&config, 1);
    let blocks = (config.max_position_embeddings + 1).div_ceil(BLOCK);
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut model = CpuModel::new(&weights, blocks, BLOCK).unwrap();
    let err = model
        .forward(&[SeqStep {
            block_table: &table,
            context_len: config.max_position_embeddings,
            tokens: &[1],
        }])
        .unwrap_err();
    assert!(err.to_string().contains("positions"), "{err}");
}
