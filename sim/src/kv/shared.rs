//! Shared prefixes: agents of one prefix group start with the same tokens (system prompt, tool
//! schemas), so the full blocks of that prefix hold the same KV in every one of them and are kept
//! once, with a reference count per block.
//!
//! Life of a shared block: the first agent of the group to compute a full prefix block publishes
//! it (the block becomes the group's, with one reference); an agent that computes a block the
//! group already holds in some table points at that copy instead and frees its own. An agent
//! with an empty table takes the group's blocks when admitted (a reclaim: the run of prefix
//! blocks the group holds from the first one on), so its KV covers those tokens without prefill.
//! Each table pointing at a block is one reference, whatever the agent's state: a swap moves
//! only private blocks, so a paused or swapped-out agent keeps the prefix on the GPU for the
//! group. When the last reference goes (drop, release, end of program, compaction), the block
//! waits at the back of the free queue as a cached block of the group: the next agent reclaims
//! it while it survives; an allocation that reuses it evicts it, and a later agent recomputes it.

use super::pools::{GROUP_CACHED, NONE, SHARED};
use super::{KvError, KvManager, Slot};
use crate::ids::{AgentId, BlockId};

impl KvManager {
    /// Declares that the agent's sequence starts with the `prefix_tokens`-token prefix of
    /// `group`. Called before the agent has any KV; every agent of a group names the same length.
    pub fn set_shared_prefix(
        &mut self,
        agent: AgentId,
        group: u32,
        prefix_tokens: u32,
    ) -> Result<(), KvError> {
        let invalid = |message: String| Err(KvError::Invalid { agent, message });
        let a = &self.agents[agent as usize];
        if !a.slots.is_empty() || !a.cached.is_empty() || a.group.is_some() {
            return invalid("a prefix group is set once, before the agent has KV".into());
        }
        if group as usize >= traces::workload::PREFIX_GROUPS_MAX {
            return invalid(format!(
                "prefix group {group} out of range (at most {} groups)",
                traces::workload::PREFIX_GROUPS_MAX
            ));
        }
        let g = group as usize;
        if g >= self.groups.len() {
            self.groups.resize(g + 1, Vec::new());
            self.group_tokens.resize(g + 1, NONE);
            self.group_lead.resize(g + 1, 0);
        }
        if self.group_tokens[g] == NONE {
            self.group_tokens[g] = prefix_tokens;
            self.groups[g] = vec![NONE; (prefix_tokens / self.block_size_tokens) as usize];
        } else if self.group_tokens[g] != prefix_tokens {
            return invalid(format!(
                "prefix group {group} has {} tokens, not {prefix_tokens}",
                self.group_tokens[g]
            ));
        }
        let a = &mut self.agents[agent as usize];
        a.group = Some(group);
        a.share_limit = prefix_tokens / self.block_size_tokens;
        Ok(())
    }

    /// The agent's prefix group.
    pub fn prefix_group(&self, agent: AgentId) -> Option<u32> {
        self.agents[agent as usize].group
    }

    /// Slots of the agent's table that point at shared blocks.
    pub fn shared_blocks(&self, agent: AgentId) -> u32 {
        self.agents[agent as usize].shared_count
    }

    /// Block tables pointing at a GPU block when it is shared (0 otherwise).
    pub fn shared_block_refs(&self, block: BlockId) -> u32 {
        self.gpu.refs[block as usize]
    }

    /// The group's block for logical index `index` of its prefix, referenced or cached.
    pub fn group_prefix_block(&self, group: u32, index: u32) -> Option<BlockId> {
        let b = *self.groups.get(group as usize)?.get(index as usize)?;
        (b != NONE).then_some(b)
    }

    /// For an agent of a prefix group with an empty table: the blocks a reclaim would give it now
    /// (the group's shared blocks, then its own cached prefix), 0 otherwise.
    pub fn prefix_hit_blocks(&self, agent: AgentId) -> u32 {
        let a = &self.agents[agent as usize];
        if a.group.is_none() || !a.slots.is_empty() {
            return 0;
        }
        self.reclaim_run(agent).0
    }

    /// Of [`KvManager::prefix_hit_blocks`], those that cost no free block: shared blocks other
    /// tables already point at. Admission counts only the rest.
    pub fn prefix_hit_free_blocks(&self, agent: AgentId) -> u32 {
        let a = &self.agents[agent as usize];
        if a.group.is_none() || !a.slots.is_empty() {
            return 0;
        }
        self.reclaim_run(agent).1
    }

    /// The run of blocks a reclaim would give back, from logical index 0 on: at each index the
    /// group's shared block (within the shareable prefix) or else the agent's own cached block.
    /// Returns (blocks, of which shared blocks already referenced).
    pub(super) fn reclaim_run(&self, agent: AgentId) -> (u32, u32) {
        let a = &self.agents[agent as usize];
        // Every block of the group's referenced lead within the agent's shareable prefix counts
        // without a look.
        let lead = a
            .group
            .map_or(0, |g| self.group_lead[g as usize].min(a.share_limit));
        let (mut run, mut referenced) = (lead, lead);
        loop {
            let i = run as usize;
            if let Some(b) = self.group_block(agent, i) {
                referenced += u32::from(self.gpu.refs[b as usize] > 0);
            } else if !a
                .cached
                .get(i)
                .is_some_and(|&b| self.gpu.cache_tag[b as usize] == (agent, run))
            {
                return (run, referenced);
            }
            run += 1;
        }
    }

