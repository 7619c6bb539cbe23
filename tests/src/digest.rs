//! Run directories for the determinism and golden tests, written by the same writer as
//! `djinn simulate` (`traces::write_run_dir`), and their digests.

use std::collections::BTreeMap;
use std::path::Path;

use sha2::{Digest, Sha256};
use sim::driver::RunOutput;
use sim::experiment::SimConfig;
use traces::{RunManifest, RunSummary, WorkloadSpec};

/// The summary `djinn simulate` computes for a run (SLO 5 s, its default).
pub fn summary(
    spec: &WorkloadSpec,
    agents: u32,
    config: &SimConfig,
    output: &RunOutput,
) -> RunSummary {
    let inputs = analysis::SummaryInputs {
        policy: config.policy.name().into(),
        workload: spec.name.clone(),
        agents,
        seed: config.seed,
        turns_planned: output.turns_planned,
        block_bytes: config.block_bytes(),
        gpu_blocks_total: config.gpu_blocks(),
        host_blocks_total: config.host_blocks(),
        slo_ns: 5_000_000_000,
    };
    analysis::summarize(&inputs, &output.turns, &output.steps, &output.swaps)
}

/// The manifest `djinn simulate` writes (`sim::experiment::manifest`), with a fixed code version
/// and no command line, so golden digests do not move with every commit.
pub fn manifest(spec: &WorkloadSpec, agents: u32, config: &SimConfig) -> RunManifest {
    sim::experiment::manifest(spec, agents, config, "test", String::new())
}

/// Writes a run directory the way `djinn simulate` does.
pub fn write_run(
    dir: &Path,
    spec: &WorkloadSpec,
    agents: u32,
    config: &SimConfig,
    output: &RunOutput,
) {
    let summary = summary(spec, agents, config, output);
    traces::write_run_dir(
        dir,
        &manifest(spec, agents, config),
        &output.turns,
        &output.steps,
        &output.swaps,
        &summary,
    )
    .unwrap_or_else(|e| panic!("writing {}: {e}", dir.display()));
}

/// Every file of a directory (recursively), by relative path.
pub fn read_dir_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .expect("under root")
                    .to_string_lossy()
                    .replace('\\', "/");
                out.insert(
                    rel,
                    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One line per file: `sha256  relative/path`, sorted by path.
pub fn dir_digest(dir: &Path) -> String {
    read_dir_bytes(dir)
        .iter()
        .map(|(name, bytes)| format!("{}  {name}\n", sha256_hex(bytes)))
        .collect()
}

/// A fresh, empty temporary directory for a test.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("djinn-tests-{}-{name}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).expect("clean temp dir");
    }
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}
