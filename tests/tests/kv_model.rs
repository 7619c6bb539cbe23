//! Model-based test of the KV mechanism: random operation sequences applied to `sim::kv::KvManager`
//! and to a deliberately simple reference model (plain vectors, a `VecDeque` free list, a map of
//! prefix-cache tags), compared after every operation: the outcome (which error, or the returned
//! value), every agent's block table, state, token counts and conservation counters, the pools'
//! free counts, the swaps in flight, and the mechanism's own `audit()`.

use std::collections::{BTreeMap, VecDeque};
use std::mem::discriminant;

use djinn_tests::env;
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use sim::kv::{KvError, KvManager, KvState, Slot, SwapDirection};

const AGENTS: u32 = 3;

#[derive(Clone, Debug)]
enum Op {
    Grow {
        agent: u32,
        extra_tokens: u32,
    },
    Advance {
        agent: u32,
        tokens: u32,
    },
    SwapOut {
        agent: u32,
        blocks: u32,
    },
    SwapIn {
        agent: u32,
    },
    /// Completes the n-th swap in flight (by id order); an unknown id when none.
    Complete {
        nth: usize,
    },
    Drop {
        agent: u32,
        keep_tokens: u32,
    },
    Release {
        agent: u32,
    },
    Reclaim {
        agent: u32,
    },
    FreeAll {
        agent: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let agent = 0..AGENTS;
    prop_oneof![
        4 => (agent.clone(), 0..40u32).prop_map(|(agent, extra_tokens)| Op::Grow { agent, extra_tokens }),
        1 => (agent.clone(), 0..4u32).prop_map(|(agent, tokens)| Op::Advance { agent, tokens }),
        2 => (agent.clone(), 0..6u32).prop_map(|(agent, blocks)| Op::SwapOut { agent, blocks }),
        2 => agent.clone().prop_map(|agent| Op::SwapIn { agent }),
        3 => (0..4usize).prop_map(|nth| Op::Complete { nth }),
        1 => (agent.clone(), 0..60u32).prop_map(|(agent, keep_tokens)| Op::Drop { agent, keep_tokens }),
        1 => agent.clone().prop_map(|agent| Op::Release { agent }),
        1 => agent.clone().prop_map(|agent| Op::Reclaim { agent }),
        1 => agent.prop_map(|agent| Op::FreeAll { agent }),
    ]
}

#[derive(Clone, Debug, Default)]
struct RefAgent {
    slots: Vec<Slot>,
    kv_tokens: u32,
    high_water: u32,
    dropped: u64,
    recomputed: u64,
    cached: Vec<u32>,
}

impl RefAgent {
    fn count(&self, f: impl Fn(&Slot) -> bool) -> u32 {
        self.slots.iter().filter(|s| f(s)).count() as u32
    }
    fn moving(&self) -> bool {
        self.slots
            .iter()
            .any(|s| matches!(s, Slot::SwapOut { .. } | Slot::SwapIn { .. }))
    }
    fn resident(&self) -> bool {
        self.slots.iter().all(|s| matches!(s, Slot::Gpu(_)))
    }
    fn state(&self) -> KvState {
        if self.slots.iter().any(|s| matches!(s, Slot::SwapOut { .. })) {
            KvState::SwappingOut
        } else if self.slots.iter().any(|s| matches!(s, Slot::SwapIn { .. })) {
            KvState::SwappingIn
        } else if self.slots.iter().any(|s| matches!(s, Slot::Host(_))) {
            KvState::Host
        } else if self.slots.is_empty() {
            KvState::Dropped
        } else {
            KvState::Gpu
        }
    }
}

/// The reference: what the mechanism's documentation promises, with the simplest structures.
#[derive(Clone, Debug)]
struct Reference {
    block_size: u32,
    gpu_total: u32,
    host_total: u32,
    /// GPU free list: allocation takes the front; a freed block without a cache tag goes to the
    /// front, a cached one to the back (so cached blocks are reused last, oldest first).
    gpu_free: VecDeque<u32>,
    host_free: VecDeque<u32>,
    /// Free GPU blocks that still hold an agent's cached prefix block: block -> (agent, index).
    tags: BTreeMap<u32, (u32, u32)>,
    agents: Vec<RefAgent>,
    swaps: BTreeMap<u64, (u32, SwapDirection)>,
    next_swap: u64,
}

/// The outcome of an operation, compared between model and mechanism.
#[derive(Debug, PartialEq)]
enum Outcome {
    Value(u64),
    /// Blocks grown, then tokens recomputed.
    Computed(u32, u32),
    Swap(u32, SwapDirection),
    Error(std::mem::Discriminant<KvError>),
}

fn outcome<T>(r: Result<T, KvError>, value: impl Fn(T) -> Outcome) -> Outcome {
    match r {
        Ok(v) => value(v),
        Err(e) => Outcome::Error(discriminant(&e)),
    }
}

fn err(e: KvError) -> Outcome {
    Outcome::Error(discriminant(&e))
}

impl Reference {
    fn new(block_size: u32, gpu: u32, host: u32) -> Self {
        Reference {
            block_size,
            gpu_total: gpu,
            host_total: host,
            gpu_free: (0..gpu).collect(),
            host_free: (0..host).collect(),
            tags: BTreeMap::new(),
            agents: vec![RefAgent::default(); AGENTS as usize],
            swaps: BTreeMap::new(),
            next_swap: 0,
        }
    }

