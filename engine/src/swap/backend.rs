//! The real engine behind `sim`'s [`Backend`] seam: a paged model (CPU or CUDA) and a swap
//! engine over its KV pool, driven by the same run loop as the simulated GPU.
//!
//! The run loop owns block ids (`sim::kv::KvManager`) and the agents' KV state machine; this
//! backend executes steps on the block tables the mechanism holds and swaps the block pairs its
//! `SwapJob`s name. It never lets an agent run while a swap still copies one of its blocks: a
//! step naming such a block is refused with an error, even if the mechanism already thinks the
//! agent is resident (a swap is complete only once `poll_swaps` has reported it).
//!
//! Token ids: the workload gives token counts, not text, so new input tokens are drawn from a
//! seeded hash of (agent, position); a decode step feeds back the token the agent generated last
//! (greedy), so a run is a real generation whose tokens can be checked afterwards. The first
//! tokens of an agent of a prefix group are its group's (a hash of (group, position)), the same
//! in every agent of the group: that is what makes their KV the same and shareable.
//!
//! Shared prefix blocks: the mechanism may point several tables at one physical block of a
//! group's prefix. The engine executes that as it is: an agent admitted with a prefix hit starts
//! its prefill after the shared part (those positions' KV is already in the pool, written by the
//! agent that computed them), and the engine refuses a step that would write into a shared block
//! or a swap that names one (a swap moves only private blocks; shared ones stay on the GPU for
//! the group), since either would change the KV under the other agents.

use std::collections::BTreeMap;
use std::time::Instant;

use sim::backend::{Backend, BackendError, BatchSeq, StepBatch, SwapCompletion};
use sim::ids::AgentId;
use sim::kv::{KvManager, SwapDirection as SimDirection, SwapJob};
use sim::time::SimTime;
use sim::workload::{SharedPrefix, Workload};

use super::cpu::CpuSwapEngine;
use super::{BlockPair, SwapDirection, SwapEngine, SwapError, SwapId, SwapRecord};
use crate::batch::{PagedModel, SeqStep};
use crate::cpu::CpuModel;

/// A swap engine that can copy blocks of a given model's KV pool.
pub trait SwapExecutor: SwapEngine {
    type Model: PagedModel;

    fn submit_for(
        &mut self,
        model: &mut Self::Model,
        agent: AgentId,
        direction: SwapDirection,
        pairs: &[BlockPair],
    ) -> Result<SwapId, SwapError>;
}

impl SwapExecutor for CpuSwapEngine<f32> {
    type Model = CpuModel;

    fn submit_for(
        &mut self,
        model: &mut CpuModel,
        agent: AgentId,
        direction: SwapDirection,
        pairs: &[BlockPair],
    ) -> Result<SwapId, SwapError> {
        self.submit(model.kv_pool_mut(), agent, direction, pairs)
    }
}

#[cfg(feature = "cuda")]
impl SwapExecutor for super::cuda::CudaSwapEngine {
    type Model = crate::cuda::CudaModel;

    fn submit_for(
        &mut self,
        _model: &mut crate::cuda::CudaModel,
        agent: AgentId,
        direction: SwapDirection,
        pairs: &[BlockPair],
    ) -> Result<SwapId, SwapError> {
        // The engine was built over this model's pool (base pointer) and ordered after its stream.
        self.submit(agent, direction, pairs)
    }
}

/// How the backend predicts when copies finish (for `next_swap_completion` and
/// `channel_busy_until`); completions themselves always come from the swap engine.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SwapEstimate {
    pub latency_ns: u64,
    pub out_bytes_per_s: f64,
    pub in_bytes_per_s: f64,
}

impl SwapEstimate {
    /// The H100 pinned-copy rates measured by `djinn engine swap-bench` (results/h100/swap-bench.json).
    pub fn h100_measured() -> Self {
        SwapEstimate {
            latency_ns: 20_000,
            out_bytes_per_s: 55e9,
            in_bytes_per_s: 55e9,
        }
    }
}

/// While a swap is predicted done but not yet reported, the run loop is asked to look again this
/// much later (it has nothing else to do).
const REPOLL_NS: u64 = 20_000;

