//! The scheduler seam: events in, a [`StepPlan`] out, plain data only.
//!
//! A scheduler holds no GPU handle, clock or file. It sees the run through a read-only
//! [`SchedView`] (the KV mechanism's queries and each agent's progress) and answers with a plan of
//! intents: which agents compute how many tokens, which swap out / in, drop, release to or reclaim
//! from the prefix cache, and which waiting turns to reject. The run loop applies the plan through
//! the shared KV mechanism (which checks it) and hands the resulting batch to a backend. This is
//! what lets one policy run unchanged on the simulated GPU and on the H100.

use crate::ids::{AgentId, SwapId};
use crate::kv::{KvManager, SwapDirection};
use crate::time::SimTime;

/// Where an agent is in its program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Before its first arrival.
    NotArrived,
    /// A turn's input is ready; the turn has not computed yet (or was preempted back).
    Waiting,
    /// The turn has been admitted and computes (prefill chunks, then decode).
    Running,
    /// Between turns.
    Paused,
    /// Program complete.
    Done,
    /// A turn was rejected (out of memory); the agent's program ended there.
    Rejected,
}

/// Progress of one agent, maintained by the run loop (read-only for schedulers). What a step
/// reads for every agent of its batch (phase, token counts, attained service) comes first, in
/// declaration order, so it shares a cache line in most records.
#[derive(Clone, Debug)]
#[repr(C)]
pub struct AgentRuntime {
    pub phase: Phase,
    /// Tokens in the sequence so far (known tokens; the KV may cover fewer).
    pub seq_tokens: u32,
    pub generated: u32,
    pub generate_target: u32,
    pub turn_index: u32,
    pub turn_count: u32,
    /// Compute time this agent has received so far (for attained-service ordering).
    pub attained_service_ns: u64,
    /// Admission order of the current turn (a sequence number; lower = earlier).
    pub admit_seq: u64,
    pub first_arrival: SimTime,
    /// When the current turn's input became ready.
    pub turn_arrival: SimTime,
    /// Start of the current pause and its hint (when paused).
    pub pause_started: SimTime,
    pub pause_hint_ns: Option<u64>,
}

impl AgentRuntime {
    /// Tokens whose KV must still be computed before the next token can be generated.
    pub fn pending_tokens(&self, kv: &KvManager, agent: AgentId) -> u32 {
        self.seq_tokens - kv.kv_tokens(agent)
    }

    /// Tokens still to generate in the current turn.
    pub fn remaining_generate(&self) -> u32 {
        self.generate_target - self.generated
    }

    pub fn alive(&self) -> bool {
        matches!(self.phase, Phase::Waiting | Phase::Running | Phase::Paused)
    }
}

/// Engine-level limits every policy respects (the same for all, so comparisons are fair).
#[derive(Clone, Debug, PartialEq)]
pub struct SchedConfig {
    /// Tokens one step may process (prefill chunks plus decodes): the chunked-prefill budget.
    pub max_batch_tokens: u32,
    /// Sequences one step may process.
    pub max_batch_sequences: u32,
    /// How a step is filled with prefill (the same for every KV policy of a comparison).
    pub batching: crate::policies::BatchPolicy,
}

impl Default for SchedConfig {
    fn default() -> Self {
        SchedConfig {
            max_batch_tokens: 8192,
            max_batch_sequences: 256,
            batching: crate::policies::BatchPolicy::default(),
        }
    }
}

/// What a policy may know of costs (from the GPU profile), to price keep / swap / drop.
#[derive(Clone, Debug, PartialEq)]
pub struct CostHints {
    pub kv_bytes_per_token: u64,
    pub block_bytes: u64,
    /// One-way swap: latency + bytes / bandwidth (host-to-device and device-to-host).
    pub swap_latency_ns: u64,
    pub swap_in_bandwidth_bytes_per_s: f64,
    pub swap_out_bandwidth_bytes_per_s: f64,
    /// Approximate prefill (recompute) time per token on a busy GPU.
    pub prefill_ns_per_token: f64,
    /// Approximate time of one decode step at moderate batch.
    pub decode_step_ns: f64,
    /// Device-memory time to read one cached token's KV (a decode step reads every cached
    /// token of every decoding sequence): KV bytes per token / memory bandwidth.
    pub kv_read_ns_per_token: f64,
}

impl CostHints {
    pub fn swap_in_ns(&self, blocks: u32) -> u64 {
        self.swap_latency_ns.saturating_add(
            (blocks as f64 * self.block_bytes as f64 / self.swap_in_bandwidth_bytes_per_s * 1e9)
                as u64,
        )
    }
    pub fn swap_out_ns(&self, blocks: u32) -> u64 {
        self.swap_latency_ns.saturating_add(
            (blocks as f64 * self.block_bytes as f64 / self.swap_out_bandwidth_bytes_per_s * 1e9)
                as u64,
        )
    }
    pub fn recompute_ns(&self, tokens: u32) -> u64 {
        (tokens as f64 * self.prefill_ns_per_token) as u64
    }
}

