//! Random simulation cases: a workload spec, an agent count, a seed, pool sizes from "barely one
//! agent" to "plenty", a PCIe bandwidth, a block size and a batch budget. A case turns into the
//! exact `SimConfig` the `djinn simulate` command line would build, and can write the files and
//! print the one-line command that reproduces it.

use std::path::PathBuf;

use proptest::prelude::*;
use sha2::{Digest, Sha256};
use sim::driver::{CheckLevel, RunLimits};
use sim::experiment::SimConfig;
use sim::workload::{self, Workload};
use sim::{BatchPolicy, PolicyKind};
use traces::workload::{
    AgentSpec, Arrival, Distribution, HintSpec, MixtureComponent, PrefixGroupSpec, WorkloadSpec,
};
use traces::GpuProfile;

/// How big the GPU KV pool is, relative to the generated workload.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GpuPool {
    /// Between the largest single context (0.0) and every agent's largest context at once (1.0).
    Fits(f64),
    /// Smaller than the largest single context by this fraction (0..1): some agent can never fit.
    Short(f64),
}

#[derive(Clone, Debug)]
pub struct Case {
    pub spec: WorkloadSpec,
    /// The `--agents` of the command line (ignored for explicit arrivals, as in the CLI).
    pub agents: u32,
    pub seed: u64,
    pub block_size_tokens: u32,
    pub gpu_pool: GpuPool,
    /// Host pool as a fraction of every agent's largest context at once (0 = no host pool).
    pub host_fill: f64,
    /// PCIe bandwidth of both copy directions, bytes per second.
    pub pcie_bytes_per_s: f64,
    pub max_batch_tokens: u32,
    /// The batch policy every KV policy of the case runs under.
    pub batching: BatchPolicy,
}

/// A case made concrete: the workload drawn from the spec and the pools sized from it.
#[derive(Clone, Debug)]
pub struct Materialized {
    pub workload: Workload,
    pub gpu_blocks: u32,
    pub host_blocks: u32,
    /// Blocks of the largest single context any agent reaches (what "fits" is measured against).
    pub largest_context_blocks: u32,
    /// Shared prefix blocks that swapped-out agents may keep on the GPU (each group's once).
    pub pinned_prefix_blocks: u32,
    pub profile: GpuProfile,
}

impl Materialized {
    pub fn fits(&self) -> bool {
        self.gpu_blocks as u64
            >= self.largest_context_blocks as u64 + self.pinned_prefix_blocks as u64
    }

    /// The `SimConfig` the CLI builds for these flags, with every-step checking.
    pub fn config(&self, case: &Case, policy: PolicyKind) -> SimConfig {
        let mut config = SimConfig::new(policy, self.profile.clone());
        config.seed = case.seed;
        config.gpu_memory_utilization = 1.0;
        config.host_memory_bytes = self.host_blocks as u64
            * self.profile.kv_bytes_per_token
            * case.block_size_tokens as u64;
        config.block_size_tokens = case.block_size_tokens;
        config.sched.max_batch_tokens = case.max_batch_tokens;
        config.sched.batching = case.batching;
        config.check = CheckLevel::Full;
        config.limits = RunLimits {
            max_steps: 5_000_000,
            ..RunLimits::default()
        };
        config
    }
}

/// Blocks for `tokens` at `block_size` tokens per block.
fn blocks_for(tokens: u64, block_size: u32) -> u64 {
    tokens.div_ceil(block_size as u64)
}

/// The shipped H100 profile with the pool and PCIe of a case (the "profile variant").
pub fn profile_variant(
    gpu_blocks: u32,
    block_size_tokens: u32,
    pcie_bytes_per_s: f64,
) -> GpuProfile {
    let mut p =
        calibration::load_profile(calibration::DEFAULT_PROFILE).expect("shipped profile loads");
    let block_bytes = p.kv_bytes_per_token * block_size_tokens as u64;
    // With utilization 1.0 the pool is exactly memory - weights - reserve, all integers well below
    // 2^53, so the float arithmetic of `SimConfig::gpu_blocks` is exact.
    p.gpu_memory_bytes =
        p.weight_bytes + p.workspace_reserve_bytes + gpu_blocks as u64 * block_bytes;
    p.host_to_device.bandwidth_bytes_per_s = pcie_bytes_per_s;
    p.device_to_host.bandwidth_bytes_per_s = pcie_bytes_per_s;
    p.name = format!(
        "proptest-{gpu_blocks}blocks-pcie{:.1}GBps",
        pcie_bytes_per_s / 1e9
    );
    p
}

