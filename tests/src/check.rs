//! Running a case under a policy, and the checks made on what it recorded.
//!
//! The run loop checks its own invariants after every step (`CheckLevel::Full`: pool capacity,
//! single ownership and free-queue integrity, residency of every computing agent, per-turn and
//! per-agent token conservation, deadlock and limits). The checks here are a second, independent
//! layer computed only from the records a run writes (turns, steps, swaps), plus the liveness and
//! fairness promises, which are properties of a whole run.

use sim::backend::{BatchSeq, SimGpu, StepBatch};
use sim::driver::{self, RunError, RunOutput};
use sim::experiment::simulate_workload;
use sim::kv::SwapDirection;
use sim::sched::Scheduler;
use sim::time::VirtualClock;
use sim::PolicyKind;

use crate::case::{Case, Materialized};

/// What a policy promises beyond the safety invariants every policy must keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Promises {
    /// When the GPU pool holds the largest single context, no turn is rejected.
    pub no_rejection_when_fits: bool,
    /// Waiting turns are served in a fair order (first come, first served by turn arrival), so no
    /// turn's queue wait exceeds [`FAIRNESS_WAIT_MULTIPLE`] x the mean wait (plus [`fairness_slack_ns`]).
    pub fair_order: bool,
}

/// The promises of a shipped policy. Policies added later get none until their author states
/// them here: they are still held to every safety invariant, to termination without deadlock and
/// to the liveness bound.
pub fn promises_of(kind: PolicyKind) -> Promises {
    match kind.name() {
        // Admits first come, first served by turn arrival with growth reserved; evicts paused
        // agents rather than rejecting.
        "djinn" | "swap" | "offline" => Promises {
            no_rejection_when_fits: true,
            fair_order: true,
        },
        // Preempts by recompute instead of rejecting; the preempted go back to the head of the
        // queue, so order is not first come, first served.
        "vllm" | "vllm-noapc" => Promises {
            no_rejection_when_fits: true,
            fair_order: false,
        },
        // Rejects (out of memory) when paused agents hold the pool: that is the cliff it models.
        "pin" => Promises {
            no_rejection_when_fits: false,
            fair_order: true,
        },
        _ => Promises {
            no_rejection_when_fits: false,
            fair_order: false,
        },
    }
}

/// A policy to run: a shipped one, or a canary built only for tests.
pub struct PolicyUnderTest {
    pub name: String,
    pub kind: Option<PolicyKind>,
    pub build: fn() -> Box<dyn Scheduler + Send>,
    pub promises: Promises,
}

impl PolicyUnderTest {
    pub fn shipped(kind: PolicyKind) -> Self {
        // `PolicyKind::build` is a method; a fn pointer per kind keeps this type plain data.
        PolicyUnderTest {
            name: kind.name().to_string(),
            kind: Some(kind),
            build: || unreachable!("shipped policies run through simulate_workload"),
            promises: promises_of(kind),
        }
    }

    /// Every shipped policy (new `PolicyKind` variants are picked up automatically).
    pub fn all_shipped() -> Vec<PolicyUnderTest> {
        PolicyKind::ALL.iter().map(|&k| Self::shipped(k)).collect()
    }
}

/// Worst-case work of a case, from which the liveness bound is stated.
#[derive(Clone, Copy, Debug)]
pub struct Horizon {
    /// Serial compute time of every turn recomputing its whole context (chunked at the batch
    /// budget) and then decoding alone at its final context.
    pub serial_work_ns: u64,
    /// A swap out and a swap in of every turn's final context.
    pub swap_ns: u64,
    /// Every pause of every agent.
    pub pause_ns: u64,
    /// The last first arrival.
    pub last_arrival_ns: u64,
}

/// Recomputes of a turn's whole context the liveness bound allows (preemption by recompute can
/// redo a turn's prefill; 4 x the serial work of every turn is far beyond what a sane policy
/// needs, yet finite: a livelock or starvation blows through it).
pub const LIVENESS_WORK_MULTIPLE: u64 = 4;

