//! The KV mechanism shared by the simulator and the real engine: paged block pools on the GPU and
//! in host memory, per-agent block tables, the agent KV state machine and the prefix-cache free
//! queue of the vllm policies.
//!
//! Policies never touch this directly: they read it through [`KvManager`]'s query methods and ask
//! for changes in a `StepPlan`, which the run loop applies here. Every mutation checks its
//! preconditions and returns a [`KvError`] (a scheduler asked for the impossible) rather than
//! corrupting state; [`KvManager::audit`] recounts everything from scratch for the checker.

use std::collections::BTreeMap;

use crate::ids::{AgentId, BlockId, SwapId};

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

const NONE: u32 = u32::MAX;

/// The GPU pool: blocks plus an LRU free queue (a doubly linked list over block ids, so a cached
/// block can be taken back from the middle in O(1)). Allocation pops the front; freeing pushes
/// the back. Cached (prefix-tagged) blocks stay in the queue and count as free.
#[derive(Clone, Debug)]
struct GpuPool {
    owner: Vec<AgentId>,
    /// For a free block released by the vllm policy: (agent, logical index) whose KV it still holds.
    cache_tag: Vec<(AgentId, u32)>,
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    free_count: u32,
}

impl GpuPool {
    fn new(blocks: u32) -> Self {
        let n = blocks as usize;
        let mut pool = GpuPool {
            owner: vec![NONE; n],
            cache_tag: vec![(NONE, NONE); n],
            prev: vec![NONE; n],
            next: vec![NONE; n],
            head: NONE,
            tail: NONE,
            free_count: 0,
        };
        for b in 0..blocks {
            pool.push_back(b);
        }
        pool
    }

    fn push_back(&mut self, b: BlockId) {
        let i = b as usize;
        debug_assert_eq!(self.owner[i], NONE);
        self.prev[i] = self.tail;
        self.next[i] = NONE;
        if self.tail == NONE {
            self.head = b;
        } else {
            self.next[self.tail as usize] = b;
        }
        self.tail = b;
        self.free_count += 1;
    }