pub struct EngineBackend<M: PagedModel, S: SwapExecutor<Model = M>> {
    model: M,
    swap: S,
    name: String,
    vocab_size: u32,
    token_seed: u64,
    block_bytes: u64,
    estimate: SwapEstimate,
    /// The token each agent generated last (the input of its next decode step).
    last_token: BTreeMap<AgentId, u32>,
    /// Every token of each agent's sequence as the engine ran it (inputs and generated).
    sequences: BTreeMap<AgentId, Vec<u32>>,
    /// Greedy tokens each agent generated, in order.
    generated: BTreeMap<AgentId, Vec<u32>>,
    /// Positions of each agent's sequence whose token is one the model generated (fed back).
    generated_positions: BTreeMap<AgentId, std::collections::BTreeSet<u32>>,
    /// Each agent's shared prefix in the current run's workload (index: agent id).
    prefixes: Vec<Option<SharedPrefix>>,
    /// Engine swap id -> the run loop's swap id.
    sim_swap_of: BTreeMap<SwapId, sim::ids::SwapId>,
    predicted_end: BTreeMap<sim::ids::SwapId, SimTime>,
    /// Predicted end of the copies queued per direction: [out, in].
    free_at: [SimTime; 2],
    last_now: SimTime,
    records: Vec<SwapRecord>,
    /// A failure seen where the trait cannot return one (`poll_swaps`); reported by the next call
    /// that can.
    deferred_failure: Option<String>,
    /// The current run's clock zero on the swap engine's clock (records are shifted by it).
    epoch_offset_ns: u64,
}

fn failed(message: impl Into<String>) -> BackendError {
    BackendError::Failed(message.into())
}

fn engine_direction(direction: SimDirection) -> SwapDirection {
    match direction {
        SimDirection::Out => SwapDirection::Out,
        SimDirection::In => SwapDirection::In,
    }
}

fn channel(direction: SimDirection) -> usize {
    match direction {
        SimDirection::Out => 0,
        SimDirection::In => 1,
    }
}

/// A new input token of `agent` at `position` (seeded, so runs repeat).
fn input_token(seed: u64, agent: AgentId, position: u32, vocab_size: u32) -> u32 {
    mix_token(seed ^ ((agent as u64) << 32) ^ position as u64, vocab_size)
}

/// The token at `position` of prefix group `group`'s shared prefix. The top bit keeps group
/// tokens apart from any agent's (agent ids fit in 32 bits).
fn group_token(seed: u64, group: u32, position: u32, vocab_size: u32) -> u32 {
    mix_token(
        seed ^ (1u64 << 63) ^ ((group as u64) << 32) ^ position as u64,
        vocab_size,
    )
}

fn mix_token(mut x: u64, vocab_size: u32) -> u32 {
    // splitmix64 finaliser: a fixed, well-mixed function of the inputs.
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    (x % vocab_size as u64) as u32
}

impl<M: PagedModel, S: SwapExecutor<Model = M>> EngineBackend<M, S> {
    /// `block_bytes`: bytes of one KV block (for the swap-time predictions).
    pub fn new(
        name: impl Into<String>,
        model: M,
        swap: S,
        vocab_size: u32,
        block_bytes: u64,
        token_seed: u64,
        estimate: SwapEstimate,
    ) -> Self {
        EngineBackend {
            model,
            swap,
            name: name.into(),
            vocab_size,
            token_seed,
            block_bytes,
            estimate,
            last_token: BTreeMap::new(),
            sequences: BTreeMap::new(),
            generated: BTreeMap::new(),
            generated_positions: BTreeMap::new(),
            prefixes: Vec::new(),
            sim_swap_of: BTreeMap::new(),
            predicted_end: BTreeMap::new(),
            free_at: [SimTime::ZERO; 2],
            last_now: SimTime::ZERO,
            records: Vec::new(),
            deferred_failure: None,
            epoch_offset_ns: 0,
        }
    }

