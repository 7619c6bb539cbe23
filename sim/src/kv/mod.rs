//! The KV mechanism shared by the simulator and the real engine: paged block pools on the GPU and
//! in host memory, per-agent block tables, the agent KV state machine, the prefix-cache free
//! queue of the vllm policies, and the blocks of shared prefixes (agents of one prefix group hold
//! one copy of their common system prompt, with reference counts).
//!
//! Policies never touch this directly: they read it through [`KvManager`]'s query methods and ask
//! for changes in a `StepPlan`, which the run loop applies here. Every mutation checks its
//! preconditions and returns a [`KvError`] (a scheduler asked for the impossible) rather than
//! corrupting state; [`KvManager::audit`] recounts everything from scratch for the checker.
//!
//! Shared prefixes, precisely (see `shared.rs`): a block table may point at a block of its prefix
//! group's shared prefix; the block then counts one reference per table pointing at it, whatever
//! the agent's state (resident, paused, partly swapped out). A swap moves only private blocks, so
//! a swapped-out agent's shared blocks stay on the GPU and its return restores only its private
//! part. A shared block is freed only when no table points at it; it then waits in the free queue
//! as a cached block that any agent of the group reclaims while it survives. The per-agent block
//! counts policies read ([`KvManager::blocks`], [`KvManager::gpu_blocks_held`]) are private blocks:
//! what evicting the agent frees for sure; [`KvManager::table_blocks`] is the whole table.

use std::collections::BTreeMap;

use crate::ids::{AgentId, BlockId, SwapId};

mod audit;
mod cache;
mod pools;
mod shared;
#[cfg(test)]
mod tests;

use pools::{GpuPool, HostPool, NONE};

/// Where one logical block of an agent's context lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    Gpu(BlockId),
    Host(BlockId),
    /// Being copied GPU -> host; both copies are held until the copy completes.
    SwapOut {
        gpu: BlockId,
        host: BlockId,
    },
    /// Being copied host -> GPU.
    SwapIn {
        host: BlockId,
        gpu: BlockId,
    },
}

/// The agent KV state machine (derived from its slots).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum KvState {
    /// Every block is on the GPU (the agent may compute).
    Gpu,
    /// Some block is being copied out.
    SwappingOut,
    /// Some block is on the host and none is moving (possibly mixed with GPU blocks).
    Host,
    /// Some block is being copied in.
    SwappingIn,
    /// No KV at all (never computed, dropped, or released to the prefix cache).
    Dropped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwapDirection {
    /// GPU to host.
    Out,
    /// Host to GPU.
    In,
}

impl SwapDirection {
    pub fn as_str(self) -> &'static str {
        match self {
            SwapDirection::Out => "out",
            SwapDirection::In => "in",
        }
    }
}

/// One asynchronous copy of some of an agent's blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwapJob {
    pub id: SwapId,
    pub agent: AgentId,
    pub direction: SwapDirection,
    /// (GPU block, host block) pairs, in the agent's logical order.
    pub pairs: Vec<(BlockId, BlockId)>,
}

/// A plan asked for something the mechanism cannot do. Always a scheduler (or mechanism) bug:
/// fatal for the run, reported with the seed and step.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("agent {agent}: GPU pool exhausted (needed {needed} blocks, {free} free)")]
    GpuPoolExhausted {
        agent: AgentId,
        needed: u32,
        free: u32,
    },
    #[error("agent {agent}: host pool exhausted (needed {needed} blocks, {free} free)")]
    HostPoolExhausted {
        agent: AgentId,
        needed: u32,
        free: u32,
    },
    #[error("agent {agent}: {action} needs all blocks on the GPU, but its KV is {state:?}")]
    NotResident {
        agent: AgentId,
        action: &'static str,
        state: KvState,
    },
    #[error("agent {agent}: {action} not allowed while a swap is in flight")]
    SwapInFlight {
        agent: AgentId,
        action: &'static str,
    },
    #[error("agent {agent}: {message}")]
    Invalid { agent: AgentId, message: String },
    #[error("unknown swap {0}")]
    UnknownSwap(SwapId),
}

