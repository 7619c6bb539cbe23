//! Determinism: the same seed gives byte-identical run directories (written by the CLI's writer,
//! `traces::write_run_dir`), a sweep gives the same per-configuration outputs on 1 thread and on
//! many, and digests of a few tiny runs are pinned in `tests/golden/` (rewrite them on purpose
//! with `DJINN_GOLDEN_UPDATE=1`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use djinn_tests::digest::{dir_digest, read_dir_bytes, temp_dir, write_run};
use djinn_tests::env;
use rayon::prelude::*;
use sim::driver::CheckLevel;
use sim::experiment::{shipped_workload, simulate, SimConfig};
use sim::PolicyKind;
use traces::WorkloadSpec;

fn shipped(name: &str) -> WorkloadSpec {
    let text = shipped_workload(name).unwrap_or_else(|| panic!("no shipped workload {name}"));
    WorkloadSpec::from_toml_str(Path::new(name), text).expect("shipped workloads parse")
}

/// A small run configuration: (workload, agents, policy, seed).
#[derive(Clone, Debug)]
struct RunConfig {
    workload: &'static str,
    agents: u32,
    policy: PolicyKind,
    seed: u64,
    /// GPU memory utilization: lower values make memory short, where policies differ.
    gpu_memory_utilization: f64,
}

impl RunConfig {
    fn name(&self) -> String {
        format!(
            "{}-n{}-{}-seed{}-util{}",
            self.workload,
            self.agents,
            self.policy.name(),
            self.seed,
            self.gpu_memory_utilization
        )
    }

    /// Simulates and writes the run directory under `root`; returns its path.
    fn run_into(&self, root: &Path) -> PathBuf {
        let spec = shipped(self.workload);
        let profile =
            calibration::load_profile(calibration::DEFAULT_PROFILE).expect("shipped profile");
        let mut config = SimConfig::new(self.policy, profile);
        config.seed = self.seed;
        config.gpu_memory_utilization = self.gpu_memory_utilization;
        config.check = CheckLevel::Step {
            audit_interval_steps: 64,
        };
        let (_, output) = simulate(&spec, Some(self.agents), &config)
            .unwrap_or_else(|e| panic!("{}: {e}", self.name()));
        let dir = root.join(self.name());
        write_run(&dir, &spec, self.agents, &config, &output);
        dir
    }
}

/// Every shipped policy on two small workloads where memory is short (the cliff), at `seeds`.
fn configs(seeds: &[u64]) -> Vec<RunConfig> {
    let mut out = Vec::new();
    for &seed in seeds {
        for policy in PolicyKind::ALL {
            out.push(RunConfig {
                workload: "seed-cliff",
                agents: 12,
                policy,
                seed,
                gpu_memory_utilization: 0.25,
            });
            out.push(RunConfig {
                workload: "agents-capacity",
                agents: 6,
                policy,
                seed,
                gpu_memory_utilization: 0.22,
            });
        }
    }
    out
}

#[test]
fn same_seed_gives_byte_identical_run_directories_and_another_seed_does_not() {
    let root_a = temp_dir("determinism-a");
    let root_b = temp_dir("determinism-b");
    for config in configs(&[0, 1, 42]) {
        let a = read_dir_bytes(&config.run_into(&root_a));
        let b = read_dir_bytes(&config.run_into(&root_b));
        let files: std::collections::BTreeSet<String> = traces::RUN_DIR_FILES
            .iter()
            .map(|f| f.to_string())
            .collect();
        assert_eq!(
            a.keys().cloned().collect::<std::collections::BTreeSet<_>>(),
            files,
            "{}: run directory files",
            config.name()
        );
        for (file, bytes) in &a {
            assert!(
                b.get(file) == Some(bytes),
                "{}: {file} differs between two runs of the same seed",
                config.name()
            );
        }
        let mut other = config.clone();
        other.seed += 1000;
        let c = read_dir_bytes(&other.run_into(&root_b));
        assert_ne!(
            a.get("turns.csv"),
            c.get("turns.csv"),
            "{}: another seed gave the same turns",
            config.name()
        );
    }
    std::fs::remove_dir_all(root_a).ok();
    std::fs::remove_dir_all(root_b).ok();
}