impl Horizon {
    pub fn of(case: &Case, m: &Materialized) -> Horizon {
        let gpu = SimGpu::new(m.profile.clone(), case.block_size_tokens);
        let budget = case.max_batch_tokens.max(1);
        let block_bytes = gpu.block_bytes();
        let (mut serial_work_ns, mut swap_ns, mut pause_ns) = (0u64, 0u64, 0u64);
        let mut step = StepBatch::default();
        for agent in &m.workload.agents {
            let mut context = 0u32;
            for turn in &agent.turns {
                let with_input = context + turn.new_tokens;
                let final_tokens = with_input + turn.generated_tokens;
                let mut start = 0u32;
                while start < with_input {
                    let tokens = budget.min(with_input - start);
                    step.clear();
                    step.prefill.push(BatchSeq {
                        agent: 0,
                        context_tokens: start,
                        tokens,
                    });
                    serial_work_ns += gpu.step_ns(&step).max(1);
                    start += tokens;
                }
                step.clear();
                step.decode.push(BatchSeq {
                    agent: 0,
                    context_tokens: final_tokens,
                    tokens: 1,
                });
                serial_work_ns += gpu.step_ns(&step).max(1) * turn.generated_tokens as u64;
                let bytes =
                    (final_tokens as u64).div_ceil(case.block_size_tokens as u64) * block_bytes;
                swap_ns +=
                    gpu.swap_ns(SwapDirection::Out, bytes) + gpu.swap_ns(SwapDirection::In, bytes);
                pause_ns += turn.pause_after.map_or(0, |p| p.true_ns);
                context = final_tokens;
            }
        }
        let last_arrival_ns = m
            .workload
            .agents
            .iter()
            .map(|a| a.arrival.as_nanos())
            .max()
            .unwrap_or(0);
        Horizon {
            serial_work_ns,
            swap_ns,
            pause_ns,
            last_arrival_ns,
        }
    }

    /// The most any turn may take from its arrival to its last token when the pool holds the
    /// largest context: LIVENESS_WORK_MULTIPLE x serial work + all swaps + all pauses.
    pub fn turn_latency_bound_ns(&self) -> u64 {
        self.serial_work_ns
            .saturating_mul(LIVENESS_WORK_MULTIPLE)
            .saturating_add(self.swap_ns)
            .saturating_add(self.pause_ns)
    }
}

/// Fair order: no turn's queue wait exceeds this multiple of the mean queue wait...
pub const FAIRNESS_WAIT_MULTIPLE: u64 = 20;

/// ...plus this slack: four times the longest service (admission to last token) of any turn in the
/// run plus four of the longest steps. Even first come, first served at low load makes an unlucky
/// turn wait for the running turns that hold the memory it needs while the mean wait stays near
/// zero; and a big head that does not fit yet may be overtaken by turns that do (work
/// conservation), so it may wait for a few services.
pub fn fairness_slack_ns(output: &RunOutput) -> u64 {
    let longest_step = output
        .steps
        .iter()
        .map(|s| s.duration_ns)
        .max()
        .unwrap_or(0);
    let longest_service = output
        .turns
        .iter()
        .filter_map(|t| Some(t.finished_ns? - t.admitted_ns?))
        .max()
        .unwrap_or(0);
    4 * longest_service + 4 * longest_step
}

/// Runs one policy on a case with every-step checking and the liveness horizon as a time limit.
pub fn run_policy(
    case: &Case,
    m: &Materialized,
    put: &PolicyUnderTest,
) -> Result<RunOutput, RunError> {
    let horizon = Horizon::of(case, m);
    let mut config = m.config(case, put.kind.unwrap_or(PolicyKind::ALL[0]));
    // A run that outlives every turn's bound by far is a livelock: stop it there.
    config.limits.max_sim_time = sim::time::SimTime(
        horizon
            .last_arrival_ns
            .saturating_add(horizon.turn_latency_bound_ns())
            .saturating_mul(2)
            .max(1_000_000_000),
    );
    match put.kind {
        Some(_) => simulate_workload(&m.workload, &config),
        None => {
            let mut scheduler = (put.build)();
            let mut backend = SimGpu::new(config.profile.clone(), config.block_size_tokens);
            let mut clock = VirtualClock::default();
            driver::run(
                &config.settings(),
                &m.workload,
                scheduler.as_mut(),
                &mut backend,
                &mut clock,
            )
        }
    }
}

