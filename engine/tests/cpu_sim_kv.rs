//! The CPU forward executing block tables from `sim`'s shared KV mechanism: agents grow their GPU
//! tables with `KvManager::ensure_capacity`, are swapped out and back in through `SwapJob` block
//! pairs (copied whole with `CpuModel::blocks` / `write_blocks`), and still produce the logits of
//! one plain prefill of their whole sequence.

mod cpu_common;

use cpu_common::*;
use engine::batch::SeqStep;
use engine::cpu::CpuModel;
use engine::weights::WeightSet;
use sim::kv::{KvManager, KvState};

fn sequence(agent: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 53 + agent * 29 + 7) % 256)
        .collect()
}

fn reference_row(weights: &WeightSet, tokens: &[u32]) -> Vec<f32> {
    let blocks = tokens.len().div_ceil(16);
    let mut model = CpuModel::new(weights, blocks, 16).unwrap();
    let table: Vec<u32> = (0..blocks as u32).collect();
    let logits = model
        .forward(&[SeqStep {
            block_table: &table,
            context_len: 0,
            tokens,
        }])
        .unwrap();
    logits.row(0).to_vec()
}

#[test]
fn agents_on_sim_block_tables_survive_swap_out_and_in() {
    let weights = load_tiny("tiny-gqa");
    let block_size = 4u32;
    let gpu_blocks = 14u32;
    let agent_count = 3u32;
    let mut kv = KvManager::new(block_size, gpu_blocks, 16, agent_count);
    let mut model = CpuModel::new(&weights, gpu_blocks as usize, block_size as usize).unwrap();
    let block_elems = model.layout().block_elems();
    let mut host_pool = vec![0.0f32; 16 * block_elems];

    let prompt_lens = [6usize, 11, 3];
    let total_lens = [14usize, 19, 12];
    let sequences: Vec<Vec<u32>> = (0..agent_count)
        .map(|a| sequence(a, total_lens[a as usize]))
        .collect();
    let mut done = [0usize; 3];

    // One batched step over the given agents: each runs `new_tokens[a]` tokens.
    let step = |kv: &mut KvManager,
                model: &mut CpuModel,
                agents: &[u32],
                new_tokens: &[usize],
                done: &mut [usize; 3]| {
        let tables: Vec<Vec<u32>> = agents
            .iter()
            .zip(new_tokens)
            .map(|(&a, &n)| {
                kv.ensure_capacity(a, (done[a as usize] + n) as u32)
                    .unwrap();
                kv.gpu_block_table(a).collect()
            })
            .collect();
        let batch: Vec<SeqStep> = agents
            .iter()
            .zip(new_tokens)
            .zip(&tables)
            .map(|((&a, &n), table)| SeqStep {
                block_table: table,
                context_len: done[a as usize],
                tokens: &sequences[a as usize][done[a as usize]..done[a as usize] + n],
            })
            .collect();
        let logits = model.forward(&batch).unwrap();
        for (row, (&a, &n)) in agents.iter().zip(new_tokens).enumerate() {
            kv.advance(a, n as u32).unwrap();
            done[a as usize] += n;
            let reference = reference_row(&weights, &sequences[a as usize][..done[a as usize]]);
            assert_rows_close(
                logits.row(row),
                &reference,
                CONSISTENCY_ABS_TOLERANCE,
                &format!("agent {a} at {} tokens", done[a as usize]),
            );
        }
    };

    // Prefill all three in one step, then decode twice.
    step(&mut kv, &mut model, &[0, 1, 2], &prompt_lens, &mut done);
    for _ in 0..2 {
        step(&mut kv, &mut model, &[0, 1, 2], &[1, 1, 1], &mut done);
    }

    // Swap agent 1 out whole: copy each (GPU, host) pair, then complete.
    let job_id = kv.start_swap_out(1, u32::MAX).unwrap();
    let job = kv.swap_job(job_id).unwrap().clone();
    for &(gpu, host) in &job.pairs {
        let host = host as usize * block_elems;
        host_pool[host..host + block_elems].copy_from_slice(model.blocks(gpu, 1).unwrap());
    }
    kv.complete_swap(job.id).unwrap();
    assert_eq!(kv.state(1), KvState::Host);
    // The freed GPU blocks are free for anyone: poison them, so only the host copy can bring
    // agent 1's context back.
    for &(gpu, _) in &job.pairs {
        model.blocks_mut(gpu, 1).unwrap().fill(f32::NAN);
    }

    // The others keep decoding meanwhile.
    for _ in 0..5 {
        step(&mut kv, &mut model, &[0, 2], &[1, 1], &mut done);
    }

    // Swap agent 1 back in (to whatever GPU blocks are free now) and continue all three.
    let job_id = kv.start_swap_in(1).unwrap();
    let job = kv.swap_job(job_id).unwrap().clone();
    for &(gpu, host) in &job.pairs {
        let host = host as usize * block_elems;
        model
            .write_blocks(gpu, &host_pool[host..host + block_elems])
            .unwrap();
    }
    kv.complete_swap(job.id).unwrap();
    assert_eq!(kv.state(1), KvState::Gpu);
    let remaining = total_lens[1] - done[1];
    step(&mut kv, &mut model, &[1], &[remaining - 2], &mut done);
    step(&mut kv, &mut model, &[0, 1, 2], &[1, 1, 1], &mut done);
    assert_eq!(done, [14, 18, 11]);
}
