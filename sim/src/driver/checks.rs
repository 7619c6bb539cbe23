//! The run loop's invariant checks after a step (and the final ones at the end of a run).

use super::{CheckLevel, LoopState, RunError};
use crate::ids::AgentId;
use crate::sched::Phase;
use crate::time::SimTime;

/// Work units of a full audit that one step may pay for, amortised: an audit walks every agent
/// and every block, so auditing every fixed number of steps made checking quadratic over a run
/// whose length grows with its agent count (8.7% of the time of a 30,000-agent run, more beyond). Spacing
/// audits by their own size keeps the cost per step constant; small runs keep the configured
/// interval, and the incremental checks still run after every step.
const AUDIT_WORK_PER_STEP: u64 = 8;

impl LoopState<'_> {
    /// Steps until the next full audit: at least `min_interval`, and at least the audit's size
    /// (agents plus blocks of both pools) over [`AUDIT_WORK_PER_STEP`].
    fn audit_spacing(&self, min_interval: u64) -> u64 {
        let size = self.agents.len() as u64
            + self.kv.gpu_blocks_total() as u64
            + self.kv.host_blocks_total() as u64;
        min_interval.max(size / AUDIT_WORK_PER_STEP)
    }

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
                } => audit_interval_steps > 0 && self.step >= self.next_audit_step,
            };
        if audit_now {
            if let CheckLevel::Step {
                audit_interval_steps,
            } = self.settings.check
            {
                self.next_audit_step = self.step + self.audit_spacing(audit_interval_steps);
            }
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
            let incomplete = self.book.open_turns(&self.out);
            if incomplete > 0 {
                return Err(
                    self.invariant(now, format!("run ended with {incomplete} unfinished turns"))
                );
            }
        }
        Ok(())
    }

    /// The agent of a compute order has a turn in progress and all its KV on the GPU. Runs for
    /// every agent of every batch: inlined, with the error built off the path.
    #[inline]
    pub(super) fn check_computable(&self, agent: AgentId, now: SimTime) -> Result<(), RunError> {
        let a = &self.agents[agent as usize];
        if matches!(a.phase, Phase::Waiting | Phase::Running) && self.kv.is_resident(agent) {
            return Ok(());
        }
        Err(self.not_computable(agent, now))
    }

    /// Why [`Self::check_computable`] refused.
    #[cold]
    #[inline(never)]
    fn not_computable(&self, agent: AgentId, now: SimTime) -> RunError {
        let a = &self.agents[agent as usize];
        if !matches!(a.phase, Phase::Waiting | Phase::Running) {
            return self.invariant(
                now,
                format!("agent {agent} ordered to compute while {:?}", a.phase),
            );
        }
        self.invariant(
            now,
            format!(
                "agent {agent} ordered to compute while its KV is {:?}",
                self.kv.state(agent)
            ),
        )
    }
}
