//! Per-turn and per-pause demand of a generated workload in the cost model's units, and the
//! necessary conditions each bound checks on it (docs/bounds.md derives each one).
//!
//! Times are f64 nanoseconds. A turn of an agent that meets the SLO on every turn ends by its
//! deadline `arrival + (i + 1) x SLO + pauses before it`; its GPU work lies in [0, deadline].

use crate::experiment::SimConfig;
use crate::workload::Workload;

use super::BoundKind;

/// The cost model's constants, per token and per step.
#[derive(Clone, Copy, Debug)]
pub struct Physics {
    pub gpu_blocks: f64,
    pub host_blocks: f64,
    pub block_tokens: f64,
    pub kv_bytes_per_token: f64,
    /// Bytes per ns.
    pub memory_bandwidth: f64,
    pub weight_read_ns: f64,
    pub step_overhead_ns: f64,
    /// Per sequence of a step, less the half nanosecond a step's rounding can take away.
    pub slot_ns: f64,
    /// Matmul time of one token.
    pub token_ns: f64,
    /// Attention time of one query-key pair.
    pub pair_ns: f64,
    /// The slower PCIe direction, bytes per ns.
    pub pcie_bandwidth: f64,
    /// The cost form's share of the smaller of memory and compute time that does not overlap:
    /// `max(m, c) + f min(m, c)` is at least both `m + f c` and `c + f m`, so each time bound
    /// adds `f` times the other's per-token time.
    pub serial_fraction: f64,
}

impl Physics {
    pub fn new(config: &SimConfig) -> Self {
        let p = &config.profile;
        let c = &p.cost;
        let bw = c.memory_bandwidth_bytes_per_s / 1e9;
        Physics {
            gpu_blocks: config.gpu_blocks() as f64,
            host_blocks: config.host_blocks() as f64,
            block_tokens: config.block_size_tokens.max(1) as f64,
            kv_bytes_per_token: p.kv_bytes_per_token as f64,
            memory_bandwidth: bw,
            weight_read_ns: p.weight_bytes as f64 / bw,
            step_overhead_ns: c.step_overhead_ns,
            slot_ns: (c.per_sequence_ns - 0.5).max(0.0),
            token_ns: c.flops_per_token / c.matmul_flops_per_s * 1e9,
            pair_ns: c.attention_flops_per_pair / c.attention_flops_per_s * 1e9,
            pcie_bandwidth: p
                .host_to_device
                .bandwidth_bytes_per_s
                .min(p.device_to_host.bandwidth_bytes_per_s)
                / 1e9,
            serial_fraction: c.serial_fraction,
        }
    }

    /// Compute time of the tokens at positions [from, to): each attends to its position + 1.
    pub fn compute_ns(&self, from: u64, to: u64) -> f64 {
        let n = to.saturating_sub(from) as f64;
        // sum of (p + 1) over p in [from, to)
        let pairs = (to as f64 * (to as f64 + 1.0) - from as f64 * (from as f64 + 1.0)) / 2.0;
        n * self.token_ns + pairs * self.pair_ns
    }

    /// The share of a step's fixed cost a decode at cached context `p` must carry: its blocks
    /// over the pool's, since the decodes of one step hold at most the pool between them.
    fn pool_share(&self, p: u64) -> f64 {
        (p as f64 / self.block_tokens).ceil() / self.gpu_blocks
    }

    fn blocks(&self, tokens: u64) -> u64 {
        (tokens as f64 / self.block_tokens).ceil() as u64
    }
}

/// One turn's least GPU time under each time bound, and its deadline.
#[derive(Clone, Copy, Debug)]
struct TurnDemand {
    deadline: f64,
    compute_ns: f64,
    hbm_ns: f64,
}

/// The KV an agent holds over one pause: `tokens` for `pause_ns`, its next turn due by
/// `next_deadline`.
#[derive(Clone, Copy, Debug)]
struct PauseDemand {
    tokens: u64,
    pause_ns: f64,
    next_deadline: f64,
}

/// A change of the blocks an agent is sure to hold: from `at` on it holds `blocks`.
#[derive(Clone, Copy, Debug)]
struct HoldEvent {
    at: f64,
    agent: usize,
    blocks: u64,
}

