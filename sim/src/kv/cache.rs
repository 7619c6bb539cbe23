//! The GPU prefix cache of the vllm policies: a released agent's full blocks stay in the free
//! queue with a tag and come back on reclaim while they survive; a reclaim also takes the agent's
//! prefix group's shared blocks.

use super::pools::NONE;
use super::{KvError, KvManager, Slot};
use crate::ids::AgentId;

impl KvManager {
    /// Releases a resident agent's blocks into the GPU prefix cache (vllm at turn end): full
    /// blocks keep a tag and can be reclaimed until reused; they go to the back of the free queue
    /// tail block first, so the oldest-freed tails are evicted before prefixes. The partial last
    /// block has no cache key: it goes to the front and is reused first. Shared blocks lose this
    /// agent's reference (the last one leaves them cached for the group).
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
        a.shared_count = 0;
        // Tokens not in the cache count as dropped now; a reclaim gives back what survives.
        a.tokens_dropped_total += a.kv_tokens as u64;
        a.kv_tokens = 0;
        let mut cached = Vec::with_capacity(full_blocks);
        for (i, slot) in slots.iter().enumerate().rev() {
            let Slot::Gpu(b) = *slot else {
                unreachable!("resident")
            };
            if self.gpu.is_shared(b) {
                self.unref_shared(b);
            } else if i < full_blocks {
                self.gpu.owner[b as usize] = NONE;
                self.gpu.cache_tag[b as usize] = (agent, i as u32);
                self.gpu.push_back(b);
            } else {
                self.free_gpu(b);
            }
        }
        for slot in slots.iter().take(full_blocks) {
            let Slot::Gpu(b) = *slot else { unreachable!() };
            cached.push(b);
        }
        self.agents[agent as usize].cached = cached;
        self.sync_state(agent);
        Ok(())
    }

    /// Takes back the surviving cached prefix of an agent with no blocks, with its prefix group's
    /// shared blocks (see [`KvManager::reclaimable_prefix_blocks`]). Returns tokens reclaimed.
    pub fn reclaim_cached(&mut self, agent: AgentId) -> Result<u32, KvError> {
        if !self.agents[agent as usize].slots.is_empty() {
            return Err(KvError::Invalid {
                agent,
                message: "reclaim with blocks already held".into(),
            });
        }
        let survive = self.reclaimable_prefix_blocks(agent) as usize;
        let cached = std::mem::take(&mut self.agents[agent as usize].cached);
        let mut slots = Vec::with_capacity(survive);
        for i in 0..survive.max(cached.len()) {
            if i < survive {
                if let Some(b) = self.group_block(agent, i) {
                    self.attach_shared(agent, b);
                    slots.push(Slot::Gpu(b));
                    continue;
                }
                let b = cached[i];
                self.gpu.unlink(b);
                self.gpu.cache_tag[b as usize] = (NONE, NONE);
                self.gpu.owner[b as usize] = agent;
                slots.push(Slot::Gpu(b));
            } else if self.gpu.cache_tag[cached[i] as usize] == (agent, i as u32) {
                // Beyond the first lost block a cached block is useless (prefix chains break).
                self.gpu.cache_tag[cached[i] as usize] = (NONE, NONE);
            }
        }
        let bs = self.block_size_tokens;
        let a = &mut self.agents[agent as usize];
        a.slots = slots;
        a.gpu_slot_count = survive as u32;
        a.kv_tokens = survive as u32 * bs;
        // Tokens this agent computed before were counted as dropped: they are back. A first hit
        // of the group's shared blocks brings tokens it never computed (first-time tokens).
        a.tokens_dropped_total -= a.kv_tokens.min(a.computed_high_water) as u64;
        a.computed_high_water = a.computed_high_water.max(a.kv_tokens);
        let tokens = a.kv_tokens;
        let lost_blocks = cached.len().saturating_sub(survive) as u32;
        if lost_blocks > 0 {
            self.counters.drops += 1;
            self.counters.dropped_tokens += (lost_blocks * bs) as u64;
        }
        self.sync_state(agent);
        Ok(tokens)
    }

    pub(super) fn untag_cached(&mut self, agent: AgentId) {
        let cached = std::mem::take(&mut self.agents[agent as usize].cached);
        for (i, b) in cached.into_iter().enumerate() {
            if self.gpu.cache_tag[b as usize] == (agent, i as u32) {
                self.gpu.cache_tag[b as usize] = (NONE, NONE);
            }
        }
    }
}
