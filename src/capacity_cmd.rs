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
use traces::WorkloadSpec;

use crate::runio::outdir::check_new_file;
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
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Smallest N tried.
    #[arg(long, default_value_t = 8)]
    pub min_agents: u32,
    /// Largest N tried.
    #[arg(long, default_value_t = 1024)]
    pub max_agents: u32,
    #[arg(long, default_value = calibration::DEFAULT_PROFILE)]
    pub profile: String,
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
    /// The largest N that passed (0: even the smallest failed).
    pub capacity_agents: u32,
    /// True when `max_agents` passed (the capacity is at least that).
    pub capped: bool,
    /// Worst P99 over seeds at the capacity, ms.
    pub p99_ms_at_capacity: f64,
    /// The smallest failing N found, and why it failed.
    pub first_failing_agents: u32,
    pub failure: String,
    pub probes: u32,
    /// The capacity over the tightest bound that holds for every policy (sim::bounds); empty
    /// when that bound is unknown (beyond --max-agents, or under the TTFT metric).
    pub fraction_of_binding_bound: Option<f64>,
}

/// One probe's verdict: worst P99 over seeds and the rejections seen.
struct Probe {
    p99_ms: f64,
    rejected: u64,
}

fn percentile_ms(mut v: Vec<u64>, p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    analysis::percentile(&v, p) as f64 / 1e6
}

fn probe(
    spec: &WorkloadSpec,
    base: &SimConfig,
    policy: PolicyKind,
    agents: u32,
    seeds: u64,
    metric: CapacityMetric,
) -> Result<Probe> {
    let mut worst = Probe {
        p99_ms: 0.0,
        rejected: 0,
    };
    for seed in 0..seeds {
        let mut config = base.clone();
        config.policy = policy;
        config.seed = seed;
        let (_, out) =
            sim::experiment::simulate(spec, Some(agents), &config).with_context(|| {
                format!(
                    "{} / {} / {agents} agents / seed {seed}",
                    spec.name,
                    policy.name()
                )
            })?;
        let rejected = out.turns.iter().filter(|t| t.rejected).count() as u64;
        let values: Vec<u64> = out
            .turns
            .iter()
            .filter(|t| !t.rejected)
            .filter_map(|t| match metric {
                CapacityMetric::TurnP99 => t.finished_ns.map(|f| f - t.arrival_ns),
                CapacityMetric::TtftAfterPauseP99 => (t.turn_index > 0)
                    .then_some(t.first_token_ns.map(|f| f - t.arrival_ns))
                    .flatten(),
            })
            .collect();
        worst.p99_ms = worst.p99_ms.max(percentile_ms(values, 99.0));
        worst.rejected += rejected;
    }
    Ok(worst)
}

/// Doubling then bisection over N.
fn search(
    spec: &WorkloadSpec,
    base: &SimConfig,
    policy: PolicyKind,
    args: &CapacityArgs,
    slo_ms: f64,
) -> Result<CapacityRow> {
    let mut probes = 0u32;
    let mut cache: BTreeMap<u32, (bool, f64, String)> = BTreeMap::new();
    let mut test = |n: u32, probes: &mut u32| -> Result<(bool, f64, String)> {
        if let Some(v) = cache.get(&n) {
            return Ok(v.clone());
        }
        *probes += 1;
        let p = probe(spec, base, policy, n, args.seeds, args.metric)?;
        let verdict = if p.rejected > 0 {
            (
                false,
                p.p99_ms,
                format!("{} turns rejected (out of memory)", p.rejected),
            )
        } else if p.p99_ms > slo_ms {
            (false, p.p99_ms, format!("P99 {:.0} ms > SLO", p.p99_ms))
        } else {
            (true, p.p99_ms, String::new())
        };
        cache.insert(n, verdict.clone());
        Ok(verdict)
    };
    let (mut lo, mut lo_p99) = (0u32, 0.0f64);
    let mut hi: Option<(u32, String)> = None;
    let mut n = args.min_agents.max(1);
    loop {
        let (ok, p99, why) = test(n, &mut probes)?;
        if ok {
            lo = n;
            lo_p99 = p99;
            if n >= args.max_agents {
                break;
            }
            n = (n * 2).min(args.max_agents);
        } else {
            hi = Some((n, why));
            break;
        }
    }
    if let Some((mut h, mut why)) = hi.clone() {
        while h - lo > 1 {
            let mid = lo + (h - lo) / 2;
            let (ok, p99, w) = test(mid, &mut probes)?;
            if ok {
                lo = mid;
                lo_p99 = p99;
            } else {
                h = mid;
                why = w;
            }
        }
        hi = Some((h, why));
    }
    Ok(CapacityRow {
        workload: spec.name.clone(),
        batching: base.sched.batching.name(),
        policy: policy.name().into(),
        metric: format!("{:?}", args.metric),
        slo_ms,
        seeds: args.seeds,
        capacity_agents: lo,
        capped: hi.is_none(),
        p99_ms_at_capacity: lo_p99,
        first_failing_agents: hi.as_ref().map_or(0, |h| h.0),
        failure: hi.map_or_else(
            || format!("passed at max_agents {}", args.max_agents),
            |h| h.1,
        ),
        probes,
        fraction_of_binding_bound: None,
    })
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
        || args.min_agents == 0
        || args.min_agents > args.max_agents
        || args.max_agents > traces::workload::AGENTS_MAX
    {
        bail!(
            "need --seeds >= 1 and 1 <= --min-agents <= --max-agents <= {}",
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
    let mut base = SimConfig::new(PolicyKind::Pin, calibration::load_profile(&args.profile)?);
    base.predictor = sim::policies::PredictorMode::parse(&args.predictor).context("--predictor")?;
    base.sched.batching = args.batching;
    let specs: Vec<WorkloadSpec> = load_workloads(&workloads)?
        .into_iter()
        .map(|(spec, _)| spec)
        .collect();
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
                let r = search(&specs[w], &base, p, &args, args.slo_ms);
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
        "== {}: capacity = largest N with {} <= {:.0} ms and no rejected turn, every seed of {} (profile {}, batch policy {})",
        spec.name,
        match args.metric {
            CapacityMetric::TurnP99 => "P99 turn latency",
            CapacityMetric::TtftAfterPauseP99 => "P99 TTFT after a pause",
        },
        args.slo_ms,
        args.seeds,
        base.profile.name,
        base.sched.batching.name()
    );
    println!("{}", pin_arithmetic(spec, base));
    println!(
        "{:<20} {:>9} {:>12} {:>10}  first failure",
        "policy", "capacity", "p99 ms at N", "probes"
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
        let fail = if r.capped {
            r.failure.clone()
        } else {
            format!("N={}: {}", r.first_failing_agents, r.failure)
        };
        println!(
            "{:<20} {:>9} {:>12.0} {:>10}  {}",
            r.policy, cap, r.p99_ms_at_capacity, r.probes, fail
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
            min_agents: 16,
            max_agents: 256,
            profile: calibration::DEFAULT_PROFILE.into(),
            predictor: "hint".into(),
            batching: sim::BatchPolicy::default(),
            out: PathBuf::new(),
            overwrite: false,
            threads: Some(1),
        };
        let row = search(&spec, &base, PolicyKind::Pin, &args, args.slo_ms).unwrap();
        assert_eq!(row.capacity_agents, predicted, "{text}\n{row:?}");
        assert!(row.failure.contains("rejected"), "{row:?}");
    }
}
