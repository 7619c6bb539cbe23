//! The paged forward's contract on the CPU: prefill-then-decode, later turns on cached KV and
//! batched decode all give the logits of one plain prefill; bad steps are errors, not panics.

mod cpu_common;

use cpu_common::*;
use engine::batch::{generate_greedy, SeqStep};
use engine::config::ModelConfig;
use engine::cpu::{CpuError, CpuModel};
use engine::weights::WeightSet;

fn tokens(seed: u32, count: usize, vocab: usize) -> Vec<u32> {
    // A fixed, simple token pattern (values only need to differ between sequences).
    (0..count as u32)
        .map(|i| (i * 37 + seed * 101 + 11) % vocab as u32)
        .collect()
}

/// Logits of every position of `sequence` from one prefill into fresh blocks.
fn reference_logits(weights: &WeightSet, sequence: &[u32], block_size: usize) -> Vec<Vec<f32>> {
    let blocks = sequence.len().div_ceil(block_size);
    let mut model = CpuModel::new(weights, blocks, block_size).unwrap();
    let table: Vec<u32> = (0..blocks as u32).collect();
    let logits = model
        .forward_every_token(&[SeqStep {
            block_table: &table,
            context_len: 0,
            tokens: sequence,
        }])
        .unwrap();
    (0..logits.rows).map(|r| logits.row(r).to_vec()).collect()
}

fn models() -> Vec<WeightSet> {
    vec![
        load_tiny("tiny"),
        load_tiny("tiny-gqa"),
        WeightSet::random(&ModelConfig::tiny_gqa(), 3),
    ]
}

#[test]
fn prefill_then_decode_equals_one_long_prefill() {
    for weights in models() {
        let block_size = 4;
        let sequence = tokens(1, 23, weights.config.vocab_size);
        let reference = reference_logits(&weights, &sequence, block_size);
        let mut model = CpuModel::new(&weights, 12, block_size).unwrap();
        let table = [7u32, 2, 9, 0, 11, 5];
        let prompt_len = 9;
        let prefill = model
            .forward(&[SeqStep {
                block_table: &table,
                context_len: 0,
                tokens: &sequence[..prompt_len],
            }])
            .unwrap();
        assert_rows_close(
            prefill.row(0),
            &reference[prompt_len - 1],
            CONSISTENCY_ABS_TOLERANCE,
            "prefill",
        );
        for position in prompt_len..sequence.len() {
            let decode = model
                .forward(&[SeqStep {
                    block_table: &table,
                    context_len: position,
                    tokens: &sequence[position..position + 1],
                }])
                .unwrap();
            assert_rows_close(
                decode.row(0),
                &reference[position],
                CONSISTENCY_ABS_TOLERANCE,
                &format!("{} decode at position {position}", weights.config.name),
            );
        }
    }
}

#[test]
fn later_turn_on_cached_kv_equals_recomputing_from_scratch() {
    for weights in models() {
        let block_size = 5;
        let vocab = weights.config.vocab_size;
        // Turn 1: a prompt and three generated tokens; turn 2: a new user message on top.
        let turn1_prompt = tokens(2, 11, vocab);
        let mut model = CpuModel::new(&weights, 16, block_size).unwrap();
        let table = [3u32, 14, 1, 8, 6, 12, 0];
        let mut history = turn1_prompt.clone();
        let mut logits = model
            .forward(&[SeqStep {
                block_table: &table,
                context_len: 0,
                tokens: &turn1_prompt,
            }])
            .unwrap();
        for _ in 0..3 {
            let next = logits.argmax(0);
            logits = model
                .forward(&[SeqStep {
                    block_table: &table,
                    context_len: history.len(),
                    tokens: &[next],
                }])
                .unwrap();
            history.push(next);
        }
        let turn2 = tokens(3, 14, vocab);
        let cached_len = history.len();
        let turn2_logits = model
            .forward_every_token(&[SeqStep {
                block_table: &table,
                context_len: cached_len,
                tokens: &turn2,
            }])
            .unwrap();
        history.extend_from_slice(&turn2);
        let reference = reference_logits(&weights, &history, block_size);
        for (row, position) in (cached_len..history.len()).enumerate() {
            assert_rows_close(
                turn2_logits.row(row),
                &reference[position],
                CONSISTENCY_ABS_TOLERANCE,
                &format!("{} turn 2 position {position}", weights.config.name),
            );
        }
    }
}

