//! `djinn capacity`: per policy, the largest number of agents the simulated GPU serves within a
//! latency SLO. A probe at N runs every seed; N passes when, for every seed, no turn was rejected
//! and the chosen P99 (turn latency, or time to first token of turns after a pause) is at most the
//! SLO. The search doubles N until a probe fails, then bisects between the last pass and the first
//! failure. Prints a table (with the `pin` pool arithmetic where the workload allows it) and
//! writes a CSV.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use rayon::prelude::*;
use serde::Serialize;
use sim::experiment::SimConfig;
use sim::PolicyKind;
use traces::workload::Distribution;
use traces::workload::HintSpec;
use traces::WorkloadSpec;

use crate::runio::outdir::check_new_file;
use crate::runio::profile_args::{check_context, ProfileArgs};
use crate::runio::{load_workloads, parse_policy};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CapacityMetric {
    /// P99 of whole-turn latency (arrival to last token).
    TurnP99,
    /// P99 time to first token of turns that follow a pause (the agent's wait when it comes back).
    TtftAfterPauseP99,
}

#[derive(Args, Debug)]
pub struct CapacityArgs {
    /// Workloads (shipped names or spec paths). Default: seed-cliff, agents-capacity, swe-agent.
    #[arg(long = "workload", short = 'w')]
    pub workloads: Vec<String>,
    /// Policies (repeat), or `all`. Default: all.
    #[arg(long = "policy", short = 'p')]
    pub policies: Vec<String>,
    /// The latency SLO, ms.
    #[arg(long, default_value_t = 5000.0)]
    pub slo_ms: f64,
    /// Which P99 must stay under the SLO.
    #[arg(long, value_enum, default_value_t = CapacityMetric::TurnP99)]
    pub metric: CapacityMetric,
    /// Seeds per probe (0..seeds); N passes only if every seed passes.
    #[arg(long, default_value_t = 5)]
    pub seeds: u64,
    /// N probed evenly between the last pass and the first failure of the doubling phase, before
    /// bisecting (more points expose more of a curve that is not monotone).
    #[arg(long, default_value_t = 6)]
    pub scan_points: u32,
    /// N probed above the result (capacity + 2, + 4, + 8, ...): a pass there is reported as a
    /// place where the curve is not monotone.
    #[arg(long, default_value_t = 3)]
    pub confirm_points: u32,
    /// Smallest N tried.
    #[arg(long, default_value_t = 8)]
    pub min_agents: u32,
    /// Largest N tried.
    #[arg(long, default_value_t = 1024)]
    pub max_agents: u32,
    #[command(flatten)]
    pub gpu: ProfileArgs,
    /// Override what the scheduler is told about pauses (default: each workload's own `[hint]`).
    #[arg(long, value_enum)]
    pub hint: Option<crate::simulate_cmd::HintOverride>,
    /// Log-normal sigma of the hint noise (implies --hint noisy when given alone).
    #[arg(long)]
    pub hint_sigma: Option<f64>,
    /// What hint-using policies do with hints (hint, ewma, none).
    #[arg(long, default_value = "hint", value_parser = ["hint", "ewma", "none"])]
    pub predictor: String,
    /// How every policy's steps are filled with prefill after their decodes: `fill` (the whole
    /// token budget, as vLLM), `chunk-N` (at most N prefill tokens per step) or `stall-free` (the
    /// compute a memory-bound decode step leaves idle, at least 1,024 tokens). One batch policy
    /// for all, so policies differ only in KV placement. Default chunk-1024: the capacity of djinn,
    /// vllm, swap and next-use on seed-cliff, agents-capacity and swe-agent is the best or within
    /// 1.2% of the best under it (docs/policies-and-workloads.md).
    #[arg(long, default_value = sim::policies::batching::DEFAULT_BATCHING_NAME, value_parser = sim::BatchPolicy::parse)]
    pub batching: sim::BatchPolicy,
    /// CSV output. An existing file is never replaced silently: the command refuses (before any
    /// probe runs) unless --overwrite is given.
    #[arg(long, default_value = "runs/capacity.csv")]
    pub out: PathBuf,
    /// Replace an existing --out file.
    #[arg(long)]
    pub overwrite: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CapacityRow {
    pub workload: String,
    pub policy: String,
    pub metric: String,
    pub slo_ms: f64,
    pub seeds: u64,
    /// The batch policy every probe ran under.
    pub batching: String,
    /// What the scheduler was told about pauses (the workload's hint, or the override).
    pub hint: String,
    /// The largest N such that every probed N up to it passed (0: even the smallest failed).
    pub capacity_agents: u32,
    /// True when `max_agents` passed (the capacity is at least that).
    pub capped: bool,
    /// P99 at the capacity over the seeds, ms: worst (the verdict), median and best seed.
    pub p99_ms_at_capacity: f64,
    pub p99_ms_at_capacity_median: f64,
    pub p99_ms_at_capacity_best: f64,
    /// The smallest failing N found, and why it failed.
    pub first_failing_agents: u32,
    pub failure: String,
    /// Probed N above the first failure that passed again (the curve is not monotone there),
    /// separated by `;`. Empty when every probe above the first failure failed.
    pub non_monotone_passes: String,
    pub probes: u32,
    /// The capacity over the tightest bound that holds for every policy (sim::bounds); empty
    /// when that bound is unknown (beyond --max-agents, or under the TTFT metric).
    pub fraction_of_binding_bound: Option<f64>,
}

/// One probe's verdict over every seed.
#[derive(Clone, Debug)]
struct Probe {
    passed: bool,
    /// P99 per seed, ms, in seed order.
    p99_ms_by_seed: Vec<f64>,
    why: String,
}

impl Probe {
    fn worst_ms(&self) -> f64 {
        self.p99_ms_by_seed.iter().copied().fold(0.0, f64::max)
    }
    fn best_ms(&self) -> f64 {
        self.p99_ms_by_seed
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
    }
    fn median_ms(&self) -> f64 {
        let mut v = self.p99_ms_by_seed.clone();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }
}

fn percentile_ms(mut v: Vec<u64>, p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    analysis::percentile(&v, p) as f64 / 1e6
}

/// Runs every seed at `agents`: the probe passes when no seed rejected a turn and every seed's P99
/// is within the SLO.
fn probe(
    spec: &WorkloadSpec,
    base: &SimConfig,
    policy: PolicyKind,
    agents: u32,
    args: &CapacityArgs,
) -> Result<Probe> {
    let mut p99_ms_by_seed = Vec::with_capacity(args.seeds as usize);
    let mut rejected = 0u64;
    for seed in 0..args.seeds {
        let mut config = base.clone();
        config.policy = policy;
        config.seed = seed;
        // A probe needs the turns' latencies only (exact, for the exact P99), not every record.
        config.recording = sim::driver::Recording::Latencies;
        let (_, out) =
            sim::experiment::simulate(spec, Some(agents), &config).with_context(|| {
                format!(
                    "{} / {} / {agents} agents / seed {seed}",
                    spec.name,
                    policy.name()
                )
            })?;
        rejected += out.turns_rejected;
        let latencies = out.turn_latencies;
        let values = match args.metric {
            CapacityMetric::TurnP99 => latencies.turn_ns,
            CapacityMetric::TtftAfterPauseP99 => latencies.ttft_after_pause_ns,
        };
        p99_ms_by_seed.push(percentile_ms(values, 99.0));
    }
    let mut probe = Probe {
        passed: false,
        p99_ms_by_seed,
        why: String::new(),
    };
    if rejected > 0 {
        probe.why = format!("{rejected} turns rejected (out of memory)");
    } else if probe.worst_ms() > args.slo_ms {
        probe.why = format!("P99 {:.0} ms > SLO", probe.worst_ms());
    } else {
        probe.passed = true;
    }
    Ok(probe)
}

/// The probes of one search, by N.
struct Probes<F: FnMut(u32) -> Result<Probe>> {
    run_probe: F,
    by_agents: BTreeMap<u32, Probe>,
}

impl<F: FnMut(u32) -> Result<Probe>> Probes<F> {
    fn passes(&mut self, agents: u32) -> Result<bool> {
        if !self.by_agents.contains_key(&agents) {
            let p = (self.run_probe)(agents)?;
            self.by_agents.insert(agents, p);
        }
        Ok(self.by_agents[&agents].passed)
    }

