//! `djinn sweep`: a TOML sweep spec expands to policies x workloads x agent counts x seeds x
//! overrides; the configurations run in parallel (rayon) with a progress bar; each finished
//! configuration writes one result file atomically (`<out>/configs/<id>.json`), so an interrupted
//! sweep resumes where it stopped (finished configurations are skipped, half-finished ones left no
//! file and are redone); at the end the rows are merged into one CSV. `--shard K/N` runs the
//! configurations whose index is K modulo N (deterministic), and `djinn sweep merge` joins shards.
//!
//! Resuming is safe only with the same inputs: `<out>/sweep.json` and every result record what
//! produced them (`state`), and a rerun with another spec, profile or workload file is refused.

mod merge;
mod spec;
mod state;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sim::experiment::SimConfig;
use traces::WorkloadSpec;

pub use merge::MergeArgs;
pub use spec::{expand, parse_shard, read_spec, resolve, SweepConfig, SweepSpec};
use state::{FolderState, SweepInputs, SweepManifest};

use crate::runio::inputs::{check_expected, expect_flags, shell_word, Input};
use crate::runio::load_workload_with_inputs;
use crate::runio::profile_args::{check_context, PartNames};

#[derive(Args, Debug)]
pub struct SweepArgs {
    #[command(subcommand)]
    pub command: Option<SweepCommand>,
    /// The sweep spec (TOML). See docs/sweeps.md for the format.
    #[arg(value_name = "SPEC")]
    pub spec: Option<PathBuf>,
    /// Output folder: sweep.json (what produced its results), configs/<id>.json per
    /// configuration, results.csv (or results-shard-K-of-N.csv). Rerunning into it resumes, but
    /// only with the same spec, profile and workload files: otherwise the sweep refuses (naming
    /// what changed) unless --overwrite is given.
    #[arg(long, default_value = "runs/sweep")]
    pub out: PathBuf,
    /// Discard the sweep results in --out that other inputs produced (its sweep.json, configs/,
    /// runs/ and results*.csv), and run every configuration again.
    #[arg(long)]
    pub overwrite: bool,
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
    /// Refuse to run unless FILE's content still has this SHA-256. The reproduce line of a
    /// --run-dirs manifest carries one per input file (spec, workload, profile, trace).
    /// Repeatable.
    #[arg(long = "expect-sha256", value_name = "FILE=SHA256")]
    pub expect_sha256: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum SweepCommand {
    /// Join the results of several shards (or output folders) into one CSV.
    Merge(MergeArgs),
}

/// What one finished configuration writes (and the merge reads back).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ConfigResult {
    pub config_index: usize,
    pub config_id: String,
    pub override_name: String,
    pub hint: String,
    pub predictor: String,
    /// Empty in results written before batch policies were an axis.
    #[serde(default)]
    pub batching: String,
    pub row: analysis::table::SummaryRow,
    /// Fingerprint of the sweep inputs that produced it (`sweep.json`'s `inputs_sha256`); empty
    /// in results written before fingerprints existed.
    #[serde(default)]
    pub inputs_sha256: String,
}

/// The loaded inputs of a sweep: what fixes its results, and the profile and workloads.
pub struct LoadedInputs {
    pub fixed: SweepInputs,
    pub profile: traces::GpuProfile,
    /// By the spec's workload entry.
    pub workloads: BTreeMap<String, WorkloadSpec>,
}

/// Loads the profile and every workload of `spec` (read from `spec_path`) with their hashes.
/// Two entries naming workloads of one `name` are an error: their rows could not be told apart.
pub fn sweep_inputs(spec_path: &Path, spec: &SweepSpec) -> Result<LoadedInputs> {
    let choice = calibration::ProfileChoice {
        profile: spec.profile.as_deref(),
        model: spec.model.as_deref(),
        card: spec.card.as_deref(),
    };
    let file = spec_path.display().to_string();
    let keys = [
        format!("{file}: field `profile`"),
        format!("{file}: field `model`"),
        format!("{file}: field `card`"),
    ];
    let names = PartNames {
        profile: &keys[0],
        model: &keys[1],
        card: &keys[2],
    };
    let resolved = crate::runio::profile_args::resolve(choice, &names)?;
    let profile = resolved.profile;
    let mut inputs = resolved.inputs;
    let mut workloads: BTreeMap<String, WorkloadSpec> = BTreeMap::new();
    for w in &spec.workloads {
        let (loaded, files) = load_workload_with_inputs(w)
            .with_context(|| format!("{}: field `workloads`", spec_path.display()))?;
        if let Some((other, _)) = workloads.iter().find(|(_, s)| s.name == loaded.name) {
            bail!(
                "{}: field `workloads`: `{other}` and `{w}` are both named `{}`; give one another `name`",
                spec_path.display(),
                loaded.name
            );
        }
        check_context(&profile, w, loaded.max_context_tokens)
            .with_context(|| format!("{}: field `workloads`", spec_path.display()))?;
        inputs.extend(files);
        workloads.insert(w.clone(), loaded);
    }
    Ok(LoadedInputs {
        fixed: SweepInputs {
            spec: spec.clone(),
            inputs,
        },
        profile,
        workloads,
    })
}

