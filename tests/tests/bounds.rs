//! The physical bounds (sim::bounds) are upper bounds in fact: on a card cut down so that memory
//! runs short at a few dozen agents, every N at which a policy passes (no turn rejected, P99 turn
//! latency within the SLO on every seed) is at most each bound that holds for that policy.

use sim::bounds::{BoundKind, BoundsReport, BoundsRequest};
use sim::experiment::{self, SimConfig};
use sim::PolicyKind;
use traces::WorkloadSpec;

const SLO_MS: f64 = 5000.0;
const SEEDS: u64 = 2;

/// The analytic H100 with about 14k tokens of GPU KV pool and 8k tokens of host pool.
fn small_card() -> SimConfig {
    let mut c = SimConfig::new(
        PolicyKind::Pin,
        calibration::load_profile("h100-llama2-7b").unwrap(),
    );
    c.gpu_memory_utilization = 0.29;
    c.host_memory_bytes = 4 << 30;
    c
}

fn passes(spec: &WorkloadSpec, config: &SimConfig, policy: PolicyKind, agents: u32) -> bool {
    (0..SEEDS).all(|seed| {
        let mut c = config.clone();
        c.policy = policy;
        c.seed = seed;
        let (_, out) = experiment::simulate(spec, Some(agents), &c).unwrap();
        if out.turns.iter().any(|t| t.rejected) {
            return false;
        }
        let mut latencies: Vec<u64> = out
            .turns
            .iter()
            .map(|t| t.finished_ns.unwrap() - t.arrival_ns)
            .collect();
        latencies.sort_unstable();
        analysis::percentile(&latencies, 99.0) as f64 <= SLO_MS * 1e6
    })
}

/// The bounds that must hold for `policy`: the universal ones, and the memory-only ones for
/// `pin`, the one shipped policy that neither swaps nor drops.
fn applicable(report: &BoundsReport, policy: PolicyKind) -> Vec<(BoundKind, u32)> {
    report
        .bounds
        .iter()
        .filter(|b| b.kind.universal() || policy == PolicyKind::Pin)
        .map(|b| (b.kind, b.agents))
        .collect()
}

fn check(workload: &str, probe_to: u32) {
    let spec = WorkloadSpec::from_toml_str(
        std::path::Path::new(workload),
        sim::experiment::shipped_workload(workload).unwrap(),
    )
    .unwrap();
    let config = small_card();
    let report = sim::bounds::compute(
        &spec,
        &config,
        &BoundsRequest {
            slo_ms: SLO_MS,
            first_seed: 0,
            seeds: SEEDS,
            max_agents: 256,
        },
    )
    .unwrap();
    let binding = report.binding().unwrap();
    assert!(!binding.capped, "{}", report.render());
    let mut best = 0;
    for policy in [
        PolicyKind::Djinn,
        PolicyKind::Vllm,
        PolicyKind::Pin,
        PolicyKind::Swap,
    ] {
        let bounds = applicable(&report, policy);
        let tightest = bounds.iter().map(|b| b.1).min().unwrap();
        // Probe a little past the tightest applicable bound: a pass there is a wrong bound.
        for n in 1..=(tightest + 2).min(probe_to) {
            if passes(&spec, &config, policy, n) {
                best = best.max(n);
                for &(kind, agents) in &bounds {
                    assert!(
                        n <= agents,
                        "{workload}: {} passes at N = {n} above the {} bound {agents}\n{}",
                        policy.name(),
                        kind.name(),
                        report.render()
                    );
                }
            }
        }
    }
    // Not vacuous: some policy serves a real number of agents.
    assert!(
        best >= 4,
        "{workload}: best pass {best}\n{}",
        report.render()
    );
}

#[test]
fn no_policy_passes_above_a_bound_on_seed_cliff() {
    check("seed-cliff", 40);
}

#[test]
fn no_policy_passes_above_a_bound_on_agents_capacity() {
    check("agents-capacity", 40);
}