impl Case {
    /// The spec exactly as the CLI would read it back from the file this case writes.
    pub fn spec_as_read(&self) -> WorkloadSpec {
        let text = self.spec.to_toml_string();
        WorkloadSpec::from_toml_str(std::path::Path::new("case.toml"), &text)
            .unwrap_or_else(|e| panic!("a generated spec must be valid: {e}\n{text}"))
    }

    pub fn materialize(&self) -> Materialized {
        let spec = self.spec_as_read();
        let workload = workload::generate(&spec, spec.agent_count(Some(self.agents)), self.seed);
        let bs = self.block_size_tokens;
        // The last generated token of a program never gets KV: the pool needs final - 1 tokens.
        let largest = workload
            .agents
            .iter()
            .map(|a| blocks_for(a.final_sequence_tokens().saturating_sub(1), bs))
            .max()
            .unwrap_or(1)
            .max(1);
        let all_at_once: u64 = workload
            .agents
            .iter()
            .map(|a| blocks_for(a.final_sequence_tokens(), bs))
            .sum::<u64>()
            .max(largest);
        // A swapped-out agent keeps its group's shared prefix on the GPU (a swap moves only
        // private blocks), so each group's shared blocks may stay pinned: a pool that always
        // fits the largest context holds those too.
        let pinned: u64 = spec
            .prefix_groups
            .iter()
            .map(|g| (g.tokens / bs) as u64)
            .sum();
        let need = largest + pinned;
        let all_at_once = all_at_once.max(need);
        let gpu_blocks = match self.gpu_pool {
            // Squared, so most cases sit near the tight end where policies differ.
            GpuPool::Fits(f) => need + ((all_at_once - need) as f64 * f * f).round() as u64,
            GpuPool::Short(f) => ((largest as f64 * (1.0 - f)).floor() as u64)
                .clamp(1, largest.saturating_sub(1).max(1)),
        };
        let host_blocks = (all_at_once as f64 * self.host_fill).round() as u64;
        let gpu_blocks = gpu_blocks.min(u32::MAX as u64) as u32;
        let profile = profile_variant(gpu_blocks, bs, self.pcie_bytes_per_s);
        let m = Materialized {
            workload,
            gpu_blocks,
            host_blocks: host_blocks.min(u32::MAX as u64) as u32,
            largest_context_blocks: largest.min(u32::MAX as u64) as u32,
            pinned_prefix_blocks: pinned.min(u32::MAX as u64) as u32,
            profile,
        };
        let config = m.config(self, PolicyKind::ALL[0]);
        assert_eq!(
            config.gpu_blocks(),
            m.gpu_blocks,
            "profile variant must give the intended GPU pool"
        );
        assert_eq!(
            config.host_blocks(),
            m.host_blocks,
            "host bytes must give the intended host pool"
        );
        m
    }

    /// A short stable name of this case (for its temporary folder).
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.spec.to_toml_string());
        h.update(format!(
            "{} {} {} {:?} {} {} {} {}",
            self.agents,
            self.seed,
            self.block_size_tokens,
            self.gpu_pool,
            self.host_fill,
            self.pcie_bytes_per_s,
            self.max_batch_tokens,
            self.batching.name()
        ));
        let d = h.finalize();
        d.iter().take(6).map(|b| format!("{b:02x}")).collect()
    }

    /// Writes the spec and profile to a temporary folder and returns the one-line command that
    /// reruns this case under `policy_name` with every-step checking.
    pub fn write_reproduction(&self, m: &Materialized, policy_name: &str) -> String {
        let dir: PathBuf = std::env::temp_dir()
            .join("djinn-proptest")
            .join(self.digest());
        let spec_path = dir.join("spec.toml");
        let profile_path = dir.join("profile.json");
        let written = traces::write_atomic(&spec_path, self.spec.to_toml_string().as_bytes())
            .and_then(|_| traces::write_json_atomic(&profile_path, &m.profile));
        if let Err(e) = written {
            return format!("(could not write the reproduction files: {e})");
        }
        let config = m.config(self, PolicyKind::ALL[0]);
        let host_gib = config.host_memory_bytes as f64 / (1u64 << 30) as f64;
        format!(
            "cargo run --release -- simulate --workload {} --policy {policy_name} --agents {} --seed {} --profile {} --gpu-memory-utilization 1 --host-memory-gib {host_gib} --block-size {} --max-batch-tokens {} --batching {} --check full --no-write",
            spec_path.display(),
            self.agents,
            self.seed,
            profile_path.display(),
            self.block_size_tokens,
            self.max_batch_tokens,
            self.batching.name()
        )
    }
}