pub struct Demand {
    physics: Physics,
    turns: Vec<TurnDemand>,
    pauses: Vec<PauseDemand>,
    holds: Vec<HoldEvent>,
    /// Per agent totals, to set aside the k most helpful agents.
    agent_compute: Vec<f64>,
    agent_hbm: Vec<f64>,
    agent_memory_time: Vec<f64>,
    agent_peak_blocks: Vec<u64>,
    /// Turns that may miss the SLO with the P99 still under it.
    pub late_turns: usize,
    horizon_end: f64,
}

/// Horizons at which the memory-over-time conditions are checked (any horizon gives a valid
/// necessary condition; more only tighten).
const HORIZONS: usize = 32;

impl Demand {
    pub fn new(workload: &Workload, physics: &Physics, slo_ns: f64) -> Self {
        let ph = *physics;
        let agents = workload.agents.len();
        let mut d = Demand {
            physics: ph,
            turns: Vec::new(),
            pauses: Vec::new(),
            holds: Vec::new(),
            agent_compute: vec![0.0; agents],
            agent_hbm: vec![0.0; agents],
            agent_memory_time: vec![0.0; agents],
            agent_peak_blocks: vec![0; agents],
            late_turns: 0,
            horizon_end: 0.0,
        };
        for (a, program) in workload.agents.iter().enumerate() {
            let arrival = program.arrival.as_nanos() as f64;
            let all_pauses: f64 = program
                .turns
                .iter()
                .filter_map(|t| t.pause_after.map(|p| p.true_ns as f64))
                .sum();
            // The agent cannot finish before every pause has elapsed.
            let earliest_end = arrival + all_pauses;
            let mut paused_before = 0.0;
            let (mut seq, mut kv) = (0u64, 0u64);
            for (i, turn) in program.turns.iter().enumerate() {
                let deadline = arrival + (i as f64 + 1.0) * slo_ns + paused_before;
                seq += turn.new_tokens as u64;
                // The prefill computes [kv, seq) and reads `seq` tokens of KV; it yields the
                // first generated token. Each of the other generated tokens is a decode at
                // cached context p = seq .. seq + g - 2.
                let g = turn.generated_tokens.max(1) as u64;
                // Roofline terms (matmul + attention; KV and weight reads) and the fixed step
                // costs (slots, overhead shares), kept apart for the serial fraction.
                let flops = ph.compute_ns(kv, seq + g - 1);
                let mut reads = ph.kv_bytes_per_token * seq as f64 / ph.memory_bandwidth;
                let mut fixed = ph.slot_ns;
                for p in seq..seq + g - 1 {
                    let share = ph.pool_share(p);
                    fixed += ph.slot_ns + share * ph.step_overhead_ns;
                    reads += ph.kv_bytes_per_token * (p + 1) as f64 / ph.memory_bandwidth
                        + share * ph.weight_read_ns;
                }
                let compute = fixed + flops + ph.serial_fraction * reads;
                let hbm = fixed + reads + ph.serial_fraction * flops;
                seq += g;
                kv = seq - 1;
                d.turns.push(TurnDemand {
                    deadline,
                    compute_ns: compute,
                    hbm_ns: hbm,
                });
                d.agent_compute[a] += compute;
                d.agent_hbm[a] += hbm;
                d.horizon_end = d.horizon_end.max(deadline);
                if let Some(p) = turn.pause_after {
                    let z = p.true_ns as f64;
                    // The next turn's deadline.
                    let next_deadline = deadline + slo_ns + z;
                    d.pauses.push(PauseDemand {
                        tokens: kv,
                        pause_ns: z,
                        next_deadline,
                    });
                    d.agent_memory_time[a] += kv as f64 * z;
                    if deadline < earliest_end {
                        let blocks = ph.blocks(kv);
                        d.holds.push(HoldEvent {
                            at: deadline,
                            agent: a,
                            blocks,
                        });
                        d.agent_peak_blocks[a] = d.agent_peak_blocks[a].max(blocks);
                    }
                    paused_before += z;
                }
            }
            if d.agent_peak_blocks[a] > 0 {
                d.holds.push(HoldEvent {
                    at: earliest_end,
                    agent: a,
                    blocks: 0,
                });
            }
        }
        let n = d.turns.len();
        // The P99 rule of the capacity search: rank ceil(0.99 n) must be within the SLO.
        let rank = ((99.0 / 100.0) * n as f64).ceil() as usize;
        d.late_turns = if n == 0 { 0 } else { n - rank.clamp(1, n) };
        d
    }

