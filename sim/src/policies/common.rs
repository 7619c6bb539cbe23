//! Pieces every policy shares: ordered waiting queues, the committed (running) set with its
//! growth reservation, and the batch builder (decodes first, then chunked prefill).

use std::collections::BTreeSet;

use crate::ids::AgentId;
use crate::kv::KvState;
use crate::sched::{PrefillOrder, SchedView, StepPlan};

/// A waiting turn's place in a [`WaitQueue`]: (class, key, arrival sequence); orders as the queue.
pub type QueuePosition = (u8, u64, u64);

/// Waiting turns ordered by a policy-chosen key, ties broken by arrival sequence. Front pushes
/// (vllm's preempted requests) go ahead of every ordinary entry, latest front push first.
#[derive(Clone, Debug, Default)]
pub struct WaitQueue {
    /// (class: 0 = front, 1 = ordinary; key; sequence; agent)
    entries: BTreeSet<(u8, u64, u64, AgentId)>,
    /// Each queued agent's entry, by agent id (dense: a lookup per event and plan stays O(1),
    /// and a million queued agents take 32 MB instead of a second tree's 50).
    index: Vec<Option<(u8, u64, u64)>>,
    next_seq: u64,
}

impl WaitQueue {
    pub fn push(&mut self, agent: AgentId, key: u64) {
        self.insert(agent, 1, key);
    }

    pub fn push_front(&mut self, agent: AgentId) {
        // Later front pushes sort first: the key counts down.
        let key = u64::MAX - self.next_seq;
        self.insert(agent, 0, key);
    }

    /// Pushes into an explicit class (lower classes go first; class 0 is also used by
    /// `push_front`, whose keys count down from `u64::MAX`).
    pub fn push_class(&mut self, agent: AgentId, class: u8, key: u64) {
        self.insert(agent, class, key);
    }

    fn insert(&mut self, agent: AgentId, class: u8, key: u64) {
        self.remove(agent);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.insert((class, key, seq, agent));
        let i = agent as usize;
        if self.index.len() <= i {
            self.index.resize(i + 1, None);
        }
        self.index[i] = Some((class, key, seq));
    }

    pub fn remove(&mut self, agent: AgentId) -> bool {
        let entry = self.index.get_mut(agent as usize).and_then(Option::take);
        if let Some((class, key, seq)) = entry {
            self.entries.remove(&(class, key, seq, agent));
            true
        } else {
            false
        }
    }

    pub fn contains(&self, agent: AgentId) -> bool {
        self.position(agent).is_some()
    }

