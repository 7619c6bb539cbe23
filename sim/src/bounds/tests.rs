//! Hand-worked cases (docs/bounds.md repeats them): a profile of round numbers and constant
//! workloads whose bounds are computed by hand, checked to the agent.

use std::path::Path;

use traces::{CopyChannel, CostModel, GpuProfile, Provenance, WorkloadSpec};

use super::*;
use crate::policies::PolicyKind;

/// 1 us of matmul per token, no attention cost, 1 ns to read a token's KV (1,000 B at 1e12 B/s),
/// 1 ms to read the weights, no step overhead, a 100-block GPU pool and a 50-block host pool of
/// 16-token blocks, PCIe 1e6 B/s each way.
fn config() -> SimConfig {
    let profile = GpuProfile {
        schema_version: traces::SCHEMA_VERSION,
        name: "hand".into(),
        gpu_name: "hand".into(),
        gpu_memory_bytes: 1_000_000_000 + 100 * 16 * 1000,
        model_name: "m".into(),
        weight_bytes: 1_000_000_000,
        kv_bytes_per_token: 1000,
        max_context_tokens: 4096,
        workspace_reserve_bytes: 0,
        cost: CostModel {
            form: "roofline-v1".into(),
            step_overhead_ns: 0.0,
            // Exactly the half nanosecond a step's rounding may take: no per-slot time left.
            per_sequence_ns: 0.5,
            memory_bandwidth_bytes_per_s: 1e12,
            matmul_flops_per_s: 1e12,
            attention_flops_per_s: 1e12,
            flops_per_token: 1e6,
            attention_flops_per_pair: 0.0,
            serial_fraction: 0.0,
            corrections: None,
        },
        host_to_device: CopyChannel {
            latency_ns: 0,
            bandwidth_bytes_per_s: 1e6,
            step_memory_bytes_per_copied_byte: 0.0,
        },
        device_to_host: CopyChannel {
            latency_ns: 0,
            bandwidth_bytes_per_s: 1e6,
            step_memory_bytes_per_copied_byte: 0.0,
        },
        provenance: Provenance {
            kind: "analytic".into(),
            source: String::new(),
            fit_error: None,
            device: String::new(),
            driver: String::new(),
            commit: String::new(),
            fitted_from: None,
            validation: None,
        },
    };
    let mut c = SimConfig::new(PolicyKind::Pin, profile);
    c.gpu_memory_utilization = 1.0;
    c.host_memory_bytes = 50 * 16 * 1000;
    assert_eq!((c.gpu_blocks(), c.host_blocks()), (100, 50));
    c
}

/// All agents arrive at 0 and run `turns` constant turns.
fn spec(turns: u32, prompt: u32, new: u32, generated: u32, pause_s: f64) -> WorkloadSpec {
    let text = format!(
        r#"
schema_version = 1
name = "hand"
agents = 1
max_context_tokens = 4096
[arrival]
kind = "ramp"
ramp_s = 0.0
[agent]
turns = {{ kind = "constant", value = {turns} }}
first_prompt_tokens = {{ kind = "constant", value = {prompt} }}
new_tokens = {{ kind = "constant", value = {new} }}
generated_tokens = {{ kind = "constant", value = {generated} }}
pause_s = {{ kind = "constant", value = {pause_s} }}
[hint]
kind = "exact"
"#
    );
    WorkloadSpec::from_toml_str(Path::new("hand.toml"), &text).unwrap()
}

/// The bounds of `spec` under the 10 ms SLO of both examples.
fn bounds_of(spec: &WorkloadSpec, seeds: u64, max_agents: u32) -> BoundsReport {
    let req = BoundsRequest {
        slo_ms: 10.0,
        first_seed: 0,
        seeds,
        max_agents,
    };
    compute(spec, &config(), &req).unwrap()
}

fn bound(report: &BoundsReport, kind: BoundKind) -> (u32, bool) {
    let b = report.get(kind).unwrap();
    (b.agents, b.capped)
}

