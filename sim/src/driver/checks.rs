//! The run loop's invariant checks after a step (and the final ones at the end of a run).

use super::{CheckLevel, LoopState, RunError};
use crate::sched::Phase;
use crate::time::SimTime;

impl LoopState<'_> {
    pub(super) fn check_after_step(
        &mut self,
        now: SimTime,
        final_check: bool,
    ) -> Result<(), RunError> {
        // Capacity is structural (counters cannot exceed pools); check the counters agree.
        if self.kv.gpu_blocks_used() > self.kv.gpu_blocks_total()
            || self.kv.host_blocks_used() > self.kv.host_blocks_total()
        {
            return Err(self.invariant(now, "pool capacity exceeded"));
        }
        let audit_now = final_check
            || match self.settings.check {
                CheckLevel::Full => true,
                CheckLevel::Step {
                    audit_interval_steps,
                } => audit_interval_steps > 0 && self.step % audit_interval_steps == 0,
            };
        if audit_now {
            self.out.audits += 1;
            self.kv.audit().map_err(|m| self.invariant(now, m))?;
            for (i, a) in self.agents.iter().enumerate() {
                if a.generated > a.generate_target {
                    return Err(self.invariant(
                        now,
                        format!(
                            "agent {i} generated {} of {}",
                            a.generated, a.generate_target
                        ),
                    ));
                }
                if matches!(a.phase, Phase::Done | Phase::Rejected)
                    && (self.kv.table_blocks(i as u32) > 0 || self.kv.has_cached_prefix(i as u32))
                {
                    return Err(self.invariant(now, format!("agent {i} ended but still holds KV")));
                }
            }
        }
        if final_check {
            if self.kv.gpu_blocks_used() != 0 || self.kv.host_blocks_used() != 0 {
                return Err(self.invariant(
                    now,
                    format!(
                        "run ended with {} GPU and {} host blocks still held (leak)",
                        self.kv.gpu_blocks_used(),
                        self.kv.host_blocks_used()
                    ),
                ));
            }
            let incomplete = self
                .out
                .turns
                .iter()
                .filter(|t| !t.rejected && t.finished_ns.is_none())
                .count();
            if incomplete > 0 {
                return Err(
                    self.invariant(now, format!("run ended with {incomplete} unfinished turns"))
                );
            }
        }
        Ok(())
    }
}