    pub fn iter(&self) -> impl Iterator<Item = AgentId> + '_ {
        self.entries.iter().map(|(_, _, _, a)| *a)
    }

    /// The agent's exact position in the queue (smaller = earlier), if it is queued: entries
    /// compare as the queue orders them.
    pub fn position(&self, agent: AgentId) -> Option<QueuePosition> {
        self.index.get(agent as usize).copied().flatten()
    }

    /// Entries with their positions, in queue order.
    pub fn iter_positions(&self) -> impl Iterator<Item = (QueuePosition, AgentId)> + '_ {
        self.entries.iter().map(|&(c, k, s, a)| ((c, k, s), a))
    }

    /// Lowest priority first.
    pub fn iter_rev(&self) -> impl Iterator<Item = AgentId> + '_ {
        self.entries.iter().rev().map(|(_, _, _, a)| *a)
    }

    pub fn first(&self) -> Option<AgentId> {
        self.entries.iter().next().map(|(_, _, _, a)| *a)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Blocks an agent needs on the GPU to run its current turn to the end, beyond what it already
/// holds there: its host blocks (to swap in) plus the growth of the turn, less the shared prefix
/// blocks it will take at admission that other agents already hold (they cost no free block).
pub fn need_blocks(view: &SchedView, agent: AgentId) -> u32 {
    let host_only = view.kv.blocks(agent) - view.kv.gpu_blocks_held(agent);
    (host_only + view.growth_blocks_to_finish(agent))
        .saturating_sub(view.kv.prefix_hit_free_blocks(agent))
}

/// Blocks the committed agents will still allocate to finish their turns.
pub fn reserved_growth(view: &SchedView, committed: &[AgentId]) -> u32 {
    committed
        .iter()
        .map(|&a| view.growth_blocks_to_finish(a))
        .sum()
}

/// Adds decodes for every resident, decoding committed agent, then prefill chunks in order, within
/// the step's token and sequence budgets and the prefill cap of the run's batch policy
/// (`queue_waiting`: turns wait for admission). Policies that reserve growth call this; their
/// reservation guarantees the blocks. Agents reclaiming in this plan are left out: a reclaim
/// lands when the plan is applied, after the view was taken, so their pending tokens are known
/// from the next plan on, which comes at this instant.
pub fn build_batch(
    view: &SchedView,
    committed: &[AgentId],
    plan: &mut StepPlan,
    queue_waiting: bool,
) {
    let mut tokens_left = view.config.max_batch_tokens as i64;
    let mut seqs_left = view.config.max_batch_sequences as i64;
    let reclaiming = !plan.reclaim.is_empty();
    if reclaiming {
        // Without compute the run loop would otherwise move on to the next event.
        plan.wake_no_later_than(view.now);
    }
    // Where the prefill pass starts: the first agent this pass found resident but not
    // decoding, or where it stopped (what comes before is decodes only; usually most of the
    // batch, with the turns to prefill admitted last).
    let mut prefill_from = committed.len();
    for (i, &agent) in committed.iter().enumerate() {
        if seqs_left == 0 || tokens_left == 0 {
            prefill_from = prefill_from.min(i);
            break;
        }
        if view.kv.is_resident(agent) {
            if view.is_decoding(agent) {
                plan.decode.push(agent);
                tokens_left -= 1;
                seqs_left -= 1;
            } else {
                prefill_from = prefill_from.min(i);
            }
        }
    }
    let prefill_tokens_max = view
        .config
        .batching
        .prefill_cap(view, &plan.decode, queue_waiting);
    tokens_left = tokens_left.min(prefill_tokens_max as i64);
    for &agent in &committed[prefill_from..] {
        if seqs_left == 0 || tokens_left <= 0 {
            break;
        }
        if view.kv.is_resident(agent)
            && !view.is_decoding(agent)
            && !(reclaiming && plan.reclaim.contains(&agent))
        {
            let pending = view.pending_tokens(agent);
            if pending == 0 {
                continue;
            }
            let chunk = pending.min(tokens_left as u32);
            plan.prefill.push(PrefillOrder {
                agent,
                tokens: chunk,
            });
            tokens_left -= chunk as i64;
            seqs_left -= 1;
        }
    }
}

/// True when the agent's KV can be committed now (not moving out).
pub fn ready_to_commit(view: &SchedView, agent: AgentId) -> bool {
    !matches!(view.kv.state(agent), KvState::SwappingOut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_orders_by_key_then_arrival_and_front_pushes_go_first() {
        let mut q = WaitQueue::default();
        q.push(5, 10);
        q.push(6, 3);
        q.push(7, 3);
        assert_eq!(q.iter().collect::<Vec<_>>(), vec![6, 7, 5]);
        q.push_front(5);
        q.push_front(9);
        assert_eq!(q.iter().collect::<Vec<_>>(), vec![9, 5, 6, 7]);
        assert!(q.remove(6));
        assert_eq!(q.len(), 3);
    }
}

/// Upper bound of waiting turns one commit pass looks at (keeps a plan O(batch)).
pub const COMMIT_SCAN_MAX: usize = 512;

/// Commits waiting agents in queue order while their need fits in `avail` blocks, issuing the
/// swap-in of host-resident KV as part of the commitment. Agents whose KV is still moving out are
/// skipped (they are not ready). With `strict`, the first agent that does not fit stops the loop
/// (no overtaking, so big turns cannot starve) and is returned with its need.
pub fn commit_waiting(
    view: &SchedView,
    waiting: &mut WaitQueue,
    committed: &mut Vec<AgentId>,
    plan: &mut StepPlan,
    avail: &mut i64,
    strict: bool,
    skip: &[AgentId],
) -> Option<(AgentId, u32)> {
    // Lazy, bounded scan: committed agents leave the queue as we go, skipped (not ready) ones
    // are stepped over; more turns than COMMIT_SCAN_MAX could never be committed at once.
    let mut skipped = 0usize;
    for _ in 0..COMMIT_SCAN_MAX {
        let Some(agent) = waiting.iter().nth(skipped) else {
            break;
        };
        // Not ready, or already acted on by this plan (e.g. evicted): step over it.
        if !ready_to_commit(view, agent) || skip.contains(&agent) {
            skipped += 1;
            continue;
        }
        let need = need_blocks(view, agent);
        if need as i64 <= *avail {
            *avail -= need as i64;
            if view.kv.state(agent) == KvState::Host {
                plan.swap_in.push(agent);
            } else if view.kv.prefix_hit_blocks(agent) > 0 {
                // Its group's shared prefix is on the GPU: take it instead of prefilling it.
                plan.reclaim.push(agent);
            }
            waiting.remove(agent);
            committed.push(agent);
        } else if strict {
            return Some((agent, need));
        } else {
            skipped += 1;
        }
    }
    None
}

/// A waiting turn that can never run: its context does not fit the whole GPU pool.
pub fn never_fits(view: &SchedView, agent: AgentId) -> bool {
    let a = view.agent(agent);
    let final_tokens = a.seq_tokens + a.remaining_generate().saturating_sub(1);
    view.kv.blocks_for(final_tokens) > view.kv.gpu_blocks_total()
}