#[test]
fn batched_decode_of_several_agents_equals_decoding_each_alone() {
    for weights in models() {
        let block_size = 4;
        let vocab = weights.config.vocab_size;
        let prompt_lens = [3usize, 17, 8, 1];
        let decode_steps = 6;
        let sequences: Vec<Vec<u32>> = prompt_lens
            .iter()
            .enumerate()
            .map(|(agent, len)| tokens(10 + agent as u32, len + decode_steps, vocab))
            .collect();
        // Interleaved block ids: agent a owns blocks a, a + 4, a + 8, ...
        let tables: Vec<Vec<u32>> = (0..prompt_lens.len() as u32)
            .map(|agent| (0..6).map(|i| agent + 4 * i).collect())
            .collect();
        let mut model = CpuModel::new(&weights, 24, block_size).unwrap();
        // Prefill all agents in one batched step (different lengths in one batch).
        let prefill: Vec<SeqStep> = (0..prompt_lens.len())
            .map(|a| SeqStep {
                block_table: &tables[a],
                context_len: 0,
                tokens: &sequences[a][..prompt_lens[a]],
            })
            .collect();
        let prefill_logits = model.forward(&prefill).unwrap();
        let references: Vec<Vec<Vec<f32>>> = sequences
            .iter()
            .map(|s| reference_logits(&weights, s, block_size))
            .collect();
        for a in 0..prompt_lens.len() {
            assert_rows_close(
                prefill_logits.row(a),
                &references[a][prompt_lens[a] - 1],
                CONSISTENCY_ABS_TOLERANCE,
                "batched prefill",
            );
        }
        for step in 0..decode_steps {
            let batch: Vec<SeqStep> = (0..prompt_lens.len())
                .map(|a| {
                    let position = prompt_lens[a] + step;
                    SeqStep {
                        block_table: &tables[a],
                        context_len: position,
                        tokens: &sequences[a][position..position + 1],
                    }
                })
                .collect();
            let logits = model.forward(&batch).unwrap();
            assert_eq!(logits.rows, prompt_lens.len());
            for a in 0..prompt_lens.len() {
                assert_rows_close(
                    logits.row(a),
                    &references[a][prompt_lens[a] + step],
                    CONSISTENCY_ABS_TOLERANCE,
                    &format!("{} agent {a} decode step {step}", weights.config.name),
                );
            }
        }
    }
}

#[test]
fn mixed_batch_of_prefill_and_decode_matches_references() {
    let weights = load_tiny("tiny-gqa");
    let block_size = 16;
    let a = tokens(20, 30, 256);
    let b = tokens(21, 12, 256);
    let mut model = CpuModel::new(&weights, 4, block_size).unwrap();
    let table_a = [0u32, 1];
    let table_b = [3u32];
    model
        .forward(&[SeqStep {
            block_table: &table_a,
            context_len: 0,
            tokens: &a[..29],
        }])
        .unwrap();
    // Agent a decodes its 30th token while agent b prefills, in one step.
    let logits = model
        .forward(&[
            SeqStep {
                block_table: &table_a,
                context_len: 29,
                tokens: &a[29..],
            },
            SeqStep {
                block_table: &table_b,
                context_len: 0,
                tokens: &b,
            },
        ])
        .unwrap();
    assert_rows_close(
        logits.row(0),
        &reference_logits(&weights, &a, block_size)[29],
        CONSISTENCY_ABS_TOLERANCE,
        "a",
    );
    assert_rows_close(
        logits.row(1),
        &reference_logits(&weights, &b, block_size)[11],
        CONSISTENCY_ABS_TOLERANCE,
        "b",
    );
}

#[test]
fn kv_blocks_copied_out_and_back_in_restore_the_context() {
    // What the swap engine does: copy an agent's blocks out, let others overwrite them, copy back.
    let weights = load_tiny("tiny");
    let block_size = 4;
    let sequence = tokens(30, 13, 256);
    let mut model = CpuModel::new(&weights, 8, block_size).unwrap();
    let table = [4u32, 5, 6, 7];
    model
        .forward(&[SeqStep {
            block_table: &table,
            context_len: 0,
            tokens: &sequence[..12],
        }])
        .unwrap();
    let block_elems = model.layout().block_elems();
    let mut saved = vec![0.0f32; 3 * block_elems];
    model.read_blocks(4, &mut saved).unwrap();
    // Another agent overwrites blocks 4..7.
    let other = tokens(31, 12, 256);
    model
        .forward(&[SeqStep {
            block_table: &table,
            context_len: 0,
            tokens: &other,
        }])
        .unwrap();
    assert_ne!(model.blocks(4, 3).unwrap(), saved.as_slice());
    // Swap in to different blocks (0..3) and continue there.
    model.write_blocks(0, &saved).unwrap();
    let moved_table = [0u32, 1, 2, 7];
    let logits = model
        .forward(&[SeqStep {
            block_table: &moved_table,
            context_len: 12,
            tokens: &sequence[12..],
        }])
        .unwrap();
    let reference = reference_logits(&weights, &sequence, block_size);
    assert_rows_close(
        logits.row(0),
        &reference[12],
        CONSISTENCY_ABS_TOLERANCE,
        "after swap-in",
    );
    assert!(matches!(
        model.read_blocks(6, &mut saved),
        Err(CpuError::BlockRangeOutOfPool {
            first: 6,
            end: 9,
            num_blocks: 8
        })
    ));
    assert!(matches!(
        model.write_blocks(0, &saved[1..]),
        Err(CpuError::BlockDataSize { .. })
    ));
}