#[test]
fn decode_heavy_single_turn_agents_are_bound_by_hbm_then_compute() {
    // One turn: 16 prompt tokens, 17 generated = 1 prefill step + 16 decodes at p = 16..31.
    // HBM: reads 16 + (17 + ... + 32) = 408 ns; pool shares 1/100 (p = 16) + 15 x 2/100 = 0.31
    // of the 1 ms weight read = 310,000 ns; 310,408 ns per agent, all due by the 10 ms SLO:
    // 32 x 310,408 = 9.93 ms fits, 33 does not (no turn may be late below 100 turns).
    // Compute: 32 tokens x 1 us = 32 us per agent; k = N - ceil(0.99 N) agents set aside (3 from
    // N = 300): 315 - 3 = 312 agents x 32 us = 9.984 ms fits, 316 - 3 gives 10.016 ms.
    let r = bounds_of(&spec(1, 16, 0, 17, 1.0), 2, 400);
    assert_eq!(bound(&r, BoundKind::Hbm), (32, false), "{}", r.render());
    assert_eq!(bound(&r, BoundKind::Compute), (315, false));
    // No pauses: nothing to hold, cross or recompute.
    assert_eq!(bound(&r, BoundKind::Fluid), (315, false));
    assert_eq!(bound(&r, BoundKind::GpuMemory), (400, true));
    assert_eq!(bound(&r, BoundKind::Pcie), (400, true));
    assert_eq!(r.binding().unwrap().kind, BoundKind::Hbm);
    assert_eq!(r.fraction(16), Some(0.5));
}

#[test]
fn two_turn_agents_paused_together_are_bound_by_memory_and_pcie() {
    // Turn 1: 159 tokens + 1 generated; the pause holds 159 tokens = 10 blocks from the first
    // turn's deadline (10 ms) until the agent can end (1 s). Pin: 10 N <= 100 gives 10;
    // GPU + host: 10 N <= 150 gives 15.
    // PCIe: by t = 1.02 s (the second turn's deadline) the GPU holds 1,600 tokens x 1.02 s; the
    // rest of 159 N tokens held 1 s each crosses at 1e6 B/s = 1,000 tokens/s each way:
    // 159 N - 1,632 <= 1,020 gives 16.
    // Compute: 159 us per agent due by 10 ms, less one agent of 160 us set aside from N = 51
    // (k = 1): 63 x 159 - 160 = 9,857 us fits, 64 x 159 - 160 = 10,016 does not.
    let r = bounds_of(&spec(2, 159, 0, 1, 1.0), 1, 100);
    assert_eq!(
        bound(&r, BoundKind::GpuMemory),
        (10, false),
        "{}",
        r.render()
    );
    assert_eq!(bound(&r, BoundKind::GpuHostMemory), (15, false));
    assert_eq!(bound(&r, BoundKind::Pcie), (16, false));
    assert_eq!(bound(&r, BoundKind::Compute), (63, false));
    // Keeping 2,448 of the 159 N paused tokens in the pools over 1.02 s and recomputing the rest
    // at 1 us costs far less than the slack: the compute condition binds the fluid bound.
    assert_eq!(bound(&r, BoundKind::Fluid), (63, false));
    assert_eq!(bound(&r, BoundKind::Hbm), (100, true));
    assert_eq!(r.binding().unwrap().kind, BoundKind::Compute);
    assert!(r
        .render()
        .contains("binding (tightest universal): compute at N = 63"));
}

#[test]
fn the_serial_fraction_adds_the_other_roofline_term() {
    // The one-turn agents of the first example with no overlap at all (fraction 1): a step
    // costs memory + compute, so both time bounds charge 310,408 + 32,000 = 342,408 ns a turn:
    // 29 x 342,408 ns = 9.93 ms fits in 10 ms, 30 do not.
    let mut c = config();
    c.profile.cost.serial_fraction = 1.0;
    let req = BoundsRequest {
        slo_ms: 10.0,
        first_seed: 0,
        seeds: 1,
        max_agents: 64,
    };
    let r = compute(&spec(1, 16, 0, 17, 1.0), &c, &req).unwrap();
    assert_eq!(bound(&r, BoundKind::Hbm), (29, false), "{}", r.render());
    assert_eq!(bound(&r, BoundKind::Compute), (29, false));
}