    fn unlink(&mut self, b: BlockId) {
        let i = b as usize;
        let (p, n) = (self.prev[i], self.next[i]);
        if p == NONE {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NONE {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[i] = NONE;
        self.next[i] = NONE;
        self.free_count -= 1;
    }
}

/// The host pool: a FIFO free list (no caching on the host).
#[derive(Clone, Debug)]
struct HostPool {
    owner: Vec<AgentId>,
    free: std::collections::VecDeque<BlockId>,
}

impl HostPool {
    fn new(blocks: u32) -> Self {
        HostPool {
            owner: vec![NONE; blocks as usize],
            free: (0..blocks).collect(),
        }
    }
}

/// Per-agent KV bookkeeping.
#[derive(Clone, Debug, Default)]
pub struct AgentKv {
    slots: Vec<Slot>,
    /// Tokens of the sequence prefix whose KV is valid.
    kv_tokens: u32,
    gpu_slot_count: u32,
    host_slot_count: u32,
    moving_out_count: u32,
    moving_in_count: u32,
    /// The prefix released to the GPU prefix cache (vllm): logical index -> block that held it.
    cached: Vec<BlockId>,
    /// Highest token count whose KV has ever been computed: positions below it are recomputes.
    computed_high_water: u32,
    tokens_dropped_total: u64,
    tokens_recomputed_total: u64,
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
    gpu: GpuPool,
    host: HostPool,
    agents: Vec<AgentKv>,
    in_flight: BTreeMap<SwapId, SwapJob>,
    next_swap_id: SwapId,
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
            gpu: GpuPool::new(gpu_blocks),
            host: HostPool::new(host_blocks),
            agents: vec![AgentKv::default(); agent_count as usize],
            in_flight: BTreeMap::new(),
            next_swap_id: 0,
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
        tokens.div_ceil(self.block_size_tokens)
    }
    pub fn agent_count(&self) -> u32 {
        self.agents.len() as u32
    }
    pub fn state(&self, agent: AgentId) -> KvState {
        self.agents[agent as usize].state()
    }
    /// Tokens whose KV is valid (wherever it is).
    pub fn kv_tokens(&self, agent: AgentId) -> u32 {
        self.agents[agent as usize].kv_tokens
    }
    /// Blocks in the agent's table (any location).
    pub fn blocks(&self, agent: AgentId) -> u32 {
        self.agents[agent as usize].slots.len() as u32
    }
    /// Blocks the agent holds on the GPU (resident or in flight in either direction).
    pub fn gpu_blocks_held(&self, agent: AgentId) -> u32 {
        let a = &self.agents[agent as usize];
        a.gpu_slot_count + a.moving_out_count + a.moving_in_count
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
    /// Blocks of the cached prefix that would come back if the agent reclaimed now.
    pub fn reclaimable_prefix_blocks(&self, agent: AgentId) -> u32 {
        let a = &self.agents[agent as usize];
        a.cached
            .iter()
            .enumerate()
            .take_while(|(i, b)| self.gpu.cache_tag[**b as usize] == (agent, *i as u32))
            .count() as u32
    }
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

    fn alloc_gpu(&mut self, agent: AgentId) -> BlockId {
        let b = self.gpu.head;
        debug_assert_ne!(b, NONE, "alloc_gpu on an empty pool");
        self.gpu.unlink(b);
        let (tag_agent, tag_index) = self.gpu.cache_tag[b as usize];
        if tag_agent != NONE {
            // Reusing a cached prefix block evicts it from its former owner's cached prefix.
            self.gpu.cache_tag[b as usize] = (NONE, NONE);
            self.counters.cache_evicted_blocks += 1;
            let _ = tag_index;
        }
        self.gpu.owner[b as usize] = agent;
        b
    }

    fn free_gpu(&mut self, b: BlockId) {
        debug_assert_ne!(
            self.gpu.owner[b as usize], NONE,
            "double free of GPU block {b}"
        );
        self.gpu.owner[b as usize] = NONE;
        self.gpu.push_back(b);
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
    pub fn ensure_capacity(&mut self, agent: AgentId, tokens: u32) -> Result<u32, KvError> {
        if !self.is_resident(agent) {
            return Err(KvError::NotResident {
                agent,
                action: "grow",
                state: self.state(agent),
            });
        }
        let have = self.blocks(agent);
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
        for _ in 0..extra {
            let b = self.alloc_gpu(agent);
            let a = &mut self.agents[agent as usize];
            a.slots.push(Slot::Gpu(b));
            a.gpu_slot_count += 1;
        }
        Ok(extra)
    }

    /// Records that the KV of `tokens` more tokens was computed (prefill chunk or decode).
    /// Returns how many of them were recomputes of dropped KV.
    pub fn advance(&mut self, agent: AgentId, tokens: u32) -> Result<u32, KvError> {
        if !self.is_resident(agent) {
            return Err(KvError::NotResident {
                agent,
                action: "compute",
                state: self.state(agent),
            });
        }
        let capacity = self.blocks(agent) * self.block_size_tokens;
        let a = &mut self.agents[agent as usize];
        let end = a.kv_tokens + tokens;
        if end > capacity {
            return Err(KvError::Invalid {
                agent,
                message: format!("computing to {end} tokens but blocks hold only {capacity}"),
            });
        }
        let recomputed = a.computed_high_water.min(end).saturating_sub(a.kv_tokens);
        a.tokens_recomputed_total += recomputed as u64;
        a.computed_high_water = a.computed_high_water.max(end);
        a.kv_tokens = end;
        Ok(recomputed)
    }

    /// Starts copying the agent's last `block_count` GPU blocks to the host (all of them when
    /// `block_count` exceeds what is on the GPU). The GPU copies stay allocated until completion.
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
            .filter(|(_, s)| matches!(s, Slot::Gpu(_)))
            .map(|(i, _)| i)
            .take(block_count as usize)
            .collect();
        if indices.is_empty() {
            return Err(KvError::Invalid {
                agent,
                message: "swap out of an agent with no GPU blocks".into(),
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
        while self.agents[agent as usize].slots.len() > keep_blocks {
            match self.agents[agent as usize].slots.pop().expect("len > keep") {
                Slot::Gpu(b) => {
                    self.free_gpu(b);
                    self.agents[agent as usize].gpu_slot_count -= 1;
                }
                Slot::Host(b) => {
                    self.free_host(b);
                    self.agents[agent as usize].host_slot_count -= 1;
                }
                _ => unreachable!("the caller checked that nothing moves"),
            }
        }
    }

    /// The agent rewrote its sequence after its first `keep_tokens` tokens (it compacted its
    /// history): the KV beyond them is obsolete, neither dropped nor to be recomputed, so it
    /// leaves the token accounting as if it had never been computed. Every valid token of the
    /// kept prefix stays (the block holding its last tokens too: later tokens overwrite that
    /// block's tail, as a decode does); a cached prefix keeps only its full blocks within it.
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
        let keep_blocks = keep_tokens.div_ceil(bs) as usize;
        self.free_slots_beyond(agent, keep_blocks);
        let full_blocks = (keep_tokens / bs) as usize;
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
        a.kv_tokens = a.kv_tokens.min(keep_tokens);
        a.computed_high_water = a.computed_high_water.min(keep_tokens);
        let missing_after = a.computed_high_water.saturating_sub(a.kv_tokens) as u64;
        a.tokens_dropped_total = a.tokens_dropped_total - missing_before + missing_after;
        Ok(())
    }

    /// Releases a resident agent's blocks into the GPU prefix cache (vllm at turn end): full
    /// blocks keep a tag and can be reclaimed until reused; they go to the free queue tail block
    /// first, so the oldest-freed tails are evicted before prefixes.
    pub fn release_to_cache(&mut self, agent: AgentId) -> Result<(), KvError> {
        if !self.is_resident(agent) {
            return Err(KvError::NotResident {
                agent,
                action: "release",
                state: self.state(agent),
            });
        }
        self.untag_cached(agent);
        let bs = self.block_size_tokens;
        let a = &mut self.agents[agent as usize];
        let full_blocks = (a.kv_tokens / bs) as usize;
        let slots = std::mem::take(&mut a.slots);
        a.gpu_slot_count = 0;
        // Tokens not in the cache count as dropped now; a reclaim gives back what survives.
        a.tokens_dropped_total += a.kv_tokens as u64;
        a.kv_tokens = 0;
        let mut cached = Vec::with_capacity(full_blocks);
        for (i, slot) in slots.iter().enumerate().rev() {
            let Slot::Gpu(b) = *slot else {
                unreachable!("resident")
            };
            self.free_gpu(b);
            if i < full_blocks {
                self.gpu.cache_tag[b as usize] = (agent, i as u32);
            }
        }
        for slot in slots.iter().take(full_blocks) {
            let Slot::Gpu(b) = *slot else { unreachable!() };
            cached.push(b);
        }
        self.agents[agent as usize].cached = cached;
        Ok(())
    }

    /// Takes back the surviving cached prefix of an agent with no blocks. Returns tokens reclaimed.
    pub fn reclaim_cached(&mut self, agent: AgentId) -> Result<u32, KvError> {
        if !self.agents[agent as usize].slots.is_empty() {
            return Err(KvError::Invalid {
                agent,
                message: "reclaim with blocks already held".into(),
            });
        }
        let survive = self.reclaimable_prefix_blocks(agent) as usize;
        let cached = std::mem::take(&mut self.agents[agent as usize].cached);
        for (i, &b) in cached.iter().enumerate() {
            if i < survive {
                self.gpu.unlink(b);
                self.gpu.cache_tag[b as usize] = (NONE, NONE);
                self.gpu.owner[b as usize] = agent;
            } else if self.gpu.cache_tag[b as usize] == (agent, i as u32) {
                // Beyond the first lost block a cached block is useless (prefix chains break).
                self.gpu.cache_tag[b as usize] = (NONE, NONE);
            }
        }
        let bs = self.block_size_tokens;
        let a = &mut self.agents[agent as usize];
        a.slots = cached[..survive].iter().map(|&b| Slot::Gpu(b)).collect();
        a.gpu_slot_count = survive as u32;
        a.kv_tokens = survive as u32 * bs;
        a.tokens_dropped_total -= a.kv_tokens as u64;
        let lost_blocks = (cached.len() - survive) as u32;
        if lost_blocks > 0 {
            self.counters.drops += 1;
            self.counters.dropped_tokens += (lost_blocks * bs) as u64;
        }
        Ok(a.kv_tokens)
    }

    fn untag_cached(&mut self, agent: AgentId) {
        let cached = std::mem::take(&mut self.agents[agent as usize].cached);
        for (i, b) in cached.into_iter().enumerate() {
            if self.gpu.cache_tag[b as usize] == (agent, i as u32) {
                self.gpu.cache_tag[b as usize] = (NONE, NONE);
            }
        }
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
                Slot::Gpu(b) => self.free_gpu(b),
                Slot::Host(b) => self.free_host(b),
                _ => unreachable!("checked above"),
            }
        }
        let a = &mut self.agents[agent as usize];
        a.gpu_slot_count = 0;
        a.host_slot_count = 0;
        a.kv_tokens = 0;
        // The program ended: its sequence is gone for good, so conservation restarts from zero.
        a.computed_high_water = 0;
        a.tokens_dropped_total = 0;
        a.tokens_recomputed_total = 0;
        Ok(())
    }

    /// Recounts everything from scratch and compares with the incremental state: pool capacity,
    /// single ownership of every block, the free queue's integrity, cache tags, per-agent counts
    /// and token conservation. Returns the first violation found.
    pub fn audit(&self) -> Result<(), String> {
        let gpu_n = self.gpu.owner.len();
        let host_n = self.host.owner.len();
        let mut gpu_seen = vec![NONE; gpu_n];
        let mut host_seen = vec![NONE; host_n];
        for (agent, a) in self.agents.iter().enumerate() {
            let agent = agent as AgentId;
            let (mut g, mut h, mut o, mut i_) = (0u32, 0u32, 0u32, 0u32);
            let claim = |pool: &mut Vec<u32>, b: BlockId, what: &str| -> Result<(), String> {
                let slot = pool
                    .get_mut(b as usize)
                    .ok_or_else(|| format!("agent {agent}: {what} block {b} out of range"))?;
                if *slot != NONE {
                    return Err(format!(
                        "{what} block {b} owned by agents {} and {agent}",
                        *slot
                    ));
                }
                *slot = agent;
                Ok(())
            };
            for s in &a.slots {
                match *s {
                    Slot::Gpu(b) => {
                        claim(&mut gpu_seen, b, "GPU")?;
                        g += 1;
                    }
                    Slot::Host(b) => {
                        claim(&mut host_seen, b, "host")?;
                        h += 1;
                    }
                    Slot::SwapOut { gpu, host } => {
                        claim(&mut gpu_seen, gpu, "GPU")?;
                        claim(&mut host_seen, host, "host")?;
                        o += 1;
                    }
                    Slot::SwapIn { host, gpu } => {
                        claim(&mut gpu_seen, gpu, "GPU")?;
                        claim(&mut host_seen, host, "host")?;
                        i_ += 1;
                    }
                }
            }
            if (g, h, o, i_)
                != (
                    a.gpu_slot_count,
                    a.host_slot_count,
                    a.moving_out_count,
                    a.moving_in_count,
                )
            {
                return Err(format!(
                    "agent {agent}: slot counts (gpu {g}, host {h}, out {o}, in {i_}) disagree with bookkeeping ({}, {}, {}, {})",
                    a.gpu_slot_count, a.host_slot_count, a.moving_out_count, a.moving_in_count
                ));
            }
            if a.kv_tokens > a.slots.len() as u32 * self.block_size_tokens {
                return Err(format!(
                    "agent {agent}: {} KV tokens in {} blocks",
                    a.kv_tokens,
                    a.slots.len()
                ));
            }
            if a.slots.len() as u32 > self.blocks_for(a.kv_tokens) + 1 && !a.slots.is_empty() {
                // Growth reserves at most the next block; more would be a leak inside an agent.
                return Err(format!(
                    "agent {agent}: holds {} blocks for {} tokens",
                    a.slots.len(),
                    a.kv_tokens
                ));
            }
            // Conservation: every token dropped is either recomputed or still missing.
            let missing = a.computed_high_water.saturating_sub(a.kv_tokens) as u64;
            if a.tokens_recomputed_total + missing != a.tokens_dropped_total {
                return Err(format!(
                    "agent {agent}: token conservation broken: recomputed {} + missing {} != dropped {}",
                    a.tokens_recomputed_total, missing, a.tokens_dropped_total
                ));
            }
            if !a.cached.is_empty() && !a.slots.is_empty() {
                return Err(format!(
                    "agent {agent}: has both a cached prefix and blocks"
                ));
            }
        }
        for b in 0..gpu_n {
            if gpu_seen[b] != self.gpu.owner[b] {
                return Err(format!(
                    "GPU block {b}: owner {} but tables say {}",
                    self.gpu.owner[b] as i64, gpu_seen[b] as i64
                ));
            }
        }
        for b in 0..host_n {
            if host_seen[b] != self.host.owner[b] {
                return Err(format!(
                    "host block {b}: owner {} but tables say {}",
                    self.host.owner[b] as i64, host_seen[b] as i64
                ));
            }
        }
        self.audit_free_lists()?;
        for (id, job) in &self.in_flight {
            if job.id != *id || job.pairs.is_empty() {
                return Err(format!("swap {id} is malformed"));
            }
        }
        Ok(())
    }

    /// The GPU free queue holds exactly the unowned blocks, linked consistently; the host free
    /// list holds exactly the unowned host blocks; cached GPU blocks are unowned and listed by
    /// the agent they are tagged for.
    fn audit_free_lists(&self) -> Result<(), String> {
        let gpu_n = self.gpu.owner.len();
        let mut count = 0u32;
        let mut prev = NONE;
        let mut cur = self.gpu.head;
        while cur != NONE {
            if self.gpu.owner[cur as usize] != NONE {
                return Err(format!("GPU block {cur} is in the free queue but owned"));
            }
            if self.gpu.prev[cur as usize] != prev {
                return Err(format!("GPU free queue broken at block {cur}"));
            }
            count += 1;
            if count as usize > gpu_n {
                return Err("GPU free queue has a cycle".into());
            }
            prev = cur;
            cur = self.gpu.next[cur as usize];
        }
        let unowned = self.gpu.owner.iter().filter(|o| **o == NONE).count() as u32;
        if count != unowned || count != self.gpu.free_count {
            return Err(format!(
                "GPU free queue has {count} blocks, {unowned} unowned, counter {}",
                self.gpu.free_count
            ));
        }
        let host_unowned = self.host.owner.iter().filter(|o| **o == NONE).count();
        if host_unowned != self.host.free.len() {
            return Err(format!(
                "host free list has {} blocks but {host_unowned} are unowned",
                self.host.free.len()
            ));
        }
        for b in 0..gpu_n {
            let (agent, index) = self.gpu.cache_tag[b];
            if agent != NONE {
                if self.gpu.owner[b] != NONE {
                    return Err(format!("GPU block {b} is owned but still tagged as cached"));
                }
                if self.agents[agent as usize].cached.get(index as usize) != Some(&(b as u32)) {
                    return Err(format!("GPU block {b} tagged for agent {agent} index {index}, which does not list it"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_swap_out_in_round_trip_keeps_accounting() {
        let mut kv = KvManager::new(16, 10, 10, 2);
        kv.ensure_capacity(0, 40).unwrap();
        assert_eq!(kv.blocks(0), 3);
        kv.advance(0, 40).unwrap();
        let out = kv.start_swap_out(0, u32::MAX).unwrap();
        assert_eq!(kv.swap_job(out).unwrap().pairs.len(), 3);
        assert_eq!(kv.state(0), KvState::SwappingOut);
        assert_eq!(
            kv.gpu_blocks_free(),
            7,
            "GPU copies stay held while moving out"
        );
        kv.audit().unwrap();
        kv.complete_swap(out).unwrap();
        assert_eq!(
            (kv.state(0), kv.gpu_blocks_free(), kv.host_blocks_free()),
            (KvState::Host, 10, 7)
        );
        let inn = kv.start_swap_in(0).unwrap();
        assert!(kv.advance(0, 1).is_err(), "no compute while swapping in");
        kv.complete_swap(inn).unwrap();
        assert_eq!((kv.state(0), kv.kv_tokens(0)), (KvState::Gpu, 40));
        kv.audit().unwrap();
    }

    #[test]
    fn drop_and_recompute_conserves_tokens() {
        let mut kv = KvManager::new(16, 10, 0, 1);
        kv.ensure_capacity(0, 50).unwrap();
        kv.advance(0, 50).unwrap();
        assert_eq!(
            kv.drop_tail(0, 20).unwrap(),
            34,
            "keeps one whole block (16 tokens)"
        );
        kv.audit().unwrap();
        kv.ensure_capacity(0, 51).unwrap();
        assert_eq!(kv.advance(0, 35).unwrap(), 34, "34 recomputed, 1 new");
        kv.audit().unwrap();
    }

    #[test]
    fn a_compaction_keeps_the_prefix_and_forgets_the_rest_without_counting_drops() {
        let mut kv = KvManager::new(16, 8, 8, 2);
        kv.ensure_capacity(0, 70).unwrap();
        kv.advance(0, 70).unwrap();
        kv.drop_tail(0, 48).unwrap(); // 22 tokens dropped by a policy
        kv.forget_beyond(0, 40).unwrap();
        // The block holding tokens 32..40 stays; the policy's drop below 40 still counts.
        assert_eq!((kv.kv_tokens(0), kv.blocks(0)), (40, 3));
        assert_eq!(kv.tokens_dropped_total(0), 0);
        kv.audit().unwrap();
        // A cached prefix keeps only its full blocks within the kept prefix.
        kv.release_to_cache(0).unwrap();
        kv.forget_beyond(0, 40).unwrap();
        assert_eq!(kv.reclaimable_prefix_blocks(0), 2);
        kv.audit().unwrap();
        assert_eq!(kv.reclaim_cached(0).unwrap(), 32);
        kv.audit().unwrap();
        // Moving KV is refused (the run loop waits for the swap).
        kv.start_swap_out(0, 2).unwrap();
        assert!(matches!(
            kv.forget_beyond(0, 8),
            Err(KvError::SwapInFlight { .. })
        ));
    }

    #[test]
    fn prefix_cache_survives_until_reused_tail_first() {
        let mut kv = KvManager::new(16, 6, 0, 2);
        kv.ensure_capacity(0, 64).unwrap();
        kv.advance(0, 63).unwrap();
        kv.release_to_cache(0).unwrap();
        assert_eq!(kv.gpu_blocks_free(), 6);
        assert_eq!(
            kv.reclaimable_prefix_blocks(0),
            3,
            "three full blocks cached, the partial one not"
        );
        // Agent 1 takes 4 blocks: the 2 never-used ones, agent 0's partial (uncached) last block,
        // then the oldest freed cached block, which is agent 0's tail.
        kv.ensure_capacity(1, 64).unwrap();
        kv.advance(1, 64).unwrap();
        assert_eq!(kv.counters.cache_evicted_blocks, 1);
        assert_eq!(kv.reclaimable_prefix_blocks(0), 2);
        kv.audit().unwrap();
        assert_eq!(kv.reclaim_cached(0).unwrap(), 32);
        kv.audit().unwrap();
        assert_eq!(kv.kv_tokens(0), 32);
    }

    #[test]
    fn audit_catches_a_leaked_block() {
        let mut kv = KvManager::new(16, 4, 0, 1);
        kv.ensure_capacity(0, 16).unwrap();
        // Corrupt on purpose: pretend the block is free without unlinking the owner.
        kv.gpu.owner[0] = NONE;
        assert!(kv.audit().is_err());
    }
}
