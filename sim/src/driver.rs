//! The run loop: delivers events to the scheduler, applies its plans through the KV mechanism,
//! runs steps and swaps on a backend, records turns, steps and swaps, and checks invariants after
//! every step.
//!
//! Event order is total: the queue is keyed by (time, sequence number), and at one instant the
//! loop first collects finished swaps (in completion order), then due arrivals (in key order),
//! then plans.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use traces::{StepRecord, SwapRecord, TurnRecord};

use crate::backend::{Backend, BatchSeq, StepBatch, SwapCompletion};
use crate::ids::{AgentId, SwapId};
use crate::kv::{KvError, KvManager, SwapDirection};
use crate::sched::{
    AgentRuntime, CostHints, PauseNotice, Phase, SchedConfig, SchedEvent, SchedView, Scheduler,
    StepPlan,
};
use crate::time::{Clock, SimTime};
use crate::workload::Programs;

mod checks;
mod compaction;
mod records;

use records::{kv_source, TurnBook};
pub use records::{Recording, TurnLatencies};

/// How thoroughly invariants are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckLevel {
    /// Incremental checks after every step, a full recount of the KV mechanism every
    /// `audit_interval_steps` steps and at the end.
    Step { audit_interval_steps: u64 },
    /// A full recount after every step (tests; slower).
    Full,
}

/// Limits that stop a run loudly instead of letting it spin.
#[derive(Clone, Debug, PartialEq)]
pub struct RunLimits {
    pub max_steps: u64,
    pub max_sim_time: SimTime,
    /// Consecutive plans at the same instant without compute (guards against a policy looping).
    pub max_idle_replans: u32,
}

impl Default for RunLimits {
    fn default() -> Self {
        RunLimits {
            max_steps: 200_000_000,
            max_sim_time: SimTime::from_secs_f64(30.0 * 24.0 * 3600.0),
            max_idle_replans: 64,
        }
    }
}

/// Settings of a run (everything but the workload, policy and backend).
#[derive(Clone, Debug)]
pub struct RunSettings {
    pub seed: u64,
    pub block_size_tokens: u32,
    pub gpu_blocks: u32,
    pub host_blocks: u32,
    pub sched: SchedConfig,
    pub costs: CostHints,
    pub limits: RunLimits,
    pub check: CheckLevel,
    /// What the output keeps of turns, steps and swaps (never changes the run itself).
    pub recording: Recording,
}

/// Why a run stopped early. Every variant names the seed, so it can be reproduced.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invariant violated (seed {seed}, step {step}, t={time}): {message}")]
    Invariant {
        seed: u64,
        step: u64,
        time: SimTime,
        message: String,
    },
    #[error("deadlock (seed {seed}, step {step}, t={time}): nothing runs and nothing is pending, yet {unfinished} agents are unfinished; {detail}")]
    Deadlock {
        seed: u64,
        step: u64,
        time: SimTime,
        unfinished: u32,
        detail: String,
    },
    #[error("limit exceeded (seed {seed}, step {step}, t={time}): {limit}")]
    Limit {
        seed: u64,
        step: u64,
        time: SimTime,
        limit: String,
    },
    #[error("backend error (seed {seed}, step {step}): {message}")]
    Backend {
        seed: u64,
        step: u64,
        message: String,
    },
    #[error("workload: {0}")]
    Workload(String),
}

/// Everything a run produced. `turns`, `steps` and `swaps` are filled under
/// [`Recording::Full`] only; the counts below always are.
#[derive(Clone, Debug, Default)]
pub struct RunOutput {
    pub turns: Vec<TurnRecord>,
    pub steps: Vec<StepRecord>,
    pub swaps: Vec<SwapRecord>,
    /// Under [`Recording::Latencies`]: the finished turns' latencies.
    pub turn_latencies: TurnLatencies,
    pub steps_run: u64,
    pub swaps_started: u64,
    pub turns_rejected: u64,
    pub end_time: SimTime,
    pub turns_planned: u64,
    pub gpu_blocks_used_peak: u32,
    pub host_blocks_used_peak: u32,
    pub agents_alive_peak: u32,
    pub audits: u64,
    /// Scheduler events delivered (arrivals, turn ends, swap completions).
    pub events_delivered: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum QueuedEvent {
    /// The agent's next turn input is ready.
    TurnArrival(AgentId),
}

struct TurnTracker {
    record_index: usize,
    first_time_tokens: u64,
    new_tokens: u32,
    /// The turn's input replaces part of the history (the previous turn's last generated token
    /// is then not computed by this turn).
    compacted: bool,
    /// Since when the admitted turn waits again after a preemption.
    preempted_at: Option<SimTime>,
}

/// What the run loop keeps per agent, in one cache line: a step touches it for every agent of
/// its batch, and the duplicate stamp in an array of its own cost a second cache miss per agent
/// per step.
#[repr(align(64))]
#[derive(Default)]
struct AgentLoop {
    /// The turn in progress (waiting, running or preempted); `None` between turns.
    turn: Option<TurnTracker>,
    /// Step stamp of the last batch the agent was in (duplicate detection).
    batch_stamp: u64,
}

/// A plan that computed nothing, and the count of such plans in a row at one instant.
struct IdlePlan<'p> {
    plan: &'p StepPlan,
    /// Whether the plan changed state (a rejection, release, drop or swap start).
    changed: bool,
    replans: &'p mut u32,
}