#[test]
fn greedy_generation_is_deterministic_and_matches_stepwise_argmax() {
    let weights = load_tiny("tiny-gqa");
    let prompt = tokens(40, 9, 256);
    let mut model = CpuModel::new(&weights, 8, 4).unwrap();
    let generated = generate_greedy(&mut model, &prompt, 12, &[]).unwrap();
    assert_eq!(generated.len(), 12);
    let mut again = CpuModel::new(&weights, 8, 4).unwrap();
    assert_eq!(
        generate_greedy(&mut again, &prompt, 12, &[]).unwrap(),
        generated
    );
    // Each generated token is the argmax of a full prefill of everything before it.
    let mut history = prompt.clone();
    for &token in &generated {
        let reference = reference_logits(&weights, &history, 4);
        assert_eq!(
            engine::batch::greedy_token(reference.last().unwrap()),
            token
        );
        history.push(token);
    }
    // A stop token ends the generation and is returned.
    let stop = generated[3];
    let mut stopping = CpuModel::new(&weights, 8, 4).unwrap();
    let first_stop = generated.iter().position(|t| *t == stop).unwrap();
    assert_eq!(
        generate_greedy(&mut stopping, &prompt, 12, &[stop]).unwrap(),
        generated[..=first_stop].to_vec()
    );
}

#[test]
fn bad_steps_are_errors_that_name_the_sequence() {
    let weights = load_tiny("tiny");
    let mut model = CpuModel::new(&weights, 4, 4).unwrap();
    let step = |table: &'static [u32], context_len: usize, tokens: &'static [u32]| SeqStep {
        block_table: table,
        context_len,
        tokens,
    };
    assert!(matches!(model.forward(&[]), Err(CpuError::EmptyBatch)));
    let err = model
        .forward(&[step(&[0, 1], 0, &[1, 2]), step(&[2], 0, &[])])
        .unwrap_err();
    assert!(matches!(err, CpuError::NoNewTokens { seq: 1 }), "{err}");
    let err = model.forward(&[step(&[0], 0, &[256])]).unwrap_err();
    assert!(
        matches!(
            err,
            CpuError::TokenOutOfVocab {
                seq: 0,
                token: 256,
                ..
            }
        ),
        "{err}"
    );
    let err = model.forward(&[step(&[0], 3, &[1, 2])]).unwrap_err();
    assert!(
        matches!(
            err,
            CpuError::BlockTableTooShort {
                seq: 0,
                tokens: 5,
                needed_blocks: 2,
                table_blocks: 1
            }
        ),
        "{err}"
    );
    let err = model.forward(&[step(&[0, 9], 3, &[1, 2])]).unwrap_err();
    assert!(
        matches!(
            err,
            CpuError::BlockOutOfPool {
                seq: 0,
                block: 9,
                ..
            }
        ),
        "{err}"
    );
    let err = model
        .forward(&[step(&[0, 1], 4, &[1]), step(&[3, 1], 4, &[1, 2])])
        .unwrap_err();
    assert!(
        matches!(
            err,
            CpuError::OverlappingWrites {
                first: 0,
                second: 1,
                block: 1,
                slot: 0
            }
        ),
        "{err}"
    );
    let err = model
        .forward(&[step(&[2], 0, &[1]), step(&[2], 0, &[2])])
        .unwrap_err();
    assert!(
        matches!(
            err,
            CpuError::OverlappingWrites {
                first: 0,
                second: 1,
                block: 2,
                slot: 0
            }
        ),
        "{err}"
    );
    let err = model.forward(&[step(&[0, 1], 511, &[1, 2])]).unwrap_err();
    assert!(matches!(err, CpuError::TooManyPositions { .. }), "{err}");
    // A valid step still works after the errors (nothing was written by them).
    model.forward(&[step(&[0, 1], 0, &[1, 2, 3])]).unwrap();
    assert!(matches!(
        CpuModel::new(&weights, 1, 0),
        Err(CpuError::ZeroBlockSize)
    ));
}