/// Facts about one checked run (for reporting and calibration of the stated bounds).
#[derive(Clone, Debug, Default)]
pub struct RunFacts {
    pub steps: u64,
    pub turns_finished: u64,
    pub turns_rejected: u64,
    pub max_latency_over_bound: f64,
    pub max_wait_ns: u64,
    pub mean_wait_ns: u64,
}

/// Runs `put` on the case and checks everything. The error names the policy, the seed and the
/// command that reproduces the run.
pub fn check_policy(
    case: &Case,
    m: &Materialized,
    put: &PolicyUnderTest,
) -> Result<RunFacts, String> {
    let fail = |what: String| -> String {
        let cmd = case.write_reproduction(m, &put.name);
        format!(
            "policy {} failed on seed {} ({} agents, GPU pool {} blocks (largest context {}), host pool {} blocks, block {} tokens, PCIe {:.1} GB/s, batch {} tokens): {what}\n  reproduce with: {cmd}",
            put.name,
            case.seed,
            m.workload.agents.len(),
            m.gpu_blocks,
            m.largest_context_blocks,
            m.host_blocks,
            case.block_size_tokens,
            case.pcie_bytes_per_s / 1e9,
            case.max_batch_tokens
        )
    };
    let output = run_policy(case, m, put).map_err(|e| fail(format!("run error: {e}")))?;
    check_records(case, m, &output).map_err(fail)?;
    check_summary(&output).map_err(fail)?;
    let mut facts = RunFacts {
        steps: output.steps.len() as u64,
        ..Default::default()
    };
    facts.turns_rejected = output.turns.iter().filter(|t| t.rejected).count() as u64;
    facts.turns_finished = output
        .turns
        .iter()
        .filter(|t| t.finished_ns.is_some())
        .count() as u64;

    // Liveness: with the largest context fitting, every turn completes within the stated bound.
    if m.fits() {
        let bound = Horizon::of(case, m).turn_latency_bound_ns().max(1);
        if put.promises.no_rejection_when_fits && facts.turns_rejected > 0 {
            let t = output.turns.iter().find(|t| t.rejected).expect("counted");
            return Err(fail(format!(
                "{} turns rejected although the pool holds the largest context; first: agent {} turn {}",
                facts.turns_rejected, t.agent_id, t.turn_index
            )));
        }
        for t in &output.turns {
            if let Some(end) = t.finished_ns {
                let latency = end - t.arrival_ns;
                facts.max_latency_over_bound = facts
                    .max_latency_over_bound
                    .max(latency as f64 / bound as f64);
                if latency > bound {
                    return Err(fail(format!(
                        "agent {} turn {} took {latency} ns, beyond the liveness bound {bound} ns",
                        t.agent_id, t.turn_index
                    )));
                }
            }
        }
    }

    // Fairness: queue waits of finished turns.
    let waits: Vec<u64> = output
        .turns
        .iter()
        .filter_map(|t| Some(t.admitted_ns? - t.arrival_ns))
        .collect();
    if !waits.is_empty() {
        facts.max_wait_ns = *waits.iter().max().expect("non-empty");
        facts.mean_wait_ns =
            (waits.iter().map(|&w| w as u128).sum::<u128>() / waits.len() as u128) as u64;
        if put.promises.fair_order && m.fits() {
            let allowed = FAIRNESS_WAIT_MULTIPLE * facts.mean_wait_ns + fairness_slack_ns(&output);
            if facts.max_wait_ns > allowed {
                return Err(fail(format!(
                    "unfair order: a turn waited {} ns, more than {FAIRNESS_WAIT_MULTIPLE} x the mean wait {} ns + slack {} ns",
                    facts.max_wait_ns,
                    facts.mean_wait_ns,
                    fairness_slack_ns(&output)
                )));
            }
        }
    }
    Ok(facts)
}