// ----- strategies -----

/// How large a case may get: bigger agent counts come with fewer turns and shorter contexts so
/// that a case stays cheap with a full audit after every step.
#[derive(Clone, Copy, Debug)]
struct Size {
    agents_max: u32,
    turns_max: u32,
    window_max: u32,
    generated_max: f64,
    /// Block sizes allowed (tiny blocks make big pools, and the full audit is O(pool)).
    block_sizes: &'static [u32],
}

const SMALL: Size = Size {
    agents_max: 8,
    turns_max: 8,
    window_max: 4096,
    generated_max: 200.0,
    block_sizes: &[16, 1, 4, 8, 32],
};
const MEDIUM: Size = Size {
    agents_max: 60,
    turns_max: 4,
    window_max: 2048,
    generated_max: 40.0,
    block_sizes: &[16, 4, 8, 32],
};
const LARGE: Size = Size {
    agents_max: 300,
    turns_max: 3,
    window_max: 512,
    generated_max: 10.0,
    block_sizes: &[16, 8, 32],
};

/// A distribution of non-negative values up to about `max`, in every shape the spec supports.
pub fn value_dist(max: f64) -> BoxedStrategy<Distribution> {
    let max = max.max(1.0);
    let leaf = prop_oneof![
        (0.0..=max).prop_map(|value| Distribution::Constant {
            value: value.round()
        }),
        (0.0..=max, 0.0..=max).prop_map(|(a, b)| Distribution::Uniform {
            low: a.min(b).round(),
            high: a.max(b).round()
        }),
        (1.0..=max).prop_map(|mean| Distribution::Exponential { mean }),
        (1.0..=max, 0.0..1.5f64, any::<bool>()).prop_map(move |(median, sigma, clamp)| {
            Distribution::LogNormal {
                median,
                sigma: Some(sigma),
                p90: None,
                max: clamp.then_some(max),
            }
        }),
        (1.0..=max, 1.0..4.0f64).prop_map(|(median, ratio)| Distribution::LogNormal {
            median,
            sigma: None,
            p90: Some(median * ratio),
            max: None
        }),
    ];
    leaf.prop_recursive(1, 3, 3, |inner| {
        prop::collection::vec((0.01..10.0f64, inner), 1..=3).prop_map(|parts| {
            Distribution::Mixture {
                components: parts
                    .into_iter()
                    .map(|(weight, dist)| MixtureComponent { weight, dist })
                    .collect(),
            }
        })
    })
    .boxed()
}

/// Pauses from zero and milliseconds (tool calls) to minutes (humans), in seconds.
pub fn pause_dist() -> BoxedStrategy<Distribution> {
    let leaf = prop_oneof![
        Just(Distribution::Constant { value: 0.0 }),
        (0.001..0.1f64).prop_map(|value| Distribution::Constant { value }),
        (0.001..0.1f64, 0.0..0.1f64).prop_map(|(low, extra)| Distribution::Uniform {
            low,
            high: low + extra
        }),
        (0.01..10.0f64).prop_map(|mean| Distribution::Exponential { mean }),
        (0.1..60.0f64, 0.0..2.0f64).prop_map(|(median, sigma)| Distribution::LogNormal {
            median,
            sigma: Some(sigma),
            p90: None,
            max: Some(600.0)
        }),
        (60.0..300.0f64).prop_map(|low| Distribution::Uniform { low, high: 300.0 }),
    ];
    leaf.prop_recursive(1, 3, 3, |inner| {
        prop::collection::vec((0.01..10.0f64, inner), 1..=3).prop_map(|parts| {
            Distribution::Mixture {
                components: parts
                    .into_iter()
                    .map(|(weight, dist)| MixtureComponent { weight, dist })
                    .collect(),
            }
        })
    })
    .boxed()
}

fn hint() -> impl Strategy<Value = HintSpec> {
    prop_oneof![
        Just(HintSpec::Exact),
        (0.0..2.0f64).prop_map(|sigma| HintSpec::Noisy { sigma }),
        Just(HintSpec::None)
    ]
}