    /// Forgets the previous run (sequences, generated tokens, swap records, predictions) so the
    /// same model and pools serve another run. `epoch_offset_ns`: the new run's clock zero, in
    /// nanoseconds after the swap engine's epoch (its records are shifted onto the run's clock).
    /// Fails if a swap is still in flight.
    ///
    /// `workload`: the run's agents; the engine reads each one's shared prefix from it (its
    /// first tokens are the group's).
    pub fn begin_run(
        &mut self,
        epoch_offset_ns: u64,
        workload: &Workload,
    ) -> Result<(), BackendError> {
        self.check_deferred()?;
        if !self.sim_swap_of.is_empty() || self.swap.in_flight_count() > 0 {
            return Err(failed(format!(
                "a new run cannot start while {} swaps are in flight",
                self.swap.in_flight_count()
            )));
        }
        self.last_token.clear();
        self.sequences.clear();
        self.generated.clear();
        self.generated_positions.clear();
        self.predicted_end.clear();
        self.free_at = [SimTime::ZERO; 2];
        self.last_now = SimTime::ZERO;
        self.records.clear();
        self.prefixes = vec![None; workload.agents.len()];
        for a in &workload.agents {
            match self.prefixes.get_mut(a.agent_id as usize) {
                Some(slot) => *slot = a.prefix,
                None => {
                    return Err(failed(format!(
                        "workload `{}`: agent id {} is not below its {} agents",
                        workload.name,
                        a.agent_id,
                        workload.agents.len()
                    )))
                }
            }
        }
        self.epoch_offset_ns = epoch_offset_ns;
        Ok(())
    }

    /// The swap engine's epoch offset of the current run (see [`Self::begin_run`]).
    pub fn epoch_offset_ns(&self) -> u64 {
        self.epoch_offset_ns
    }

    pub fn model(&self) -> &M {
        &self.model
    }

    pub fn model_mut(&mut self) -> &mut M {
        &mut self.model
    }

    pub fn swap_engine(&self) -> &S {
        &self.swap
    }

    /// The copy engine's record of every reported swap (ids are the run loop's swap ids).
    pub fn swap_records(&self) -> &[SwapRecord] {
        &self.records
    }