/// Checks what the summary derives from the records: the P99 decomposition adds up to the P99.
pub fn check_summary(out: &RunOutput) -> Result<(), String> {
    let s = analysis::summarize(
        &analysis::SummaryInputs::default(),
        &out.turns,
        &out.steps,
        &out.swaps,
    );
    let d = &s.decomposition_p99;
    let sum = d.queue_wait_ns + d.kv_restore_ns + d.prefill_ns + d.decode_ns;
    if sum != s.turn_latency.p99_ns {
        return Err(format!(
            "P99 decomposition {d:?} adds up to {sum} ns, not the P99 {} ns",
            s.turn_latency.p99_ns
        ));
    }
    // Preemptions: the step records report exactly the turns' preemptions; only a preempted turn
    // has requeued time.
    let by_steps: u64 = out.steps.iter().map(|s| s.preemptions as u64).sum();
    if by_steps != s.preemptions {
        return Err(format!(
            "steps report {by_steps} preemptions, turns {}",
            s.preemptions
        ));
    }
    if let Some(t) = out
        .turns
        .iter()
        .find(|t| t.requeued_ns > 0 && t.preemptions == 0)
    {
        return Err(format!(
            "agent {} turn {} requeued {} ns without a preemption",
            t.agent_id, t.turn_index, t.requeued_ns
        ));
    }
    Ok(())
}

/// Checks a run's records against the workload, independently of the run loop's own checker.
pub fn check_records(case: &Case, m: &Materialized, out: &RunOutput) -> Result<(), String> {
    let w = &m.workload;
    // Turn records: per agent, turns 0..k in order; a rejected turn ends the agent's program.
    let mut per_agent: Vec<Vec<&traces::TurnRecord>> = vec![Vec::new(); w.agents.len()];
    for t in &out.turns {
        per_agent
            .get_mut(t.agent_id as usize)
            .ok_or_else(|| format!("turn record of unknown agent {}", t.agent_id))?
            .push(t);
    }
    let mut expected_computed: u64 = 0;
    for (agent, records) in per_agent.iter().enumerate() {
        let program = &w.agents[agent];
        let rejected = records.last().is_some_and(|t| t.rejected);
        if !rejected && records.len() != program.turns.len() {
            return Err(format!(
                "agent {agent}: {} turn records for {} turns and no rejection",
                records.len(),
                program.turns.len()
            ));
        }
        for i in 0..records.len() {
            expected_computed += check_turn(agent, i, records, program, case.block_size_tokens)?;
        }
    }
    // Conservation over the whole run: the steps computed exactly the first-time tokens of every
    // finished turn plus what was recomputed.
    let computed: u64 = out
        .steps
        .iter()
        .map(|s| s.prefill_tokens as u64 + s.decode_batch as u64)
        .sum();
    if computed != expected_computed {
        return Err(format!(
            "steps computed {computed} tokens, turns account for {expected_computed}"
        ));
    }
    check_steps(case, m, out)?;
    check_swaps(case, m, out)
}

