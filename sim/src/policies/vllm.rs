//! `vllm` (and `vllm-noapc`): stateless turns with automatic prefix caching, as vLLM v1 does.
//!
//! At turn end the agent's blocks go to the LRU free queue with their prefix tags (tail blocks
//! first). On return the surviving prefix is reclaimed and the rest recomputed. Blocks are
//! allocated step by step, without reservation; when a running request cannot grow, the most
//! recently admitted running request is preempted by recompute and goes back to the head of the
//! waiting queue; no new request is admitted in a step that preempted. `vllm-noapc` drops instead
//! of caching, so every return recomputes its whole context.

use crate::ids::AgentId;
use crate::sched::{Phase, PrefillOrder, SchedEvent, SchedView, Scheduler, StepPlan};

use super::common::{never_fits, WaitQueue};

#[derive(Debug)]
pub struct Vllm {
    prefix_caching: bool,
    waiting: WaitQueue,
    running: Vec<AgentId>,
    to_release: Vec<AgentId>,
}

impl Vllm {
    pub fn new(prefix_caching: bool) -> Self {
        Vllm {
            prefix_caching,
            waiting: WaitQueue::default(),
            running: Vec::new(),
            to_release: Vec::new(),
        }
    }

    /// Frees a resident agent's blocks the vLLM way (cache them, or drop them without caching).
    fn free_blocks(&self, agent: AgentId, plan: &mut StepPlan) {
        if self.prefix_caching {
            plan.release.push(agent);
        } else {
            plan.drop.push((agent, 0));
        }
    }
}

impl Scheduler for Vllm {
    fn name(&self) -> String {
        if self.prefix_caching {
            "vllm"
        } else {
            "vllm-noapc"
        }
        .into()
    }

    fn on_event(&mut self, event: &SchedEvent, view: &SchedView) {
        match *event {
            SchedEvent::TurnArrived { agent, .. } => self
                .waiting
                .push(agent, view.agent(agent).turn_arrival.as_nanos()),
            SchedEvent::TurnFinished { agent, pause, .. } => {
                self.running.retain(|&a| a != agent);
                if pause.is_some() {
                    self.to_release.push(agent);
                }
            }
            SchedEvent::SwapDone { .. } => {}
        }
    }

    fn plan_step(&mut self, view: &SchedView, plan: &mut StepPlan) {
        let kv = view.kv;
        let mut free = kv.gpu_blocks_free() as i64;
        let mut released_now: Vec<AgentId> = Vec::new();
        for agent in std::mem::take(&mut self.to_release) {
            // Released even when the agent is already back (a zero pause), as vLLM does: a
            // finished request's blocks go to the prefix cache and its next turn reclaims them.
            // A waiting turn that kept its blocks outside the free count could hold what the head
            // of the queue needs while waiting behind it: a deadlock (found by the property tests).
            if matches!(view.agent(agent).phase, Phase::Paused | Phase::Waiting)
                && kv.blocks(agent) > 0
                && kv.is_resident(agent)
            {
                free += kv.blocks(agent) as i64;
                self.free_blocks(agent, plan);
                released_now.push(agent);
            }
        }
        let mut tokens_left = view.config.max_batch_tokens as i64;
        let mut seqs_left = view.config.max_batch_sequences as i64;
        let mut preempted = false;
        // The run's batch policy caps the step's prefill (vLLM itself fills the budget: `fill`).
        let decoding: Vec<AgentId> = self
            .running
            .iter()
            .copied()
            .filter(|&a| view.is_decoding(a))
            .collect();
        let mut prefill_left =
            view.config
                .batching
                .prefill_cap(view, &decoding, !self.waiting.is_empty()) as i64;

        // Running requests first, in admission order; preempt from the back when short.
        let mut i = 0;
        while i < self.running.len() && seqs_left > 0 && tokens_left > 0 {
            let agent = self.running[i];
            let decoding = view.is_decoding(agent);
            let tokens = if decoding {
                1
            } else {
                view.pending_tokens(agent)
                    .min(tokens_left as u32)
                    .min(prefill_left as u32)
            };
            if tokens == 0 {
                // Prefill budget spent: this request waits for the next step.
                i += 1;
                continue;
            }
            let need =
                kv.blocks_for(kv.kv_tokens(agent) + tokens) as i64 - kv.table_blocks(agent) as i64;
            let mut self_preempted = false;
            while need > free {
                let victim = *self.running.last().expect("agent i is running");
                if victim == agent {
                    self_preempted = true;
                    break;
                }
                self.running.pop();
                free += kv.blocks(victim) as i64;
                self.free_blocks(victim, plan);
                self.waiting.push_front(victim);
                preempted = true;
            }
            if self_preempted {
                self.running.remove(i);
                free += kv.blocks(agent) as i64;
                self.free_blocks(agent, plan);
                self.waiting.push_front(agent);
                preempted = true;
                continue;
            }
            free -= need.max(0);
            if decoding {
                plan.decode.push(agent);
            } else {
                plan.prefill.push(PrefillOrder { agent, tokens });
                prefill_left -= tokens as i64;
            }
            tokens_left -= tokens as i64;
            seqs_left -= 1;
            i += 1;
        }

        // Then waiting requests, first come first served, while blocks and budget allow.
        if !preempted {
            // Every pass of this loop either stops or takes the head out of the queue, so the
            // head is always the next candidate: no snapshot of the (possibly long) queue needed.
            for _ in 0..super::common::COMMIT_SCAN_MAX {
                let Some(agent) = self.waiting.first() else {
                    break;
                };
                if seqs_left == 0 || tokens_left <= 0 || prefill_left <= 0 {
                    break;
                }
                if released_now.contains(&agent) {
                    // Its release is applied with this plan; it is admitted (reclaiming its cached
                    // prefix) by the next plan, at the same instant. Stop here to keep the order.
                    break;
                }
                if never_fits(view, agent) {
                    self.waiting.remove(agent);
                    plan.reject.push(agent);
                    continue;
                }
                // Its own cached prefix, or blocks of its group's shared prefix (other agents'
                // running or cached blocks, as automatic prefix caching finds them).
                let cached = kv.has_cached_prefix(agent) || kv.prefix_hit_blocks(agent) > 0;
                let reclaim_blocks = if cached {
                    kv.reclaimable_prefix_blocks(agent)
                } else {
                    0
                };
                let kv_after = if cached {
                    reclaim_blocks * kv.block_size_tokens()
                } else {
                    kv.kv_tokens(agent)
                };
                let pending = view.agent(agent).seq_tokens - kv_after;
                let chunk = pending.min(tokens_left as u32).min(prefill_left as u32);
                // Blocks the agent will hold after this step, all taken from the free count (its
                // own cached blocks are counted as free until reclaimed) except shared blocks
                // that other running agents hold.
                let hold = kv.blocks_for(kv_after + chunk) as i64;
                let take = hold
                    - if cached {
                        kv.prefix_hit_free_blocks(agent) as i64
                    } else {
                        kv.table_blocks(agent) as i64
                    };
                if take > free {
                    break;
                }
                free -= take;
                if cached {
                    plan.reclaim.push(agent);
                }
                plan.prefill.push(PrefillOrder {
                    agent,
                    tokens: chunk,
                });
                tokens_left -= chunk as i64;
                prefill_left -= chunk as i64;
                seqs_left -= 1;
                self.waiting.remove(agent);
                self.running.push(agent);
            }
        }
    }
}