    pub fn holds(&self, kind: BoundKind) -> bool {
        if self.turns.is_empty() {
            return true;
        }
        if self.physics.gpu_blocks <= 0.0 {
            return false;
        }
        match kind {
            BoundKind::GpuMemory => self.memory_holds(self.physics.gpu_blocks),
            BoundKind::GpuHostMemory => {
                self.memory_holds(self.physics.gpu_blocks + self.physics.host_blocks)
            }
            BoundKind::Pcie => self.pcie_holds(),
            BoundKind::Hbm => self.work_holds(|t| t.hbm_ns, &self.agent_hbm),
            BoundKind::Compute => self.work_holds(|t| t.compute_ns, &self.agent_compute),
            BoundKind::Fluid => {
                self.work_holds(|t| t.compute_ns, &self.agent_compute) && self.fluid_holds()
            }
        }
    }

    /// The sum of the `late_turns` largest values: what setting aside that many agents can
    /// take off a total.
    fn top_k(&self, values: &[f64]) -> f64 {
        let mut v = values.to_vec();
        v.sort_by(|a, b| b.total_cmp(a));
        v.iter().take(self.late_turns).sum()
    }

    /// The GPU runs one step at a time: for every deadline t, the work of the turns due by t,
    /// less what the late agents may carry, fits in [0, t].
    fn work_holds(&self, work: impl Fn(&TurnDemand) -> f64, per_agent: &[f64]) -> bool {
        let spare = self.top_k(per_agent);
        let mut order: Vec<&TurnDemand> = self.turns.iter().collect();
        order.sort_by(|a, b| a.deadline.total_cmp(&b.deadline));
        let mut done = 0.0;
        order.iter().all(|t| {
            done += work(t);
            done - spare <= t.deadline
        })
    }

    /// At every instant, the blocks that on-time agents are sure to hold fit in `capacity`.
    fn memory_holds(&self, capacity: f64) -> bool {
        let mut events = self.holds.clone();
        // Releases first at one instant: the looser order, so the condition stays necessary.
        events.sort_by(|a, b| a.at.total_cmp(&b.at).then(a.blocks.cmp(&b.blocks)));
        let top = self.agent_peak_blocks.iter().copied().max().unwrap_or(0) as usize;
        let mut level = vec![0u64; self.agent_peak_blocks.len()];
        let mut count_at = vec![0u64; top + 1];
        let mut total: u64 = 0;
        for e in &events {
            let old = level[e.agent];
            if old > 0 {
                count_at[old as usize] -= 1;
            }
            total = total - old + e.blocks;
            level[e.agent] = e.blocks;
            if e.blocks > 0 {
                count_at[e.blocks as usize] += 1;
            }
            if total as f64 > capacity {
                // Only now is the exact top-k worth its walk.
                let mut left = self.late_turns as u64;
                let mut spare = 0u64;
                for b in (1..=top).rev() {
                    if left == 0 {
                        break;
                    }
                    let take = count_at[b].min(left);
                    spare += take * b as u64;
                    left -= take;
                }
                if (total - spare) as f64 > capacity {
                    return false;
                }
            }
        }
        true
    }

