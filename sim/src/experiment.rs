//! From a workload spec, a GPU profile and the run knobs to a finished simulated run.

use traces::{GpuProfile, RunManifest, WorkloadSpec};

use crate::backend::SimGpu;
use crate::driver::{self, CheckLevel, Recording, RunError, RunLimits, RunOutput, RunSettings};
use crate::policies::PolicyKind;
use crate::sched::{CostHints, SchedConfig};
use crate::time::VirtualClock;
use crate::workload::{Programs, Workload};

/// The shipped workload specs, embedded so the binary works anywhere.
pub const SHIPPED_WORKLOADS: [(&str, &str); 14] = [
    ("seed-exp1", include_str!("../workloads/seed-exp1.toml")),
    ("seed-cliff", include_str!("../workloads/seed-cliff.toml")),
    (
        "agents-capacity",
        include_str!("../workloads/agents-capacity.toml"),
    ),
    (
        "azure-conv-synth",
        include_str!("../workloads/azure-conv-synth.toml"),
    ),
    ("swe-agent", include_str!("../workloads/swe-agent.toml")),
    (
        "swe-agent-shared",
        include_str!("../workloads/swe-agent-shared.toml"),
    ),
    ("chat", include_str!("../workloads/chat.toml")),
    (
        "agents-background",
        include_str!("../workloads/agents-background.toml"),
    ),
    (
        "coding-agent-replay",
        include_str!("../workloads/coding-agent-replay.toml"),
    ),
    (
        "coding-agent",
        include_str!("../workloads/coding-agent.toml"),
    ),
    (
        "coding-agent-small",
        include_str!("../workloads/coding-agent-small.toml"),
    ),
    (
        "coding-agent-unshared",
        include_str!("../workloads/coding-agent-unshared.toml"),
    ),
    ("chat-long", include_str!("../workloads/chat-long.toml")),
    (
        "swe-agent-long",
        include_str!("../workloads/swe-agent-long.toml"),
    ),
];

/// The text of a shipped workload by name.
pub fn shipped_workload(name: &str) -> Option<&'static str> {
    SHIPPED_WORKLOADS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
}

/// Knobs of a simulated run beyond the workload.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub policy: PolicyKind,
    pub profile: GpuProfile,
    /// Fraction of GPU memory the engine may use (weights, workspace and KV).
    pub gpu_memory_utilization: f64,
    /// Host memory set aside for swapped KV.
    pub host_memory_bytes: u64,
    pub block_size_tokens: u32,
    pub sched: SchedConfig,
    pub limits: RunLimits,
    pub check: CheckLevel,
    /// What hint-using policies do with pause hints.
    pub predictor: crate::policies::PredictorMode,
    /// What the output keeps (summary recordings for runs that only need figures).
    pub recording: Recording,
}

impl SimConfig {
    pub fn new(policy: PolicyKind, profile: GpuProfile) -> Self {
        SimConfig {
            seed: 0,
            policy,
            profile,
            gpu_memory_utilization: 0.9,
            host_memory_bytes: 128 << 30,
            block_size_tokens: 16,
            sched: SchedConfig::default(),
            limits: RunLimits::default(),
            check: CheckLevel::Step {
                audit_interval_steps: 1024,
            },
            predictor: crate::policies::PredictorMode::Hint,
            recording: Recording::Full,
        }
    }

    pub fn block_bytes(&self) -> u64 {
        self.profile.kv_bytes_per_token * self.block_size_tokens as u64
    }

    /// GPU KV blocks: memory x utilization, minus weights, minus the workspace reserve.
    pub fn gpu_blocks(&self) -> u32 {
        let usable = self.profile.gpu_memory_bytes as f64 * self.gpu_memory_utilization
            - self.profile.weight_bytes as f64
            - self.profile.workspace_reserve_bytes as f64;
        (usable.max(0.0) / self.block_bytes() as f64)
            .floor()
            .min(u32::MAX as f64) as u32
    }

    pub fn host_blocks(&self) -> u32 {
        (self.host_memory_bytes / self.block_bytes()).min(u32::MAX as u64) as u32
    }