    /// The tokens of an agent's sequence as run (new inputs and fed-back generated tokens).
    pub fn sequence(&self, agent: AgentId) -> &[u32] {
        self.sequences.get(&agent).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The greedy tokens an agent generated, in order.
    pub fn generated(&self, agent: AgentId) -> &[u32] {
        self.generated.get(&agent).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Positions of the agent's sequence that hold a token the model generated and that was fed
    /// back: the logits at the position before must pick exactly that token (greedy).
    pub fn generated_positions(&self, agent: AgentId) -> Vec<u32> {
        self.generated_positions
            .get(&agent)
            .map(|p| p.iter().copied().collect())
            .unwrap_or_default()
    }

    fn check_deferred(&mut self) -> Result<(), BackendError> {
        match self.deferred_failure.take() {
            Some(message) => Err(failed(message)),
            None => Ok(()),
        }
    }

    fn prefix_of(&self, agent: AgentId) -> Option<SharedPrefix> {
        self.prefixes.get(agent as usize).copied().flatten()
    }

    /// The input token at `position` of an agent's sequence that the engine has not run yet: its
    /// group's token inside its shared prefix, else its own.
    fn new_input_token(&self, agent: AgentId, position: u32) -> u32 {
        match self.prefix_of(agent) {
            Some(p) if position < p.tokens => {
                group_token(self.token_seed, p.group, position, self.vocab_size)
            }
            _ => input_token(self.token_seed, agent, position, self.vocab_size),
        }
    }

    /// Checks one sequence of a step against the shared blocks of its table: the mechanism's
    /// prefix group is the workload's; KV the engine never computed for this agent (a prefix
    /// hit) lies inside its shared prefix, in blocks that are shared (another agent wrote them);
    /// and the step writes no shared block.
    fn check_shared_blocks(
        &self,
        seq: &BatchSeq,
        table: &[u32],
        positions_run: usize,
        kv: &KvManager,
    ) -> Result<(), BackendError> {
        let agent = seq.agent;
        let prefix = self.prefix_of(agent);
        if let Some(group) = kv.prefix_group(agent) {
            if prefix.map(|p| p.group) != Some(group) {
                return Err(failed(format!(
                    "agent {agent} shares the KV of prefix group {group}, but the run's workload gives it {}",
                    prefix.map_or("no shared prefix".into(), |p| format!("group {}", p.group))
                )));
            }
        }
        let block_size = kv.block_size_tokens().max(1) as usize;
        let shared = |index: usize| {
            table
                .get(index)
                .is_some_and(|&b| kv.shared_block_refs(b) > 0)
        };
        let context = seq.context_tokens as usize;
        if positions_run < context {
            let limit = prefix.map_or(0, |p| p.tokens as usize);
            let unshared = (positions_run / block_size..context.div_ceil(block_size))
                .find(|&index| !shared(index));
            if context > limit || unshared.is_some() {
                return Err(failed(format!(
                    "agent {agent} starts a step at position {context}, but the engine ran only its first {positions_run} positions \
                     and KV it did not compute must be a hit of its shared prefix ({limit} tokens) in shared blocks{}",
                    unshared.map_or(String::new(), |i| format!(" (its block {i} is private)"))
                )));
            }
        }
        let end = context + seq.tokens as usize;
        if let Some(index) = (context / block_size..end.div_ceil(block_size)).find(|&i| shared(i)) {
            return Err(failed(format!(
                "agent {agent} would write positions {context}..{end} into shared block {} (its block {index}); \
                 a shared block is written once, by the agent that computed it",
                table[index]
            )));
        }
        Ok(())
    }

    /// The block table of an agent that may run now, or why it may not.
    fn runnable_table(&self, agent: AgentId, kv: &KvManager) -> Result<Vec<u32>, BackendError> {
        if !kv.is_resident(agent) {
            return Err(failed(format!(
                "agent {agent} was scheduled while its KV is {:?}, not resident on the GPU",
                kv.state(agent)
            )));
        }
        let table: Vec<u32> = kv.gpu_block_table(agent).collect();
        for &block in &table {
            if let Some(swap_id) = self.swap.busy_swap_of_gpu_block(block) {
                return Err(failed(format!(
                    "agent {agent} was scheduled while engine swap {swap_id} still copies its GPU block {block}; \
                     a swap is complete only once poll_swaps has reported it"
                )));
            }
        }
        Ok(table)
    }
}

impl<M: PagedModel, S: SwapExecutor<Model = M>> Backend for EngineBackend<M, S> {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn execute_step(
        &mut self,
        _now: SimTime,
        batch: &StepBatch,
        kv: &KvManager,
    ) -> Result<u64, BackendError> {
        self.check_deferred()?;
        let seqs: Vec<_> = batch.prefill.iter().chain(&batch.decode).copied().collect();
        let mut tables = Vec::with_capacity(seqs.len());
        let mut inputs = Vec::with_capacity(seqs.len());
        let mut fed_generated = Vec::new();
        for seq in &seqs {
            let table = self.runnable_table(seq.agent, kv)?;
            // Positions already run keep their tokens (a dropped prefix is recomputed from the
            // same tokens); the first new position takes the token generated last; later ones
            // are new input.
            let known = self
                .sequences
                .get(&seq.agent)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            self.check_shared_blocks(seq, &table, known.len(), kv)?;
            tables.push(table);
            let pending = self.last_token.get(&seq.agent).copied();
            let tokens: Vec<u32> = (0..seq.tokens)
                .map(|i| {
                    let position = seq.context_tokens + i;
                    match known.get(position as usize) {
                        Some(&token) => token,
                        None if position as usize == known.len() && pending.is_some() => {
                            fed_generated.push((seq.agent, position));
                            pending.expect("checked")
                        }
                        None => self.new_input_token(seq.agent, position),
                    }
                })
                .collect();
            inputs.push(tokens);
        }
        let steps: Vec<SeqStep<'_>> = seqs
            .iter()
            .zip(&tables)
            .zip(&inputs)
            .map(|((seq, table), tokens)| SeqStep {
                block_table: table,
                context_len: seq.context_tokens as usize,
                tokens,
            })
            .collect();
        let started = Instant::now();
        // Greedy tokens only: on the GPU they leave the device through mapped pinned memory, not a
        // copy engine (a logits read-back would queue behind the swap-outs in flight).
        let next_tokens = self
            .model
            .forward_greedy(&steps)
            .map_err(|e| failed(format!("forward failed: {e}")))?;
        if next_tokens.len() != seqs.len() {
            return Err(failed(format!(
                "forward returned {} tokens for a batch of {} sequences",
                next_tokens.len(),
                seqs.len()
            )));
        }
        let duration_ns = started.elapsed().as_nanos() as u64;
        for (agent, position) in fed_generated {
            self.generated_positions
                .entry(agent)
                .or_default()
                .insert(position);
        }
        for (row, (seq, tokens)) in seqs.iter().zip(&inputs).enumerate() {
            // A prefix hit: the shared positions before the step are the group's tokens
            // (checked above to lie inside the prefix).
            let run_before = self.sequences.get(&seq.agent).map_or(0, Vec::len) as u32;
            let hit: Vec<u32> = (run_before..seq.context_tokens)
                .map(|position| self.new_input_token(seq.agent, position))
                .collect();
            let sequence = self.sequences.entry(seq.agent).or_default();
            sequence.extend_from_slice(&hit);
            let end = seq.context_tokens as usize + tokens.len();
            if end > sequence.len() {
                // New positions: the pending generated token (if any) is now part of the sequence.
                sequence.truncate(seq.context_tokens as usize);
                sequence.extend_from_slice(tokens);
                let token = next_tokens[row];
                self.last_token.insert(seq.agent, token);
                self.generated.entry(seq.agent).or_default().push(token);
            }
            // Else a recompute of positions already run: same tokens, nothing new generated.
        }
        Ok(duration_ns.max(1))
    }

    fn start_swap(
        &mut self,
        now: SimTime,
        job: &SwapJob,
        kv: &KvManager,
    ) -> Result<(), BackendError> {
        self.check_deferred()?;
        // Shared blocks stay on the GPU for the group: moving one would take it from under the
        // other agents that reference it.
        if let Some(&(block, _)) = job
            .pairs
            .iter()
            .find(|&&(gpu_block, _)| kv.shared_block_refs(gpu_block) > 0)
        {
            return Err(failed(format!(
                "swap {} of agent {} names GPU block {block}, which is shared ({} tables point at it); a swap moves only private blocks",
                job.id,
                job.agent,
                kv.shared_block_refs(block)
            )));
        }
        let pairs = BlockPair::from_job(&job.pairs);
        let engine_id = self
            .swap
            .submit_for(
                &mut self.model,
                job.agent,
                engine_direction(job.direction),
                &pairs,
            )
            .map_err(|e| failed(format!("swap {} of agent {}: {e}", job.id, job.agent)))?;
        self.sim_swap_of.insert(engine_id, job.id);
        let bytes = pairs.len() as f64 * self.block_bytes as f64;
        let rate = match job.direction {
            SimDirection::Out => self.estimate.out_bytes_per_s,
            SimDirection::In => self.estimate.in_bytes_per_s,
        };
        let lane = channel(job.direction);
        let start = self.free_at[lane].max(now);
        let end = start + self.estimate.latency_ns + (bytes / rate * 1e9).round() as u64;
        self.free_at[lane] = end;
        self.predicted_end.insert(job.id, end);
        Ok(())
    }

    fn poll_swaps(&mut self, now: SimTime, out: &mut Vec<SwapCompletion>) {
        self.last_now = now;
        let mut records = match self.swap.poll() {
            Ok(records) => records,
            Err(e) => {
                self.deferred_failure = Some(format!("polling the swap engine failed: {e}"));
                return;
            }
        };
        // Completion order: by when each copy ended.
        records.sort_by_key(|r| (r.end_ns, r.swap_id));
        for mut record in records {
            let Some(sim_id) = self.sim_swap_of.remove(&record.swap_id) else {
                self.deferred_failure = Some(format!(
                    "the swap engine reported swap {} it was never given",
                    record.swap_id
                ));
                return;
            };
            self.predicted_end.remove(&sim_id);
            record.swap_id = sim_id;
            record.start_ns = record.start_ns.saturating_sub(self.epoch_offset_ns);
            record.end_ns = record.end_ns.saturating_sub(self.epoch_offset_ns);
            out.push(SwapCompletion {
                swap_id: sim_id,
                at: now,
            });
            self.records.push(record);
        }
    }

    fn next_swap_completion(&self) -> Option<SimTime> {
        let predicted = self.predicted_end.values().min().copied()?;
        // Never "now or earlier": the run loop would re-plan at the same instant until it gives up.
        Some(predicted.max(self.last_now + REPOLL_NS))
    }

    fn channel_busy_until(&self, direction: SimDirection) -> SimTime {
        self.free_at[channel(direction)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_tokens_are_seeded_and_in_range() {
        let a = input_token(1, 2, 3, 256);
        assert_eq!(a, input_token(1, 2, 3, 256));
        assert!((0..100).map(|p| input_token(1, 2, p, 256)).all(|t| t < 256));
        let distinct: std::collections::BTreeSet<u32> =
            (0..100).map(|p| input_token(1, 2, p, 256)).collect();
        assert!(distinct.len() > 50, "tokens should vary with position");
    }
}
