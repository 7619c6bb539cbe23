//! `djinn sweep`: a TOML sweep spec expands to policies x workloads x agent counts x seeds x
//! overrides; the configurations run in parallel (rayon) with a progress bar; each finished
//! configuration writes one result file atomically (`<out>/configs/<id>.json`), so an interrupted
//! sweep resumes where it stopped (finished configurations are skipped, half-finished ones left no
//! file and are redone); at the end the rows are merged into one CSV. `--shard K/N` runs the
//! configurations whose index is K modulo N (deterministic), and `djinn sweep merge` joins shards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sim::experiment::SimConfig;
use sim::policies::PredictorMode;
use sim::PolicyKind;
use traces::workload::HintSpec;
use traces::WorkloadSpec;

use crate::runio::{load_workload, parse_policy};

#[derive(Args, Debug)]
pub struct SweepArgs {
    #[command(subcommand)]
    pub command: Option<SweepCommand>,
    /// The sweep spec (TOML). See analysis/SWEEPS.md for the format.
    #[arg(value_name = "SPEC")]
    pub spec: Option<PathBuf>,
    /// Output folder: configs/<id>.json per configuration, results.csv (or results-shard-K-of-N.csv).
    #[arg(long, default_value = "results/sweep")]
    pub out: PathBuf,
    /// Run only configurations whose index is K modulo N (0 <= K < N), e.g. `--shard $SLURM_ARRAY_TASK_ID/16`.
    #[arg(long, value_name = "K/N")]
    pub shard: Option<String>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Also write a full run directory per configuration under <out>/runs/<id>/.
    #[arg(long)]
    pub run_dirs: bool,
    /// Print only the plan (configuration count, shard share, already done) and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// No progress bar (logs, batch jobs).
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Subcommand, Debug)]
pub enum SweepCommand {
    /// Join the results of several shards (or output folders) into one CSV.
    Merge(MergeArgs),
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Output folders of the shards (each holding configs/*.json).
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
    /// The merged CSV.
    #[arg(long, default_value = "results/sweep/results.csv")]
    pub out: PathBuf,
    /// The sweep spec: when given, the merge checks every configuration is present.
    #[arg(long)]
    pub spec: Option<PathBuf>,
}

/// A sweep spec as written in TOML.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SweepSpec {
    pub name: String,
    pub policies: Vec<String>,
    pub workloads: Vec<String>,
    pub agents: Vec<u32>,
    pub seeds: Vec<u64>,
    #[serde(default = "default_profile")]
    pub profile: String,
    #[serde(default = "default_slo_ms")]
    pub slo_ms: f64,
    /// Named knob sets; the sweep runs each. Empty = one set of defaults named "base".
    #[serde(default)]
    pub overrides: Vec<Override>,
}

fn default_profile() -> String {
    calibration::DEFAULT_PROFILE.to_string()
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
}

/// What one finished configuration writes (and the merge reads back).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ConfigResult {
    pub config_index: usize,
    pub config_id: String,
    pub override_name: String,
    pub hint: String,
    pub predictor: String,
    pub row: analysis::table::SummaryRow,
}

fn parse_hint(s: &str) -> Result<HintSpec> {
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
    let spec: SweepSpec = toml::from_str(&text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        anyhow::anyhow!(
            "{}: {}{}",
            path.display(),
            line.map(|l| format!("line {l}: ")).unwrap_or_default(),
            e.message()
        )
    })?;
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
    for (i, &n) in spec.agents.iter().enumerate() {
        if n == 0 || n > traces::workload::AGENTS_MAX {
            return fail(
                &format!("agents[{i}]"),
                format!("must be in 1..={}, got {n}", traces::workload::AGENTS_MAX),
            );
        }
    }
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

/// The configurations of a spec, in a fixed order (workload, override, agents, seed, policy).
pub fn expand(spec: &SweepSpec) -> Result<Vec<SweepConfig>> {
    let overrides = if spec.overrides.is_empty() {
        vec![Override {
            name: "base".into(),
            ..Default::default()
        }]
    } else {
        spec.overrides.clone()
    };
    let mut out = Vec::new();
    for w in &spec.workloads {
        let wname = Path::new(w)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| w.clone());
        for o in &overrides {
            for &n in &spec.agents {
                for &seed in &spec.seeds {
                    for p in &spec.policies {
                        let policy = parse_policy(p)?;
                        let index = out.len();
                        let id = format!("{wname}__{}__n{n}__s{seed}__{}", policy.name(), o.name);
                        out.push(SweepConfig {
                            index,
                            id,
                            workload: w.clone(),
                            policy,
                            agents: n,
                            seed,
                            knobs: o.clone(),
                        });
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

fn hint_name(h: &HintSpec) -> String {
    match h {
        HintSpec::Exact => "exact".into(),
        HintSpec::None => "none".into(),
        HintSpec::Noisy { sigma } => format!("noisy:{sigma}"),
    }
}

/// Runs one configuration (simulate + summarize). Returns the result and the run output.
pub fn run_config(
    config: &SweepConfig,
    spec: &WorkloadSpec,
    sim: &SimConfig,
    slo_ms: f64,
) -> Result<(ConfigResult, sim::driver::RunOutput, traces::RunSummary)> {
    let (_, output) = sim::experiment::simulate(spec, Some(config.agents), sim)
        .with_context(|| format!("configuration {}", config.id))?;
    let inputs = analysis::SummaryInputs {
        policy: config.policy.name().into(),
        workload: spec.name.clone(),
        agents: config.agents,
        seed: config.seed,
        turns_planned: output.turns_planned,
        block_bytes: sim.block_bytes(),
        gpu_blocks_total: sim.gpu_blocks(),
        host_blocks_total: sim.host_blocks(),
        slo_ns: (slo_ms * 1e6) as u64,
    };
    let summary = analysis::summarize(&inputs, &output.turns, &output.steps, &output.swaps);
    let result = ConfigResult {
        config_index: config.index,
        config_id: config.id.clone(),
        override_name: config.knobs.name.clone(),
        hint: hint_name(&spec.hint),
        predictor: sim.predictor.name().into(),
        row: analysis::table::SummaryRow::from(&summary),
    };
    Ok((result, output, summary))
}

fn result_path(out: &Path, id: &str) -> PathBuf {
    out.join("configs").join(format!("{id}.json"))
}

/// A finished configuration's result, if its file is there and whole.
fn read_done(path: &Path) -> Option<ConfigResult> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// CSV of results: config columns, then the summary row's columns.
pub fn results_csv(results: &[ConfigResult]) -> Result<Vec<u8>> {
    let rows: Vec<analysis::table::SummaryRow> = results.iter().map(|r| r.row.clone()).collect();
    let body = traces::io::csv_bytes(&rows)?;
    let text = String::from_utf8(body)?;
    let mut lines = text.lines();
    let mut out = String::new();
    let header = lines.next().unwrap_or("");
    out.push_str("config_index,config_id,override,hint,predictor,");
    out.push_str(header);
    out.push('\n');
    for (r, line) in results.iter().zip(lines) {
        out.push_str(&format!(
            "{},{},{},{},{},{}\n",
            r.config_index, r.config_id, r.override_name, r.hint, r.predictor, line
        ));
    }
    Ok(out.into_bytes())
}

pub fn run(args: SweepArgs) -> Result<()> {
    if let Some(SweepCommand::Merge(m)) = args.command {
        return merge(m);
    }
    let spec_path = args.spec.clone().context(
        "a sweep spec is required: djinn sweep SPEC.toml (or djinn sweep merge DIRS...)",
    )?;
    let spec = read_spec(&spec_path)?;
    let configs = expand(&spec)?;
    let (shard_k, shard_n) = match &args.shard {
        Some(s) => parse_shard(s)?,
        None => (0, 1),
    };
    let mine: Vec<SweepConfig> = configs
        .iter()
        .filter(|c| c.index % shard_n == shard_k)
        .cloned()
        .collect();
    let profile = calibration::load_profile(&spec.profile)?;
    let mut specs = BTreeMap::new();
    for w in &spec.workloads {
        specs.insert(
            w.clone(),
            load_workload(w)
                .with_context(|| format!("{}: field `workloads`", spec_path.display()))?,
        );
    }
    // Validate every configuration before running any (bad overrides fail fast, nothing written).
    let resolved: Vec<(SweepConfig, WorkloadSpec, SimConfig)> = mine
        .iter()
        .map(|c| resolve(c, &profile, &specs).map(|(s, sim)| (c.clone(), s, sim)))
        .collect::<Result<_>>()?;
    let todo: Vec<&(SweepConfig, WorkloadSpec, SimConfig)> = resolved
        .iter()
        .filter(|(c, _, _)| read_done(&result_path(&args.out, &c.id)).is_none())
        .collect();
    println!(
        "sweep {}: {} configurations; shard {shard_k}/{shard_n} has {}, {} already done, {} to run",
        spec.name,
        configs.len(),
        mine.len(),
        mine.len() - todo.len(),
        todo.len()
    );
    if args.dry_run {
        return Ok(());
    }
    std::fs::create_dir_all(args.out.join("configs"))
        .with_context(|| format!("creating {}", args.out.display()))?;
    let pool = crate::runio::thread_pool(args.threads)?;
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(todo.len() as u64)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} configs, {per_sec}, ETA {eta_precise} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let started = Instant::now();
    let failures = AtomicUsize::new(0);
    let errors: Vec<String> = pool.install(|| {
        todo.par_iter()
            .filter_map(|(c, s, sim)| {
                let outcome = (|| -> Result<()> {
                    let (result, output, summary) = run_config(c, s, sim, spec.slo_ms)?;
                    if args.run_dirs {
                        let manifest = sim::experiment::manifest(
                            s,
                            c.agents,
                            sim,
                            &crate::runio::code_version(),
                            format!(
                                "djinn sweep {} (configuration {})",
                                spec_path.display(),
                                c.id
                            ),
                        );
                        traces::write_run_dir(
                            &args.out.join("runs").join(&c.id),
                            &manifest,
                            &output.turns,
                            &output.steps,
                            &output.swaps,
                            &summary,
                        )?;
                    }
                    traces::write_json_atomic(&result_path(&args.out, &c.id), &result)?;
                    Ok(())
                })();
                bar.inc(1);
                outcome.err().map(|e| {
                    failures.fetch_add(1, Ordering::Relaxed);
                    format!("{:#}", e)
                })
            })
            .collect()
    });
    bar.finish_and_clear();
    let wall_s = started.elapsed().as_secs_f64();
    println!(
        "ran {} configurations in {:.2} s on {} threads ({:.1} configurations/s)",
        todo.len(),
        wall_s,
        pool.current_num_threads(),
        todo.len() as f64 / wall_s.max(1e-9)
    );
    // Merge what this shard has (including configurations finished by earlier, interrupted runs).
    let mut results: Vec<ConfigResult> = mine
        .iter()
        .filter_map(|c| read_done(&result_path(&args.out, &c.id)))
        .collect();
    results.sort_by_key(|r| r.config_index);
    let csv_name = if shard_n == 1 {
        "results.csv".to_string()
    } else {
        format!("results-shard-{shard_k}-of-{shard_n}.csv")
    };
    traces::write_atomic(&args.out.join(&csv_name), &results_csv(&results)?)?;
    println!(
        "{} rows in {}",
        results.len(),
        args.out.join(&csv_name).display()
    );
    if !errors.is_empty() {
        for e in errors.iter().take(5) {
            eprintln!("failed: {e}");
        }
        bail!(
            "{} of {} configurations failed (rerun to retry them; finished ones are kept)",
            errors.len(),
            todo.len()
        );
    }
    Ok(())
}

fn merge(args: MergeArgs) -> Result<()> {
    let mut by_index: BTreeMap<usize, ConfigResult> = BTreeMap::new();
    for dir in &args.dirs {
        let configs = dir.join("configs");
        let entries = std::fs::read_dir(&configs)
            .with_context(|| format!("reading {}", configs.display()))?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        for p in paths {
            let text =
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            let r: ConfigResult = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a configuration result", p.display()))?;
            if let Some(prev) = by_index.get(&r.config_index) {
                if prev.config_id != r.config_id {
                    bail!("{}: configuration {} is {} here but {} in another shard (different sweep specs?)", p.display(), r.config_index, r.config_id, prev.config_id);
                }
            }
            by_index.insert(r.config_index, r);
        }
    }
    if let Some(spec_path) = &args.spec {
        let configs = expand(&read_spec(spec_path)?)?;
        let missing: Vec<&str> = configs
            .iter()
            .filter(|c| {
                by_index
                    .get(&c.index)
                    .map(|r| r.config_id != c.id)
                    .unwrap_or(true)
            })
            .map(|c| c.id.as_str())
            .collect();
        if !missing.is_empty() {
            bail!(
                "{} of {} configurations missing, e.g. {}",
                missing.len(),
                configs.len(),
                missing
                    .iter()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let results: Vec<ConfigResult> = by_index.into_values().collect();
    traces::write_atomic(&args.out, &results_csv(&results)?)?;
    println!(
        "merged {} configurations from {} folders into {}",
        results.len(),
        args.dirs.len(),
        args.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_spec(dir: &Path, text: &str) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let p = dir.join("sweep.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    const SPEC: &str = r#"
name = "t"
workloads = ["seed-exp1"]
policies = ["djinn", "vllm"]
agents = [2, 3]
seeds = [0, 1]
[[overrides]]
name = "a"
[[overrides]]
name = "b"
hint = "noisy:0.5"
predictor = "ewma"
"#;

    fn args(spec: &Path, out: &Path, shard: Option<&str>) -> SweepArgs {
        SweepArgs {
            command: None,
            spec: Some(spec.to_path_buf()),
            out: out.to_path_buf(),
            shard: shard.map(String::from),
            threads: Some(2),
            run_dirs: false,
            dry_run: false,
            quiet: true,
        }
    }

    #[test]
    fn expansion_is_the_full_product_and_shards_partition_it() {
        let dir = std::env::temp_dir().join(format!("djinn-sweep-expand-{}", std::process::id()));
        let spec = read_spec(&write_spec(&dir, SPEC)).unwrap();
        let configs = expand(&spec).unwrap();
        assert_eq!(configs.len(), 2 * 2 * 2 * 2);
        let ids: std::collections::BTreeSet<&str> = configs.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids.len(), configs.len(), "ids are unique");
        let mut seen = vec![0; configs.len()];
        for k in 0..3 {
            for c in configs.iter().filter(|c| c.index % 3 == k) {
                seen[c.index] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1));
        assert_eq!(parse_shard("2/3").unwrap(), (2, 3));
        assert!(parse_shard("3/3").is_err() && parse_shard("x").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_specs_name_the_field() {
        let dir = std::env::temp_dir().join(format!("djinn-sweep-bad-{}", std::process::id()));
        for (text, field) in [
            (SPEC.replace("\"vllm\"", "\"nope\""), "policies[1]"),
            (SPEC.replace("agents = [2, 3]", "agents = [0]"), "agents[0]"),
            (SPEC.replace("noisy:0.5", "noisy:x"), "overrides[1].hint"),
            (SPEC.replace("seeds = [0, 1]", "seeds = []"), "seeds"),
        ] {
            let e = format!("{:#}", read_spec(&write_spec(&dir, &text)).unwrap_err());
            assert!(e.contains(field) && e.contains("sweep.toml"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn resumes_skipping_finished_configurations_and_shards_merge_to_the_whole() {
        let dir = std::env::temp_dir().join(format!("djinn-sweep-resume-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let spec = write_spec(&dir, SPEC);
        let full = dir.join("full");
        run(args(&spec, &full, None)).unwrap();
        let whole = std::fs::read(full.join("results.csv")).unwrap();
        assert_eq!(String::from_utf8_lossy(&whole).lines().count(), 1 + 16);
        // Interrupt: one configuration never finished (no file); another finished earlier.
        let configs = expand(&read_spec(&spec).unwrap()).unwrap();
        let lost = result_path(&full, &configs[5].id);
        let kept = result_path(&full, &configs[6].id);
        std::fs::remove_file(&lost).unwrap();
        std::fs::write(
            &kept,
            std::fs::read_to_string(&kept)
                .unwrap()
                .replace("\"hint\"", "\"hint\" "),
        )
        .unwrap();
        let marker = std::fs::read(&kept).unwrap();
        run(args(&spec, &full, None)).unwrap();
        assert!(lost.exists(), "the unfinished configuration was redone");
        assert_eq!(
            std::fs::read(&kept).unwrap(),
            marker,
            "a finished configuration is not rerun"
        );
        assert_eq!(std::fs::read(full.join("results.csv")).unwrap(), whole);
        // Three shards into three folders, merged, equal the single run.
        let dirs: Vec<PathBuf> = (0..3).map(|k| dir.join(format!("shard{k}"))).collect();
        for (k, d) in dirs.iter().enumerate() {
            run(args(&spec, d, Some(&format!("{k}/3")))).unwrap();
        }
        let merged = dir.join("merged.csv");
        merge(MergeArgs {
            dirs: dirs.clone(),
            out: merged.clone(),
            spec: Some(spec.clone()),
        })
        .unwrap();
        assert_eq!(std::fs::read(&merged).unwrap(), whole);
        let e = merge(MergeArgs {
            dirs: dirs[..2].to_vec(),
            out: dir.join("partial.csv"),
            spec: Some(spec.clone()),
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("missing"), "{e:#}");
        assert!(
            !dir.join("partial.csv").exists(),
            "no output for an incomplete merge"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