fn arrival(agents: u32) -> impl Strategy<Value = Arrival> {
    prop_oneof![
        // 0.01 to 1000 agents per second, log-uniform.
        (-2.0..3.0f64).prop_map(|e| Arrival::Poisson {
            rate_per_s: 10f64.powf(e)
        }),
        prop_oneof![Just(0.0), 0.0..60.0f64].prop_map(|ramp_s| Arrival::Ramp { ramp_s }),
        prop::collection::vec(prop_oneof![Just(0.0), 0.0..100.0f64], agents as usize)
            .prop_map(|times_s| Arrival::Explicit { times_s }),
    ]
}

fn turns_dist(max: u32) -> impl Strategy<Value = Distribution> {
    prop_oneof![
        (1..=max).prop_map(|v| Distribution::Constant { value: v as f64 }),
        (1..=max).prop_map(move |high| Distribution::Uniform {
            low: 1.0,
            high: high as f64
        }),
    ]
}

/// No shared prefix in half the cases; else one or two groups with prefixes up to half the
/// window (shorter than a block too) and shares that leave some agents out or none.
fn prefix_groups(window: u32) -> impl Strategy<Value = Vec<PrefixGroupSpec>> {
    let group = (1..=window / 2, 0.05..=1.0f64);
    prop_oneof![
        1 => Just(Vec::new()),
        1 => prop::collection::vec(group, 1..=2).prop_map(|groups| {
            let total: f64 = groups.iter().map(|g| g.1).sum();
            groups
                .into_iter()
                .enumerate()
                .map(|(i, (tokens, share))| PrefixGroupSpec {
                    name: format!("group-{i}"),
                    tokens,
                    share: Some(share / total.max(1.0)),
                    shared: true,
                })
                .collect()
        }),
    ]
}

fn case_of_size(size: Size) -> impl Strategy<Value = Case> {
    (1..=size.agents_max, 16..=size.window_max).prop_flat_map(move |(agents, window)| {
        let spec = (
            arrival(agents),
            turns_dist(size.turns_max),
            value_dist(window as f64),
            value_dist(window as f64 / 4.0),
            value_dist(size.generated_max),
            pause_dist(),
            hint(),
            prefix_groups(window),
        )
            .prop_map(
                move |(arrival, turns, first_prompt_tokens, new_tokens, generated_tokens, pause_s, hint, prefix_groups)| {
                    WorkloadSpec {
                        schema_version: traces::SCHEMA_VERSION,
                        name: "proptest".into(),
                        description: "generated by djinn-tests".into(),
                        agents,
                        max_context_tokens: window,
                        arrival,
                        agent: AgentSpec {
                            turns,
                            first_prompt_tokens,
                            new_tokens,
                            generated_tokens,
                            pause_s,
                        },
                        hint,
                        replay: None,
                        background: None,
                        prefix_groups,
                    }
                },
            );
        let gpu_pool =
            prop_oneof![9 => (0.0..=1.0f64).prop_map(GpuPool::Fits), 1 => (0.0..1.0f64).prop_map(GpuPool::Short)];
        let host_fill = prop_oneof![1 => Just(0.0), 3 => 0.0..=1.5f64];
        // 5 to 100 GB/s, log-uniform.
        let pcie = (5f64.ln()..=100f64.ln()).prop_map(|l| (l.exp() * 1e9).round());
        let block_size = prop::sample::select(size.block_sizes);
        let batch = prop_oneof![3 => Just(8192u32), 1 => 1..=512u32, 1 => 512..=8192u32];
        // Every batch policy, so the invariants hold whatever fills the steps.
        let batching = prop_oneof![
            Just(BatchPolicy::Fill),
            Just(BatchPolicy::StallFree),
            (1..=4096u32).prop_map(BatchPolicy::Chunk),
        ];
        (spec, any::<u64>(), block_size, gpu_pool, host_fill, pcie, batch, batching).prop_map(
            move |(spec, seed, block_size_tokens, gpu_pool, host_fill, pcie_bytes_per_s, max_batch_tokens, batching)| Case {
                spec,
                agents,
                seed,
                block_size_tokens,
                gpu_pool,
                host_fill,
                pcie_bytes_per_s,
                max_batch_tokens,
                batching,
            },
        )
    })
}

/// Random cases: mostly small ones (many turns, long contexts), some with tens and some with
/// hundreds of agents.
pub fn case_strategy() -> impl Strategy<Value = Case> {
    prop_oneof![4 => case_of_size(SMALL), 2 => case_of_size(MEDIUM), 1 => case_of_size(LARGE)]
}
