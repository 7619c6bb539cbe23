//! The shared-prefix scenario both backends run (CPU in `cpu_shared_prefix`, CUDA in
//! `cuda_forward`): agents of one prefix group whose tables point at the same physical blocks
//! (as `sim`'s KV mechanism decides) against the same agents each prefilling its own copy,
//! demanding bit-identical logits at every step, through a prefix hit, a swap of one agent (only
//! its private blocks move, through the backend's swap engine), a drop and recompute, and the end
//! of the agent that computed the prefix (its shared blocks stay while another table references
//! them).
//!
//! Every freed GPU block is poisoned (NaN on the CPU, which reads only a sequence's own slots; a
//! large finite value on the GPU, whose kernels read whole blocks and weigh the slots past the
//! end by zero), so a block freed while still referenced, or a KV read from anywhere but the
//! shared copy, shows up in the logits.
//!
//! The prefix is prefilled as a chunk of its own, by the agent that publishes it and by each
//! unshared agent alike: a GEMM's last bits may depend on how many rows a chunk has (on the CPU
//! a 17-row and an 18-row prefill of the same prefix differ by 8e-7 in the logits), which is a
//! property of chunking, not of sharing. With equal chunks, bit-identity is what sharing must give.
#![allow(dead_code)]

use std::collections::BTreeSet;

use engine::batch::{PagedModel, SeqStep};
use engine::swap::backend::SwapExecutor;
use engine::swap::{BlockPair, SwapDirection};
use sim::kv::{KvManager, Slot};

pub const BLOCK: u32 = 4;
const PREFIX: u32 = 12;
pub const GPU_BLOCKS: u32 = 24;
pub const HOST_BLOCKS: u32 = 16;
const AGENTS: u32 = 3;

/// Agent `a`'s sequence: the group's 12-token prefix, then its own tokens.
fn sequence(agent: u32) -> Vec<u32> {
    let prefix = (0..PREFIX).map(|i| (i * 37 + 11) % 256);
    let own = (PREFIX..40).map(|i| (i * 53 + agent * 29 + 7) % 256);
    prefix.chain(own).collect()
}

/// What a backend gives the scenario: its model, the swap engine over the model's pool, and a
/// way to fill a GPU block with NaN.
pub struct Engine<M: PagedModel, S: SwapExecutor<Model = M>> {
    pub model: M,
    pub swap: S,
    pub poison: fn(&mut M, u32),
}

/// One KV mechanism and engine: the shared world (the agents are in a prefix group) or the
/// unshared one (each agent computes its own copy of the prefix).
struct World<M: PagedModel, S: SwapExecutor<Model = M>> {
    kv: KvManager,
    engine: Engine<M, S>,
    done: [u32; AGENTS as usize],
    sequences: Vec<Vec<u32>>,
    prefilled: u32,
}

impl<M: PagedModel, S: SwapExecutor<Model = M>> World<M, S> {
    fn new(shared: bool, engine: Engine<M, S>) -> Self {
        let mut kv = KvManager::new(BLOCK, GPU_BLOCKS, HOST_BLOCKS, AGENTS);
        if shared {
            for agent in 0..AGENTS {
                kv.set_shared_prefix(agent, 0, PREFIX).unwrap();
            }
        }
        let mut world = World {
            kv,
            engine,
            done: [0; AGENTS as usize],
            sequences: (0..AGENTS).map(sequence).collect(),
            prefilled: 0,
        };
        world.poison_free_blocks();
        world
    }

    /// Admits an agent with an empty table: a prefix hit where the group holds blocks.
    fn admit(&mut self, agent: u32) -> u32 {
        let hit = self.kv.reclaim_cached(agent).unwrap();
        self.done[agent as usize] = hit;
        hit
    }