/// The read-only view a scheduler plans from.
pub struct SchedView<'a> {
    pub now: SimTime,
    pub kv: &'a KvManager,
    pub agents: &'a [AgentRuntime],
    pub config: &'a SchedConfig,
    pub costs: &'a CostHints,
    /// Swaps in flight per direction, with the time the channel is busy until (if known).
    pub swap_out_busy_until: SimTime,
    pub swap_in_busy_until: SimTime,
}

impl SchedView<'_> {
    pub fn agent(&self, agent: AgentId) -> &AgentRuntime {
        &self.agents[agent as usize]
    }
    pub fn pending_tokens(&self, agent: AgentId) -> u32 {
        self.agents[agent as usize].pending_tokens(self.kv, agent)
    }
    /// True when the agent's next compute is a decode (one pending token, already generating).
    pub fn is_decoding(&self, agent: AgentId) -> bool {
        let a = &self.agents[agent as usize];
        a.generated > 0 && self.pending_tokens(agent) == 1
    }
    /// Blocks the agent's current turn will need in total when it completes, beyond what its table
    /// holds (shared prefix blocks included).
    pub fn growth_blocks_to_finish(&self, agent: AgentId) -> u32 {
        let a = &self.agents[agent as usize];
        // The final token of a turn is generated without its KV being written.
        let final_tokens = a.seq_tokens + a.remaining_generate().saturating_sub(1);
        self.kv
            .blocks_for(final_tokens)
            .saturating_sub(self.kv.table_blocks(agent))
    }
}

/// A decision from the scheduler about an event it was told of.
#[derive(Clone, Debug, PartialEq)]
pub enum SchedEvent {
    /// A turn's input is ready (first arrival or return from a pause).
    TurnArrived { agent: AgentId, turn_index: u32 },
    /// A turn generated its last token. `pause` is `None` for the agent's last turn.
    TurnFinished {
        agent: AgentId,
        turn_index: u32,
        pause: Option<PauseNotice>,
    },
    /// A swap finished; the agent's blocks moved.
    SwapDone {
        agent: AgentId,
        swap_id: SwapId,
        direction: SwapDirection,
    },
}

/// What a scheduler is told when a pause starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PauseNotice {
    /// The hint (exact, noisy or absent, per the workload).
    pub hint_ns: Option<u64>,
    /// The true pause. Only the `djinn-true-pauses` reference reads it (it measures what exact
    /// pause prediction buys djinn); a real policy cannot know it.
    pub true_ns_reference_only: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillOrder {
    pub agent: AgentId,
    pub tokens: u32,
}

/// The plan of one step. Applied in field order: reject, release, reclaim, drop, swap_out,
/// swap_in, then the compute orders (which allocate the blocks they grow into).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepPlan {
    /// Waiting turns rejected as out of memory (the agent's program ends).
    pub reject: Vec<AgentId>,
    /// Resident agents whose blocks go to the prefix cache (vllm at turn end).
    pub release: Vec<AgentId>,
    /// Agents taking back their surviving cached prefix.
    pub reclaim: Vec<AgentId>,
    /// (agent, tokens to keep): drop the KV beyond a prefix (0 = all).
    pub drop: Vec<(AgentId, u32)>,
    /// (agent, blocks): start copying the agent's last `blocks` GPU blocks to the host.
    pub swap_out: Vec<(AgentId, u32)>,
    /// Start copying all of the agent's host blocks back to the GPU.
    pub swap_in: Vec<AgentId>,
    /// Prefill chunks (tokens of the agent's pending tokens).
    pub prefill: Vec<PrefillOrder>,
    /// Agents that decode one token.
    pub decode: Vec<AgentId>,
    /// Call the scheduler again no later than this (timers: prefetch, TTL expiry).
    pub wake_at: Option<SimTime>,
}

impl StepPlan {
    pub fn clear(&mut self) {
        self.reject.clear();
        self.release.clear();
        self.reclaim.clear();
        self.drop.clear();
        self.swap_out.clear();
        self.swap_in.clear();
        self.prefill.clear();
        self.decode.clear();
        self.wake_at = None;
    }

    pub fn has_compute(&self) -> bool {
        !self.prefill.is_empty() || !self.decode.is_empty()
    }

    pub fn wake_no_later_than(&mut self, t: SimTime) {
        self.wake_at = Some(self.wake_at.map_or(t, |w| w.min(t)));
    }
}

/// A scheduling policy.
pub trait Scheduler {
    /// The policy's name as it appears in tables and manifests.
    fn name(&self) -> String;
    /// Learns of an event (called before the next `plan_step`, in event order).
    fn on_event(&mut self, event: &SchedEvent, view: &SchedView);
    /// Plans the next step into `plan` (cleared by the caller).
    fn plan_step(&mut self, view: &SchedView, plan: &mut StepPlan);
}