/// Per-agent KV bookkeeping. The fields every step reads for each agent of its batch (table
/// length, counts, token marks) come first and the record starts on a cache line, so they cost
/// one line per agent per step; the cached prefix and the totals follow.
#[derive(Clone, Debug, Default)]
#[repr(C, align(64))]
pub struct AgentKv {
    slots: Vec<Slot>,
    /// Tokens of the sequence prefix whose KV is valid.
    kv_tokens: u32,
    gpu_slot_count: u32,
    host_slot_count: u32,
    moving_out_count: u32,
    moving_in_count: u32,
    /// Slots of the table that point at shared blocks (all on the GPU).
    shared_count: u32,
    /// Highest token count whose KV has ever been computed: positions below it are recomputes.
    computed_high_water: u32,
    /// Leading logical blocks whose KV is the group's (the prefix's full blocks, fewer after a
    /// compaction cut into the prefix): only these may be shared.
    share_limit: u32,
    tokens_recomputed_total: u64,
    /// The prefix released to the GPU prefix cache (vllm): logical index -> block that held it.
    cached: Vec<BlockId>,
    tokens_dropped_total: u64,
    /// The agent's prefix group, if its sequence starts with a shared prefix.
    group: Option<u32>,
}

impl AgentKv {
    pub fn state(&self) -> KvState {
        if self.moving_out_count > 0 {
            KvState::SwappingOut
        } else if self.moving_in_count > 0 {
            KvState::SwappingIn
        } else if self.host_slot_count > 0 {
            KvState::Host
        } else if self.slots.is_empty() {
            KvState::Dropped
        } else {
            KvState::Gpu
        }
    }
}

/// Counts of what the last operations did (reset by the caller each step).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvStepCounters {
    pub drops: u32,
    pub dropped_tokens: u64,
    pub cache_evicted_blocks: u32,
}

/// The shared KV mechanism.
#[derive(Clone, Debug)]
pub struct KvManager {
    block_size_tokens: u32,
    /// log2 of the block size when it is a power of two (it is in every shipped profile):
    /// `blocks_for` runs for every committed turn several times a step, and a shift costs a
    /// cycle where a division costs tens.
    block_shift: Option<u32>,
    gpu: GpuPool,
    host: HostPool,
    agents: Vec<AgentKv>,
    /// Each agent's [`KvState`], kept beside the tables: policies test the state of hundreds of
    /// waiting agents per step, and one byte per agent stays in cache where the per-agent record
    /// (a cache miss each) does not. Refreshed by every mutation that changes a table's shape;
    /// the audit recomputes it.
    states: Vec<KvState>,
    in_flight: BTreeMap<SwapId, SwapJob>,
    next_swap_id: SwapId,
    /// Per prefix group: the shared block of each full prefix block (`NONE` while absent).
    groups: Vec<Vec<BlockId>>,
    /// Per prefix group: its prefix length in tokens.
    group_tokens: Vec<u32>,
    /// Per prefix group: how many leading prefix blocks the group holds in some table (present
    /// and referenced). Admission asks what a reclaim would bring for every waiting agent, and at
    /// real scale a prefix is hundreds of blocks: the walk starts past this run.
    group_lead: Vec<u32>,
    pub counters: KvStepCounters,
}

impl KvManager {
    pub fn new(
        block_size_tokens: u32,
        gpu_blocks: u32,
        host_blocks: u32,
        agent_count: u32,
    ) -> Self {
        assert!(block_size_tokens > 0, "block size must be > 0");
        KvManager {
            block_size_tokens,
            block_shift: block_size_tokens
                .is_power_of_two()
                .then(|| block_size_tokens.trailing_zeros()),
            gpu: GpuPool::new(gpu_blocks),
            host: HostPool::new(host_blocks),
            agents: vec![AgentKv::default(); agent_count as usize],
            states: vec![KvState::Dropped; agent_count as usize],
            in_flight: BTreeMap::new(),
            next_swap_id: 0,
            groups: Vec::new(),
            group_tokens: Vec::new(),
            group_lead: Vec::new(),
            counters: KvStepCounters::default(),
        }
    }