    /// One batched step: each agent runs up to `until` tokens of its sequence. Returns each
    /// agent's last-token logits.
    fn step(&mut self, work: &[(u32, u32)]) -> Vec<Vec<f32>> {
        let tables: Vec<Vec<u32>> = work
            .iter()
            .map(|&(a, until)| {
                self.kv.ensure_capacity(a, until).unwrap();
                self.kv.gpu_block_table(a).collect()
            })
            .collect();
        let batch: Vec<SeqStep> = work
            .iter()
            .zip(&tables)
            .map(|(&(a, until), table)| SeqStep {
                block_table: table,
                context_len: self.done[a as usize] as usize,
                tokens: &self.sequences[a as usize][self.done[a as usize] as usize..until as usize],
            })
            .collect();
        let logits = self
            .engine
            .model
            .forward(&batch)
            .unwrap_or_else(|e| panic!("forward: {e}"));
        let rows = (0..work.len()).map(|r| logits.row(r).to_vec()).collect();
        for &(a, until) in work {
            let new = until - self.done[a as usize];
            self.prefilled += new;
            self.kv.advance(a, new).unwrap();
            self.done[a as usize] = until;
        }
        self.kv.audit().unwrap();
        rows
    }

    /// Copies a swap job's blocks with the backend's swap engine and waits for them.
    fn copy(&mut self, id: sim::ids::SwapId, direction: SwapDirection) -> usize {
        let job = self.kv.swap_job(id).unwrap().clone();
        let pairs = BlockPair::from_job(&job.pairs);
        let engine = &mut self.engine;
        engine
            .swap
            .submit_for(&mut engine.model, job.agent, direction, &pairs)
            .unwrap_or_else(|e| panic!("swap: {e}"));
        let records = engine.swap.wait_all().unwrap();
        assert_eq!(records.len(), 1);
        self.kv.complete_swap(id).unwrap();
        pairs.len()
    }

    /// Swaps an agent out (all it may move) and poisons the GPU blocks it gave up.
    fn swap_out(&mut self, agent: u32) -> usize {
        let id = self.kv.start_swap_out(agent, u32::MAX).unwrap();
        let moved = self.copy(id, SwapDirection::Out);
        self.poison_free_blocks();
        moved
    }

    fn swap_in(&mut self, agent: u32) -> usize {
        let id = self.kv.start_swap_in(agent).unwrap();
        self.copy(id, SwapDirection::In)
    }

    /// Fills every GPU block no table points at with NaN.
    fn poison_free_blocks(&mut self) {
        let held: BTreeSet<u32> = (0..AGENTS)
            .flat_map(|a| self.kv.slots(a).to_vec())
            .filter_map(|slot| match slot {
                Slot::Gpu(b) => Some(b),
                _ => None,
            })
            .collect();
        for block in (0..GPU_BLOCKS).filter(|b| !held.contains(b)) {
            (self.engine.poison)(&mut self.engine.model, block);
        }
    }
}

/// Runs the same schedule on both worlds and demands bit-identical logits at every step.
struct Twins<M: PagedModel, S: SwapExecutor<Model = M>> {
    shared: World<M, S>,
    unshared: World<M, S>,
}

impl<M: PagedModel, S: SwapExecutor<Model = M>> Twins<M, S> {
    fn step(&mut self, work: &[(u32, u32)], what: &str) {
        let a = self.shared.step(work);
        let b = self.unshared.step(work);
        for (row, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(x.iter().all(|v| v.is_finite()), "{what}: non-finite logits");
            let same = x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(
                same,
                "{what}: agent {} logits differ shared vs unshared",
                work[row].0
            );
        }
    }

    fn decode(&mut self, agents: &[u32], what: &str) {
        let work: Vec<(u32, u32)> = agents
            .iter()
            .map(|&a| (a, self.shared.done[a as usize] + 1))
            .collect();
        self.step(&work, what);
    }
}