/// Runs one configuration (simulate + summarize). Returns the result and the run output.
pub fn run_config(
    config: &SweepConfig,
    spec: &WorkloadSpec,
    sim: &SimConfig,
    slo_ms: f64,
    inputs_sha256: &str,
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
        hint: spec::hint_name(&spec.hint),
        predictor: sim.predictor.name().into(),
        batching: sim.sched.batching.name(),
        row: analysis::table::SummaryRow::from(&summary),
        inputs_sha256: inputs_sha256.into(),
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
    out.push_str("config_index,config_id,override,hint,predictor,batching,");
    out.push_str(header);
    out.push('\n');
    for (r, line) in results.iter().zip(lines) {
        out.push_str(&format!(
            "{},{},{},{},{},{},{}\n",
            r.config_index, r.config_id, r.override_name, r.hint, r.predictor, r.batching, line
        ));
    }
    Ok(out.into_bytes())
}

/// One configuration to run, its inputs resolved.
type Job = (SweepConfig, WorkloadSpec, SimConfig);

/// Splits this shard's jobs into those to run and counts the finished ones. A finished result
/// of other inputs is refused, or rerun with `--overwrite`; after a discard nothing is finished.
fn plan_todo<'a>(
    args: &SweepArgs,
    jobs: &'a [Job],
    fingerprint: &str,
    fresh: bool,
) -> Result<Vec<&'a Job>> {
    if fresh {
        return Ok(jobs.iter().collect());
    }
    let mut todo = Vec::new();
    let mut foreign = Vec::new();
    for job in jobs {
        let path = result_path(&args.out, &job.0.id);
        match read_done(&path) {
            Some(r) if r.inputs_sha256 == fingerprint => {}
            Some(_) => {
                foreign.push(path);
                todo.push(job);
            }
            None => todo.push(job),
        }
    }
    if !foreign.is_empty() && !args.overwrite {
        bail!(
            "{} finished configuration(s) in {} were produced by other inputs than {} records (e.g. {}); use another --out, or --overwrite to run them again",
            foreign.len(),
            args.out.join("configs").display(),
            args.out.join(state::MANIFEST).display(),
            foreign[0].display()
        );
    }
    Ok(todo)
}

