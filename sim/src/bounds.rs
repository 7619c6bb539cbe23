//! Physical upper bounds on the number of agents a simulated GPU can serve, computed from the
//! profile's cost model and the generated workload, never from a run (formulas and worked
//! examples: docs/bounds.md).
//!
//! Each bound is a necessary condition of "N agents pass": no turn rejected and P99 turn latency
//! <= SLO on every seed. A passing run lets at most `k = turns - ceil(0.99 turns)` turns be late,
//! and a late turn frees its agent from every deadline, so each condition first sets aside the k
//! agents that help the scheduler most. The bound is the largest N (up to the scan's maximum) at
//! which the condition holds on every seed, so a capacity measured at any N above it is
//! impossible in the simulator's physics, whatever the policy.

mod demand;

use traces::{TraceError, WorkloadSpec};

use crate::experiment::SimConfig;
use crate::replay::build_workload;
use demand::{Demand, Physics};

/// The bounds, tightest physics first in the tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoundKind {
    /// Every alive agent's KV stays on the GPU (policies that never swap or drop).
    GpuMemory,
    /// Every alive agent's KV stays on the GPU or the host (policies that never drop).
    GpuHostMemory,
    /// KV that is not on the GPU for a whole pause crosses PCIe out and back (never drop).
    Pcie,
    /// Decode steps read the weights and the resident KV; the batch is what the pool holds.
    Hbm,
    /// Every token computed once at the matmul and attention rates.
    Compute,
    /// Compute plus the cheapest recomputation that fits the KV into GPU + host memory over time.
    Fluid,
}

impl BoundKind {
    pub const ALL: [BoundKind; 6] = [
        BoundKind::GpuMemory,
        BoundKind::GpuHostMemory,
        BoundKind::Pcie,
        BoundKind::Hbm,
        BoundKind::Compute,
        BoundKind::Fluid,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BoundKind::GpuMemory => "gpu-memory",
            BoundKind::GpuHostMemory => "gpu+host-memory",
            BoundKind::Pcie => "pcie",
            BoundKind::Hbm => "hbm",
            BoundKind::Compute => "compute",
            BoundKind::Fluid => "fluid-drops",
        }
    }

    /// True when the bound holds for every policy; the others assume a policy that never drops
    /// KV (and, for `GpuMemory`, never swaps).
    pub fn universal(self) -> bool {
        matches!(self, BoundKind::Hbm | BoundKind::Compute | BoundKind::Fluid)
    }

    pub fn holds_for(self) -> &'static str {
        match self {
            BoundKind::GpuMemory => "policies that never swap or drop (pin)",
            BoundKind::GpuHostMemory | BoundKind::Pcie => "policies that never drop (swap)",
            _ => "every policy",
        }
    }
}

/// One bound: the largest N whose condition held on every seed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bound {
    pub kind: BoundKind,
    /// 0 when even N = 1 fails.
    pub agents: u32,
    /// True when the condition still held at the scan's maximum (the bound is at least that).
    pub capped: bool,
}

/// The bounds of one workload under one configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct BoundsReport {
    pub workload: String,
    pub slo_ms: f64,
    pub first_seed: u64,
    pub seeds: u64,
    pub max_agents: u32,
    pub bounds: Vec<Bound>,
}

impl BoundsReport {
    /// The tightest bound that holds for every policy.
    pub fn binding(&self) -> Option<Bound> {
        self.bounds
            .iter()
            .filter(|b| b.kind.universal())
            .min_by_key(|b| b.agents)
            .copied()
    }

    pub fn get(&self, kind: BoundKind) -> Option<Bound> {
        self.bounds.iter().find(|b| b.kind == kind).copied()
    }

    /// A capacity as a fraction of the binding bound (None when the bound is 0 or capped, i.e.
    /// unknown beyond the scan).
    pub fn fraction(&self, capacity: u32) -> Option<f64> {
        let b = self.binding()?;
        (b.agents > 0 && !b.capped).then(|| capacity as f64 / b.agents as f64)
    }

    /// The printable block: one line per bound, then which binds.
    pub fn render(&self) -> String {
        let mut s = format!(
            "bounds on N (largest N whose necessary condition holds on seeds {}..{}, P99 turn latency <= {:.0} ms; scanned up to {}):\n",
            self.first_seed,
            self.first_seed + self.seeds,
            self.slo_ms,
            self.max_agents
        );
        for b in &self.bounds {
            let n = if b.capped {
                format!(">={}", b.agents)
            } else {
                b.agents.to_string()
            };
            s.push_str(&format!(
                "  {:<16} {:>7}  holds for {}\n",
                b.kind.name(),
                n,
                b.kind.holds_for()
            ));
        }
        match self.binding() {
            Some(b) => s.push_str(&format!(
                "  binding (tightest universal): {} at N {} {}\n",
                b.kind.name(),
                if b.capped { ">=" } else { "=" },
                b.agents
            )),
            None => s.push_str("  binding: none\n"),
        }
        s
    }
}