    /// The largest probed N such that every probed N up to it passed (0 if the smallest failed),
    /// and the smallest probed failing N.
    fn frontier(&self) -> (u32, Option<u32>) {
        frontier(&self.by_agents)
    }
}

/// Scan, then refine. 1. Double N from `--min-agents` until a probe fails (or `--max-agents`
/// passes). 2. Scan `--scan-points` evenly spaced N between the last pass and that failure. 3.
/// Bisect between the largest N below which every probe passed and the next probe (a failure). 4.
/// Probe `--confirm-points` N above the result (+2, +4, +8, ...) to expose a curve that is not
/// monotone. The capacity is the largest N such that every probed N up to it passed; probes above
/// the first failure that pass are reported, not taken.
fn search(
    spec: &WorkloadSpec,
    base: &SimConfig,
    policy: PolicyKind,
    args: &CapacityArgs,
) -> Result<CapacityRow> {
    let probes = search_with(args, |n| probe(spec, base, policy, n, args))?;
    Ok(row(spec, base, policy, args, &probes.by_agents))
}

fn search_with<F: FnMut(u32) -> Result<Probe>>(
    args: &CapacityArgs,
    run_probe: F,
) -> Result<Probes<F>> {
    let mut probes = Probes {
        run_probe,
        by_agents: BTreeMap::new(),
    };
    let mut n = args.min_agents.max(1);
    while probes.passes(n)? {
        if n >= args.max_agents {
            break;
        }
        n = n.saturating_mul(2).min(args.max_agents);
    }
    if let (low @ 1.., Some(fail)) = probes.frontier() {
        for k in 1..=args.scan_points {
            let m = low + ((fail - low) as u64 * k as u64 / (args.scan_points as u64 + 1)) as u32;
            if m > low && m < fail {
                probes.passes(m)?;
            }
        }
    }
    // Bisect; capacity 0 means `--min-agents` itself failed: nothing below it is searched.
    while let (capacity, Some(fail)) = probes.frontier() {
        if capacity == 0 || fail - capacity <= 1 {
            break;
        }
        probes.passes(capacity + (fail - capacity) / 2)?;
    }
    let (capacity, _) = probes.frontier();
    if capacity > 0 && capacity < args.max_agents {
        for k in 1..=args.confirm_points {
            let m = capacity.saturating_add(1u32 << k).min(args.max_agents);
            probes.passes(m)?;
        }
    }
    Ok(probes)
}

/// The largest N such that every probed N up to it passed, and the smallest failing N.
fn frontier(by_agents: &BTreeMap<u32, Probe>) -> (u32, Option<u32>) {
    let mut capacity = 0;
    for (&n, p) in by_agents {
        if !p.passed {
            return (capacity, Some(n));
        }
        capacity = n;
    }
    (capacity, None)
}

fn row(
    spec: &WorkloadSpec,
    base: &SimConfig,
    policy: PolicyKind,
    args: &CapacityArgs,
    by_agents: &BTreeMap<u32, Probe>,
) -> CapacityRow {
    let (capacity, fail) = frontier(by_agents);
    let at = by_agents.get(&capacity);
    let non_monotone: Vec<String> = match fail {
        Some(f) => by_agents
            .range(f..)
            .filter(|(_, p)| p.passed)
            .map(|(n, _)| n.to_string())
            .collect(),
        None => Vec::new(),
    };
    CapacityRow {
        workload: spec.name.clone(),
        policy: policy.name().into(),
        metric: format!("{:?}", args.metric),
        slo_ms: args.slo_ms,
        seeds: args.seeds,
        batching: base.sched.batching.name(),
        hint: hint_name(&spec.hint),
        capacity_agents: capacity,
        capped: fail.is_none(),
        p99_ms_at_capacity: at.map_or(0.0, Probe::worst_ms),
        p99_ms_at_capacity_median: at.map_or(0.0, Probe::median_ms),
        p99_ms_at_capacity_best: at.map_or(0.0, Probe::best_ms),
        first_failing_agents: fail.unwrap_or(0),
        failure: match fail {
            Some(f) => by_agents[&f].why.clone(),
            None => format!("passed at max_agents {}", args.max_agents),
        },
        non_monotone_passes: non_monotone.join(";"),
        probes: by_agents.len() as u32,
        fraction_of_binding_bound: None,
    }
}

fn hint_name(hint: &HintSpec) -> String {
    match hint {
        HintSpec::Exact => "exact".into(),
        HintSpec::Noisy { sigma } => format!("noisy-{sigma}"),
        HintSpec::None => "none".into(),
    }
}

fn constant(d: &Distribution) -> Option<u32> {
    match d {
        Distribution::Constant { value } => Some(value.round() as u32),
        _ => None,
    }
}

/// The `pin` pool arithmetic for a workload whose agents all run the same constant 2-turn program
/// and are alive together (seed-cliff): every paused agent holds its whole context.
pub fn pin_arithmetic(spec: &WorkloadSpec, config: &SimConfig) -> String {
    let p = &config.profile;
    let usable = p.gpu_memory_bytes as f64 * config.gpu_memory_utilization
        - p.weight_bytes as f64
        - p.workspace_reserve_bytes as f64;
    let blocks = config.gpu_blocks();
    let bs = config.block_size_tokens;
    let mut s = format!(
        "pool: ({:.2} GiB x {} - weights {:.2} GiB - workspace {:.2} GiB) = {:.2} GiB / {} KiB per token = {} blocks x {bs} = {} tokens",
        p.gpu_memory_bytes as f64 / (1u64 << 30) as f64,
        config.gpu_memory_utilization,
        p.weight_bytes as f64 / (1u64 << 30) as f64,
        p.workspace_reserve_bytes as f64 / (1u64 << 30) as f64,
        usable / (1u64 << 30) as f64,
        p.kv_bytes_per_token / 1024,
        blocks,
        blocks as u64 * bs as u64
    );
    let a = &spec.agent;
    if let (Some(2), Some(prompt), Some(new), Some(generated)) = (
        constant(&a.turns),
        constant(&a.first_prompt_tokens),
        constant(&a.new_tokens),
        constant(&a.generated_tokens),
    ) {
        // The last generated token of a turn has no KV yet.
        let held = prompt + generated - 1;
        let held_blocks = held.div_ceil(bs);
        let peak = prompt + generated + new + generated - 1;
        let peak_blocks = peak.div_ceil(bs);
        // All first turns must fit while the others hold their pause context, and the first
        // returning agent must grow to its peak while N-1 others stay paused.
        let n_first = blocks / held_blocks;
        let n_second = (blocks - peak_blocks) / held_blocks + 1;
        let n = n_first.min(n_second);
        s.push_str(&format!(
            "\n  pin: a paused agent holds {held} tokens = {held_blocks} blocks ({:.2} GiB); a returning agent grows to {peak} tokens = {peak_blocks} blocks; \
             N x {held_blocks} <= {blocks} gives N <= {n_first}; (N-1) x {held_blocks} + {peak_blocks} <= {blocks} gives N <= {n_second}: pin serves at most N = {n} agents alive together",
            held_blocks as f64 * config.block_bytes() as f64 / (1u64 << 30) as f64
        ));
    }
    s
}

pub fn run(args: CapacityArgs) -> Result<()> {
    if !(args.slo_ms.is_finite() && args.slo_ms > 0.0) {
        bail!("--slo-ms must be a finite number > 0, got {}", args.slo_ms);
    }
    if args.seeds == 0
        || args.seeds > 10_000
        || args.scan_points > 64
        || args.confirm_points > 16
        || args.min_agents == 0
        || args.min_agents > args.max_agents
        || args.max_agents > traces::workload::AGENTS_MAX
    {
        bail!(
            "need 1 <= --seeds <= 10000, --scan-points <= 64, --confirm-points <= 16 and 1 <= --min-agents <= --max-agents <= {}",
            traces::workload::AGENTS_MAX
        );
    }
    let workloads = if args.workloads.is_empty() {
        vec![
            "seed-cliff".into(),
            "agents-capacity".into(),
            "swe-agent".into(),
        ]
    } else {
        args.workloads.clone()
    };
    let policies: Vec<PolicyKind> =
        if args.policies.is_empty() || args.policies.iter().any(|p| p == "all") {
            PolicyKind::ALL.to_vec()
        } else {
            args.policies
                .iter()
                .map(|p| parse_policy(p))
                .collect::<Result<_>>()?
        };
    let mut base = SimConfig::new(PolicyKind::Pin, args.gpu.resolve()?.profile);
    base.predictor = sim::policies::PredictorMode::parse(&args.predictor).context("--predictor")?;
    base.sched.batching = args.batching;
    let mut specs: Vec<WorkloadSpec> = load_workloads(&workloads)?
        .into_iter()
        .map(|(spec, _)| spec)
        .collect();
    if let Some(hint) = crate::simulate_cmd::hint_override(args.hint, args.hint_sigma) {
        for spec in &mut specs {
            spec.hint = hint.clone();
            spec.validate(std::path::Path::new("--hint/--hint-sigma"))?;
        }
    }
    for (name, spec) in workloads.iter().zip(&specs) {
        check_context(&base.profile, name, spec.max_context_tokens)?;
    }
    check_new_file(&args.out, "--out", args.overwrite)?;
    let jobs: Vec<(usize, PolicyKind)> = (0..specs.len())
        .flat_map(|w| policies.iter().map(move |&p| (w, p)))
        .collect();
    let pool = crate::runio::thread_pool(args.threads)?;
    let bar = indicatif::ProgressBar::new(jobs.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} searches, ETA {eta_precise}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let mut rows: Vec<CapacityRow> = pool.install(|| {
        jobs.par_iter()
            .map(|&(w, p)| {
                let r = search(&specs[w], &base, p, &args);
                bar.inc(1);
                r
            })
            .collect::<Result<Vec<_>>>()
    })?;
    bar.finish_and_clear();
    let bounds = attach_bounds(&specs, &base, &args, &mut rows, &pool)?;
    for (spec, bounds) in specs.iter().zip(&bounds) {
        print_table(spec, &base, &args, &rows);
        print_bounds(bounds.as_ref(), &rows);
    }
    // Again: another command may have written it while the probes ran.
    check_new_file(&args.out, "--out", args.overwrite)?;
    traces::write_csv_atomic(&args.out, &rows)?;
    println!("wrote {}", args.out.display());
    Ok(())
}

/// One workload's capacities, largest first, under its `pin` pool arithmetic.
fn print_table(spec: &WorkloadSpec, base: &SimConfig, args: &CapacityArgs, rows: &[CapacityRow]) {
    println!(
        "== {}: capacity = largest N such that every probed N up to it had {} <= {:.0} ms and no rejected turn on every seed of {} (profile {}, batch policy {}, hint {}, predictor {})",
        spec.name,
        match args.metric {
            CapacityMetric::TurnP99 => "P99 turn latency",
            CapacityMetric::TtftAfterPauseP99 => "P99 TTFT after a pause",
        },
        args.slo_ms,
        args.seeds,
        base.profile.name,
        base.sched.batching.name(),
        hint_name(&spec.hint),
        args.predictor,
    );
    println!("{}", pin_arithmetic(spec, base));
    println!(
        "{:<20} {:>9} {:>26} {:>7}  first failure; N passing above it (not monotone)",
        "policy", "capacity", "p99 ms at N: worst/med/best", "probes"
    );
    let mut mine: Vec<&CapacityRow> = rows.iter().filter(|r| r.workload == spec.name).collect();
    mine.sort_by(|a, b| {
        b.capacity_agents
            .cmp(&a.capacity_agents)
            .then(a.p99_ms_at_capacity.total_cmp(&b.p99_ms_at_capacity))
    });
    for r in mine {
        let cap = if r.capped {
            format!(">={}", r.capacity_agents)
        } else {
            r.capacity_agents.to_string()
        };
        let mut fail = if r.capped {
            r.failure.clone()
        } else {
            format!("N={}: {}", r.first_failing_agents, r.failure)
        };
        if !r.non_monotone_passes.is_empty() {
            fail.push_str(&format!(
                "; passes again at N={}",
                r.non_monotone_passes.replace(';', ",")
            ));
        }
        let spread = format!(
            "{:.0}/{:.0}/{:.0}",
            r.p99_ms_at_capacity, r.p99_ms_at_capacity_median, r.p99_ms_at_capacity_best
        );
        println!(
            "{:<20} {:>9} {:>26} {:>7}  {}",
            r.policy, cap, spread, r.probes, fail
        );
    }
    println!();
}

/// Computes each workload's bounds (sim::bounds) over the seeds and N range the search probed,
/// and fills each row's fraction of the binding bound. The bounds are derived for the turn-P99
/// metric only: under another metric there are none.
fn attach_bounds(
    specs: &[WorkloadSpec],
    base: &SimConfig,
    args: &CapacityArgs,
    rows: &mut [CapacityRow],
    pool: &rayon::ThreadPool,
) -> Result<Vec<Option<sim::bounds::BoundsReport>>> {
    if args.metric != CapacityMetric::TurnP99 {
        return Ok(specs.iter().map(|_| None).collect());
    }
    let req = sim::bounds::BoundsRequest {
        slo_ms: args.slo_ms,
        first_seed: 0,
        seeds: args.seeds,
        max_agents: args.max_agents,
    };
    let reports: Vec<sim::bounds::BoundsReport> = pool.install(|| {
        specs
            .par_iter()
            .map(|spec| {
                sim::bounds::compute(spec, base, &req)
                    .with_context(|| format!("bounds of {}", spec.name))
            })
            .collect::<Result<_>>()
    })?;
    for row in rows.iter_mut() {
        if let Some(r) = reports.iter().find(|r| r.workload == row.workload) {
            row.fraction_of_binding_bound = r.fraction(row.capacity_agents);
        }
    }
    Ok(reports.into_iter().map(Some).collect())
}

/// The bounds block under a workload's table, and each policy's capacity over the binding bound.
fn print_bounds(report: Option<&sim::bounds::BoundsReport>, rows: &[CapacityRow]) {
    let Some(report) = report else {
        println!("bounds: derived for the turn-P99 metric only\n");
        return;
    };
    print!("{}", report.render());
    let mut mine: Vec<&CapacityRow> = rows
        .iter()
        .filter(|r| r.workload == report.workload)
        .collect();
    mine.sort_by(|a, b| b.capacity_agents.cmp(&a.capacity_agents));
    let cells: Vec<String> = mine
        .iter()
        .map(|r| match r.fraction_of_binding_bound {
            Some(f) => format!("{} {:.2}", r.policy, f),
            None => format!("{} -", r.policy),
        })
        .collect();
    println!("  capacity / binding bound: {}\n", cells.join(", "));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_args(min_agents: u32, max_agents: u32) -> CapacityArgs {
        CapacityArgs {
            workloads: vec![],
            policies: vec![],
            slo_ms: 5000.0,
            metric: CapacityMetric::TurnP99,
            seeds: 5,
            scan_points: 6,
            confirm_points: 3,
            hint: None,
            hint_sigma: None,
            min_agents,
            max_agents,
            gpu: ProfileArgs::default(),
            predictor: "hint".into(),
            batching: sim::BatchPolicy::default(),
            out: PathBuf::new(),
            overwrite: false,
            threads: Some(1),
        }
    }

    /// A probe that passes exactly on `pass(n)`.
    fn fake(pass: impl Fn(u32) -> bool) -> impl FnMut(u32) -> Result<Probe> {
        move |n| {
            Ok(Probe {
                passed: pass(n),
                p99_ms_by_seed: vec![n as f64],
                why: "fake".into(),
            })
        }
    }

    #[test]
    fn monotone_curve_gives_its_threshold() {
        for threshold in [8, 9, 100, 173, 511, 512, 1000] {
            let p = search_with(&test_args(8, 1024), fake(|n| n <= threshold)).unwrap();
            assert_eq!(p.frontier(), (threshold, Some(threshold + 1)));
        }
        let p = search_with(&test_args(8, 1024), fake(|_| true)).unwrap();
        assert_eq!(p.frontier(), (1024, None));
        let p = search_with(&test_args(8, 1024), fake(|_| false)).unwrap();
        assert_eq!(p.frontier(), (0, Some(8)));
        assert_eq!(p.by_agents.len(), 1, "nothing below --min-agents is probed");
    }

    #[test]
    fn a_pass_above_a_failure_is_flagged_not_taken() {
        // Passes below 300 and again at 360..=370, where the scan between 256 (pass) and 512
        // (fail) probes 365: a plain bisection would have walked up from 365.
        let curve = |n: u32| n < 300 || (360..=370).contains(&n);
        let args = test_args(8, 1024);
        let p = search_with(&args, fake(curve)).unwrap();
        let spec = crate::runio::load_workload("seed-cliff").unwrap();
        let base = SimConfig::new(
            PolicyKind::Pin,
            calibration::load_profile("h100-llama2-7b").unwrap(),
        );
        let r = row(&spec, &base, PolicyKind::Pin, &args, &p.by_agents);
        assert_eq!(r.capacity_agents, 299, "{r:?}");
        assert_eq!(r.first_failing_agents, 300);
        assert_eq!(r.non_monotone_passes, "365", "{r:?}");
    }

    #[test]
    fn every_probed_n_up_to_the_capacity_passed_on_random_curves() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for _ in 0..200 {
            // A noisy cliff: passes below `edge`, each N within `noise` of it flips at random.
            let edge: u32 = rng.gen_range(1..1200);
            let noise: u32 = rng.gen_range(0..40);
            let flips: Vec<bool> = (0..1300).map(|_| rng.gen_bool(0.3)).collect();
            let curve = |n: u32| (n < edge) != (n.abs_diff(edge) < noise && flips[n as usize]);
            let p = search_with(&test_args(8, 1024), fake(curve)).unwrap();
            let (capacity, fail) = p.frontier();
            for (&n, probe) in &p.by_agents {
                assert_eq!(probe.passed, curve(n));
                if n <= capacity {
                    assert!(probe.passed, "N={n} <= capacity {capacity} failed");
                }
            }
            match fail {
                Some(f) if capacity > 0 => assert_eq!(f, capacity + 1, "refined to adjacent N"),
                Some(f) => assert_eq!(f, 8),
                None => assert_eq!(capacity, 1024),
            }
        }
    }

