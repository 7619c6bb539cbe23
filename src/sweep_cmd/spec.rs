//! The sweep spec (TOML): reading and checking it, and its expansion into configurations.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sim::experiment::SimConfig;
use sim::policies::PredictorMode;
use sim::BatchPolicy;
use sim::PolicyKind;
use traces::workload::HintSpec;
use traces::WorkloadSpec;

use crate::runio::parse_policy;

/// A sweep spec as written in TOML.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SweepSpec {
    pub name: String,
    pub policies: Vec<String>,
    pub workloads: Vec<String>,
    pub agents: Vec<u32>,
    pub seeds: Vec<u64>,
    /// Profile name or path. Absent with neither `model` nor `card`: the default profile, written
    /// back by name so the spec's fingerprint is what it was before models and cards existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Model the profile is derived from (name or path), as `--model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Card the profile is derived from (name or path), as `--card`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card: Option<String>,
    #[serde(default = "default_slo_ms")]
    pub slo_ms: f64,
    /// Batch policies to sweep (an axis: every configuration runs under each). Empty = the
    /// default batch policy only, and configuration ids without a batch-policy part.
    #[serde(default)]
    pub batching: Vec<String>,
    /// Named knob sets; the sweep runs each. Empty = one set of defaults named "base".
    #[serde(default)]
    pub overrides: Vec<Override>,
}

fn default_slo_ms() -> f64 {
    5000.0
}

/// One named set of knobs.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Override {
    pub name: String,
    pub gpu_memory_utilization: Option<f64>,
    pub host_memory_gib: Option<f64>,
    pub max_batch_tokens: Option<u32>,
    /// Cap of the host<->GPU copy bandwidth per direction, GB/s (e.g. 25 for PCIe Gen4).
    pub pcie_gbps: Option<f64>,
    /// `exact`, `none` or `noisy:SIGMA`: what the workload tells the scheduler.
    pub hint: Option<String>,
    /// `hint`, `ewma` or `none`: what hint-using policies do with hints.
    pub predictor: Option<String>,
}

/// One configuration of the expanded sweep.
#[derive(Clone, Debug)]
pub struct SweepConfig {
    pub index: usize,
    pub id: String,
    pub workload: String,
    pub policy: PolicyKind,
    pub agents: u32,
    pub seed: u64,
    pub knobs: Override,
    pub batching: BatchPolicy,
}

pub fn parse_hint(s: &str) -> Result<HintSpec> {
    Ok(match s {
        "exact" => HintSpec::Exact,
        "none" => HintSpec::None,
        other => match other.strip_prefix("noisy:").map(str::parse::<f64>) {
            Some(Ok(sigma)) if sigma.is_finite() && sigma >= 0.0 => HintSpec::Noisy { sigma },
            _ => bail!("hint must be exact, none or noisy:SIGMA (sigma >= 0), got {other:?}"),
        },
    })
}

/// Reads and validates a sweep spec; errors name the file and field.
pub fn read_spec(path: &Path) -> Result<SweepSpec> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut spec: SweepSpec = traces::io::parse_toml(path, &text)?;
    if spec.profile.is_none() && spec.model.is_none() && spec.card.is_none() {
        spec.profile = Some(calibration::DEFAULT_PROFILE.to_string());
    }
    let fail = |field: &str, msg: String| -> Result<SweepSpec> {
        bail!("{}: field `{field}`: {msg}", path.display())
    };
    for (field, empty) in [
        ("policies", spec.policies.is_empty()),
        ("workloads", spec.workloads.is_empty()),
        ("agents", spec.agents.is_empty()),
        ("seeds", spec.seeds.is_empty()),
    ] {
        if empty {
            return fail(field, "must list at least one value".into());
        }
    }
    for (i, p) in spec.policies.iter().enumerate() {
        parse_policy(p).with_context(|| format!("{}: field `policies[{i}]`", path.display()))?;
    }
    for (i, b) in spec.batching.iter().enumerate() {
        if let Err(e) = BatchPolicy::parse(b) {
            return fail(&format!("batching[{i}]"), e);
        }
    }
    for (i, &n) in spec.agents.iter().enumerate() {
        if n == 0 || n > traces::workload::AGENTS_MAX {
            return fail(
                &format!("agents[{i}]"),
                format!("must be in 1..={}, got {n}", traces::workload::AGENTS_MAX),
            );
        }
    }
    check_distinct(path, &spec)?;
    if !(spec.slo_ms.is_finite() && spec.slo_ms > 0.0) {
        return fail(
            "slo_ms",
            format!("must be a finite number > 0, got {}", spec.slo_ms),
        );
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, o) in spec.overrides.iter().enumerate() {
        let f = |name: &str| format!("overrides[{i}].{name}");
        if o.name.is_empty()
            || !o
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return fail(
                &f("name"),
                format!(
                    "must be non-empty letters, digits, '-', '_' or '.', got {:?}",
                    o.name
                ),
            );
        }
        if !names.insert(o.name.clone()) {
            return fail(&f("name"), format!("{:?} appears twice", o.name));
        }
        if let Some(u) = o.gpu_memory_utilization {
            if !(u > 0.0 && u <= 1.0) {
                return fail(
                    &f("gpu_memory_utilization"),
                    format!("must be in (0, 1], got {u}"),
                );
            }
        }
        if let Some(h) = o.host_memory_gib {
            if !(h.is_finite() && (0.0..=1048576.0).contains(&h)) {
                return fail(
                    &f("host_memory_gib"),
                    format!("must be in [0, 1048576], got {h}"),
                );
            }
        }
        if o.max_batch_tokens == Some(0) {
            return fail(&f("max_batch_tokens"), "must be > 0".into());
        }
        if let Some(b) = o.pcie_gbps {
            if !(b.is_finite() && b > 0.0) {
                return fail(
                    &f("pcie_gbps"),
                    format!("must be a finite number > 0, got {b}"),
                );
            }
        }
        if let Some(h) = &o.hint {
            parse_hint(h).with_context(|| format!("{}: field `{}`", path.display(), f("hint")))?;
        }
        if let Some(p) = &o.predictor {
            if PredictorMode::parse(p).is_none() {
                return fail(
                    &f("predictor"),
                    format!("must be hint, ewma or none, got {p:?}"),
                );
            }
        }
    }
    Ok(spec)
}