/// Runs every configuration on a rayon pool of `threads`; returns each one's directory bytes.
fn sweep(
    threads: usize,
    root: &Path,
    configs: &[RunConfig],
) -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool");
    pool.install(|| {
        configs
            .par_iter()
            .map(|c| (c.name(), read_dir_bytes(&c.run_into(root))))
            .collect::<Vec<_>>()
    })
    .into_iter()
    .collect()
}

#[test]
fn sweep_on_one_thread_and_on_all_threads_gives_identical_outputs() {
    let configs = configs(&[3, 4]);
    let many = std::thread::available_parallelism()
        .map_or(4, |n| n.get())
        .max(4);
    let one = sweep(1, &temp_dir("sweep-1"), &configs);
    let all = sweep(many, &temp_dir("sweep-all"), &configs);
    assert_eq!(one.len(), configs.len());
    for (name, files) in &one {
        assert!(
            all.get(name) == Some(files),
            "{name}: outputs differ between 1 thread and {many} threads"
        );
    }
}

/// The pinned runs: tiny, every shipped policy, shipped workloads.
fn golden_configs() -> Vec<RunConfig> {
    let mut out = Vec::new();
    for policy in PolicyKind::ALL {
        out.push(RunConfig {
            workload: "seed-exp1",
            agents: 4,
            policy,
            seed: 0,
            gpu_memory_utilization: 0.9,
        });
        out.push(RunConfig {
            workload: "seed-cliff",
            agents: 10,
            policy,
            seed: 0,
            gpu_memory_utilization: 0.25,
        });
        out.push(RunConfig {
            workload: "agents-capacity",
            agents: 5,
            policy,
            seed: 0,
            gpu_memory_utilization: 0.22,
        });
        out.push(RunConfig {
            workload: "azure-conv-synth",
            agents: 20,
            policy,
            seed: 0,
            gpu_memory_utilization: 0.9,
        });
    }
    out
}

fn golden_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join("sim-runs.sha256")
}

#[test]
fn golden_digests_of_tiny_runs_are_unchanged() {
    let root = temp_dir("golden");
    let mut text = String::from(
        "# SHA-256 of the run-directory files of tiny simulated runs (tests/tests/determinism.rs).\n# A change here is a behaviour change: review it, then rewrite with\n#   DJINN_GOLDEN_UPDATE=1 cargo test -p djinn-tests --test determinism golden\n",
    );
    for config in golden_configs() {
        let dir = config.run_into(&root);
        for line in dir_digest(&dir).lines() {
            let (hash, file) = line.split_once("  ").expect("digest line");
            text.push_str(&format!("{hash}  {}/{file}\n", config.name()));
        }
    }
    std::fs::remove_dir_all(&root).ok();
    let path = golden_path();
    if env::golden_update() {
        traces::write_atomic(&path, text.as_bytes()).expect("write golden digests");
        eprintln!("rewrote {}", path.display());
        return;
    }
    let stored = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("{}: {e}; create it with DJINN_GOLDEN_UPDATE=1 cargo test -p djinn-tests --test determinism golden", path.display())
    });
    if stored != text {
        let stored_lines: std::collections::BTreeSet<&str> =
            stored.lines().filter(|l| !l.starts_with('#')).collect();
        let new_lines: std::collections::BTreeSet<&str> =
            text.lines().filter(|l| !l.starts_with('#')).collect();
        let changed: Vec<&str> = new_lines
            .symmetric_difference(&stored_lines)
            .map(|l| l.split_once("  ").map_or(*l, |(_, f)| f))
            .collect();
        panic!(
            "golden digests changed for {} file(s), e.g. {:?}.\nIf the behaviour change is intended, rewrite them with\n  DJINN_GOLDEN_UPDATE=1 cargo test -p djinn-tests --test determinism golden\nand commit {}.",
            changed.len(),
            &changed[..changed.len().min(8)],
            path.display()
        );
    }
}