    fn horizons(&self) -> impl Iterator<Item = f64> + '_ {
        (1..=HORIZONS).map(move |j| self.horizon_end * j as f64 / HORIZONS as f64)
    }

    /// No-drop policies: over [0, t] the GPU holds at most pool x t token-seconds; KV of a pause
    /// that is not on the GPU the whole pause crosses PCIe out and back. Filling the budget with
    /// the shortest pauses first leaves the least to cross.
    fn pcie_holds(&self) -> bool {
        let mut by_pause: Vec<&PauseDemand> = self.pauses.iter().collect();
        by_pause.sort_by(|a, b| a.pause_ns.total_cmp(&b.pause_ns));
        let spare_memory = self.top_k(&self.agent_memory_time);
        let ph = &self.physics;
        self.horizons().all(|t| {
            let mut budget = ph.gpu_blocks * ph.block_tokens * t + spare_memory;
            let mut crossing = 0.0;
            for p in by_pause.iter().filter(|p| p.next_deadline <= t) {
                let need = p.tokens as f64 * p.pause_ns;
                if need <= budget {
                    budget -= need;
                } else {
                    let kept = if p.pause_ns > 0.0 {
                        budget / p.pause_ns
                    } else {
                        p.tokens as f64
                    };
                    budget = 0.0;
                    crossing += p.tokens as f64 - kept;
                }
            }
            crossing * ph.kv_bytes_per_token <= ph.pcie_bandwidth * t
        })
    }

    /// Ideal drops: over [0, t] GPU + host hold at most (pools) x t token-seconds; a token not
    /// held over its pause is recomputed at its compute cost. The cheapest such recomputation
    /// (a fractional knapsack by cost per token-second) adds to the compute due by t.
    fn fluid_holds(&self) -> bool {
        let ph = &self.physics;
        let spare_work = self.top_k(&self.agent_compute);
        let spare_memory = self.top_k(&self.agent_memory_time);
        let mut order: Vec<&TurnDemand> = self.turns.iter().collect();
        order.sort_by(|a, b| a.deadline.total_cmp(&b.deadline));
        self.horizons().all(|t| {
            let work: f64 = order
                .iter()
                .take_while(|d| d.deadline <= t)
                .map(|d| d.compute_ns)
                .sum();
            let due: Vec<&PauseDemand> = self
                .pauses
                .iter()
                .filter(|p| p.next_deadline <= t)
                .collect();
            let budget = (ph.gpu_blocks + ph.host_blocks) * ph.block_tokens * t + spare_memory;
            work - spare_work + self.least_recompute(&due, budget) <= t
        })
    }

    /// A lower bound on the recomputation when the pauses' KV must fit `budget` token-ns: keep
    /// the tokens whose recompute cost per token-ns is at least a threshold, lowered until the
    /// kept KV reaches the budget (keeping at least the budget never recomputes more than the
    /// optimum).
    fn least_recompute(&self, pauses: &[&PauseDemand], budget: f64) -> f64 {
        let ph = &self.physics;
        // Tokens [0, cut) of a pause are dropped at threshold `lambda` (cost per token-ns).
        let cut = |p: &PauseDemand, lambda: f64| -> u64 {
            if p.pause_ns <= 0.0 {
                return 0;
            }
            let want = lambda * p.pause_ns;
            if ph.pair_ns <= 0.0 {
                return if ph.token_ns >= want { 0 } else { p.tokens };
            }
            // cost(q) = token_ns + pair_ns (q + 1) >= want  <=>  q >= (want - token_ns)/pair_ns - 1
            let q = ((want - ph.token_ns) / ph.pair_ns - 1.0).ceil();
            q.clamp(0.0, p.tokens as f64) as u64
        };
        let kept_memory = |lambda: f64| -> f64 {
            pauses
                .iter()
                .map(|p| (p.tokens - cut(p, lambda)) as f64 * p.pause_ns)
                .sum()
        };
        if kept_memory(0.0) <= budget {
            return 0.0;
        }
        let mut lo = 0.0f64;
        let mut hi = pauses
            .iter()
            .filter(|p| p.pause_ns > 0.0)
            .map(|p| ph.compute_ns(p.tokens.saturating_sub(1), p.tokens) / p.pause_ns)
            .fold(0.0, f64::max)
            * 2.0
            + 1.0;
        for _ in 0..50 {
            let mid = (lo + hi) / 2.0;
            if kept_memory(mid) >= budget {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        pauses.iter().map(|p| ph.compute_ns(0, cut(p, lo))).sum()
    }
}
