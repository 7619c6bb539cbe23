//! Deliberately broken policies, compiled only into the tests. Each breaks one promise; a test
//! asserts the checker catches it. If a canary ever passes, the harness is broken.

use sim::ids::AgentId;
use sim::kv::KvState;
use sim::policies::common::{build_batch, commit_waiting, never_fits, reserved_growth, WaitQueue};
use sim::policies::swap::Swap;
use sim::sched::{Phase, PrefillOrder, SchedEvent, SchedView, Scheduler, StepPlan};

use crate::check::{PolicyUnderTest, Promises};

/// `swap`, but it also computes for a waiting agent whose KV is still on the host (or moving):
/// the residency invariant must catch it.
#[derive(Default)]
pub struct ComputesOnHost {
    inner: Swap,
}

impl Scheduler for ComputesOnHost {
    fn name(&self) -> String {
        "canary-computes-on-host".into()
    }
    fn on_event(&mut self, event: &SchedEvent, view: &SchedView) {
        self.inner.on_event(event, view);
    }
    fn plan_step(&mut self, view: &SchedView, plan: &mut StepPlan) {
        self.inner.plan_step(view, plan);
        let planned = |a: AgentId, plan: &StepPlan| {
            plan.decode.contains(&a) || plan.prefill.iter().any(|p| p.agent == a)
        };
        let victim = (0..view.agents.len() as AgentId).find(|&a| {
            matches!(view.agent(a).phase, Phase::Waiting | Phase::Running)
                && matches!(
                    view.kv.state(a),
                    KvState::Host | KvState::SwappingIn | KvState::SwappingOut
                )
                && !planned(a, plan)
        });
        if let Some(a) = victim {
            if plan.prefill.len() + plan.decode.len() < view.config.max_batch_sequences as usize {
                plan.prefill.push(PrefillOrder {
                    agent: a,
                    tokens: 1,
                });
            }
        }
    }
}

/// First come, first served admission like `pin`, except that every waiting turn is admitted
/// with no regard for memory: allocation must fail loudly (capacity).
#[derive(Default)]
pub struct Overcommits {
    waiting: WaitQueue,
    committed: Vec<AgentId>,
}

impl Scheduler for Overcommits {
    fn name(&self) -> String {
        "canary-overcommits".into()
    }
    fn on_event(&mut self, event: &SchedEvent, view: &SchedView) {
        match *event {
            SchedEvent::TurnArrived { agent, .. } => self
                .waiting
                .push(agent, view.agent(agent).turn_arrival.as_nanos()),
            SchedEvent::TurnFinished { agent, .. } => self.committed.retain(|&a| a != agent),
            SchedEvent::SwapDone { .. } => {}
        }
    }
    fn plan_step(&mut self, view: &SchedView, plan: &mut StepPlan) {
        let mut unlimited = i64::MAX;
        commit_waiting(
            view,
            &mut self.waiting,
            &mut self.committed,
            plan,
            &mut unlimited,
            false,
            &[],
        );
        build_batch(view, &self.committed, plan, !self.waiting.is_empty());
    }
}

/// Admits waiting turns last come, first served (a stack), with `pin`'s memory rules: safe, and
/// it terminates, but early turns starve behind later ones. The fairness check must catch it.
#[derive(Default)]
pub struct LastComeFirstServed {
    waiting: WaitQueue,
    committed: Vec<AgentId>,
}

impl Scheduler for LastComeFirstServed {
    fn name(&self) -> String {
        "canary-lcfs".into()
    }
    fn on_event(&mut self, event: &SchedEvent, view: &SchedView) {
        match *event {
            SchedEvent::TurnArrived { agent, .. } => self
                .waiting
                .push(agent, u64::MAX - view.agent(agent).turn_arrival.as_nanos()),
            SchedEvent::TurnFinished { agent, .. } => self.committed.retain(|&a| a != agent),
            SchedEvent::SwapDone { .. } => {}
        }
    }
    fn plan_step(&mut self, view: &SchedView, plan: &mut StepPlan) {
        let mut avail =
            view.kv.gpu_blocks_free() as i64 - reserved_growth(view, &self.committed) as i64;
        if let Some((head, _)) = commit_waiting(
            view,
            &mut self.waiting,
            &mut self.committed,
            plan,
            &mut avail,
            true,
            &[],
        ) {
            if never_fits(view, head)
                || (self.committed.is_empty() && view.kv.swaps_in_flight() == 0)
            {
                self.waiting.remove(head);
                plan.reject.push(head);
            }
        }
        build_batch(view, &self.committed, plan, !self.waiting.is_empty());
    }
}

/// `swap`, but agent 0 is never given compute after its first turn: it starves. Termination
/// (deadlock detection) or the liveness bound must catch it.
#[derive(Default)]
pub struct StarvesAgentZero {
    inner: Swap,
}

impl Scheduler for StarvesAgentZero {
    fn name(&self) -> String {
        "canary-starves-agent-0".into()
    }
    fn on_event(&mut self, event: &SchedEvent, view: &SchedView) {
        self.inner.on_event(event, view);
    }
    fn plan_step(&mut self, view: &SchedView, plan: &mut StepPlan) {
        self.inner.plan_step(view, plan);
        if view.agents.first().is_some_and(|a| a.turn_index > 0) {
            plan.prefill.retain(|p| p.agent != 0);
            plan.decode.retain(|&a| a != 0);
        }
    }
}

/// Every canary, as a policy under test that claims the promises it breaks.
pub fn all() -> Vec<PolicyUnderTest> {
    let fair = Promises {
        no_rejection_when_fits: false,
        fair_order: true,
    };
    let live = Promises {
        no_rejection_when_fits: true,
        fair_order: false,
    };
    vec![
        PolicyUnderTest {
            name: "canary-computes-on-host".into(),
            kind: None,
            build: || Box::new(ComputesOnHost::default()),
            promises: live,
        },
        PolicyUnderTest {
            name: "canary-overcommits".into(),
            kind: None,
            build: || Box::new(Overcommits::default()),
            promises: live,
        },
        PolicyUnderTest {
            name: "canary-lcfs".into(),
            kind: None,
            build: || Box::new(LastComeFirstServed::default()),
            promises: fair,
        },
        PolicyUnderTest {
            name: "canary-starves-agent-0".into(),
            kind: None,
            build: || Box::new(StarvesAgentZero::default()),
            promises: live,
        },
    ]
}