    /// The group's block at logical index `i` when the agent may share it.
    pub(super) fn group_block(&self, agent: AgentId, i: usize) -> Option<BlockId> {
        let a = &self.agents[agent as usize];
        let g = a.group? as usize;
        if i >= a.share_limit as usize {
            return None;
        }
        let b = self.groups[g][i];
        (b != NONE).then_some(b)
    }

    /// Adds a reference from the agent's table to a shared block (taking it out of the free
    /// queue when it was cached). The caller puts the slot in the table.
    pub(super) fn attach_shared(&mut self, agent: AgentId, b: BlockId) {
        let i = b as usize;
        if self.gpu.refs[i] == 0 {
            self.gpu.unlink(b);
            self.gpu.owner[i] = SHARED;
            self.gpu.cache_tag[i] = (NONE, NONE);
            self.gpu.refs[i] = 1;
            self.extend_lead(self.gpu.shared_key[i]);
        } else {
            self.gpu.refs[i] += 1;
        }
        self.agents[agent as usize].shared_count += 1;
    }

    /// Removes one reference; the last one leaves the block cached at the back of the free queue.
    /// The caller takes the slot out of the table.
    // Out of line: runs without prefix groups never get here, and inlined it slows their
    // hot path (allocation, compute, free).
    #[inline(never)]
    pub(super) fn unref_shared(&mut self, b: BlockId) {
        let i = b as usize;
        self.gpu.refs[i] -= 1;
        if self.gpu.refs[i] == 0 {
            let (g, index) = self.gpu.shared_key[i];
            let lead = &mut self.group_lead[g as usize];
            *lead = (*lead).min(index);
            self.gpu.owner[i] = NONE;
            self.gpu.cache_tag[i] = GROUP_CACHED;
            self.gpu.push_back(b);
        }
    }

    /// The group no longer has this (unreferenced) block: it was reused or replaced.
    // Out of line: runs without prefix groups never get here, and inlined it slows their
    // hot path (allocation, compute, free).
    #[inline(never)]
    pub(super) fn forget_shared_block(&mut self, b: BlockId) {
        let (g, i) = self.gpu.shared_key[b as usize];
        self.groups[g as usize][i as usize] = NONE;
        self.gpu.shared_key[b as usize] = (NONE, NONE);
        self.gpu.cache_tag[b as usize] = (NONE, NONE);
    }

    /// After a compute that took the agent's KV from `before` tokens: every prefix block that
    /// became full is the group's from now on (published, or swapped for the copy another table
    /// already points at).
    // Out of line: runs without prefix groups never get here, and inlined it slows their
    // hot path (allocation, compute, free).
    #[inline(never)]
    pub(super) fn publish_full_blocks(&mut self, agent: AgentId, before: u32) {
        let bs = self.block_size_tokens;
        let a = &self.agents[agent as usize];
        let Some(g) = a.group else { return };
        let from = before / bs;
        let to = (a.kv_tokens / bs).min(a.share_limit);
        for i in from..to {
            let Slot::Gpu(b) = self.agents[agent as usize].slots[i as usize] else {
                unreachable!("a computing agent is resident")
            };
            if self.gpu.is_shared(b) {
                continue;
            }
            let current = self.groups[g as usize][i as usize];
            if current != NONE && self.gpu.refs[current as usize] > 0 {
                // Computed concurrently with the copy the group holds: keep that one.
                self.attach_shared(agent, current);
                self.agents[agent as usize].slots[i as usize] = Slot::Gpu(current);
                self.free_gpu(b);
                continue;
            }
            if current != NONE {
                // An unreferenced copy still cached: the fresh one replaces it.
                self.forget_shared_block(current);
            }
            self.gpu.owner[b as usize] = SHARED;
            self.gpu.refs[b as usize] = 1;
            self.gpu.shared_key[b as usize] = (g, i);
            self.groups[g as usize][i as usize] = b;
            self.agents[agent as usize].shared_count += 1;
            self.extend_lead((g, i));
        }
    }

    /// Block `index` of group `g` became referenced: when it was the first block past the
    /// group's lead, the lead grows over it and over every referenced block after it.
    fn extend_lead(&mut self, (g, index): (u32, u32)) {
        let blocks = &self.groups[g as usize];
        let lead = &mut self.group_lead[g as usize];
        if *lead != index {
            return;
        }
        while let Some(&b) = blocks.get(*lead as usize) {
            if b == NONE || self.gpu.refs[b as usize] == 0 {
                break;
            }
            *lead += 1;
        }
    }
}