/// What a bound computation needs besides the workload spec and the configuration.
#[derive(Clone, Copy, Debug)]
pub struct BoundsRequest {
    pub slo_ms: f64,
    /// Seeds first_seed..first_seed + seeds (`djinn capacity` probes 0..seeds).
    pub first_seed: u64,
    pub seeds: u64,
    pub max_agents: u32,
}

/// Evaluates which bound conditions hold at N agents on every seed. `kinds` selects those to
/// evaluate; the others are reported as holding.
fn holds_at(
    spec: &WorkloadSpec,
    physics: &Physics,
    req: &BoundsRequest,
    agents: u32,
    kinds: &[BoundKind],
) -> Result<Vec<bool>, TraceError> {
    let mut ok = vec![true; kinds.len()];
    for seed in req.first_seed..req.first_seed.saturating_add(req.seeds) {
        let workload = build_workload(spec, agents, seed)?;
        let d = Demand::new(&workload, physics, req.slo_ms * 1e6);
        for (i, &kind) in kinds.iter().enumerate() {
            if ok[i] {
                ok[i] = d.holds(kind);
            }
        }
        if ok.iter().all(|o| !o) {
            break;
        }
    }
    Ok(ok)
}

/// Scans N downward from each kind's start; a kind's bound is the first N where it holds.
fn scan(
    spec: &WorkloadSpec,
    physics: &Physics,
    req: &BoundsRequest,
    starts: &[(BoundKind, u32)],
) -> Result<Vec<Bound>, TraceError> {
    let mut found: Vec<Option<u32>> = vec![None; starts.len()];
    let top = starts.iter().map(|s| s.1).max().unwrap_or(0);
    let mut n = top;
    while n >= 1 && found.iter().any(|f| f.is_none()) {
        let pending: Vec<usize> = (0..starts.len())
            .filter(|&i| found[i].is_none() && starts[i].1 >= n)
            .collect();
        if !pending.is_empty() {
            let kinds: Vec<BoundKind> = pending.iter().map(|&i| starts[i].0).collect();
            let ok = holds_at(spec, physics, req, n, &kinds)?;
            for (j, &i) in pending.iter().enumerate() {
                if ok[j] {
                    found[i] = Some(n);
                }
            }
        }
        n -= 1;
    }
    Ok(starts
        .iter()
        .zip(found)
        .map(|(&(kind, _), f)| Bound {
            kind,
            agents: f.unwrap_or(0),
            capped: f == Some(req.max_agents),
        })
        .collect())
}

/// Computes every bound of `spec` under `config` (profile, pools, block size).
pub fn compute(
    spec: &WorkloadSpec,
    config: &SimConfig,
    req: &BoundsRequest,
) -> Result<BoundsReport, TraceError> {
    let physics = Physics::new(config);
    let max = req.max_agents.max(1);
    let req = BoundsRequest {
        max_agents: max,
        seeds: req.seeds.max(1),
        ..*req
    };
    // The fluid condition includes the compute one and GPU memory is a subset of GPU + host, so
    // those two scans start where the looser ones ended.
    let first = scan(
        spec,
        &physics,
        &req,
        &[
            (BoundKind::GpuHostMemory, max),
            (BoundKind::Pcie, max),
            (BoundKind::Hbm, max),
            (BoundKind::Compute, max),
        ],
    )?;
    let start_of = |kind: BoundKind| {
        first
            .iter()
            .find(|b| b.kind == kind)
            .map_or(max, |b| b.agents)
    };
    let mut second = scan(
        spec,
        &physics,
        &req,
        &[
            (BoundKind::GpuMemory, start_of(BoundKind::GpuHostMemory)),
            (BoundKind::Fluid, start_of(BoundKind::Compute)),
        ],
    )?;
    second.extend(first);
    let bounds = BoundKind::ALL
        .iter()
        .filter_map(|k| second.iter().find(|b| b.kind == *k).copied())
        .collect();
    Ok(BoundsReport {
        workload: spec.name.clone(),
        slo_ms: req.slo_ms,
        first_seed: req.first_seed,
        seeds: req.seeds,
        max_agents: max,
        bounds,
    })
}

#[cfg(test)]
mod tests;
