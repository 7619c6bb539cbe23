//! A GPU profile derived from a model description and a card description.
//!
//! The roofline-v1 cost model needs the bytes a step moves and the FLOPs it does: the model fixes
//! the weights, the KV bytes per token and the FLOPs per token and per attention pair; the card
//! the memory, bandwidth, FLOP/s and host link. Figures measured on the card are used as they
//! are. A card with only specification-sheet figures gets each figure times the share of its
//! specification the measured H100 reaches, so a spec-only card is not flattered against a
//! measured one (a datasheet's peak is never reached).

use traces::hardware::Figure;
use traces::{CardSpec, CopyChannel, CostModel, GpuProfile, ModelSpec, Provenance};

/// Shares of the H100 SXM's specification that its measurements reach (calibration/cards/h100-sxm.toml):
/// device memory as the driver reports it, of 80 GiB.
pub const MEMORY_SHARE: f64 = 85_520_809_984.0 / 85_899_345_920.0;
/// Copy bandwidth, 3.0 of 3.35 TB/s.
pub const BANDWIDTH_SHARE: f64 = 3.0 / 3.35;
/// A large fp16 GEMM, 790 of 989 TFLOP/s.
pub const FLOPS_SHARE: f64 = 790.0 / 989.0;
/// Pinned copies over PCIe Gen5 x16, 55 of 64 GB/s each way. Applied to NVLink-C2C as well: the
/// copy engines and their launch overhead, not the wire, are what a copy loses.
pub const LINK_SHARE: f64 = 55.0 / 64.0;
/// Attention kernels against dense GEMM where a card gives no attention figure: the H100
/// profile's assumption, 400 of 790 TFLOP/s.
pub const ATTENTION_SHARE: f64 = 400.0 / 790.0;

/// Assumptions shared by every analytic profile until a fit replaces them: a step's fixed cost
/// (launches, sampling, scheduling), its cost per sequence, and the activation and workspace
/// memory kept out of the KV pool.
pub const STEP_OVERHEAD_NS: f64 = 300_000.0;
pub const PER_SEQUENCE_NS: f64 = 5_000.0;
pub const WORKSPACE_RESERVE_BYTES: u64 = 4 << 30;

/// Significant figures of the FLOPs per token, as the analytic profiles state them: the roofline
/// ignores norms, activations and softmax, which weigh more than the digits dropped.
const FLOPS_PER_TOKEN_DIGITS: i32 = 4;

fn effective(f: &Figure, share: f64) -> f64 {
    f.measured.unwrap_or(f.spec * share)
}

fn round_significant(x: f64, digits: i32) -> f64 {
    if x == 0.0 {
        return 0.0;
    }
    let scale = 10f64.powi(x.abs().log10().floor() as i32 - (digits - 1));
    (x / scale).round() * scale
}

/// The profile name of a derived pair, e.g. `h100-80gb-llama2-7b-fp16-analytic`.
pub fn derived_name(model: &ModelSpec, card: &CardSpec) -> String {
    format!(
        "{}-{}-{}-analytic",
        card.label,
        model.name,
        model.dtype.name()
    )
}

/// The analytic profile of `model` on `card`. Validation (weights fit, positive figures) is the
/// caller's: `GpuProfile::validate` names what is wrong.
pub fn derive_profile(model: &ModelSpec, card: &CardSpec) -> GpuProfile {
    let matmul = effective(&card.dense_flops_per_s, FLOPS_SHARE);
    let attention = card
        .attention_flops_per_s
        .unwrap_or(matmul * ATTENTION_SHARE);
    let channel = |l: &traces::hardware::LinkFigure| CopyChannel {
        latency_ns: l.latency_ns,
        bandwidth_bytes_per_s: l.measured.unwrap_or(l.spec * LINK_SHARE),
        step_memory_bytes_per_copied_byte: 0.0,
    };
    GpuProfile {
        schema_version: traces::SCHEMA_VERSION,
        name: derived_name(model, card),
        gpu_name: card.gpu_name.clone(),
        gpu_memory_bytes: effective(&card.memory_bytes, MEMORY_SHARE) as u64,
        model_name: model.name.clone(),
        weight_bytes: model.weight_bytes(),
        kv_bytes_per_token: model.kv_bytes_per_token(),
        max_context_tokens: model.max_context_tokens,
        workspace_reserve_bytes: WORKSPACE_RESERVE_BYTES,
        cost: CostModel {
            form: "roofline-v1".into(),
            step_overhead_ns: STEP_OVERHEAD_NS,
            per_sequence_ns: PER_SEQUENCE_NS,
            memory_bandwidth_bytes_per_s: effective(
                &card.memory_bandwidth_bytes_per_s,
                BANDWIDTH_SHARE,
            ),
            matmul_flops_per_s: matmul,
            attention_flops_per_s: attention,
            flops_per_token: round_significant(
                model.matmul_flops_per_token() as f64,
                FLOPS_PER_TOKEN_DIGITS,
            ),
            attention_flops_per_pair: model.attention_flops_per_pair() as f64,
            serial_fraction: 0.0,
            corrections: None,
        },
        host_to_device: channel(&card.host_to_device),
        device_to_host: channel(&card.device_to_host),
        provenance: Provenance {
            kind: "analytic".into(),
            source: provenance_source(model, card),
            fit_error: None,
            device: card.gpu_name.clone(),
            driver: String::new(),
            commit: String::new(),
            fitted_from: None,
            validation: None,
        },
    }
}

fn provenance_source(model: &ModelSpec, card: &CardSpec) -> String {
    let figures = if card.fully_measured() {
        "measured ceilings".to_string()
    } else {
        "UNMEASURED: specification-sheet figures times the share of its specification the measured H100 reaches".to_string()
    };
    format!(
        "Analytic roofline derived from model {} ({}) and card {} ({}; {figures}). Card: {} Step overhead 0.3 ms + 5 us/sequence and, where the card gives none, attention FLOP/s are assumptions until calibration replaces them.",
        model.name, model.source, card.name, card.host_link, card.source
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_significant_figures() {
        assert_eq!(round_significant(13_214_687_232.0, 4), 13_210_000_000.0);
        assert_eq!(round_significant(0.0, 4), 0.0);
        assert_eq!(round_significant(15_236.0, 4), 15_240.0);
    }
}