pub fn run(args: SweepArgs) -> Result<()> {
    if let Some(SweepCommand::Merge(m)) = args.command {
        return merge::merge(m);
    }
    check_expected(&args.expect_sha256)?;
    let spec_path = args.spec.clone().context(
        "a sweep spec is required: djinn sweep SPEC.toml (or djinn sweep merge DIRS...)",
    )?;
    let spec = read_spec(&spec_path)?;
    let configs = expand(&spec)?;
    let (shard_k, shard_n) = match &args.shard {
        Some(s) => parse_shard(s)?,
        None => (0, 1),
    };
    let loaded = sweep_inputs(&spec_path, &spec)?;
    // Validate every configuration before running any (bad overrides fail fast, nothing written).
    let jobs: Vec<Job> = configs
        .iter()
        .filter(|c| c.index % shard_n == shard_k)
        .map(|c| resolve(c, &loaded.profile, &loaded.workloads).map(|(s, sim)| (c.clone(), s, sim)))
        .collect::<Result<_>>()?;
    let fingerprint = loaded.fixed.fingerprint();
    let manifest = SweepManifest {
        tool: "djinn".into(),
        code_version: crate::runio::code_version(),
        spec_path: spec_path.display().to_string(),
        inputs_sha256: fingerprint.clone(),
        fixed_by: loaded.fixed.clone(),
    };
    let folder = state::check_folder(&args.out, &manifest, args.overwrite)?;
    let fresh = matches!(folder, FolderState::Replace { .. });
    let todo = plan_todo(&args, &jobs, &fingerprint, fresh)?;
    println!(
        "sweep {}: {} configurations; shard {shard_k}/{shard_n} has {}, {} already done, {} to run",
        spec.name,
        configs.len(),
        jobs.len(),
        jobs.len() - todo.len(),
        todo.len()
    );
    match &folder {
        FolderState::Ready {
            earlier_code: Some(code),
        } => println!(
            "note: the finished configurations were produced by djinn {code}; this is {}",
            manifest.code_version
        ),
        FolderState::Replace { paths } => println!(
            "--overwrite: discarding the earlier sweep results in {} ({} entries)",
            args.out.display(),
            paths.len()
        ),
        _ => {}
    }
    if args.dry_run {
        return Ok(());
    }
    if let FolderState::Replace { paths } = &folder {
        state::discard(paths)?;
    }
    std::fs::create_dir_all(args.out.join("configs"))
        .with_context(|| format!("creating {}", args.out.display()))?;
    traces::write_json_atomic(&args.out.join(state::MANIFEST), &manifest)?;
    let mut reproduce_inputs = vec![Input::file("sweep spec", &spec_path.display().to_string())?];
    reproduce_inputs.extend(loaded.fixed.inputs.iter().cloned());
    let reproduce = format!(
        "djinn sweep {} --out {}{}",
        shell_word(&spec_path.display().to_string()),
        shell_word(&args.out.display().to_string()),
        expect_flags(&reproduce_inputs)
    );
    let errors = run_todo(&args, &todo, spec.slo_ms, &fingerprint, &reproduce)?;
    // Merge what this shard has (including configurations finished by earlier, interrupted runs).
    let mut results: Vec<ConfigResult> = jobs
        .iter()
        .filter_map(|(c, _, _)| read_done(&result_path(&args.out, &c.id)))
        .filter(|r| r.inputs_sha256 == fingerprint)
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

/// Runs `todo` on the thread pool with a progress bar; returns the failures' messages.
fn run_todo(
    args: &SweepArgs,
    todo: &[&Job],
    slo_ms: f64,
    fingerprint: &str,
    reproduce: &str,
) -> Result<Vec<String>> {
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
    let errors: Vec<String> = pool.install(|| {
        todo.par_iter()
            .filter_map(|(c, s, sim)| {
                let outcome = (|| -> Result<()> {
                    let (result, output, summary) = run_config(c, s, sim, slo_ms, fingerprint)?;
                    if args.run_dirs {
                        let dir = args.out.join("runs").join(&c.id);
                        // A run directory without a result is what an interrupted run of this
                        // very configuration (same inputs: the folder check passed) left; the
                        // rerun writes it again.
                        if dir.exists() {
                            std::fs::remove_dir_all(&dir)
                                .with_context(|| format!("removing {}", dir.display()))?;
                        }
                        let manifest = sim::experiment::manifest(
                            s,
                            c.agents,
                            sim,
                            &crate::runio::code_version(),
                            format!("{reproduce}  # configuration {}", c.id),
                        );
                        crate::runio::write_run(&dir, &manifest, &output, &summary)?;
                    }
                    traces::write_json_atomic(&result_path(&args.out, &c.id), &result)?;
                    Ok(())
                })();
                bar.inc(1);
                outcome.err().map(|e| format!("{e:#}"))
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
    Ok(errors)
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
            overwrite: false,
            expect_sha256: vec![],
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
        // A batching axis multiplies the grid and names itself in the ids.
        let axis = SPEC.replace(
            "seeds = [0, 1]",
            "seeds = [0, 1]\nbatching = [\"fill\", \"chunk-512\"]",
        );
        let configs = expand(&read_spec(&write_spec(&dir, &axis)).unwrap()).unwrap();
        assert_eq!(configs.len(), 2 * 2 * 2 * 2 * 2);
        assert_eq!(configs[0].batching, sim::BatchPolicy::Fill);
        assert!(configs.iter().any(|c| c.id.ends_with("__a__chunk-512")));
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
            (
                SPEC.replace("seeds = [0, 1]", "seeds = [0, 1]\nbatching = [\"chunk-0\"]"),
                "batching[0]",
            ),
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
        merge::merge(MergeArgs {
            dirs: dirs.clone(),
            out: merged.clone(),
            overwrite: false,
            spec: Some(spec.clone()),
        })
        .unwrap();
        assert_eq!(std::fs::read(&merged).unwrap(), whole);
        let e = merge::merge(MergeArgs {
            dirs: dirs[..2].to_vec(),
            out: dir.join("partial.csv"),
            overwrite: false,
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