    #[test]
    fn pin_capacity_on_seed_cliff_matches_its_pool_arithmetic() {
        let spec = crate::runio::load_workload("seed-cliff").unwrap();
        let base = SimConfig::new(
            PolicyKind::Pin,
            calibration::load_profile("h100-llama2-7b").unwrap(),
        );
        let text = pin_arithmetic(&spec, &base);
        let predicted: u32 = text
            .rsplit("at most N = ")
            .next()
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        // A generous SLO: only memory limits pin.
        let args = CapacityArgs {
            workloads: vec![],
            policies: vec![],
            slo_ms: 600_000.0,
            metric: CapacityMetric::TurnP99,
            seeds: 2,
            scan_points: 6,
            confirm_points: 3,
            hint: None,
            hint_sigma: None,
            min_agents: 16,
            max_agents: 256,
            gpu: ProfileArgs::default(),
            predictor: "hint".into(),
            batching: sim::BatchPolicy::default(),
            out: PathBuf::new(),
            overwrite: false,
            threads: Some(1),
        };
        let row = search(&spec, &base, PolicyKind::Pin, &args).unwrap();
        assert_eq!(row.capacity_agents, predicted, "{text}\n{row:?}");
        assert!(row.failure.contains("rejected"), "{row:?}");
    }
}
