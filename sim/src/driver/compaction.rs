//! History compaction at a turn start: the KV beyond the kept prefix of a turn whose explicit
//! context is shorter than the sequence so far.

use super::{LoopState, RunError};
use crate::ids::AgentId;
use crate::kv::KvError;
use crate::time::SimTime;

impl LoopState<'_> {
    /// Applies a pending history compaction: the KV beyond the kept prefix goes, and the
    /// sequence becomes the kept prefix plus the turn's new tokens (which are then prefilled
    /// like any others). The engine learns of a compaction only when the turn arrives, so KV
    /// still moving then (a swap-in ahead of the turn, a swap-out late in the pause) finishes
    /// first: until then the agent cannot compute, and the sequence stays the uncompacted one
    /// so that it never holds less than its valid KV.
    pub(super) fn compact(&mut self, agent: AgentId, now: SimTime) -> Result<(), RunError> {
        let Some(&keep) = self.pending_compactions.get(&agent) else {
            return Ok(());
        };
        match self.kv.forget_beyond(agent, keep) {
            Ok(()) => {}
            Err(KvError::SwapInFlight { .. }) => return Ok(()),
            Err(e) => return Err(self.kv_err(now, e)),
        }
        self.pending_compactions.remove(&agent);
        let new_tokens = self.trackers[agent as usize]
            .turn
            .as_ref()
            .map_or(0, |t| t.new_tokens);
        self.agents[agent as usize].seq_tokens = keep + new_tokens;
        Ok(())
    }
}
