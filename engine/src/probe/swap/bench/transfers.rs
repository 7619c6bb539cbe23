//! Swap transfer rates through the engine: one agent's context out and back (scattered blocks,
//! batched and per-run copies), and many agents in both directions at once.

use std::time::Instant;

use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::floors::Floors;
use super::{SwapBenchError, SwapBenchOptions, SwapBenchRow, GIB};
use crate::probe::swap::{min_of, percentile_50};
use crate::swap::cuda::{CopyMethod, CudaSwapEngine};
use crate::swap::{BlockPair, SwapDirection, SwapEngine, SwapRecord};

// ---- section 2: one agent ---------------------------------------------------------------------

/// `count` distinct ids from `[first, first + range)` in seeded random order.
pub(super) fn scattered(rng: &mut ChaCha8Rng, first: u32, range: u32, count: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = (first..first + range).collect();
    ids.shuffle(rng);
    ids.truncate(count);
    ids
}

pub(super) fn single_agent(
    engine: &mut CudaSwapEngine,
    rng: &mut ChaCha8Rng,
    blocks: usize,
    tokens: usize,
    reps: usize,
    floors: &Floors,
    records: &mut Vec<SwapRecord>,
) -> Result<Vec<SwapBenchRow>, SwapBenchError> {
    let gpu_blocks = engine.gpu_pool().block_count;
    let host_blocks = engine.host_pool().block_count();
    let half = gpu_blocks / 2;
    let method = engine.copy_method();
    let mut out_ms = Vec::new();
    let mut in_ms = Vec::new();
    let mut out_latency_ms = Vec::new();
    let mut in_latency_ms = Vec::new();
    let mut submit_us = Vec::new();
    for rep in 0..=reps {
        // Out from scattered blocks of the lower half, in to scattered blocks of the upper half.
        let gpu_out = scattered(rng, 0, half, blocks);
        let gpu_in = scattered(rng, half, gpu_blocks - half, blocks);
        let host = scattered(rng, 0, host_blocks, blocks);
        let out_pairs: Vec<BlockPair> = gpu_out
            .iter()
            .zip(&host)
            .map(|(&g, &h)| BlockPair {
                gpu_block: g,
                host_block: h,
            })
            .collect();
        let in_pairs: Vec<BlockPair> = gpu_in
            .iter()
            .zip(&host)
            .map(|(&g, &h)| BlockPair {
                gpu_block: g,
                host_block: h,
            })
            .collect();
        for (direction, pairs) in [
            (SwapDirection::Out, &out_pairs),
            (SwapDirection::In, &in_pairs),
        ] {
            let submitted = Instant::now();
            let id = engine.submit(rep as u32, direction, pairs)?;
            let submit_cost_us = submitted.elapsed().as_secs_f64() * 1e6;
            // Busy-poll like a run loop with nothing else to do: the latency the scheduler sees.
            let mut done = Vec::new();
            while done.is_empty() {
                done = engine.poll()?;
            }
            let latency_ms = submitted.elapsed().as_secs_f64() * 1e3;
            assert_eq!(done.len(), 1);
            assert_eq!(done[0].swap_id, id);
            let record = done.pop().expect("one record");
            if rep > 0 {
                let ms = (record.end_ns - record.start_ns) as f64 / 1e6;
                match direction {
                    SwapDirection::Out => {
                        out_ms.push(ms);
                        out_latency_ms.push(latency_ms);
                    }
                    SwapDirection::In => {
                        in_ms.push(ms);
                        in_latency_ms.push(latency_ms);
                    }
                }
                submit_us.push(submit_cost_us);
                records.push(record);
            }
        }
    }
    let bytes = (blocks * engine.gpu_pool().block_bytes) as u64;
    let method_name = match method {
        CopyMethod::Batched => "batched (1 cuMemcpyBatchAsync_v2)",
        CopyMethod::PerRun => "per-run cuMemcpyAsync loop",
    };
    let mut rows = Vec::new();
    for (direction, ms, latency) in [
        (SwapDirection::Out, &out_ms, &out_latency_ms),
        (SwapDirection::In, &in_ms, &in_latency_ms),
    ] {
        let p50 = percentile_50(ms);
        let gb = bytes as f64 / (p50 * 1e6);
        let floor = floors.for_direction(direction);
        rows.push(SwapBenchRow {
            section: "one agent".into(),
            name: format!("swap-{} {tokens} tokens ({blocks} scattered blocks), {method_name}", direction.as_str()),
            bytes,
            ms_p50: p50,
            ms_min: min_of(ms),
            reps: ms.len(),
            gb_per_s: gb,
            floor,
            floor_what: format!("measured contiguous 1 GiB pinned {} GB/s", if direction == SwapDirection::Out { "D2H" } else { "H2D" }),
            ratio: gb / floor,
            target: ">= 45 GB/s".into(),
            meets_target: Some(gb >= 45.0),
            note: format!(
                "copy time from CUDA events; submit->poll latency p50 {:.2} ms; submit CPU cost p50 {:.0} us",
                percentile_50(latency),
                percentile_50(&submit_us)
            ),
        });
    }
    Ok(rows)
}