    fn blocks_for(&self, tokens: u32) -> u32 {
        tokens.div_ceil(self.block_size)
    }

    fn alloc_gpu(&mut self) -> u32 {
        let b = self.gpu_free.pop_front().expect("checked free count");
        self.tags.remove(&b);
        b
    }

    fn untag(&mut self, agent: u32) {
        for (i, b) in std::mem::take(&mut self.agents[agent as usize].cached)
            .into_iter()
            .enumerate()
        {
            if self.tags.get(&b) == Some(&(agent, i as u32)) {
                self.tags.remove(&b);
            }
        }
    }

    fn apply(&mut self, op: &Op) -> Outcome {
        let invalid = |agent| KvError::Invalid {
            agent,
            message: String::new(),
        };
        match *op {
            // Grow to hold `extra_tokens` more, then record them computed: what the run loop does
            // for a prefill chunk or a decode (the audit's "at most one block of growth reserve"
            // holds between steps, not between the two calls).
            Op::Grow {
                agent,
                extra_tokens,
            } => {
                let a = &self.agents[agent as usize];
                if !a.resident() {
                    return err(KvError::NotResident {
                        agent,
                        action: "",
                        state: a.state(),
                    });
                }
                let grown = self
                    .blocks_for(a.kv_tokens + extra_tokens)
                    .saturating_sub(a.slots.len() as u32);
                if grown > self.gpu_free.len() as u32 {
                    return err(KvError::GpuPoolExhausted {
                        agent,
                        needed: 0,
                        free: 0,
                    });
                }
                if grown > 0 {
                    // Computing from scratch abandons a cached prefix (reclaim needs an empty table).
                    self.untag(agent);
                }
                for _ in 0..grown {
                    let b = self.alloc_gpu();
                    self.agents[agent as usize].slots.push(Slot::Gpu(b));
                }
                match self.apply(&Op::Advance {
                    agent,
                    tokens: extra_tokens,
                }) {
                    Outcome::Value(recomputed) => Outcome::Computed(grown, recomputed as u32),
                    other => other,
                }
            }
            Op::Advance { agent, tokens } => {
                let bs = self.block_size;
                let a = &mut self.agents[agent as usize];
                if !a.resident() {
                    return err(KvError::NotResident {
                        agent,
                        action: "",
                        state: a.state(),
                    });
                }
                let end = a.kv_tokens + tokens;
                if end > a.slots.len() as u32 * bs {
                    return err(invalid(agent));
                }
                let recomputed = a.high_water.min(end).saturating_sub(a.kv_tokens);
                a.recomputed += recomputed as u64;
                a.high_water = a.high_water.max(end);
                a.kv_tokens = end;
                Outcome::Value(recomputed as u64)
            }
            Op::SwapOut { agent, blocks } => {
                let a = &self.agents[agent as usize];
                if a.moving() {
                    return err(KvError::SwapInFlight { agent, action: "" });
                }
                let mut indices: Vec<usize> = (0..a.slots.len())
                    .rev()
                    .filter(|&i| matches!(a.slots[i], Slot::Gpu(_)))
                    .take(blocks as usize)
                    .collect();
                if indices.is_empty() {
                    return err(invalid(agent));
                }
                if indices.len() > self.host_free.len() {
                    return err(KvError::HostPoolExhausted {
                        agent,
                        needed: 0,
                        free: 0,
                    });
                }
                indices.sort();
                for i in indices {
                    let host = self.host_free.pop_front().expect("checked");
                    let Slot::Gpu(gpu) = self.agents[agent as usize].slots[i] else {
                        unreachable!()
                    };
                    self.agents[agent as usize].slots[i] = Slot::SwapOut { gpu, host };
                }
                self.swaps
                    .insert(self.next_swap, (agent, SwapDirection::Out));
                self.next_swap += 1;
                Outcome::Value(self.next_swap - 1)
            }
            Op::SwapIn { agent } => {
                let a = &self.agents[agent as usize];
                if a.moving() {
                    return err(KvError::SwapInFlight { agent, action: "" });
                }
                let needed = a.count(|s| matches!(s, Slot::Host(_)));
                if needed == 0 {
                    return err(invalid(agent));
                }
                if needed > self.gpu_free.len() as u32 {
                    return err(KvError::GpuPoolExhausted {
                        agent,
                        needed: 0,
                        free: 0,
                    });
                }
                for i in 0..self.agents[agent as usize].slots.len() {
                    if let Slot::Host(host) = self.agents[agent as usize].slots[i] {
                        let gpu = self.alloc_gpu();
                        self.agents[agent as usize].slots[i] = Slot::SwapIn { host, gpu };
                    }
                }
                self.swaps
                    .insert(self.next_swap, (agent, SwapDirection::In));
                self.next_swap += 1;
                Outcome::Value(self.next_swap - 1)
            }
            Op::Complete { nth } => {
                let Some((&id, &(agent, direction))) = self.swaps.iter().nth(nth) else {
                    return err(KvError::UnknownSwap(0));
                };
                self.swaps.remove(&id);
                for i in 0..self.agents[agent as usize].slots.len() {
                    match self.agents[agent as usize].slots[i] {
                        Slot::SwapOut { gpu, host } if direction == SwapDirection::Out => {
                            self.gpu_free.push_front(gpu);
                            self.agents[agent as usize].slots[i] = Slot::Host(host);
                        }
                        Slot::SwapIn { host, gpu } if direction == SwapDirection::In => {
                            self.host_free.push_back(host);
                            self.agents[agent as usize].slots[i] = Slot::Gpu(gpu);
                        }
                        _ => {}
                    }
                }
                Outcome::Swap(agent, direction)
            }
            Op::Drop { agent, keep_tokens } => {
                let keep_blocks = (keep_tokens / self.block_size) as usize;
                let a = &self.agents[agent as usize];
                if a.slots
                    .iter()
                    .skip(keep_blocks)
                    .any(|s| matches!(s, Slot::SwapOut { .. } | Slot::SwapIn { .. }))
                {
                    return err(KvError::SwapInFlight { agent, action: "" });
                }
                while self.agents[agent as usize].slots.len() > keep_blocks {
                    match self.agents[agent as usize].slots.pop().expect("non-empty") {
                        Slot::Gpu(b) => self.gpu_free.push_front(b),
                        Slot::Host(b) => self.host_free.push_back(b),
                        _ => unreachable!(),
                    }
                }
                let bs = self.block_size;
                let a = &mut self.agents[agent as usize];
                let kept = a.kv_tokens.min(keep_blocks as u32 * bs);
                let dropped = a.kv_tokens - kept;
                a.kv_tokens = kept;
                a.dropped += dropped as u64;
                Outcome::Value(dropped as u64)
            }
            Op::Release { agent } => {
                let a = &self.agents[agent as usize];
                if !a.resident() {
                    return err(KvError::NotResident {
                        agent,
                        action: "",
                        state: a.state(),
                    });
                }
                self.untag(agent);
                let a = &mut self.agents[agent as usize];
                let full = (a.kv_tokens / self.block_size) as usize;
                let slots = std::mem::take(&mut a.slots);
                a.dropped += a.kv_tokens as u64;
                a.kv_tokens = 0;
                // Tail first into the back of the free list, so tails are reused before prefixes;
                // the partial block has no cache key and goes to the front.
                for (i, slot) in slots.iter().enumerate().rev() {
                    let Slot::Gpu(b) = *slot else { unreachable!() };
                    if i < full {
                        self.gpu_free.push_back(b);
                        self.tags.insert(b, (agent, i as u32));
                    } else {
                        self.gpu_free.push_front(b);
                    }
                }
                self.agents[agent as usize].cached = slots[..full]
                    .iter()
                    .map(|s| {
                        if let Slot::Gpu(b) = s {
                            *b
                        } else {
                            unreachable!()
                        }
                    })
                    .collect();
                Outcome::Value(0)
            }
            Op::Reclaim { agent } => {
                if !self.agents[agent as usize].slots.is_empty() {
                    return err(invalid(agent));
                }
                let cached = std::mem::take(&mut self.agents[agent as usize].cached);
                let survive = cached
                    .iter()
                    .enumerate()
                    .take_while(|(i, b)| self.tags.get(b) == Some(&(agent, *i as u32)))
                    .count();
                for (i, &b) in cached.iter().enumerate() {
                    if i < survive {
                        self.gpu_free.retain(|&f| f != b);
                        self.tags.remove(&b);
                    } else if self.tags.get(&b) == Some(&(agent, i as u32)) {
                        self.tags.remove(&b);
                    }
                }
                let bs = self.block_size;
                let a = &mut self.agents[agent as usize];
                a.slots = cached[..survive].iter().map(|&b| Slot::Gpu(b)).collect();
                a.kv_tokens = survive as u32 * bs;
                a.dropped -= a.kv_tokens as u64;
                Outcome::Value(a.kv_tokens as u64)
            }
            Op::FreeAll { agent } => {
                if self.agents[agent as usize].moving() {
                    return err(KvError::SwapInFlight { agent, action: "" });
                }
                self.untag(agent);
                for slot in std::mem::take(&mut self.agents[agent as usize].slots) {
                    match slot {
                        Slot::Gpu(b) => self.gpu_free.push_front(b),
                        Slot::Host(b) => self.host_free.push_back(b),
                        _ => unreachable!(),
                    }
                }
                self.agents[agent as usize] = RefAgent::default();
                Outcome::Value(0)
            }
        }
    }
}

fn apply_real(kv: &mut KvManager, op: &Op) -> Outcome {
    let value = |v: u32| Outcome::Value(v as u64);
    match *op {
        Op::Grow {
            agent,
            extra_tokens,
        } => match kv.ensure_capacity(agent, kv.kv_tokens(agent) + extra_tokens) {
            Err(e) => err(e),
            Ok(grown) => outcome(kv.advance(agent, extra_tokens), |recomputed| {
                Outcome::Computed(grown, recomputed)
            }),
        },
        Op::Advance { agent, tokens } => outcome(kv.advance(agent, tokens), value),
        Op::SwapOut { agent, blocks } => outcome(kv.start_swap_out(agent, blocks), Outcome::Value),
        Op::SwapIn { agent } => outcome(kv.start_swap_in(agent), Outcome::Value),
        Op::Complete { nth } => {
            // The n-th swap in flight by id, found by probing ids (the mechanism keeps them in a
            // map; ids are small and dense here).
            let ids: Vec<u64> = (0..10_000u64)
                .filter(|&id| kv.swap_job(id).is_some())
                .take(nth + 1)
                .collect();
            let id = ids.get(nth).copied().unwrap_or(u64::MAX);
            outcome(kv.complete_swap(id), |(agent, direction)| {
                Outcome::Swap(agent, direction)
            })
        }
        Op::Drop { agent, keep_tokens } => outcome(kv.drop_tail(agent, keep_tokens), value),
        Op::Release { agent } => outcome(kv.release_to_cache(agent), |()| Outcome::Value(0)),
        Op::Reclaim { agent } => outcome(kv.reclaim_cached(agent), value),
        Op::FreeAll { agent } => outcome(kv.free_all(agent), |()| Outcome::Value(0)),
    }
}

/// Everything observable must agree.
fn compare(kv: &KvManager, model: &Reference) -> Result<(), String> {
    kv.audit().map_err(|e| format!("audit: {e}"))?;
    let pools = (
        kv.gpu_blocks_free(),
        kv.host_blocks_free(),
        kv.swaps_in_flight(),
    );
    let model_pools = (
        model.gpu_free.len() as u32,
        model.host_free.len() as u32,
        model.swaps.len(),
    );
    if pools != model_pools
        || kv.gpu_blocks_total() != model.gpu_total
        || kv.host_blocks_total() != model.host_total
    {
        return Err(format!(
            "pools (gpu free, host free, swaps) {pools:?}, model {model_pools:?}"
        ));
    }
    for (i, m) in model.agents.iter().enumerate() {
        let agent = i as u32;
        if kv.slots(agent) != m.slots.as_slice() {
            return Err(format!(
                "agent {agent}: slots {:?}, model {:?}",
                kv.slots(agent),
                m.slots
            ));
        }
        let real = (
            kv.state(agent),
            kv.kv_tokens(agent),
            kv.computed_high_water(agent),
            kv.tokens_dropped_total(agent),
            kv.tokens_recomputed_total(agent),
            kv.is_resident(agent),
        );
        let expect = (
            m.state(),
            m.kv_tokens,
            m.high_water,
            m.dropped,
            m.recomputed,
            m.resident(),
        );
        if real != expect {
            return Err(format!("agent {agent}: (state, kv, high water, dropped, recomputed, resident) {real:?}, model {expect:?}"));
        }
        let held = (kv.gpu_blocks_held(agent), kv.host_blocks_held(agent));
        let moving = m.count(|s| matches!(s, Slot::SwapOut { .. } | Slot::SwapIn { .. }));
        let model_held = (
            m.count(|s| matches!(s, Slot::Gpu(_))) + moving,
            m.count(|s| matches!(s, Slot::Host(_))) + moving,
        );
        if held != model_held {
            return Err(format!(
                "agent {agent}: held (gpu, host) {held:?}, model {model_held:?}"
            ));
        }
        let reclaimable = m
            .cached
            .iter()
            .enumerate()
            .take_while(|(j, b)| model.tags.get(b) == Some(&(agent, *j as u32)))
            .count() as u32;
        if kv.reclaimable_prefix_blocks(agent) != reclaimable
            || kv.has_cached_prefix(agent) != !m.cached.is_empty()
        {
            return Err(format!(
                "agent {agent}: reclaimable {} (model {reclaimable}), cached {} (model {})",
                kv.reclaimable_prefix_blocks(agent),
                kv.has_cached_prefix(agent),
                !m.cached.is_empty()
            ));
        }
    }
    Ok(())
}

#[derive(Clone, Debug)]
struct Script {
    block_size: u32,
    gpu_blocks: u32,
    host_blocks: u32,
    ops: Vec<Op>,
}

fn script() -> impl Strategy<Value = Script> {
    (
        prop::sample::select(&[1u32, 2, 4, 16][..]),
        0..14u32,
        0..14u32,
        prop::collection::vec(op(), 1..80),
    )
        .prop_map(|(block_size, gpu_blocks, host_blocks, ops)| Script {
            block_size,
            gpu_blocks,
            host_blocks,
            ops,
        })
}

/// Runs a script on the mechanism and on a model that believes in `model_block_size`.
fn run_script(s: &Script, model_block_size: u32) -> Result<(), String> {
    let mut kv = KvManager::new(s.block_size, s.gpu_blocks, s.host_blocks, AGENTS);
    let mut model = Reference::new(model_block_size, s.gpu_blocks, s.host_blocks);
    for (step, op) in s.ops.iter().enumerate() {
        let expected = model.apply(op);
        let got = apply_real(&mut kv, op);
        if got != expected {
            return Err(format!(
                "op {step} {op:?}: mechanism gave {got:?}, model {expected:?}"
            ));
        }
        compare(&kv, &model).map_err(|e| format!("after op {step} {op:?}: {e}"))?;
    }
    Ok(())
}

#[test]
fn kv_mechanism_matches_the_reference_model() {
    let mut runner = TestRunner::new(env::proptest_config(512));
    if let Err(e) = runner.run(&script(), |s| {
        run_script(&s, s.block_size).map_err(TestCaseError::fail)
    }) {
        panic!("KV mechanism and reference model disagree (proptest seed {}; rerun with DJINN_PROPTEST_SEED): {e}", env::proptest_seed());
    }
}

/// The comparison bites: a model with one rule changed (it believes in blocks of twice the size)
/// disagrees with the mechanism on a short script, and so does a model that is not told of an
/// operation.
#[test]
fn a_wrong_model_is_caught() {
    let s = Script {
        block_size: 4,
        gpu_blocks: 4,
        host_blocks: 0,
        ops: vec![
            Op::Grow {
                agent: 0,
                extra_tokens: 8,
            },
            Op::Release { agent: 0 },
            Op::Grow {
                agent: 1,
                extra_tokens: 12,
            },
            Op::Reclaim { agent: 0 },
        ],
    };
    run_script(&s, 4).expect("the true model agrees");
    assert!(
        run_script(&s, 8).is_err(),
        "a model with the wrong block size must disagree"
    );
    // Reclaim after agent 1 reused agent 0's tail block: one cached block (4 tokens) survives.
    let mut kv = KvManager::new(4, 4, 0, AGENTS);
    for op in &s.ops[..3] {
        apply_real(&mut kv, op);
    }
    assert_eq!(kv.reclaim_cached(0), Ok(4));
}

/// Agents 0 and 1 share a prefix group (prefix of `prefix_tokens`), agent 2 has none; random
/// operations (compactions included) keep the shared-block invariants, recounted here from the
/// block tables alone after every operation: a block in two tables is a shared block whose
/// reference count is the number of tables pointing at it, a referenced block is never free,
/// and the blocks in use are the distinct blocks of all tables (each shared block once). The
/// mechanism's own audit runs too.
fn run_shared_script(
    s: &Script,
    prefix_tokens: u32,
    forgets: &[(usize, u32, u32)],
) -> Result<(), String> {
    let mut kv = KvManager::new(s.block_size, s.gpu_blocks, s.host_blocks, AGENTS);
    for agent in 0..2 {
        kv.set_shared_prefix(agent, 0, prefix_tokens)
            .map_err(|e| e.to_string())?;
    }
    for (step, op) in s.ops.iter().enumerate() {
        // Agents with an empty table reclaim (the group's blocks) instead of growing from scratch
        // when they can, as admission does.
        if let Op::Grow { agent, .. } = *op {
            if kv.prefix_hit_blocks(agent) > 0 {
                let _ = kv.reclaim_cached(agent);
            }
        }
        let _ = apply_real(&mut kv, op);
        for &(at, agent, keep) in forgets {
            if at == step {
                let keep = keep.min(kv.kv_tokens(agent));
                let _ = kv.forget_beyond(agent, keep);
            }
        }
        check_shared(&kv).map_err(|e| format!("after op {step} {op:?}: {e}"))?;
    }
    Ok(())
}

fn check_shared(kv: &KvManager) -> Result<(), String> {
    kv.audit().map_err(|e| format!("audit: {e}"))?;
    let mut tables: BTreeMap<u32, u32> = BTreeMap::new();
    for agent in 0..AGENTS {
        for s in kv.slots(agent) {
            let gpu = match *s {
                Slot::Gpu(b) | Slot::SwapOut { gpu: b, .. } | Slot::SwapIn { gpu: b, .. } => b,
                Slot::Host(_) => continue,
            };
            *tables.entry(gpu).or_default() += 1;
        }
        if kv.prefix_group(agent).is_none() && kv.shared_blocks(agent) > 0 {
            return Err(format!("agent {agent} without a group holds shared blocks"));
        }
    }
    for (&b, &n) in &tables {
        let refs = kv.shared_block_refs(b);
        if n > 1 && refs != n {
            return Err(format!("GPU block {b} in {n} tables but {refs} references"));
        }
        if refs > 0 && refs != n {
            return Err(format!(
                "shared GPU block {b}: {refs} references, {n} tables"
            ));
        }
    }
    if tables.len() as u32 != kv.gpu_blocks_used() {
        return Err(format!(
            "{} distinct GPU blocks in tables but {} in use",
            tables.len(),
            kv.gpu_blocks_used()
        ));
    }
    Ok(())
}

#[test]
fn shared_prefix_blocks_keep_their_invariants_under_random_operations() {
    let mut runner = TestRunner::new(env::proptest_config(256));
    let strategy = (
        script(),
        1..48u32,
        prop::collection::vec((0..80usize, 0..AGENTS, 0..60u32), 0..4),
    );
    if let Err(e) = runner.run(&strategy, |(s, prefix, forgets)| {
        run_shared_script(&s, prefix, &forgets).map_err(TestCaseError::fail)
    }) {
        panic!("shared-prefix invariants broken (proptest seed {}; rerun with DJINN_PROPTEST_SEED): {e}", env::proptest_seed());
    }
}

/// The recount bites: a mechanism whose audit and refcounts were right would still be caught
/// if a shared block's references disagreed with the tables (checked on a hand-made state).
#[test]
fn the_shared_recount_sees_sharing() {
    let mut kv = KvManager::new(4, 8, 4, AGENTS);
    kv.set_shared_prefix(0, 0, 8).unwrap();
    kv.set_shared_prefix(1, 0, 8).unwrap();
    kv.ensure_capacity(0, 9).unwrap();
    kv.advance(0, 9).unwrap();
    assert_eq!(kv.reclaim_cached(1).unwrap(), 8);
    check_shared(&kv).unwrap();
    assert_eq!(
        kv.gpu_blocks_used(),
        3,
        "two shared blocks counted once, one private"
    );
    let b = kv.slots(1)[0];
    assert_eq!(kv.slots(0)[0], b);
}
