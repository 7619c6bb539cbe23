//! Shared prefix blocks on the CPU engine: agents of one prefix group whose tables point at the
//! same physical blocks (as `sim`'s KV mechanism decides) produce bit-identical logits to the same
//! agents each prefilling its own copy, through a prefix hit, a swap of one agent (only its
//! private blocks move), a drop and recompute, and the end of the agent that computed the prefix
//! (its shared blocks stay while another table references them).
//!
//! Every freed GPU block is poisoned with NaN, so a block freed while still referenced, or a KV
//! read from anywhere but the shared copy, shows up in the logits.
//!
//! The prefix is prefilled as a chunk of its own, by the agent that publishes it and by each
//! unshared agent alike: the CPU GEMM's last bits depend on how many rows a chunk has (a 17-row
//! and an 18-row prefill of the same prefix differ by 8e-7 in the logits), which is a property of
//! chunking, not of sharing. With equal chunks, bit-identity is what sharing must give.

mod cpu_common;

use std::collections::BTreeSet;

use cpu_common::*;
use engine::batch::SeqStep;
use engine::cpu::CpuModel;
use sim::kv::{KvManager, Slot};

const BLOCK: u32 = 4;
const PREFIX: u32 = 12;
const GPU_BLOCKS: u32 = 24;
const HOST_BLOCKS: u32 = 16;
const AGENTS: u32 = 3;

/// Agent `a`'s sequence: the group's 12-token prefix, then its own tokens.
fn sequence(agent: u32) -> Vec<u32> {
    let prefix = (0..PREFIX).map(|i| (i * 37 + 11) % 256);
    let own = (PREFIX..40).map(|i| (i * 53 + agent * 29 + 7) % 256);
    prefix.chain(own).collect()
}

/// One KV mechanism and CPU model: the shared world (the agents are in a prefix group) or the
/// unshared one (each agent computes its own copy of the prefix).
struct World {
    kv: KvManager,
    model: CpuModel,
    host: Vec<f32>,
    done: [u32; AGENTS as usize],
    sequences: Vec<Vec<u32>>,
    prefilled: u32,
}

impl World {
    fn new(shared: bool) -> Self {
        let weights = load_tiny("tiny-gqa");
        let mut kv = KvManager::new(BLOCK, GPU_BLOCKS, HOST_BLOCKS, AGENTS);
        if shared {
            for agent in 0..AGENTS {
                kv.set_shared_prefix(agent, 0, PREFIX).unwrap();
            }
        }
        let model = CpuModel::new(&weights, GPU_BLOCKS as usize, BLOCK as usize).unwrap();
        let host = vec![f32::NAN; HOST_BLOCKS as usize * model.layout().block_elems()];
        World {
            kv,
            model,
            host,
            done: [0; AGENTS as usize],
            sequences: (0..AGENTS).map(sequence).collect(),
            prefilled: 0,
        }
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
        let logits = self.model.forward(&batch).unwrap();
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

    /// Swaps an agent out (all it may move) and poisons the GPU blocks it gave up.
    fn swap_out(&mut self, agent: u32) -> usize {
        let id = self.kv.start_swap_out(agent, u32::MAX).unwrap();
        let job = self.kv.swap_job(id).unwrap().clone();
        let elems = self.model.layout().block_elems();
        for &(gpu, host) in &job.pairs {
            let host = host as usize * elems;
            self.host[host..host + elems].copy_from_slice(self.model.blocks(gpu, 1).unwrap());
        }
        self.kv.complete_swap(id).unwrap();
        self.poison_free_blocks();
        job.pairs.len()
    }

    fn swap_in(&mut self, agent: u32) -> usize {
        let id = self.kv.start_swap_in(agent).unwrap();
        let job = self.kv.swap_job(id).unwrap().clone();
        let elems = self.model.layout().block_elems();
        for &(gpu, host) in &job.pairs {
            let host = host as usize * elems;
            self.model
                .write_blocks(gpu, &self.host[host..host + elems])
                .unwrap();
        }
        self.kv.complete_swap(id).unwrap();
        job.pairs.len()
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
            self.model.blocks_mut(block, 1).unwrap().fill(f32::NAN);
        }
    }
}

/// Runs the same schedule on both worlds and demands bit-identical logits at every step.
struct Twins {
    shared: World,
    unshared: World,
}

impl Twins {
    fn step(&mut self, work: &[(u32, u32)], what: &str) {
        let a = self.shared.step(work);
        let b = self.unshared.step(work);
        for (row, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(x.iter().all(|v| v.is_finite()), "{what}: NaN logits");
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

#[test]
fn shared_prefix_blocks_give_the_logits_of_unshared_execution() {
    let mut t = Twins {
        shared: World::new(true),
        unshared: World::new(false),
    };
    // Agent 0 computes the prefix (and publishes its 3 full blocks in the shared world).
    t.step(&[(0, PREFIX)], "agent 0 prefix");
    t.step(&[(0, 17)], "agent 0 first prompt");
    let group_blocks: Vec<u32> = (0..3)
        .map(|i| t.shared.kv.group_prefix_block(0, i).unwrap())
        .collect();

    // Agent 1 hits the prefix: its prefill starts after the shared part.
    assert_eq!(t.shared.admit(1), PREFIX, "a hit covers the prefix's full blocks");
    assert_eq!(t.unshared.admit(1), 0);
    t.unshared.step(&[(1, PREFIX)]);
    t.step(&[(1, 18)], "agent 1 first prompt");
    let table: Vec<u32> = t.shared.kv.gpu_block_table(1).collect();
    assert_eq!(&table[..3], &group_blocks[..], "agent 1 reads agent 0's blocks");
    for _ in 0..3 {
        t.decode(&[0, 1], "decode 0+1");
    }

    // Swap agent 1 out: only its private blocks move; the shared ones stay for the group.
    let moved = t.shared.swap_out(1);
    let moved_unshared = t.unshared.swap_out(1);
    assert_eq!(moved, 3, "21 tokens: 6 blocks, 3 of them shared");
    assert_eq!(moved_unshared, 6);
    for &b in &group_blocks {
        assert_eq!(t.shared.kv.shared_block_refs(b), 2, "agent 1 still references {b}");
    }
    t.decode(&[0], "agent 0 while 1 is out");
    t.decode(&[0], "agent 0 while 1 is out");
    assert_eq!(t.shared.swap_in(1), 3, "the return restores only the private part");
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