/// Runs the scenario on two engines of one backend (each with a pool of `GPU_BLOCKS` blocks of
/// `BLOCK` tokens and a host pool of `HOST_BLOCKS`); panics at the first difference.
pub fn run_scenario<M: PagedModel, S: SwapExecutor<Model = M>>(
    shared: Engine<M, S>,
    unshared: Engine<M, S>,
) {
    let mut t = Twins {
        shared: World::new(true, shared),
        unshared: World::new(false, unshared),
    };
    // Agent 0 computes the prefix (and publishes its 3 full blocks in the shared world).
    t.step(&[(0, PREFIX)], "agent 0 prefix");
    t.step(&[(0, 17)], "agent 0 first prompt");
    let group_blocks: Vec<u32> = (0..3)
        .map(|i| t.shared.kv.group_prefix_block(0, i).unwrap())
        .collect();

    // Agent 1 hits the prefix: its prefill starts after the shared part.
    assert_eq!(
        t.shared.admit(1),
        PREFIX,
        "a hit covers the prefix's full blocks"
    );
    assert_eq!(t.unshared.admit(1), 0);
    t.unshared.step(&[(1, PREFIX)]);
    t.step(&[(1, 18)], "agent 1 first prompt");
    let table: Vec<u32> = t.shared.kv.gpu_block_table(1).collect();
    assert_eq!(
        &table[..3],
        &group_blocks[..],
        "agent 1 reads agent 0's blocks"
    );
    for _ in 0..3 {
        t.decode(&[0, 1], "decode 0+1");
    }

    // Swap agent 1 out: only its private blocks move; the shared ones stay for the group.
    let moved = t.shared.swap_out(1);
    let moved_unshared = t.unshared.swap_out(1);
    assert_eq!(moved, 3, "21 tokens: 6 blocks, 3 of them shared");
    assert_eq!(moved_unshared, 6);
    for &b in &group_blocks {
        assert_eq!(
            t.shared.kv.shared_block_refs(b),
            2,
            "agent 1 still references {b}"
        );
    }
    t.decode(&[0], "agent 0 while 1 is out");
    t.decode(&[0], "agent 0 while 1 is out");
    assert_eq!(
        t.shared.swap_in(1),
        3,
        "the return restores only the private part"
    );
    assert_eq!(t.unshared.swap_in(1), 6);
    t.decode(&[0, 1], "decode after agent 1's swap-in");

    // Drop agent 1 back to 14 tokens (the shared blocks stay) and recompute from the same tokens.
    let keep = 14;
    for w in [&mut t.shared, &mut t.unshared] {
        let dropped = w.kv.drop_tail(1, keep).unwrap();
        assert!(dropped > 0);
        w.done[1] = w.kv.kv_tokens(1);
        w.poison_free_blocks();
    }
    assert_eq!(t.shared.kv.shared_blocks(1), 3);
    let back_to = t.shared.done[1] + 10;
    t.step(&[(1, back_to)], "agent 1 recompute after a drop");

    // Agent 0's program ends: its table lets go, but agent 1 still references the prefix, so
    // the shared blocks are not freed (the freed ones are poisoned).
    for w in [&mut t.shared, &mut t.unshared] {
        w.kv.free_all(0).unwrap();
        w.poison_free_blocks();
    }
    for &b in &group_blocks {
        assert_eq!(t.shared.kv.shared_block_refs(b), 1, "agent 1 holds {b}");
    }
    t.decode(&[1], "agent 1 after agent 0 ended");

    // A third agent hits the prefix agent 1 keeps alive.
    assert_eq!(t.shared.admit(2), PREFIX);
    t.unshared.admit(2);
    t.unshared.step(&[(2, PREFIX)]);
    t.step(&[(2, 20)], "agent 2 first prompt");
    t.decode(&[1, 2], "decode 1+2");

    // The last references gone, the blocks go back to the free queue (cached for the group).
    for w in [&mut t.shared, &mut t.unshared] {
        w.kv.free_all(1).unwrap();
        w.kv.free_all(2).unwrap();
        w.kv.audit().unwrap();
        assert_eq!(w.kv.gpu_blocks_used(), 0);
    }
    for &b in &group_blocks {
        assert_eq!(t.shared.kv.shared_block_refs(b), 0);
    }
    // The shared world computed the prefix once: twice 12 tokens fewer.
    assert_eq!(t.unshared.prefilled - t.shared.prefilled, 2 * PREFIX);
}