// ---- section 3: many agents at once ----------------------------------------------------------------

/// Block pairs of agents swapping out (device blocks `[first, first + n)`, host blocks
/// `[0, n)`) and agents swapping in (host blocks `[n, 2n)` to device blocks `[first + n, first + 2n)`),
/// scattered within each range.
pub(super) struct SwapTraffic {
    pub(super) out_agents: Vec<Vec<BlockPair>>,
    pub(super) in_agents: Vec<Vec<BlockPair>>,
}

impl SwapTraffic {
    pub(super) fn new(
        rng: &mut ChaCha8Rng,
        agents: usize,
        blocks_per_agent: usize,
        first_gpu_block: u32,
        swap_blocks: u32,
    ) -> Self {
        let half = swap_blocks / 2;
        let gpu_out = scattered(rng, first_gpu_block, half, agents * blocks_per_agent);
        let gpu_in = scattered(rng, first_gpu_block + half, half, agents * blocks_per_agent);
        let host_out = scattered(rng, 0, half, agents * blocks_per_agent);
        let host_in = scattered(rng, half, half, agents * blocks_per_agent);
        let split = |gpu: &[u32], host: &[u32]| -> Vec<Vec<BlockPair>> {
            gpu.chunks(blocks_per_agent)
                .zip(host.chunks(blocks_per_agent))
                .map(|(g, h)| {
                    g.iter()
                        .zip(h)
                        .map(|(&gpu_block, &host_block)| BlockPair {
                            gpu_block,
                            host_block,
                        })
                        .collect()
                })
                .collect()
        };
        SwapTraffic {
            out_agents: split(&gpu_out, &host_out),
            in_agents: split(&gpu_in, &host_in),
        }
    }
}

pub(super) fn span_gb_per_s(records: &[SwapRecord]) -> (f64, f64, u64) {
    let start = records.iter().map(|r| r.start_ns).min().unwrap_or(0);
    let end = records.iter().map(|r| r.end_ns).max().unwrap_or(0);
    let bytes: u64 = records.iter().map(|r| r.bytes).sum();
    let ms = (end - start) as f64 / 1e6;
    (bytes as f64 / (ms * 1e6), ms, bytes)
}

