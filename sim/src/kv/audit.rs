//! The auditor: recounts the whole KV state from the block tables and compares it with the
//! incremental bookkeeping.

use super::pools::{GROUP_CACHED, NONE, SHARED};
use super::{KvManager, Slot};
use crate::ids::{AgentId, BlockId};

impl KvManager {
    /// Recounts everything from scratch and compares with the incremental state: pool capacity,
    /// single ownership of every private block, reference counts of shared blocks, the free
    /// queue's integrity, cache tags, per-agent counts and token conservation. Returns the first
    /// violation found.
    pub fn audit(&self) -> Result<(), String> {
        let gpu_n = self.gpu.owner.len();
        let host_n = self.host.owner.len();
        let mut gpu_seen = vec![NONE; gpu_n];
        let mut host_seen = vec![NONE; host_n];
        // Tables pointing at each shared block (none can exist without prefix groups: an unowned
        // or agent-owned block is checked by the ownership recount, so that pass is skipped).
        let mut shared_seen = vec![0u32; if self.groups.is_empty() { 0 } else { gpu_n }];
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
                    Slot::Gpu(b) if self.gpu.owner.get(b as usize) == Some(&SHARED) => {
                        *shared_seen.get_mut(b as usize).ok_or_else(|| {
                            format!("agent {agent}: shared block {b} without prefix groups")
                        })? += 1;
                        g += 1;
                    }
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
            if self.states[agent as usize] != a.state() {
                return Err(format!(
                    "agent {agent}: recorded KV state {:?} but its table says {:?}",
                    self.states[agent as usize],
                    a.state()
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
        if !self.groups.is_empty() {
            for b in 0..gpu_n {
                if shared_seen[b] > 0 {
                    gpu_seen[b] = SHARED;
                }
            }
            self.audit_shared(&shared_seen)?;
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
        let mut queued = vec![false; gpu_n];
        for &b in &self.gpu.front {
            let i = b as usize;
            if i >= gpu_n || std::mem::replace(&mut queued[i], true) {
                return Err(format!(
                    "GPU block {b} is in the free queue twice, or unknown"
                ));
            }
            if self.gpu.owner[i] != NONE || self.gpu.refs[i] != 0 {
                return Err(format!("GPU block {b} is in the free queue but owned"));
            }
            if self.gpu.cache_tag[i] != (NONE, NONE) {
                return Err(format!(
                    "GPU block {b} is cached but at the front of the free queue"
                ));
            }
            count += 1;
        }
        let mut prev = NONE;
        let mut cur = self.gpu.head;
        while cur != NONE {
            if std::mem::replace(&mut queued[cur as usize], true) {
                return Err(format!("GPU block {cur} is in the free queue twice"));
            }
            if self.gpu.owner[cur as usize] != NONE {
                return Err(format!("GPU block {cur} is in the free queue but owned"));
            }
            if self.gpu.refs[cur as usize] != 0 {
                return Err(format!(
                    "shared GPU block {cur} is free while {} tables point at it",
                    self.gpu.refs[cur as usize]
                ));
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
            let group_cached = self.gpu.owner[b] == NONE
                && self.gpu.refs[b] == 0
                && self.gpu.shared_key[b].0 != NONE;
            if (agent, index) == GROUP_CACHED || group_cached {
                if (agent, index) != GROUP_CACHED || !group_cached {
                    return Err(format!(
                        "GPU block {b}: cached for its group but tagged {agent}/{index}, or the reverse"
                    ));
                }
            } else if agent != NONE {
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

    /// Shared blocks: reference counts equal the block tables pointing at each block, a block is
    /// shared exactly while referenced, keys and group tables agree, a table points at a shared
    /// block only at that block's own index of its group's prefix, every full prefix block within
    /// the shareable part is shared (computed once), and the blocks in use are the private ones
    /// plus each shared block once.
    fn audit_shared(&self, shared_seen: &[u32]) -> Result<(), String> {
        for (b, &seen) in shared_seen.iter().enumerate() {
            let refs = self.gpu.refs[b];
            if refs != seen {
                return Err(format!(
                    "shared GPU block {b}: {refs} references counted but {seen} tables point at it"
                ));
            }
            if (self.gpu.owner[b] == SHARED) != (refs > 0) {
                return Err(format!(
                    "GPU block {b}: shared owner with {refs} references"
                ));
            }
            let (g, i) = self.gpu.shared_key[b];
            if refs > 0 && g == NONE {
                return Err(format!("shared GPU block {b} has no group key"));
            }
            if g != NONE && self.group_prefix_block(g, i) != Some(b as BlockId) {
                return Err(format!(
                    "GPU block {b} keyed as block {i} of prefix group {g}, which does not list it"
                ));
            }
        }
        for (g, blocks) in self.groups.iter().enumerate() {
            let lead = blocks
                .iter()
                .take_while(|&&b| b != NONE && self.gpu.refs[b as usize] > 0)
                .count();
            if self.group_lead[g] as usize != lead {
                return Err(format!(
                    "prefix group {g}: lead of {} referenced blocks recorded, {lead} counted",
                    self.group_lead[g]
                ));
            }
            for (i, &b) in blocks.iter().enumerate() {
                if b != NONE && self.gpu.shared_key[b as usize] != (g as u32, i as u32) {
                    return Err(format!(
                        "prefix group {g} lists GPU block {b} at {i}, keyed otherwise"
                    ));
                }
            }
        }
        let mut private_on_gpu = 0u64;
        for (agent, a) in self.agents.iter().enumerate() {
            let agent = agent as AgentId;
            let mut count = 0u32;
            for (i, s) in a.slots.iter().enumerate() {
                let moving_shared = match *s {
                    Slot::SwapOut { gpu, .. } | Slot::SwapIn { gpu, .. } => self.gpu.is_shared(gpu),
                    _ => false,
                };
                if moving_shared {
                    return Err(format!("agent {agent}: shared block at slot {i} is moving"));
                }
                let Slot::Gpu(b) = *s else { continue };
                if !self.gpu.is_shared(b) {
                    continue;
                }
                count += 1;
                if self.group_block(agent, i) != Some(b) {
                    return Err(format!(
                        "agent {agent}: slot {i} points at shared block {b}, not its group's block {i}"
                    ));
                }
            }
            if count != a.shared_count {
                return Err(format!(
                    "agent {agent}: {count} shared slots but {} counted",
                    a.shared_count
                ));
            }
            let full = (a.kv_tokens / self.block_size_tokens).min(a.share_limit) as usize;
            for (i, s) in a.slots.iter().take(full).enumerate() {
                if !matches!(*s, Slot::Gpu(b) if self.gpu.is_shared(b)) {
                    return Err(format!(
                        "agent {agent}: full prefix block {i} is private (its group's prefix is computed twice)"
                    ));
                }
            }
            private_on_gpu +=
                (a.gpu_slot_count + a.moving_out_count + a.moving_in_count - a.shared_count) as u64;
        }
        let shared = shared_seen.iter().filter(|&&n| n > 0).count() as u64;
        if private_on_gpu + shared != self.gpu_blocks_used() as u64 {
            return Err(format!(
                "GPU blocks in use {} != private {private_on_gpu} + shared {shared} (each counted once)",
                self.gpu_blocks_used()
            ));
        }
        Ok(())
    }
}