/// Steps: sequential, non-overlapping, within budgets and pools.
fn check_steps(case: &Case, m: &Materialized, out: &RunOutput) -> Result<(), String> {
    let mut prev_end = 0u64;
    for (i, s) in out.steps.iter().enumerate() {
        if s.step_index != i as u64 || s.start_ns < prev_end || s.duration_ns == 0 {
            return Err(format!(
                "step {i}: index {} start {} duration {} after a step ending at {prev_end}",
                s.step_index, s.start_ns, s.duration_ns
            ));
        }
        prev_end = s.start_ns + s.duration_ns;
        if s.prefill_tokens as u64 + s.decode_batch as u64 > case.max_batch_tokens as u64
            || s.prefill_sequences + s.decode_batch > 256
        {
            return Err(format!(
                "step {i}: {} prefill tokens in {} sequences + {} decodes exceed the batch budget",
                s.prefill_tokens, s.prefill_sequences, s.decode_batch
            ));
        }
        if s.gpu_blocks_free > m.gpu_blocks || s.host_blocks_free > m.host_blocks {
            return Err(format!(
                "step {i}: free blocks {}/{} exceed the pools {}/{}",
                s.gpu_blocks_free, s.host_blocks_free, m.gpu_blocks, m.host_blocks
            ));
        }
    }
    if out.gpu_blocks_used_peak > m.gpu_blocks || out.host_blocks_used_peak > m.host_blocks {
        return Err(format!(
            "peak use {}/{} exceeds the pools {}/{}",
            out.gpu_blocks_used_peak, out.host_blocks_used_peak, m.gpu_blocks, m.host_blocks
        ));
    }
    Ok(())
}

/// Swaps: each completes, moves whole blocks, and each direction's channel runs its copies one
/// after another (FIFO), each taking latency + bytes / bandwidth; step records report every start.
fn check_swaps(case: &Case, m: &Materialized, out: &RunOutput) -> Result<(), String> {
    let gpu = SimGpu::new(m.profile.clone(), case.block_size_tokens);
    for direction in [SwapDirection::Out, SwapDirection::In] {
        let mut channel_free = 0u64;
        for s in out
            .swaps
            .iter()
            .filter(|s| s.direction == direction.as_str())
        {
            if s.bytes != s.block_count as u64 * gpu.block_bytes() || s.block_count == 0 {
                return Err(format!(
                    "swap {}: {} bytes for {} blocks",
                    s.swap_id, s.bytes, s.block_count
                ));
            }
            let expected_end = s.start_ns.max(channel_free) + gpu.swap_ns(direction, s.bytes);
            if s.end_ns != expected_end {
                return Err(format!(
                    "swap {} ({}): ended at {} but the FIFO channel model says {expected_end}",
                    s.swap_id, s.direction, s.end_ns
                ));
            }
            channel_free = s.end_ns;
        }
    }
    // Every swap start is reported by a step record (the summary's swap columns and bandwidth
    // plots come from there), including those planned while nothing computed.
    let started_in: u64 = out.steps.iter().map(|s| s.swap_in_bytes_started).sum();
    let started_out: u64 = out.steps.iter().map(|s| s.swap_out_bytes_started).sum();
    let swapped_in: u64 = out
        .swaps
        .iter()
        .filter(|s| s.direction == "in")
        .map(|s| s.bytes)
        .sum();
    let swapped_out: u64 = out
        .swaps
        .iter()
        .filter(|s| s.direction == "out")
        .map(|s| s.bytes)
        .sum();
    // A swap planned after the last step is reported by no step: that happens only for an agent
    // rejected afterwards (anyone else computes again), so equality holds without rejections.
    let rejections = out.turns.iter().any(|t| t.rejected);
    let reported = if rejections {
        started_in <= swapped_in && started_out <= swapped_out
    } else {
        (started_in, started_out) == (swapped_in, swapped_out)
    };
    if !reported {
        return Err(format!(
            "step records report {started_in} B swapped in and {started_out} B out, the swap records {swapped_in} B and {swapped_out} B"
        ));
    }
    if out
        .swaps
        .iter()
        .any(|s| s.direction != "in" && s.direction != "out")
    {
        return Err("swap with an unknown direction".into());
    }
    Ok(())
}

