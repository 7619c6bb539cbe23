//! The CPU forward against golden logits from HF transformers (engine/scripts/golden.py).

mod cpu_common;

use cpu_common::*;
use engine::batch::SeqStep;
use engine::config::ModelConfig;
use engine::cpu::CpuModel;

/// Runs every golden sequence as one prefill (all positions' logits) with the given block size and
/// a scrambled block table, and checks each row against HF.
fn check_preset_against_golden(preset: &str, block_size: usize) {
    let weights = load_tiny(preset);
    let expected_config = ModelConfig {
        name: preset.to_string(),
        ..ModelConfig::preset(preset).unwrap()
    };
    assert_eq!(
        weights.config, expected_config,
        "config.json of {preset} matches the preset"
    );
    let golden = load_golden(preset);
    let max_len = golden.iter().map(|s| s.tokens.len()).max().unwrap();
    let blocks_per_seq = max_len.div_ceil(block_size);
    let mut model = CpuModel::new(&weights, blocks_per_seq * 2 + 3, block_size).unwrap();
    let mut worst_abs = 0.0f32;
    for (index, sequence) in golden.iter().enumerate() {
        // Reversed, offset block ids: the paged addressing must not rely on contiguous blocks.
        let table: Vec<u32> = (0..blocks_per_seq as u32)
            .rev()
            .map(|b| b * 2 + 1)
            .collect();
        let step = SeqStep {
            block_table: &table,
            context_len: 0,
            tokens: &sequence.tokens,
        };
        let logits = model.forward_every_token(&[step]).unwrap();
        assert_eq!(logits.rows, sequence.tokens.len());
        let expected: Vec<f32> = sequence.logits.concat();
        let (ratio, abs) = compare(
            &logits.data,
            &expected,
            GOLDEN_ABS_TOLERANCE,
            GOLDEN_REL_TOLERANCE,
        );
        assert!(
            ratio <= 1.0,
            "{preset} sequence {index}: max |diff| {abs:e} over tolerance {GOLDEN_ABS_TOLERANCE:e} + {GOLDEN_REL_TOLERANCE:e}*|golden| (ratio {ratio})"
        );
        // The last-token path agrees with the every-token path (up to GEMM summation order).
        let last = model.forward(&[step]).unwrap();
        assert_rows_close(
            last.row(0),
            logits.row(logits.rows - 1),
            CONSISTENCY_ABS_TOLERANCE,
            "last row",
        );
        worst_abs = worst_abs.max(abs);
    }
    println!("{preset} block_size {block_size}: max |logit - HF golden| = {worst_abs:e}");
}

#[test]
fn tiny_matches_hf_golden_logits() {
    check_preset_against_golden("tiny", 16);
    check_preset_against_golden("tiny", 3);
}

#[test]
fn tiny_gqa_matches_hf_golden_logits() {
    check_preset_against_golden("tiny-gqa", 16);
    check_preset_against_golden("tiny-gqa", 5);
}

#[test]
fn tiny_gqa_llama3_matches_hf_golden_logits() {
    // Llama-3 RoPE scaling over a 64-token original context; the third sequence runs to 160.
    check_preset_against_golden("tiny-gqa-llama3", 16);
    check_preset_against_golden("tiny-gqa-llama3", 5);
}

#[test]
fn tiny_gqa_bias_matches_hf_golden_logits() {
    // q/k/v biases (HF Qwen2).
    check_preset_against_golden("tiny-gqa-bias", 16);
    check_preset_against_golden("tiny-gqa-bias", 3);
}

/// Logits of `weights` (as configured) for the golden sequence `index` of `preset`, every position.
fn every_position(weights: &engine::weights::WeightSet, sequence: &[u32]) -> Vec<f32> {
    let mut model = CpuModel::new(weights, sequence.len().div_ceil(16), 16).unwrap();
    let table: Vec<u32> = (0..sequence.len().div_ceil(16) as u32).collect();
    model
        .forward_every_token(&[SeqStep {
            block_table: &table,
            context_len: 0,
            tokens: sequence,
        }])
        .unwrap()
        .data
}

#[test]
fn golden_checks_see_the_rope_scaling_and_the_biases() {
    // The same weights without the scaling, or without the biases, miss the golden logits: the
    // tests above could not pass by ignoring either feature.
    for (preset, strip) in [
        (
            "tiny-gqa-llama3",
            &(|w: &mut engine::weights::WeightSet| {
                w.config.rope_scaling = engine::config::RopeScaling::None
            }) as &dyn Fn(&mut engine::weights::WeightSet),
        ),
        ("tiny-gqa-bias", &|w: &mut engine::weights::WeightSet| {
            for tensor in w.tensors.iter_mut().filter(|(n, _)| n.ends_with(".bias")) {
                tensor.1.data.fill(0.0);
            }
        }),
    ] {
        let mut weights = load_tiny(preset);
        strip(&mut weights);
        let sequence = &load_golden(preset)[1];
        let (ratio, abs) = compare(
            &every_position(&weights, &sequence.tokens),
            &sequence.logits.concat(),
            GOLDEN_ABS_TOLERANCE,
            GOLDEN_REL_TOLERANCE,
        );
        assert!(
            ratio > 100.0,
            "{preset}: stripped model still close (max |diff| {abs:e})"
        );
    }
}

#[test]
fn golden_check_fails_on_a_wrong_model() {
    // The tolerance is tight enough to see a small change: scaling one norm by 1% breaks it.
    let mut weights = load_tiny("tiny");
    for v in &mut weights
        .tensors
        .get_mut("model.layers.1.post_attention_layernorm.weight")
        .unwrap()
        .data
    {
        *v *= 1.01;
    }
    let golden = load_golden("tiny");
    let mut model = CpuModel::new(&weights, 8, 16).unwrap();
    let sequence = &golden[1];
    let table = [0u32, 1, 2];
    let logits = model
        .forward_every_token(&[SeqStep {
            block_table: &table,
            context_len: 0,
            tokens: &sequence.tokens,
        }])
        .unwrap();
    let (ratio, abs) = compare(
        &logits.data,
        &sequence.logits.concat(),
        GOLDEN_ABS_TOLERANCE,
        GOLDEN_REL_TOLERANCE,
    );
    assert!(
        ratio > 1.0,
        "a 1% norm change went unnoticed (max |diff| {abs:e})"
    );
}
