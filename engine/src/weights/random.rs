//! Seeded random weights.
//!
//! Scaling (why): every Linear weight is N(0, 1/fan_in), so each projection keeps the variance of
//! its (RMS-normalised, unit-variance) input; attention scores are then about N(0, 1) after the
//! 1/sqrt(head_dim) scale and the logits about N(0, 1) whatever the model size, which keeps
//! greedy choices away from near-ties that a different summation order (fp16 GPU vs fp32 CPU)
//! could flip. Embeddings are N(0, 1); RMSNorm weights are 1; q/k/v biases N(0, 0.25). The residual stream grows by about
//! one unit of variance per sub-layer, so after 32 layers its std is about 8: finite in fp16 for
//! any number of decode steps (nothing here depends on the step count).
//!
//! Each tensor draws from its own ChaCha8 stream (stream = the tensor's index in
//! `WeightSet::expected_shapes`), so a tensor's values depend only on the seed and its name.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{HostTensor, WeightSet};
use crate::config::ModelConfig;

pub(super) fn random_weights(config: &ModelConfig, seed: u64) -> WeightSet {
    let mut tensors = BTreeMap::new();
    for (index, (name, shape)) in WeightSet::expected_shapes(config).into_iter().enumerate() {
        let count: usize = shape.iter().product();
        let data = if name.ends_with("norm.weight") {
            vec![1.0f32; count]
        } else {
            let std = if name == "model.embed_tokens.weight" {
                1.0
            } else if name.ends_with(".bias") {
                // Of the order of the projection's own output (unit variance), as in trained
                // Qwen2 checkpoints, so a forward that drops or misplaces a bias is far off.
                0.5
            } else {
                1.0 / (shape[1] as f64).sqrt()
            };
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(index as u64);
            normal_samples(&mut rng, count, std)
        };
        tensors.insert(name, HostTensor::new(shape, data));
    }
    WeightSet {
        config: config.clone(),
        tensors,
    }
}

/// `count` samples of N(0, std^2) by the Box-Muller transform (two samples per pair of uniforms).
fn normal_samples(rng: &mut ChaCha8Rng, count: usize, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        // 1 - u keeps the argument of ln in (0, 1].
        let u1: f64 = 1.0 - rng.gen::<f64>();
        let u2: f64 = rng.gen::<f64>();
        let radius = (-2.0 * u1.ln()).sqrt() * std;
        let angle = std::f64::consts::TAU * u2;
        out.push((radius * angle.cos()) as f32);
        if out.len() < count {
            out.push((radius * angle.sin()) as f32);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_weights_are_seeded_valid_and_scaled() {
        let config = ModelConfig::tiny_gqa();
        let a = WeightSet::random(&config, 7);
        let b = WeightSet::random(&config, 7);
        let c = WeightSet::random(&config, 8);
        a.validate(std::path::Path::new("<random>")).unwrap();
        let q = "model.layers.1.self_attn.q_proj.weight";
        assert_eq!(a.tensors[q], b.tensors[q]);
        assert_ne!(a.tensors[q], c.tensors[q]);
        let down = &a.tensors["model.layers.0.mlp.down_proj.weight"];
        let variance =
            down.data.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / down.data.len() as f64;
        let expected = 1.0 / config.intermediate_size as f64;
        assert!(
            (variance / expected - 1.0).abs() < 0.1,
            "variance {variance} vs {expected}"
        );
        assert!(a.tensors["model.norm.weight"]
            .data
            .iter()
            .all(|v| *v == 1.0));
    }
}