/// Runs `workload` under `scheduler` on `backend` until every agent finished or was rejected.
pub fn run(
    settings: &RunSettings,
    workload: &dyn Programs,
    scheduler: &mut dyn Scheduler,
    backend: &mut dyn Backend,
    clock: &mut dyn Clock,
) -> Result<RunOutput, RunError> {
    let mut state = LoopState::new(settings, workload);
    for agent in 0..workload.agent_count() {
        if let Some(p) = workload.prefix(agent) {
            state
                .kv
                .set_shared_prefix(agent, p.group, p.tokens)
                .map_err(|e| RunError::Workload(e.to_string()))?;
        }
    }
    state.run(scheduler, backend, clock)
}

struct LoopState<'w> {
    settings: &'w RunSettings,
    workload: &'w dyn Programs,
    kv: KvManager,
    agents: Vec<AgentRuntime>,
    trackers: Vec<AgentLoop>,
    last_swap_in: Vec<Option<(SimTime, SimTime)>>,
    swap_starts: std::collections::BTreeMap<SwapId, usize>,
    /// Agents whose turn compacted the history while their KV was moving: the tokens to keep
    /// once the swap completes (see `compact`).
    pending_compactions: std::collections::BTreeMap<AgentId, u32>,
    queue: BinaryHeap<Reverse<(SimTime, u64, QueuedEvent)>>,
    queue_seq: u64,
    out: RunOutput,
    step: u64,
    admit_seq: u64,
    unfinished: u32,
    alive: u32,
    /// Swap bytes started by plans since the last step record. Plans without compute write no
    /// record, so their swaps (and the KV counters' drops) go into the next one; they were lost
    /// before (found by the property tests: steps.csv reported no swaps for a lone agent).
    unreported_swap_bytes: (u64, u64),
    /// Preemptions since the last step record, and how many of the KV counters' drops they
    /// caused (reported as preemptions, not drops).
    unreported_preemptions: (u32, u32),
    events: Vec<SchedEvent>,
    book: TurnBook,
    /// The step at or after which the next full audit runs (see `checks`).
    next_audit_step: u64,
}

impl<'w> LoopState<'w> {
    fn new(settings: &'w RunSettings, workload: &'w dyn Programs) -> Self {
        let n = workload.agent_count();
        let mut state = LoopState {
            settings,
            workload,
            kv: KvManager::new(
                settings.block_size_tokens,
                settings.gpu_blocks,
                settings.host_blocks,
                n,
            ),
            agents: (0..n)
                .map(|agent| AgentRuntime {
                    phase: Phase::NotArrived,
                    first_arrival: workload.arrival(agent),
                    turn_index: 0,
                    turn_count: workload.turn_count(agent),
                    turn_arrival: workload.arrival(agent),
                    seq_tokens: 0,
                    generated: 0,
                    generate_target: 0,
                    pause_started: SimTime::ZERO,
                    pause_hint_ns: None,
                    attained_service_ns: 0,
                    admit_seq: 0,
                })
                .collect(),
            trackers: (0..n).map(|_| AgentLoop::default()).collect(),
            last_swap_in: vec![None; n as usize],
            swap_starts: Default::default(),
            pending_compactions: Default::default(),
            queue: BinaryHeap::with_capacity(n as usize),
            queue_seq: 0,
            out: RunOutput {
                turns_planned: workload.total_turns(),
                ..Default::default()
            },
            step: 0,
            admit_seq: 0,
            unfinished: n,
            alive: 0,
            unreported_swap_bytes: (0, 0),
            unreported_preemptions: (0, 0),
            events: Vec::new(),
            book: TurnBook::new(settings.recording),
            next_audit_step: 0,
        };
        for agent in 0..n {
            state.push_event(workload.arrival(agent), QueuedEvent::TurnArrival(agent));
        }
        state
    }