    /// What policies may know of costs, derived from the profile.
    pub fn cost_hints(&self) -> CostHints {
        let c = &self.profile.cost;
        let prefill_ns_per_token = c.flops_per_token / c.matmul_flops_per_s * 1e9;
        let decode_step_ns = c.step_overhead_ns
            + self.profile.weight_bytes as f64 / c.memory_bandwidth_bytes_per_s * 1e9;
        CostHints {
            kv_bytes_per_token: self.profile.kv_bytes_per_token,
            block_bytes: self.block_bytes(),
            swap_latency_ns: self
                .profile
                .host_to_device
                .latency_ns
                .max(self.profile.device_to_host.latency_ns),
            swap_in_bandwidth_bytes_per_s: self.profile.host_to_device.bandwidth_bytes_per_s,
            swap_out_bandwidth_bytes_per_s: self.profile.device_to_host.bandwidth_bytes_per_s,
            prefill_ns_per_token,
            decode_step_ns,
            kv_read_ns_per_token: self.profile.kv_bytes_per_token as f64
                / c.memory_bandwidth_bytes_per_s
                * 1e9,
        }
    }

    pub fn settings(&self) -> RunSettings {
        RunSettings {
            seed: self.seed,
            block_size_tokens: self.block_size_tokens,
            gpu_blocks: self.gpu_blocks(),
            host_blocks: self.host_blocks(),
            sched: self.sched.clone(),
            costs: self.cost_hints(),
            limits: self.limits.clone(),
            check: self.check,
            recording: self.recording,
        }
    }
}

/// Generates the workload and simulates it.
pub fn simulate(
    spec: &WorkloadSpec,
    agents: Option<u32>,
    config: &SimConfig,
) -> Result<(Workload, RunOutput), RunError> {
    let workload = crate::replay::build_workload(spec, spec.agent_count(agents), config.seed)
        .map_err(|e| RunError::Workload(e.to_string()))?;
    let output = simulate_workload(&workload, config)?;
    Ok((workload, output))
}

/// Simulates an already generated workload.
pub fn simulate_workload(
    workload: &dyn Programs,
    config: &SimConfig,
) -> Result<RunOutput, RunError> {
    simulate_with(workload, config, &config.settings(), &config.profile)
}

/// Simulates with explicit run settings (pool sizes, cost hints the policies plan with) and the
/// profile that times the simulated GPU: the twin of a real run keeps the real run's pools and
/// hints, and calibration times it with another profile than the one the policies were told.
pub fn simulate_with(
    workload: &dyn Programs,
    config: &SimConfig,
    settings: &RunSettings,
    gpu_profile: &GpuProfile,
) -> Result<RunOutput, RunError> {
    let mut scheduler = config.policy.build_with(
        crate::policies::PolicyOptions {
            predictor: config.predictor,
        },
        workload,
    );
    let mut backend = SimGpu::new(gpu_profile.clone(), config.block_size_tokens);
    let mut clock = VirtualClock::default();
    driver::run(
        settings,
        workload,
        scheduler.as_mut(),
        &mut backend,
        &mut clock,
    )
}

/// The manifest of a simulated run: everything that fixes it, and the command that reproduces it.
pub fn manifest(
    spec: &WorkloadSpec,
    agents: u32,
    config: &SimConfig,
    code_version: &str,
    reproduce: String,
) -> RunManifest {
    let mut options = std::collections::BTreeMap::new();
    options.insert(
        "gpu_memory_utilization".into(),
        config.gpu_memory_utilization.to_string(),
    );
    options.insert(
        "host_memory_bytes".into(),
        config.host_memory_bytes.to_string(),
    );
    options.insert(
        "block_size_tokens".into(),
        config.block_size_tokens.to_string(),
    );
    options.insert("gpu_blocks".into(), config.gpu_blocks().to_string());
    options.insert("host_blocks".into(), config.host_blocks().to_string());
    options.insert("block_bytes".into(), config.block_bytes().to_string());
    options.insert(
        "max_batch_tokens".into(),
        config.sched.max_batch_tokens.to_string(),
    );
    options.insert(
        "max_batch_sequences".into(),
        config.sched.max_batch_sequences.to_string(),
    );
    options.insert("batching".into(), config.sched.batching.name());
    options.insert("predictor".into(), config.predictor.name().to_string());
    RunManifest {
        schema_version: traces::SCHEMA_VERSION,
        tool: "djinn".into(),
        code_version: code_version.into(),
        backend: "sim".into(),
        seed: config.seed,
        policy: config.policy.name().into(),
        agents,
        workload: spec.clone(),
        profile_name: config.profile.name.clone(),
        profile_provenance: config.profile.provenance.kind.clone(),
        device: String::new(),
        model: config.profile.model_name.clone(),
        options,
        reproduce,
    }
}