/// Each grid point once: a value listed twice in a field would make two configurations with one
/// id, racing for one result file.
fn check_distinct(path: &Path, spec: &SweepSpec) -> Result<()> {
    let policies: Vec<String> = spec
        .policies
        .iter()
        .map(|p| parse_policy(p).map(|k| k.name().to_string()))
        .collect::<Result<_>>()?;
    let repeats: [(&str, Vec<String>); 5] = [
        ("batching", spec.batching.clone()),
        ("policies", policies),
        (
            "workloads",
            spec.workloads.iter().map(|w| workload_stem(w)).collect(),
        ),
        ("agents", spec.agents.iter().map(u32::to_string).collect()),
        ("seeds", spec.seeds.iter().map(u64::to_string).collect()),
    ];
    for (field, values) in repeats {
        let mut seen = BTreeMap::new();
        for (i, v) in values.iter().enumerate() {
            if let Some(j) = seen.insert(v.as_str(), i) {
                bail!(
                    "{}: field `{field}`: entries {j} and {i} are the same grid point ({v}); list each once",
                    path.display()
                );
            }
        }
    }
    Ok(())
}

/// The name a workload entry gives its configurations: the file stem of a path, or the shipped
/// name itself.
pub fn workload_stem(w: &str) -> String {
    Path::new(w)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| w.to_string())
}

/// The configurations of a spec, in a fixed order (workload, override, batch policy, agents, seed,
/// policy).
pub fn expand(spec: &SweepSpec) -> Result<Vec<SweepConfig>> {
    let overrides = if spec.overrides.is_empty() {
        vec![Override {
            name: "base".into(),
            ..Default::default()
        }]
    } else {
        spec.overrides.clone()
    };
    // Listed batch policies name themselves in the id; the default alone keeps the plain id.
    let batchings: Vec<(BatchPolicy, String)> = if spec.batching.is_empty() {
        vec![(BatchPolicy::default(), String::new())]
    } else {
        spec.batching
            .iter()
            .map(|b| {
                let p = BatchPolicy::parse(b).map_err(anyhow::Error::msg)?;
                Ok((p, format!("__{}", p.name())))
            })
            .collect::<Result<_>>()?
    };
    let mut out = Vec::new();
    for w in &spec.workloads {
        let wname = workload_stem(w);
        for o in &overrides {
            for (batching, suffix) in &batchings {
                for &n in &spec.agents {
                    for &seed in &spec.seeds {
                        for p in &spec.policies {
                            let policy = parse_policy(p)?;
                            let index = out.len();
                            let id = format!(
                                "{wname}__{}__n{n}__s{seed}__{}{suffix}",
                                policy.name(),
                                o.name
                            );
                            out.push(SweepConfig {
                                index,
                                id,
                                workload: w.clone(),
                                policy,
                                agents: n,
                                seed,
                                knobs: o.clone(),
                                batching: *batching,
                            });
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Parses `K/N`.
pub fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let (k, n) = s
        .split_once('/')
        .context("--shard must be K/N, e.g. 3/16")?;
    let (k, n): (usize, usize) = (
        k.trim().parse().context("--shard K")?,
        n.trim().parse().context("--shard N")?,
    );
    if n == 0 || k >= n {
        bail!("--shard K/N needs 0 <= K < N, got {k}/{n}");
    }
    Ok((k, n))
}

/// The spec and base config of one configuration, overrides applied.
pub fn resolve(
    config: &SweepConfig,
    profile: &traces::GpuProfile,
    specs: &BTreeMap<String, WorkloadSpec>,
) -> Result<(WorkloadSpec, SimConfig)> {
    let mut spec = specs[&config.workload].clone();
    let mut sim = SimConfig::new(config.policy, profile.clone());
    sim.seed = config.seed;
    sim.sched.batching = config.batching;
    let k = &config.knobs;
    if let Some(u) = k.gpu_memory_utilization {
        sim.gpu_memory_utilization = u;
    }
    if let Some(h) = k.host_memory_gib {
        sim.host_memory_bytes = (h * (1u64 << 30) as f64) as u64;
    }
    if let Some(t) = k.max_batch_tokens {
        sim.sched.max_batch_tokens = t;
    }
    if let Some(b) = k.pcie_gbps {
        let cap = b * 1e9;
        sim.profile.host_to_device.bandwidth_bytes_per_s =
            sim.profile.host_to_device.bandwidth_bytes_per_s.min(cap);
        sim.profile.device_to_host.bandwidth_bytes_per_s =
            sim.profile.device_to_host.bandwidth_bytes_per_s.min(cap);
    }
    if let Some(h) = &k.hint {
        spec.hint = parse_hint(h)?;
    }
    if let Some(p) = &k.predictor {
        sim.predictor = PredictorMode::parse(p).context("predictor")?;
    }
    if sim.gpu_blocks() == 0 {
        bail!(
            "{}: the GPU KV pool is empty with these overrides",
            config.id
        );
    }
    Ok((spec, sim))
}

pub fn hint_name(h: &HintSpec) -> String {
    match h {
        HintSpec::Exact => "exact".into(),
        HintSpec::None => "none".into(),
        HintSpec::Noisy { sigma } => format!("noisy:{sigma}"),
    }
}