/// One turn record against its turn of the program; returns the tokens its steps must have
/// computed (first-time tokens plus recomputed ones; none for a rejected turn).
fn check_turn(
    agent: usize,
    i: usize,
    records: &[&traces::TurnRecord],
    program: &sim::workload::AgentProgram,
    block_size_tokens: u32,
) -> Result<u64, String> {
    let t = records[i];
    let turn = &program.turns[i];
    if t.turn_index as usize != i {
        return Err(format!(
            "agent {agent}: record {i} has turn index {}",
            t.turn_index
        ));
    }
    if t.rejected {
        if i + 1 != records.len() {
            return Err(format!(
                "agent {agent} turn {i}: rejected but later turns ran"
            ));
        }
        if t.admitted_ns.is_some()
            || t.finished_ns.is_some()
            || t.tokens_generated > 0
            || t.tokens_prefilled > 0
        {
            return Err(format!("agent {agent} turn {i}: rejected but it computed"));
        }
        return Ok(0);
    }
    let (Some(admitted), Some(first), Some(finished)) =
        (t.admitted_ns, t.first_token_ns, t.finished_ns)
    else {
        return Err(format!(
            "agent {agent} turn {i}: neither finished nor rejected"
        ));
    };
    if !(t.arrival_ns <= admitted && admitted <= first && first <= finished) {
        return Err(format!("agent {agent} turn {i}: times out of order: arrival {} admitted {admitted} first {first} finished {finished}", t.arrival_ns));
    }
    if i == 0 && t.arrival_ns != program.arrival.as_nanos() {
        return Err(format!(
            "agent {agent}: first turn arrived at {} not {}",
            t.arrival_ns,
            program.arrival.as_nanos()
        ));
    }
    if i > 0 {
        let prev = records[i - 1];
        let pause = program.turns[i - 1]
            .pause_after
            .expect("not the last turn")
            .true_ns;
        if prev.finished_ns.map(|f| f + pause) != Some(t.arrival_ns) {
            return Err(format!("agent {agent} turn {i}: arrived at {} but the previous turn finished at {:?} with pause {pause}", t.arrival_ns, prev.finished_ns));
        }
    }
    // Generated tokens equal the requested count.
    if t.tokens_generated != turn.generated_tokens
        || t.tokens_generated_requested != turn.generated_tokens
    {
        return Err(format!(
            "agent {agent} turn {i}: generated {} (requested {}) of {}",
            t.tokens_generated, t.tokens_generated_requested, turn.generated_tokens
        ));
    }
    // Every new prompt token (and the previous turn's last generated token) is prefilled
    // exactly once. A turn preempted mid-decode may compute some of its generated tokens'
    // KV by a prefill on its return (even with nothing lost: a full prefix-cache hit
    // leaves one pending token), so prefill may cover up to generated - 1 more.
    // A first turn may start from its group's shared prefix (its full blocks) computed by
    // other agents: it is admitted with that KV and prefills only the rest.
    let hit = if i == 0 { t.context_tokens_at_admit } else { 0 };
    let shareable = program
        .prefix
        .map_or(0, |p| p.tokens / block_size_tokens * block_size_tokens);
    if hit > shareable {
        return Err(format!(
            "agent {agent} turn {i}: admitted with {hit} tokens of KV, but its shared prefix has {shareable}"
        ));
    }
    let inputs = turn.new_tokens + u32::from(i > 0) - hit;
    if t.tokens_prefilled < inputs || t.tokens_prefilled > inputs + turn.generated_tokens - 1 {
        return Err(format!(
            "agent {agent} turn {i}: prefilled {} first-time tokens for {inputs} inputs and {} generated",
            t.tokens_prefilled, turn.generated_tokens
        ));
    }
    if let (Some(start), Some(end)) = (t.restore_start_ns, t.restore_end_ns) {
        // Residency: a turn computes only once its KV is back on the GPU.
        if start > end || end > admitted {
            return Err(format!(
                "agent {agent} turn {i}: restore {start}..{end} but admitted at {admitted}"
            ));
        }
    }
    if !traces::records::KV_SOURCES.contains(&t.kv_source.as_str()) {
        return Err(format!(
            "agent {agent} turn {i}: unknown kv_source {:?}",
            t.kv_source
        ));
    }
    Ok(
        (turn.new_tokens + turn.generated_tokens - u32::from(i == 0) - hit) as u64
            + t.tokens_recomputed as u64,
    )
}