    fn push_event(&mut self, at: SimTime, event: QueuedEvent) {
        self.queue.push(Reverse((at, self.queue_seq, event)));
        self.queue_seq += 1;
    }

    fn invariant(&self, time: SimTime, message: impl Into<String>) -> RunError {
        RunError::Invariant {
            seed: self.settings.seed,
            step: self.step,
            time,
            message: message.into(),
        }
    }

    fn backend_err(&self, e: impl std::fmt::Display) -> RunError {
        RunError::Backend {
            seed: self.settings.seed,
            step: self.step,
            message: e.to_string(),
        }
    }

    fn kv_err(&self, time: SimTime, e: KvError) -> RunError {
        self.invariant(time, format!("the plan asked for the impossible: {e}"))
    }

    fn view<'a>(&'a self, now: SimTime, backend: &dyn Backend) -> SchedView<'a> {
        SchedView {
            now,
            kv: &self.kv,
            agents: &self.agents,
            config: &self.settings.sched,
            costs: &self.settings.costs,
            swap_out_busy_until: backend.channel_busy_until(SwapDirection::Out),
            swap_in_busy_until: backend.channel_busy_until(SwapDirection::In),
        }
    }

    fn run(
        &mut self,
        scheduler: &mut dyn Scheduler,
        backend: &mut dyn Backend,
        clock: &mut dyn Clock,
    ) -> Result<RunOutput, RunError> {
        let mut plan = StepPlan::default();
        let mut batch = StepBatch::default();
        let mut completions: Vec<SwapCompletion> = Vec::new();
        let mut idle_replans = 0u32;
        let mut now = clock.now();
        loop {
            // 1. Finished swaps, then due arrivals: all become scheduler events.
            self.deliver_events(now, scheduler, backend, &mut completions)?;
            if self.unfinished == 0 && self.kv.swaps_in_flight() == 0 {
                break;
            }

            // 2. Plan and apply.
            plan.clear();
            scheduler.plan_step(&self.view(now, backend), &mut plan);
            batch.clear();
            let (swap_in_bytes, swap_out_bytes, changed) =
                self.apply_plan(&plan, &mut batch, now, backend)?;
            self.unreported_swap_bytes.0 += swap_in_bytes;
            self.unreported_swap_bytes.1 += swap_out_bytes;

            // 3. Run the step, or move time to the next thing that can happen.
            if !batch.prefill.is_empty() || !batch.decode.is_empty() {
                idle_replans = 0;
                now = self.run_batch(&batch, now, backend, clock)?;
            } else {
                let idle = IdlePlan {
                    plan: &plan,
                    changed,
                    replans: &mut idle_replans,
                };
                now = self.advance_idle(idle, now, backend, clock)?;
            }
            if now > self.settings.limits.max_sim_time {
                return Err(RunError::Limit {
                    seed: self.settings.seed,
                    step: self.step,
                    time: now,
                    limit: format!("max_sim_time = {}", self.settings.limits.max_sim_time),
                });
            }
        }
        self.check_after_step(now, true)?;
        self.book.finish(&mut self.out);
        self.out.end_time = now;
        Ok(std::mem::take(&mut self.out))
    }

    /// Turns finished swaps and due arrivals into scheduler events and delivers them.
    fn deliver_events(
        &mut self,
        now: SimTime,
        scheduler: &mut dyn Scheduler,
        backend: &mut dyn Backend,
        completions: &mut Vec<SwapCompletion>,
    ) -> Result<(), RunError> {
        completions.clear();
        backend.poll_swaps(now, completions);
        for c in completions.iter() {
            self.complete_swap(c, now)?;
        }
        while let Some(Reverse((at, _, event))) = self.queue.peek().copied() {
            if at > now {
                break;
            }
            self.queue.pop();
            match event {
                QueuedEvent::TurnArrival(agent) => self.turn_arrival(agent, at)?,
            }
        }
        if !self.events.is_empty() {
            let events = std::mem::take(&mut self.events);
            self.out.events_delivered += events.len() as u64;
            let view = self.view(now, backend);
            for e in &events {
                scheduler.on_event(e, &view);
            }
            self.events = events;
            self.events.clear();
        }
        Ok(())
    }

    /// Executes a non-empty batch and moves time to its end; returns the new time.
    fn run_batch(
        &mut self,
        batch: &StepBatch,
        now: SimTime,
        backend: &mut dyn Backend,
        clock: &mut dyn Clock,
    ) -> Result<SimTime, RunError> {
        let duration = backend
            .execute_step(now, batch, &self.kv)
            .map_err(|e| self.backend_err(e))?;
        self.record_step(now, duration, batch);
        clock.advance_to(now + duration);
        let now = clock.now();
        self.finish_step(batch, now, duration)?;
        self.step += 1;
        self.check_after_step(now, false)?;
        if self.step >= self.settings.limits.max_steps {
            return Err(RunError::Limit {
                seed: self.settings.seed,
                step: self.step,
                time: now,
                limit: format!("max_steps = {}", self.settings.limits.max_steps),
            });
        }
        Ok(now)
    }

    /// A plan without compute: move time to the next arrival, swap completion or policy timer,
    /// or plan again at this instant if the plan changed something. Returns the new time.
    fn advance_idle(
        &mut self,
        idle: IdlePlan,
        now: SimTime,
        backend: &mut dyn Backend,
        clock: &mut dyn Clock,
    ) -> Result<SimTime, RunError> {
        let mut now = now;
        let mut next = self.queue.peek().map(|Reverse((t, _, _))| *t);
        if let Some(t) = backend.next_swap_completion() {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        if let Some(w) = idle.plan.wake_at {
            next = Some(next.map_or(w, |n| n.min(w)));
        }
        match next {
            // A plan that changed state without computing (a release, drop or swap start) may
            // have made room for compute now: plan again at this instant before time moves on.
            // (Advancing first left the GPU idle until the next event; the property tests found
            // turns waiting for an unrelated arrival.)
            Some(t) if t > now && !idle.changed => {
                *idle.replans = 0;
                clock.advance_to(t);
                now = clock.now();
            }
            _ if idle.changed || next.is_some() => {
                // Something changed (or a timer is due now): plan again at the same instant. A
                // rejection ends a turn for good, so plans that reject are progress, not a loop
                // (policies reject one blocked head per plan; many at one instant tripped the
                // limit; found by the property tests).
                if idle.plan.reject.is_empty() {
                    *idle.replans += 1;
                }
                if *idle.replans > self.settings.limits.max_idle_replans {
                    return Err(RunError::Limit {
                        seed: self.settings.seed,
                        step: self.step,
                        time: now,
                        limit: format!(
                            "{} plans in a row at one instant without compute (policy loops)",
                            *idle.replans
                        ),
                    });
                }
            }
            _ => return Err(self.deadlock(now)),
        }
        if idle.changed {
            self.check_after_step(now, false)?;
        }
        Ok(now)
    }

    /// Nothing runs, nothing is due and the plan changed nothing: a deadlock, with a sample of
    /// the stuck agents.
    fn deadlock(&self, now: SimTime) -> RunError {
        let waiting: Vec<String> = self
            .agents
            .iter()
            .enumerate()
            .filter(|(_, a)| a.phase == Phase::Waiting || a.phase == Phase::Running)
            .take(5)
            .map(|(i, a)| {
                format!(
                    "agent {i} {:?} kv {:?} pending {}",
                    a.phase,
                    self.kv.state(i as u32),
                    a.pending_tokens(&self.kv, i as u32)
                )
            })
            .collect();
        RunError::Deadlock {
            seed: self.settings.seed,
            step: self.step,
            time: now,
            unfinished: self.unfinished,
            detail: format!(
                "GPU blocks free {}/{}, host free {}/{}; e.g. {}",
                self.kv.gpu_blocks_free(),
                self.kv.gpu_blocks_total(),
                self.kv.host_blocks_free(),
                self.kv.host_blocks_total(),
                waiting.join("; ")
            ),
        }
    }

    fn turn_arrival(&mut self, agent: AgentId, at: SimTime) -> Result<(), RunError> {
        let a = &mut self.agents[agent as usize];
        if a.phase == Phase::NotArrived {
            self.alive += 1;
            self.out.agents_alive_peak = self.out.agents_alive_peak.max(self.alive);
        } else {
            a.turn_index += 1;
        }
        let turn = self.workload.turn(agent, a.turn_index);
        a.phase = Phase::Waiting;
        a.turn_arrival = at;
        let compacted = turn
            .context_tokens
            .filter(|&c| (c as u64) < a.seq_tokens as u64 + turn.new_tokens as u64);
        a.seq_tokens += turn.new_tokens;
        a.generated = 0;
        a.generate_target = turn.generated_tokens;
        a.pause_hint_ns = None;
        let record = TurnRecord {
            agent_id: agent,
            turn_index: a.turn_index,
            arrival_ns: at.as_nanos(),
            admitted_ns: None,
            restore_start_ns: None,
            restore_end_ns: None,
            first_token_ns: None,
            finished_ns: None,
            tokens_prefilled: 0,
            tokens_recomputed: 0,
            tokens_generated: 0,
            tokens_generated_requested: turn.generated_tokens,
            context_tokens_at_admit: 0,
            kv_source: String::new(),
            rejected: false,
            preemptions: 0,
            requeued_ns: 0,
        };
        let record_index = self.book.open(&mut self.out, record);
        self.trackers[agent as usize].turn = Some(TurnTracker {
            record_index,
            first_time_tokens: 0,
            new_tokens: turn.new_tokens,
            compacted: compacted.is_some(),
            preempted_at: None,
        });
        if let Some(context) = compacted {
            let keep = context - turn.new_tokens;
            self.pending_compactions.insert(agent, keep);
            self.compact(agent, at)?;
        }
        self.events.push(SchedEvent::TurnArrived {
            agent,
            turn_index: self.agents[agent as usize].turn_index,
        });
        Ok(())
    }

    fn complete_swap(&mut self, c: &SwapCompletion, now: SimTime) -> Result<(), RunError> {
        let (agent, direction) = self
            .kv
            .complete_swap(c.swap_id)
            .map_err(|e| self.kv_err(now, e))?;
        if let Some(&index) = self.swap_starts.get(&c.swap_id) {
            self.out.swaps[index].end_ns = c.at.as_nanos();
            self.swap_starts.remove(&c.swap_id);
        }
        if direction == SwapDirection::In {
            let start = self.last_swap_in[agent as usize]
                .map(|(s, _)| s)
                .unwrap_or(c.at);
            self.last_swap_in[agent as usize] = Some((start, c.at));
        }
        self.compact(agent, now)?;
        self.events.push(SchedEvent::SwapDone {
            agent,
            swap_id: c.swap_id,
            direction,
        });
        Ok(())
    }

    /// Applies a plan through the KV mechanism. Returns (swap-in bytes, swap-out bytes, changed).
    fn apply_plan(
        &mut self,
        plan: &StepPlan,
        batch: &mut StepBatch,
        now: SimTime,
        backend: &mut dyn Backend,
    ) -> Result<(u64, u64, bool), RunError> {
        let (in_bytes, out_bytes, changed) = self.apply_memory_orders(plan, now, backend)?;
        self.assemble_batch(plan, batch, now)?;
        self.admit_batch(batch, now);
        self.out.gpu_blocks_used_peak =
            self.out.gpu_blocks_used_peak.max(self.kv.gpu_blocks_used());
        self.out.host_blocks_used_peak = self
            .out
            .host_blocks_used_peak
            .max(self.kv.host_blocks_used());
        Ok((in_bytes, out_bytes, changed))
    }

    /// The plan's rejections, releases, reclaims, drops and swap starts, in that order.
    /// Returns (swap-in bytes, swap-out bytes, changed).
    fn apply_memory_orders(
        &mut self,
        plan: &StepPlan,
        now: SimTime,
        backend: &mut dyn Backend,
    ) -> Result<(u64, u64, bool), RunError> {
        // `kv.counters` accumulate until the next step record (see `unreported_swap_bytes`).
        let mut changed = false;
        for &agent in &plan.reject {
            let a = &self.agents[agent as usize];
            if a.phase != Phase::Waiting || a.generated > 0 {
                return Err(self.invariant(
                    now,
                    format!(
                        "rejected agent {agent} is {:?}, not a waiting turn",
                        a.phase
                    ),
                ));
            }
            self.kv.free_all(agent).map_err(|e| self.kv_err(now, e))?;
            self.pending_compactions.remove(&agent);
            self.agents[agent as usize].phase = Phase::Rejected;
            if let Some(t) = self.trackers[agent as usize].turn.take() {
                self.out.turns[t.record_index].rejected = true;
                self.book.close(&mut self.out, t.record_index);
            }
            self.unfinished -= 1;
            self.alive -= 1;
            changed = true;
        }
        for &agent in &plan.release {
            self.note_preemption(agent, now, false);
            self.kv
                .release_to_cache(agent)
                .map_err(|e| self.kv_err(now, e))?;
            changed = true;
        }
        for &agent in &plan.reclaim {
            let high_water = self.kv.computed_high_water(agent);
            self.kv
                .reclaim_cached(agent)
                .map_err(|e| self.kv_err(now, e))?;
            // A hit of the group's shared prefix covers tokens this agent never computed: they
            // count as its turn's first-time tokens (computed once, by another agent).
            if let Some(t) = self.trackers[agent as usize].turn.as_mut() {
                t.first_time_tokens += (self.kv.computed_high_water(agent) - high_water) as u64;
            }
            changed = true;
        }
        for &(agent, keep) in &plan.drop {
            let dropped = self
                .kv
                .drop_tail(agent, keep)
                .map_err(|e| self.kv_err(now, e))?;
            self.note_preemption(agent, now, dropped > 0);
            changed = true;
        }
        let block_bytes = self.settings.costs.block_bytes;
        let (mut in_bytes, mut out_bytes) = (0u64, 0u64);
        for &(agent, blocks) in &plan.swap_out {
            self.note_preemption(agent, now, false);
            let id = self
                .kv
                .start_swap_out(agent, blocks)
                .map_err(|e| self.kv_err(now, e))?;
            out_bytes += self.start_swap(now, id, backend)? * block_bytes;
            changed = true;
        }
        for &agent in &plan.swap_in {
            let id = self
                .kv
                .start_swap_in(agent)
                .map_err(|e| self.kv_err(now, e))?;
            self.last_swap_in[agent as usize] = Some((now, SimTime::MAX));
            in_bytes += self.start_swap(now, id, backend)? * block_bytes;
            changed = true;
        }
        Ok((in_bytes, out_bytes, changed))
    }

    /// Counts a preemption when a plan takes KV from an admitted, unfinished turn that is not
    /// already waiting after one; `dropped` says the KV counters counted this as a drop.
    fn note_preemption(&mut self, agent: AgentId, now: SimTime, dropped: bool) {
        if self.agents[agent as usize].phase != Phase::Running {
            return;
        }
        let Some(t) = self.trackers[agent as usize].turn.as_mut() else {
            return;
        };
        if t.preempted_at.is_some() {
            if dropped {
                // A second cut while still requeued belongs to the same preemption.
                self.unreported_preemptions.1 += 1;
            }
            return;
        }
        t.preempted_at = Some(now);
        self.out.turns[t.record_index].preemptions += 1;
        self.unreported_preemptions.0 += 1;
        self.unreported_preemptions.1 += u32::from(dropped);
    }

    /// Checks the plan's compute orders against the batch limits and each agent's state, grows
    /// their KV for the step and fills `batch`.
    fn assemble_batch(
        &mut self,
        plan: &StepPlan,
        batch: &mut StepBatch,
        now: SimTime,
    ) -> Result<(), RunError> {
        let seq_limit = self.settings.sched.max_batch_sequences as usize;
        if plan.prefill.len() + plan.decode.len() > seq_limit {
            return Err(self.invariant(
                now,
                format!(
                    "batch of {} sequences exceeds max_batch_sequences {seq_limit}",
                    plan.prefill.len() + plan.decode.len()
                ),
            ));
        }
        let tokens: u64 =
            plan.prefill.iter().map(|p| p.tokens as u64).sum::<u64>() + plan.decode.len() as u64;
        if tokens > self.settings.sched.max_batch_tokens as u64 {
            return Err(self.invariant(
                now,
                format!(
                    "batch of {tokens} tokens exceeds max_batch_tokens {}",
                    self.settings.sched.max_batch_tokens
                ),
            ));
        }
        for order in &plan.prefill {
            let agent = order.agent;
            self.check_computable(agent, now)?;
            let pending = self.agents[agent as usize].pending_tokens(&self.kv, agent);
            if order.tokens == 0 || order.tokens > pending {
                return Err(self.invariant(
                    now,
                    format!(
                        "agent {agent}: prefill of {} tokens but {pending} pending",
                        order.tokens
                    ),
                ));
            }
            let context = self.kv.kv_tokens(agent);
            self.kv
                .ensure_capacity(agent, context + order.tokens)
                .map_err(|e| self.kv_err(now, e))?;
            batch.prefill.push(BatchSeq {
                agent,
                context_tokens: context,
                tokens: order.tokens,
            });
        }
        for &agent in &plan.decode {
            self.check_computable(agent, now)?;
            let a = &self.agents[agent as usize];
            if a.generated == 0 || a.pending_tokens(&self.kv, agent) != 1 {
                return Err(self.invariant(now, format!("agent {agent}: decode ordered but it is not decoding (generated {}, pending {})", a.generated, a.pending_tokens(&self.kv, agent))));
            }
            let context = self.kv.kv_tokens(agent);
            self.kv
                .ensure_capacity(agent, context + 1)
                .map_err(|e| self.kv_err(now, e))?;
            batch.decode.push(BatchSeq {
                agent,
                context_tokens: context,
                tokens: 1,
            });
        }
        // One order per agent per step (a stamp per agent makes this O(batch) without sorting).
        let stamp = self.step + 1;
        for i in 0..batch.prefill.len() + batch.decode.len() {
            let agent = if i < batch.prefill.len() {
                batch.prefill[i].agent
            } else {
                batch.decode[i - batch.prefill.len()].agent
            };
            let entry = &mut self.trackers[agent as usize];
            if entry.batch_stamp == stamp {
                return Err(
                    self.invariant(now, format!("agent {agent} appears twice in one batch"))
                );
            }
            entry.batch_stamp = stamp;
        }
        Ok(())
    }

    /// Marks the batch's waiting agents admitted (their turn records get the admission time,
    /// context and restore window).
    fn admit_batch(&mut self, batch: &StepBatch, now: SimTime) {
        for s in batch.prefill.iter().chain(batch.decode.iter()) {
            if let Some(t) = self.trackers[s.agent as usize].turn.as_mut() {
                if let Some(at) = t.preempted_at.take() {
                    self.out.turns[t.record_index].requeued_ns += now.as_nanos() - at.as_nanos();
                }
            }
            let a = &mut self.agents[s.agent as usize];
            if a.phase == Phase::Waiting {
                a.phase = Phase::Running;
                self.admit_seq += 1;
                a.admit_seq = self.admit_seq;
                let t = self.trackers[s.agent as usize]
                    .turn
                    .as_ref()
                    .expect("a waiting agent has a turn");
                let rec = &mut self.out.turns[t.record_index];
                if rec.admitted_ns.is_none() {
                    rec.admitted_ns = Some(now.as_nanos());
                    rec.context_tokens_at_admit = s.context_tokens;
                    if let Some((start, end)) = self.last_swap_in[s.agent as usize] {
                        rec.restore_start_ns = Some(start.as_nanos());
                        rec.restore_end_ns = Some(end.as_nanos());
                    }
                }
            }
        }
    }

    /// Hands a started swap to the backend and records it. Returns its block count.
    fn start_swap(
        &mut self,
        now: SimTime,
        id: SwapId,
        backend: &mut dyn Backend,
    ) -> Result<u64, RunError> {
        let job = self.kv.swap_job(id).expect("just started");
        backend
            .start_swap(now, job, &self.kv)
            .map_err(|e| self.backend_err(e))?;
        self.out.swaps_started += 1;
        let pairs = job.pairs.len() as u64;
        if !self.book.keeps_steps() {
            return Ok(pairs);
        }
        self.swap_starts.insert(job.id, self.out.swaps.len());
        self.out.swaps.push(SwapRecord {
            swap_id: job.id,
            agent_id: job.agent,
            direction: job.direction.as_str().into(),
            block_count: job.pairs.len() as u32,
            bytes: job.pairs.len() as u64 * self.settings.costs.block_bytes,
            start_ns: now.as_nanos(),
            end_ns: 0,
            concurrent_swaps_at_start: self.kv.swaps_in_flight() as u32,
        });
        Ok(pairs)
    }

    /// Advances token counts after a step, emits tokens and finishes turns.
    fn finish_step(
        &mut self,
        batch: &StepBatch,
        now: SimTime,
        duration: u64,
    ) -> Result<(), RunError> {
        let total_tokens = (batch.prefill_tokens() + batch.decode.len() as u64).max(1);
        // The share of a one-token computation (every decode): the same for all of them, so one
        // division a step instead of one per decode (the same quotient as the general formula).
        let unit_share = duration / total_tokens;
        for (is_prefill, s) in batch
            .prefill
            .iter()
            .map(|s| (true, s))
            .chain(batch.decode.iter().map(|s| (false, s)))
        {
            let agent = s.agent;
            let recomputed = self
                .kv
                .advance(agent, s.tokens)
                .map_err(|e| self.kv_err(now, e))?;
            let a = &mut self.agents[agent as usize];
            // In u128: a profile with absurd (but valid) costs makes steps long enough to overflow
            // u64 here (found by the robust-input tests).
            // (u128 division is a libcall: take it only when u64 would overflow.)
            let share = if s.tokens == 1 {
                unit_share
            } else {
                match duration.checked_mul(s.tokens as u64) {
                    Some(product) => product / total_tokens,
                    None => (duration as u128 * s.tokens as u128 / total_tokens as u128) as u64,
                }
            };
            a.attained_service_ns = a.attained_service_ns.saturating_add(share);
            let tracker = self.trackers[agent as usize]
                .turn
                .as_mut()
                .expect("a computing agent has a turn");
            tracker.first_time_tokens += (s.tokens - recomputed) as u64;
            let rec = &mut self.out.turns[tracker.record_index];
            rec.tokens_recomputed += recomputed;
            if is_prefill {
                rec.tokens_prefilled += s.tokens - recomputed;
            }
            if self.kv.kv_tokens(agent) == a.seq_tokens {
                // All known tokens have KV: the step produced the next token.
                a.seq_tokens += 1;
                a.generated += 1;
                rec.tokens_generated = a.generated;
                if rec.first_token_ns.is_none() {
                    rec.first_token_ns = Some(now.as_nanos());
                }
                if a.generated == a.generate_target {
                    self.finish_turn(agent, now)?;
                }
            }
        }
        Ok(())
    }

    fn finish_turn(&mut self, agent: AgentId, now: SimTime) -> Result<(), RunError> {
        let tracker = self.trackers[agent as usize]
            .turn
            .take()
            .expect("finishing turn exists");
        let a = &mut self.agents[agent as usize];
        let rec = &mut self.out.turns[tracker.record_index];
        rec.finished_ns = Some(now.as_nanos());
        // Conservation: a turn computes each of its new tokens once (plus the previous turn's last
        // generated token), and generates exactly what it asked for.
        // After a compaction that token is gone with the rest of the old history.
        let expected = tracker.new_tokens as u64 + a.generate_target as u64
            - u64::from(a.turn_index == 0 || tracker.compacted);
        if tracker.first_time_tokens != expected || a.generated != a.generate_target {
            let message = format!(
                "agent {agent} turn {}: computed {} first-time tokens (expected {expected}), generated {} of {}",
                a.turn_index, tracker.first_time_tokens, a.generated, a.generate_target
            );
            return Err(self.invariant(now, message));
        }
        // Only a full recording keeps the record (the string costs an allocation per turn).
        if self.book.keeps_steps() {
            rec.kv_source = kv_source(rec, a.turn_index).to_string();
        }
        self.book.close(&mut self.out, tracker.record_index);
        self.last_swap_in[agent as usize] = None;
        let turn_index = a.turn_index;
        let pause = self.workload.turn(agent, turn_index).pause_after;
        match pause {
            Some(p) => {
                a.phase = Phase::Paused;
                a.pause_started = now;
                a.pause_hint_ns = p.hint_ns;
                self.push_event(now + p.true_ns, QueuedEvent::TurnArrival(agent));
                self.events.push(SchedEvent::TurnFinished {
                    agent,
                    turn_index,
                    pause: Some(PauseNotice {
                        hint_ns: p.hint_ns,
                        true_ns_reference_only: p.true_ns,
                    }),
                });
            }
            None => {
                a.phase = Phase::Done;
                self.unfinished -= 1;
                self.alive -= 1;
                self.kv.free_all(agent).map_err(|e| self.kv_err(now, e))?;
                self.events.push(SchedEvent::TurnFinished {
                    agent,
                    turn_index,
                    pause: None,
                });
            }
        }
        Ok(())
    }
}
