//! Resolving inputs (workloads, profiles, policies) and writing run directories atomically.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sim::driver::RunOutput;
use sim::experiment::{shipped_workload, SimConfig, SHIPPED_WORKLOADS};
use sim::PolicyKind;
use traces::{RunManifest, RunSummary, WorkloadSpec};

/// A workload by shipped name or by path to a TOML spec.
pub fn load_workload(name_or_path: &str) -> Result<WorkloadSpec> {
    if let Some(text) = shipped_workload(name_or_path) {
        let file = format!("sim/workloads/{name_or_path}.toml");
        return Ok(WorkloadSpec::from_toml_str(Path::new(&file), text)?);
    }
    let path = Path::new(name_or_path);
    if !path.exists() {
        let known: Vec<&str> = SHIPPED_WORKLOADS.iter().map(|(n, _)| *n).collect();
        bail!("unknown workload `{name_or_path}`: no such file, and not a shipped workload (known: {})", known.join(", "));
    }
    Ok(WorkloadSpec::read(path)?)
}

pub fn parse_policy(name: &str) -> Result<PolicyKind> {
    PolicyKind::parse(name).with_context(|| format!("unknown policy `{name}` (known: {})", PolicyKind::names().join(", ")))
}

/// The code version written into manifests: the crate version and the git commit it was built from.
pub fn code_version() -> String {
    format!("{}+{}", env!("CARGO_PKG_VERSION"), option_env!("DJINN_GIT_COMMIT").unwrap_or("unknown"))
}

/// Writes one run directory (manifest, turns, steps, swaps, summary). The files go to a temporary
/// sibling directory that is renamed into place at the end, so an interrupted write never leaves
/// a directory that looks complete.
pub fn write_run_dir(dir: &Path, manifest: &RunManifest, output: &RunOutput, summary: &RunSummary) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    let result = (|| -> Result<()> {
        traces::write_json_atomic(&tmp.join("manifest.json"), manifest)?;
        traces::write_csv_atomic(&tmp.join("turns.csv"), &output.turns)?;
        traces::write_csv_atomic(&tmp.join("steps.csv"), &output.steps)?;
        traces::write_csv_atomic(&tmp.join("swaps.csv"), &output.swaps)?;
        traces::write_json_atomic(&tmp.join("summary.json"), summary)?;
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("replacing {}", dir.display()))?;
        }
        std::fs::rename(&tmp, dir).with_context(|| format!("moving {} into place", dir.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// The manifest of a simulated run.
pub fn sim_manifest(spec: &WorkloadSpec, agents: u32, config: &SimConfig, reproduce: String) -> RunManifest {
    let mut options = std::collections::BTreeMap::new();
    options.insert("gpu_memory_utilization".into(), config.gpu_memory_utilization.to_string());
    options.insert("host_memory_bytes".into(), config.host_memory_bytes.to_string());
    options.insert("block_size_tokens".into(), config.block_size_tokens.to_string());
    options.insert("gpu_blocks".into(), config.gpu_blocks().to_string());
    options.insert("host_blocks".into(), config.host_blocks().to_string());
    options.insert("block_bytes".into(), config.block_bytes().to_string());
    options.insert("max_batch_tokens".into(), config.sched.max_batch_tokens.to_string());
    options.insert("max_batch_sequences".into(), config.sched.max_batch_sequences.to_string());
    RunManifest {
        schema_version: traces::SCHEMA_VERSION,
        tool: "djinn".into(),
        code_version: code_version(),
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

pub fn run_dir(out: &Path, workload: &str, policy: &str) -> PathBuf {
    out.join(workload).join(policy)
}