    // ----- queries (what policies read) -----

    pub fn block_size_tokens(&self) -> u32 {
        self.block_size_tokens
    }
    pub fn gpu_blocks_total(&self) -> u32 {
        self.gpu.owner.len() as u32
    }
    pub fn host_blocks_total(&self) -> u32 {
        self.host.owner.len() as u32
    }
    /// Free GPU blocks, cached prefix blocks included (they are reusable).
    pub fn gpu_blocks_free(&self) -> u32 {
        self.gpu.free_count
    }
    pub fn host_blocks_free(&self) -> u32 {
        self.host.free.len() as u32
    }
    pub fn gpu_blocks_used(&self) -> u32 {
        self.gpu_blocks_total() - self.gpu_blocks_free()
    }
    pub fn host_blocks_used(&self) -> u32 {
        self.host_blocks_total() - self.host_blocks_free()
    }
    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: u32) -> u32 {
        match self.block_shift {
            Some(shift) => ((tokens as u64 + (1u64 << shift) - 1) >> shift) as u32,
            None => tokens.div_ceil(self.block_size_tokens),
        }
    }
    pub fn agent_count(&self) -> u32 {
        self.agents.len() as u32
    }
    pub fn state(&self, agent: AgentId) -> KvState {
        self.states[agent as usize]
    }
    /// Tokens whose KV is valid (wherever it is).
    pub fn kv_tokens(&self, agent: AgentId) -> u32 {
        self.agents[agent as usize].kv_tokens
    }
    /// The agent's private blocks (any location): its table less the shared blocks it points at.
    /// Evicting the agent frees at least these (for an agent without a prefix group: its table).
    pub fn blocks(&self, agent: AgentId) -> u32 {
        let a = &self.agents[agent as usize];
        a.slots.len() as u32 - a.shared_count
    }
    /// Every block of the agent's table, shared ones included (what its context occupies).
    pub fn table_blocks(&self, agent: AgentId) -> u32 {
        self.agents[agent as usize].slots.len() as u32
    }
    /// Private blocks the agent holds on the GPU (resident or in flight in either direction).
    pub fn gpu_blocks_held(&self, agent: AgentId) -> u32 {
        let a = &self.agents[agent as usize];
        a.gpu_slot_count + a.moving_out_count + a.moving_in_count - a.shared_count
    }
    pub fn host_blocks_held(&self, agent: AgentId) -> u32 {
        let a = &self.agents[agent as usize];
        a.host_slot_count + a.moving_out_count + a.moving_in_count
    }
    /// True when every block is on the GPU and nothing moves (the agent may compute).
    pub fn is_resident(&self, agent: AgentId) -> bool {
        let a = &self.agents[agent as usize];
        a.gpu_slot_count as usize == a.slots.len()
    }
    pub fn slots(&self, agent: AgentId) -> &[Slot] {
        &self.agents[agent as usize].slots
    }
    /// GPU block ids of a resident agent, in logical order (what a real forward reads).
    pub fn gpu_block_table(&self, agent: AgentId) -> impl Iterator<Item = BlockId> + '_ {
        self.agents[agent as usize].slots.iter().map(|s| match s {
            Slot::Gpu(b) => *b,
            other => panic!("gpu_block_table of a non-resident agent: {other:?}"),
        })
    }
    /// Blocks that would come back if the agent reclaimed now: its cached prefix and, for an
    /// agent of a prefix group, the group's shared blocks (a contiguous run from the start).
    pub fn reclaimable_prefix_blocks(&self, agent: AgentId) -> u32 {
        self.reclaim_run(agent).0
    }
    /// Whether the agent released a prefix to the cache (vllm) that it has not reclaimed.
    pub fn has_cached_prefix(&self, agent: AgentId) -> bool {
        !self.agents[agent as usize].cached.is_empty()
    }
    pub fn swaps_in_flight(&self) -> usize {
        self.in_flight.len()
    }
    pub fn swap_job(&self, id: SwapId) -> Option<&SwapJob> {
        self.in_flight.get(&id)
    }
    pub fn computed_high_water(&self, agent: AgentId) -> u32 {
        self.agents[agent as usize].computed_high_water
    }
    pub fn tokens_dropped_total(&self, agent: AgentId) -> u64 {
        self.agents[agent as usize].tokens_dropped_total
    }
    pub fn tokens_recomputed_total(&self, agent: AgentId) -> u64 {
        self.agents[agent as usize].tokens_recomputed_total
    }

    // ----- mutations (applied by the run loop from a plan) -----

    /// Recomputes the agent's cached state after its table changed.
    fn sync_state(&mut self, agent: AgentId) {
        self.states[agent as usize] = self.agents[agent as usize].state();
    }

    fn alloc_gpu(&mut self, agent: AgentId) -> BlockId {
        if let Some(b) = self.gpu.pop_uncached() {
            self.gpu.owner[b as usize] = agent;
            return b;
        }
        debug_assert_ne!(self.gpu.head, NONE, "alloc_gpu on an empty pool");
        let b = self.gpu.pop_linked();
        let tag = self.gpu.cache_tag[b as usize];
        if tag.0 != NONE {
            // Reusing a cached prefix block evicts it from its former owner's cached prefix, or
            // from its prefix group (a later agent recomputes it).
            self.gpu.cache_tag[b as usize] = (NONE, NONE);
            self.counters.cache_evicted_blocks += 1;
            if tag == pools::GROUP_CACHED {
                self.forget_shared_block(b);
            }
        }
        self.gpu.owner[b as usize] = agent;
        b
    }

    /// Frees a private GPU block without a cache key: it goes to the front of the free queue, so
    /// it is reused before any cached block.
    fn free_gpu(&mut self, b: BlockId) {
        debug_assert!(
            self.gpu.owner[b as usize] != NONE && !self.gpu.is_shared(b),
            "free of GPU block {b}, which is free or shared"
        );
        self.gpu.owner[b as usize] = NONE;
        self.gpu.push_front(b);
    }

    /// Frees whatever a table's GPU slot holds: a private block, or one reference to a shared one.
    fn free_gpu_slot(&mut self, b: BlockId) {
        if self.gpu.is_shared(b) {
            self.unref_shared(b);
        } else {
            self.free_gpu(b);
        }
    }

    fn alloc_host(&mut self, agent: AgentId) -> BlockId {
        let b = self
            .host
            .free
            .pop_front()
            .expect("alloc_host on an empty pool");
        self.host.owner[b as usize] = agent;
        b
    }

    fn free_host(&mut self, b: BlockId) {
        debug_assert_ne!(
            self.host.owner[b as usize], NONE,
            "double free of host block {b}"
        );
        self.host.owner[b as usize] = NONE;
        self.host.free.push_back(b);
    }

    /// Grows a resident agent's GPU table so it can hold `tokens` tokens. Returns new blocks.
    #[inline]
    pub fn ensure_capacity(&mut self, agent: AgentId, tokens: u32) -> Result<u32, KvError> {
        // Most calls (a decode within its last block) grow nothing: answer those here, inlined
        // into the run loop's batch pass, without the call.
        let a = &self.agents[agent as usize];
        let have = a.slots.len();
        if a.gpu_slot_count as usize == have && self.blocks_for(tokens) as usize <= have {
            return Ok(0);
        }
        self.grow(agent, tokens)
    }

    /// [`Self::ensure_capacity`] when the table may have to grow (or the agent is not resident).
    #[inline(never)]
    fn grow(&mut self, agent: AgentId, tokens: u32) -> Result<u32, KvError> {
        if !self.is_resident(agent) {
            return Err(KvError::NotResident {
                agent,
                action: "grow",
                state: self.state(agent),
            });
        }
        let have = self.table_blocks(agent);
        let need = self.blocks_for(tokens);
        if need <= have {
            return Ok(0);
        }
        let extra = need - have;
        if extra > self.gpu.free_count {
            return Err(KvError::GpuPoolExhausted {
                agent,
                needed: extra,
                free: self.gpu.free_count,
            });
        }
        if !self.agents[agent as usize].cached.is_empty() {
            // Growing without reclaiming first recomputes from scratch: the cached prefix can no
            // longer be reclaimed (that needs an empty table), so forget it. Left tagged, the agent
            // held both blocks and a cached prefix, which the audit rejects (found by the
            // model-based KV test).
            self.untag_cached(agent);
        }
        let a = &mut self.agents[agent as usize];
        a.slots.reserve(extra as usize);
        a.gpu_slot_count += extra;
        // The blocks at the front of the free queue carry no cache key: take them as one run, in
        // the order `alloc_gpu` would (a recompute after a drop takes hundreds at once).
        let front = &mut self.gpu.front;
        let run = (extra as usize).min(front.len());
        let start = front.len() - run;
        for &b in front[start..].iter().rev() {
            self.gpu.owner[b as usize] = agent;
            a.slots.push(Slot::Gpu(b));
        }
        front.truncate(start);
        self.gpu.free_count -= run as u32;
        for _ in run..extra as usize {
            let b = self.alloc_gpu(agent);
            self.agents[agent as usize].slots.push(Slot::Gpu(b));
        }
        self.sync_state(agent);
        Ok(extra)
    }

    /// Records that the KV of `tokens` more tokens was computed (prefill chunk or decode).
    /// Returns how many of them were recomputes of dropped KV.
    #[inline]
    pub fn advance(&mut self, agent: AgentId, tokens: u32) -> Result<u32, KvError> {
        let block_size = self.block_size_tokens;
        let a = &mut self.agents[agent as usize];
        let table = a.slots.len() as u32;
        if a.gpu_slot_count != table {
            return Err(self.advance_error(agent, 0));
        }
        let end = a.kv_tokens + tokens;
        if end > table * block_size {
            return Err(self.advance_error(agent, end));
        }
        let recomputed = a.computed_high_water.min(end).saturating_sub(a.kv_tokens);
        a.tokens_recomputed_total += recomputed as u64;
        a.computed_high_water = a.computed_high_water.max(end);
        let before = a.kv_tokens;
        a.kv_tokens = end;
        if a.share_limit > 0 {
            self.publish_full_blocks(agent, before);
        }
        Ok(recomputed)
    }

    /// Why [`Self::advance`] refused (off its inlined path): the agent is not resident, or
    /// computing to `end` tokens overflows its table.
    #[cold]
    #[inline(never)]
    fn advance_error(&self, agent: AgentId, end: u32) -> KvError {
        if !self.is_resident(agent) {
            return KvError::NotResident {
                agent,
                action: "compute",
                state: self.state(agent),
            };
        }
        let capacity = self.table_blocks(agent) * self.block_size_tokens;
        KvError::Invalid {
            agent,
            message: format!("computing to {end} tokens but blocks hold only {capacity}"),
        }
    }

    /// Starts copying the agent's last `block_count` private GPU blocks to the host (all of them
    /// when `block_count` exceeds what is on the GPU). The GPU copies stay allocated until completion.
    pub fn start_swap_out(&mut self, agent: AgentId, block_count: u32) -> Result<SwapId, KvError> {
        let a = &self.agents[agent as usize];
        if a.moving_in_count > 0 || a.moving_out_count > 0 {
            return Err(KvError::SwapInFlight {
                agent,
                action: "swap out",
            });
        }
        let indices: Vec<usize> = a
            .slots
            .iter()
            .enumerate()
            .rev()
            // Shared blocks stay: other tables may point at them (see the module doc).
            .filter(|(_, s)| matches!(s, Slot::Gpu(b) if !self.gpu.is_shared(*b)))
            .map(|(i, _)| i)
            .take(block_count as usize)
            .collect();
        if indices.is_empty() {
            return Err(KvError::Invalid {
                agent,
                message: "swap out of an agent with no private GPU blocks".into(),
            });
        }
        let needed = indices.len() as u32;
        if needed > self.host_blocks_free() {
            return Err(KvError::HostPoolExhausted {
                agent,
                needed,
                free: self.host_blocks_free(),
            });
        }
        let mut pairs = Vec::with_capacity(indices.len());
        for &i in indices.iter().rev() {
            let host = self.alloc_host(agent);
            let a = &mut self.agents[agent as usize];
            let Slot::Gpu(gpu) = a.slots[i] else {
                unreachable!()
            };
            a.slots[i] = Slot::SwapOut { gpu, host };
            a.gpu_slot_count -= 1;
            a.moving_out_count += 1;
            pairs.push((gpu, host));
        }
        self.sync_state(agent);
        Ok(self.register_swap(agent, SwapDirection::Out, pairs))
    }

    /// Starts copying all of the agent's host blocks back to newly allocated GPU blocks.
    pub fn start_swap_in(&mut self, agent: AgentId) -> Result<SwapId, KvError> {
        let a = &self.agents[agent as usize];
        if a.moving_in_count > 0 || a.moving_out_count > 0 {
            return Err(KvError::SwapInFlight {
                agent,
                action: "swap in",
            });
        }
        let needed = a.host_slot_count;
        if needed == 0 {
            return Err(KvError::Invalid {
                agent,
                message: "swap in of an agent with nothing on the host".into(),
            });
        }
        if needed > self.gpu.free_count {
            return Err(KvError::GpuPoolExhausted {
                agent,
                needed,
                free: self.gpu.free_count,
            });
        }
        let mut pairs = Vec::with_capacity(needed as usize);
        for i in 0..self.agents[agent as usize].slots.len() {
            if let Slot::Host(host) = self.agents[agent as usize].slots[i] {
                let gpu = self.alloc_gpu(agent);
                let a = &mut self.agents[agent as usize];
                a.slots[i] = Slot::SwapIn { host, gpu };
                a.host_slot_count -= 1;
                a.moving_in_count += 1;
                pairs.push((gpu, host));
            }
        }
        self.sync_state(agent);
        Ok(self.register_swap(agent, SwapDirection::In, pairs))
    }

    fn register_swap(
        &mut self,
        agent: AgentId,
        direction: SwapDirection,
        pairs: Vec<(BlockId, BlockId)>,
    ) -> SwapId {
        let id = self.next_swap_id;
        self.next_swap_id += 1;
        self.in_flight.insert(
            id,
            SwapJob {
                id,
                agent,
                direction,
                pairs,
            },
        );
        id
    }

    /// Completes a swap: the source copies are freed and the destination becomes the block.
    /// Returns the agent and direction.
    pub fn complete_swap(&mut self, id: SwapId) -> Result<(AgentId, SwapDirection), KvError> {
        let job = self.in_flight.remove(&id).ok_or(KvError::UnknownSwap(id))?;
        let agent = job.agent;
        for i in 0..self.agents[agent as usize].slots.len() {
            match self.agents[agent as usize].slots[i] {
                Slot::SwapOut { gpu, host } if job.direction == SwapDirection::Out => {
                    self.free_gpu(gpu);
                    let a = &mut self.agents[agent as usize];
                    a.slots[i] = Slot::Host(host);
                    a.moving_out_count -= 1;
                    a.host_slot_count += 1;
                }
                Slot::SwapIn { host, gpu } if job.direction == SwapDirection::In => {
                    self.free_host(host);
                    let a = &mut self.agents[agent as usize];
                    a.slots[i] = Slot::Gpu(gpu);
                    a.moving_in_count -= 1;
                    a.gpu_slot_count += 1;
                }
                _ => {}
            }
        }
        self.sync_state(agent);
        Ok((agent, job.direction))
    }

    /// Drops the KV beyond the first `keep_tokens` tokens (rounded down to whole blocks). The
    /// dropped blocks must not be moving. Returns the tokens dropped.
    pub fn drop_tail(&mut self, agent: AgentId, keep_tokens: u32) -> Result<u32, KvError> {
        let keep_blocks = (keep_tokens / self.block_size_tokens) as usize;
        let a = &self.agents[agent as usize];
        if a.slots[keep_blocks.min(a.slots.len())..]
            .iter()
            .any(|s| matches!(s, Slot::SwapIn { .. } | Slot::SwapOut { .. }))
        {
            return Err(KvError::SwapInFlight {
                agent,
                action: "drop",
            });
        }
        self.free_slots_beyond(agent, keep_blocks);
        let a = &mut self.agents[agent as usize];
        let new_kv = a.kv_tokens.min(keep_blocks as u32 * self.block_size_tokens);
        let dropped = a.kv_tokens - new_kv;
        a.kv_tokens = new_kv;
        a.tokens_dropped_total += dropped as u64;
        if dropped > 0 {
            self.counters.drops += 1;
            self.counters.dropped_tokens += dropped as u64;
        }
        Ok(dropped)
    }

    /// Frees the agent's blocks beyond the first `keep_blocks` (none of them may be moving).
    fn free_slots_beyond(&mut self, agent: AgentId, keep_blocks: usize) {
        let a = &mut self.agents[agent as usize];
        if a.shared_count == 0 && a.host_slot_count == 0 && a.slots.len() > keep_blocks {
            // Every slot beyond is a private GPU block (none moves, none is on the host or
            // shared): free them as one run, last first, as the general loop below would.
            let freed = a.slots.len() - keep_blocks;
            for slot in a.slots[keep_blocks..].iter().rev() {
                let Slot::Gpu(b) = *slot else {
                    unreachable!("no host slot and nothing moving beyond the kept blocks")
                };
                debug_assert!(self.gpu.owner[b as usize] == agent, "free of block {b}");
                self.gpu.owner[b as usize] = NONE;
                self.gpu.push_front(b);
            }
            a.slots.truncate(keep_blocks);
            a.gpu_slot_count -= freed as u32;
        }
        while self.agents[agent as usize].slots.len() > keep_blocks {
            match self.agents[agent as usize].slots.pop().expect("len > keep") {
                Slot::Gpu(b) => {
                    let a = &mut self.agents[agent as usize];
                    a.gpu_slot_count -= 1;
                    if self.gpu.is_shared(b) {
                        a.shared_count -= 1;
                        self.unref_shared(b);
                    } else {
                        self.free_gpu(b);
                    }
                }
                Slot::Host(b) => {
                    self.free_host(b);
                    self.agents[agent as usize].host_slot_count -= 1;
                }
                _ => unreachable!("the caller checked that nothing moves"),
            }
        }
        // Give the table's memory back: a table keeps the capacity of its longest context, so
        // over a run with many drops every agent ever seen held a peak-sized table (5.2 GB of a
        // million-agent run, where the live tables are bounded by the pools).
        let slots = &mut self.agents[agent as usize].slots;
        if slots.is_empty() {
            *slots = Vec::new();
        } else if slots.capacity() >= 2 * slots.len() {
            slots.shrink_to_fit();
        }
        self.sync_state(agent);
    }

    /// The agent rewrote its sequence after its first `keep_tokens` tokens (it compacted its
    /// history): the KV beyond them is obsolete, neither dropped nor to be recomputed, so it
    /// leaves the token accounting as if it had never been computed. Every valid token of the
    /// kept prefix stays (the block holding its last tokens too: later tokens overwrite that
    /// block's tail, as a decode does); a cached prefix keeps only its full blocks within it.
    /// A shared block is never written by one agent alone: when the kept prefix ends inside one,
    /// that block goes and its kept tokens count as dropped (to be recomputed into a private
    /// block); and only the blocks before the cut may be shared from now on (the rest of the
    /// sequence no longer matches the group's prefix).
    /// Nothing may be moving (the caller waits for the swap to finish).
    pub fn forget_beyond(&mut self, agent: AgentId, keep_tokens: u32) -> Result<(), KvError> {
        let bs = self.block_size_tokens;
        let a = &self.agents[agent as usize];
        if a.moving_in_count > 0 || a.moving_out_count > 0 {
            return Err(KvError::SwapInFlight {
                agent,
                action: "compact",
            });
        }
        let full_blocks = (keep_tokens / bs) as usize;
        let mut keep_blocks = keep_tokens.div_ceil(bs) as usize;
        let mut valid_tokens = keep_tokens;
        if keep_blocks > full_blocks {
            if let Some(&Slot::Gpu(b)) = a.slots.get(full_blocks) {
                if self.gpu.is_shared(b) {
                    keep_blocks = full_blocks;
                    valid_tokens = full_blocks as u32 * bs;
                }
            }
        }
        self.free_slots_beyond(agent, keep_blocks);
        let a = &mut self.agents[agent as usize];
        a.share_limit = a.share_limit.min(full_blocks as u32);
        let cached_len = self.agents[agent as usize].cached.len();
        for i in full_blocks..cached_len {
            let b = self.agents[agent as usize].cached[i];
            if self.gpu.cache_tag[b as usize] == (agent, i as u32) {
                self.gpu.cache_tag[b as usize] = (NONE, NONE);
            }
        }
        let a = &mut self.agents[agent as usize];
        a.cached.truncate(full_blocks);
        // Conservation (recomputed + missing == dropped) restated for the shorter sequence: the
        // tokens missing beyond the kept prefix will never be recomputed.
        let missing_before = a.computed_high_water.saturating_sub(a.kv_tokens) as u64;
        a.kv_tokens = a.kv_tokens.min(valid_tokens);
        a.computed_high_water = a.computed_high_water.min(keep_tokens);
        let missing_after = a.computed_high_water.saturating_sub(a.kv_tokens) as u64;
        a.tokens_dropped_total = a.tokens_dropped_total - missing_before + missing_after;
        Ok(())
    }

    /// Frees everything an agent holds (its program ended). Nothing may be moving.
    pub fn free_all(&mut self, agent: AgentId) -> Result<(), KvError> {
        let a = &self.agents[agent as usize];
        if a.moving_in_count > 0 || a.moving_out_count > 0 {
            return Err(KvError::SwapInFlight {
                agent,
                action: "free",
            });
        }
        self.untag_cached(agent);
        let slots = std::mem::take(&mut self.agents[agent as usize].slots);
        for slot in slots {
            match slot {
                Slot::Gpu(b) => self.free_gpu_slot(b),
                Slot::Host(b) => self.free_host(b),
                _ => unreachable!("checked above"),
            }
        }
        let a = &mut self.agents[agent as usize];
        a.gpu_slot_count = 0;
        a.host_slot_count = 0;
        a.shared_count = 0;
        a.kv_tokens = 0;
        // The program ended: its sequence is gone for good, so conservation restarts from zero.
        a.computed_high_water = 0;
        a.tokens_dropped_total = 0;
        a.tokens_recomputed_total = 0;
        self.sync_state(agent);
        Ok(())
    }
}