pub(super) fn many_agents(
    engine: &mut CudaSwapEngine,
    rng: &mut ChaCha8Rng,
    options: &SwapBenchOptions,
    blocks_per_agent: usize,
    floors: &Floors,
    records: &mut Vec<SwapRecord>,
) -> Result<Vec<SwapBenchRow>, SwapBenchError> {
    let agents = options.agents_per_direction;
    let mut both_gb = Vec::new();
    let mut both_ms = Vec::new();
    let mut out_gb = Vec::new();
    let mut in_gb = Vec::new();
    let mut out_only_gb = Vec::new();
    let mut out_only_ms = Vec::new();
    let mut in_only_gb = Vec::new();
    let mut in_only_ms = Vec::new();
    let mut max_concurrency = 0u32;
    let mut bytes_both = 0;
    let mut bytes_one = 0;
    for rep in 0..=options.reps {
        let traffic = SwapTraffic::new(
            rng,
            agents,
            blocks_per_agent,
            0,
            engine.gpu_pool().block_count,
        );
        // Both directions at once, submissions interleaved as a plan would list them.
        for k in 0..agents {
            engine.submit(k as u32, SwapDirection::Out, &traffic.out_agents[k])?;
            engine.submit(
                (agents + k) as u32,
                SwapDirection::In,
                &traffic.in_agents[k],
            )?;
        }
        let done = engine.wait_all()?;
        let outs: Vec<SwapRecord> = done
            .iter()
            .filter(|r| r.direction == SwapDirection::Out)
            .cloned()
            .collect();
        let ins: Vec<SwapRecord> = done
            .iter()
            .filter(|r| r.direction == SwapDirection::In)
            .cloned()
            .collect();
        let (gb_all, ms_all, bytes) = span_gb_per_s(&done);
        // One direction at a time: N agents queued on one stream.
        for k in 0..agents {
            engine.submit(k as u32, SwapDirection::Out, &traffic.out_agents[k])?;
        }
        let out_only = engine.wait_all()?;
        for k in 0..agents {
            engine.submit(
                (agents + k) as u32,
                SwapDirection::In,
                &traffic.in_agents[k],
            )?;
        }
        let in_only = engine.wait_all()?;
        if rep > 0 {
            both_gb.push(gb_all);
            both_ms.push(ms_all);
            bytes_both = bytes;
            out_gb.push(span_gb_per_s(&outs).0);
            in_gb.push(span_gb_per_s(&ins).0);
            let (g, m, b) = span_gb_per_s(&out_only);
            out_only_gb.push(g);
            out_only_ms.push(m);
            bytes_one = b;
            let (g, m, _) = span_gb_per_s(&in_only);
            in_only_gb.push(g);
            in_only_ms.push(m);
            max_concurrency = max_concurrency.max(
                done.iter()
                    .map(|r| r.concurrent_swaps_at_start)
                    .max()
                    .unwrap_or(0),
            );
            records.extend(done);
            records.extend(out_only);
            records.extend(in_only);
        }
    }
    let gib_each = (blocks_per_agent * engine.gpu_pool().block_bytes) as f64 / GIB as f64;
    let both_p50 = percentile_50(&both_gb);
    let mut rows = vec![SwapBenchRow {
        section: "many agents".into(),
        name: format!("{agents} agents out + {agents} agents in at once ({gib_each:.2} GiB each), aggregate"),
        bytes: bytes_both,
        ms_p50: percentile_50(&both_ms),
        ms_min: min_of(&both_ms),
        reps: both_ms.len(),
        gb_per_s: both_p50,
        floor: floors.both_gb_per_s,
        floor_what: "measured 1 GiB D2H + 1 GiB H2D at once, aggregate GB/s".into(),
        ratio: both_p50 / floors.both_gb_per_s,
        target: ">= 80 GB/s aggregate".into(),
        meets_target: Some(both_p50 >= 80.0),
        note: format!(
            "per direction while both busy: out {:.1} GB/s, in {:.1} GB/s; max concurrent_swaps_at_start {}",
            percentile_50(&out_gb),
            percentile_50(&in_gb),
            max_concurrency
        ),
    }];
    for (direction, gb, ms) in [
        (SwapDirection::Out, &out_only_gb, &out_only_ms),
        (SwapDirection::In, &in_only_gb, &in_only_ms),
    ] {
        let p50 = percentile_50(gb);
        let floor = floors.for_direction(direction);
        rows.push(SwapBenchRow {
            section: "many agents".into(),
            name: format!(
                "{agents} agents swap-{} queued on one stream ({gib_each:.2} GiB each)",
                direction.as_str()
            ),
            bytes: bytes_one,
            ms_p50: percentile_50(ms),
            ms_min: min_of(ms),
            reps: ms.len(),
            gb_per_s: p50,
            floor,
            floor_what: "measured contiguous 1 GiB pinned, same direction".into(),
            ratio: p50 / floor,
            target: ">= 45 GB/s".into(),
            meets_target: Some(p50 >= 45.0),
            note: String::new(),
        });
    }
    Ok(rows)
}
