//! Copy checks on a small device pool of the check's own: bit-exact round trips (batched,
//! per-run and gather-kernel copies, both directions at once), paced swaps at their cap, and
//! the busy-block rules.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{result, CudaContext};

use super::{
    check_pools, driver, outcome, pairs, pool_bytes, CheckOutcome, CheckPools, SwapCheckError,
};
use crate::cuda::{DeviceBuffer, GpuDevice};
use crate::swap::cuda::{CopyMethod, CudaSwapEngine, GpuKvPoolRef, PinnedHostPool, SwapInPath};
use crate::swap::{SwapDirection, SwapEngine, SwapError};

/// Round trips through the swap engine on [`check_pools`].
pub(super) fn round_trip(
    device: &GpuDevice,
    method: CopyMethod,
    swap_in: SwapInPath,
) -> Result<Vec<CheckOutcome>, SwapCheckError> {
    let ctx = &device.ctx;
    let CheckPools {
        _buffer,
        pool,
        original,
        host,
    } = check_pools(ctx, 7)?;
    let (block_bytes, gpu_blocks) = (pool.block_bytes, pool.block_count);
    let mut engine = CudaSwapEngine::new(ctx, pool, host, None, method, 16, Instant::now())?;
    engine.set_swap_in_path(device, swap_in)?;
    let block = |data: &[u8], b: u32| {
        data[b as usize * block_bytes..(b as usize + 1) * block_bytes].to_vec()
    };

    // Agent A: scattered device blocks plus a run contiguous on both sides; agent B: scattered.
    let a_gpu = [9u32, 2, 33, 20, 21, 22, 23, 5];
    let a_host = [40u32, 0, 17, 3, 4, 5, 6, 30];
    let b_gpu = [60u32, 1, 44];
    let b_host = [11u32, 12, 47];
    let a_out = pairs(&a_gpu, &a_host);
    let b_out = pairs(&b_gpu, &b_host);
    engine.submit(1, SwapDirection::Out, &a_out)?;
    engine.submit(2, SwapDirection::Out, &b_out)?;
    let records = engine.wait_all()?;
    let mut host_matches = true;
    for pair in a_out.iter().chain(&b_out) {
        let host_block = unsafe { engine.host_pool().block(pair.host_block) }.to_vec();
        host_matches &= host_block == block(&original, pair.gpu_block);
    }

    // Wipe A's and B's device blocks, then bring A back into other blocks while C (blocks 50..53,
    // untouched so far) goes out at the same time: both directions in flight together.
    for &b in a_gpu.iter().chain(&b_gpu) {
        unsafe { result::memset_d8_sync(pool.block_ptr(b), 0xAB, block_bytes) }
            .map_err(driver("wiping blocks"))?;
    }
    // The wipes run on the legacy stream: finished before the swap-ins may write these blocks.
    crate::cuda::finish_legacy_stream().map_err(driver("wiping blocks"))?;
    let a_back_gpu = [40u32, 41, 42, 43, 12, 13, 59, 0];
    let a_in = pairs(&a_back_gpu, &a_host);
    let c_out = pairs(&[50, 51, 52, 53], &[20, 21, 22, 23]);
    engine.submit(1, SwapDirection::In, &a_in)?;
    engine.submit(3, SwapDirection::Out, &c_out)?;
    let more = engine.wait_all()?;
    let after = pool_bytes(ctx, pool)?;
    let mut back_matches = true;
    for (&from, &to) in a_gpu.iter().zip(&a_back_gpu) {
        back_matches &= block(&after, to) == block(&original, from);
    }
    let mut c_matches = true;
    for pair in &c_out {
        c_matches &= unsafe { engine.host_pool().block(pair.host_block) }
            == block(&original, pair.gpu_block).as_slice();
    }
    // Every block neither wiped nor written by the swap-in keeps its bytes.
    let touched: Vec<u32> = a_gpu
        .iter()
        .chain(&b_gpu)
        .chain(&a_back_gpu)
        .copied()
        .collect();
    let untouched_same = (0..gpu_blocks)
        .filter(|b| !touched.contains(b))
        .all(|b| block(&after, b) == block(&original, b));

    let all_records: Vec<_> = records.iter().chain(&more).collect();
    let records_ok = all_records.len() == 4
        && all_records.iter().all(|r| {
            r.end_ns >= r.start_ns && r.bytes == r.block_count as u64 * block_bytes as u64
        })
        && all_records.iter().map(|r| r.block_count).sum::<u32>() == 8 + 3 + 8 + 4;
    let name = match swap_in {
        SwapInPath::Dma => format!("{method:?}"),
        SwapInPath::Kernel { ctas } => format!("{method:?} out, gather kernel in ({ctas} CTAs)"),
    };
    Ok(vec![
        outcome(
            &format!("swap-out copies device blocks to the named host blocks bit-exactly ({name})"),
            host_matches,
            format!("{} blocks", a_out.len() + b_out.len()),
        ),
        outcome(
            &format!("swap-out then swap-in into different device blocks is bit-exact ({name})"),
            back_matches,
            format!("{} blocks of {block_bytes} bytes", a_in.len()),
        ),
        outcome(
            &format!("a swap-out running beside a swap-in is bit-exact ({name})"),
            c_matches,
            "4 blocks".into(),
        ),
        outcome(
            &format!("blocks no swap names are unchanged ({name})"),
            untouched_same,
            format!("{} blocks", gpu_blocks as usize - touched.len()),
        ),
        outcome(
            &format!("swap records are consistent ({name})"),
            records_ok,
            format!("{:?}", all_records),
        ),
    ])
}

/// A rate cap of 2 GB/s per direction: two 16-block swap-outs queued back to back on one stream
/// move at the cap (not faster: the pace gates hold every piece back; not much slower: the gates
/// carry the release time over from one swap to the next), and a paced round trip is bit-exact.
pub(super) fn paced_swaps(device: &GpuDevice) -> Result<Vec<CheckOutcome>, SwapCheckError> {
    const CAP_GB_PER_S: f64 = 2.0;
    let ctx = &device.ctx;
    let CheckPools {
        _buffer,
        pool,
        original,
        host,
    } = check_pools(ctx, 11)?;
    let block_bytes = pool.block_bytes;
    let mut engine = CudaSwapEngine::new(
        ctx,
        pool,
        host,
        None,
        CopyMethod::Batched,
        16,
        Instant::now(),
    )?;
    engine.set_rate_cap(device, Some(CAP_GB_PER_S))?;
    // One block per pace gate, so the gates (not one burst per swap) set the rate.
    engine.set_pace_piece_bytes(block_bytes)?;
    // Device blocks ascending, host blocks descending: no two blocks coalesce, 16 pieces a swap.
    let a_gpu: Vec<u32> = (0..16).collect();
    let a_host: Vec<u32> = (0..16).rev().collect();
    let b_gpu: Vec<u32> = (16..32).collect();
    let b_host: Vec<u32> = (16..32).rev().collect();
    engine.submit(1, SwapDirection::Out, &pairs(&a_gpu, &a_host))?;
    engine.submit(2, SwapDirection::Out, &pairs(&b_gpu, &b_host))?;
    let outs = engine.wait_all()?;
    let first_start = outs.iter().map(|r| r.start_ns).min().unwrap_or(0);
    let last_end = outs.iter().map(|r| r.end_ns).max().unwrap_or(0);
    let out_bytes: u64 = outs.iter().map(|r| r.bytes).sum();
    let out_gb_per_s = out_bytes as f64 / (last_end.saturating_sub(first_start)).max(1) as f64;
    // 32 pieces, the first released at once: at most 32/31 of the cap, plus timer slack.
    let rate_ok = outs.len() == 2
        && out_gb_per_s <= CAP_GB_PER_S * 1.05
        && out_gb_per_s >= CAP_GB_PER_S * 0.8;

    let a_back_gpu: Vec<u32> = (40..56).rev().collect();
    engine.submit(1, SwapDirection::In, &pairs(&a_back_gpu, &a_host))?;
    let ins = engine.wait_all()?;
    let in_gb_per_s = ins
        .iter()
        .map(|r| r.bytes as f64 / (r.end_ns.saturating_sub(r.start_ns)).max(1) as f64)
        .fold(0.0, f64::max);
    let after = pool_bytes(ctx, pool)?;
    let block = |data: &[u8], b: u32| {
        data[b as usize * block_bytes..(b as usize + 1) * block_bytes].to_vec()
    };
    let back_matches = a_gpu
        .iter()
        .zip(&a_back_gpu)
        .all(|(&from, &to)| block(&after, to) == block(&original, from));
    // One swap of 16 pieces: at most 16/15 of the cap.
    let in_rate_ok = ins.len() == 1 && in_gb_per_s <= CAP_GB_PER_S * 16.0 / 15.0 * 1.05;

    // Swap-in capped, swap-out not: both submitted together, the swap-out must run at link speed
    // (far above the cap) while the swap-in keeps to the cap; both bit-exact.
    engine.set_rate_cap(device, None)?;
    engine.set_direction_rate_cap(device, SwapDirection::In, Some(CAP_GB_PER_S))?;
    engine.set_pace_piece_bytes(block_bytes)?;
    let capped_in_only = engine.rate_cap_gb_per_s(SwapDirection::In) == Some(CAP_GB_PER_S)
        && engine.rate_cap_gb_per_s(SwapDirection::Out).is_none();
    let c_out_gpu: Vec<u32> = (0..8).collect();
    let c_out_host: Vec<u32> = (32..40).collect();
    let c_in_gpu: Vec<u32> = (56..64).collect();
    engine.submit(3, SwapDirection::Out, &pairs(&c_out_gpu, &c_out_host))?;
    engine.submit(4, SwapDirection::In, &pairs(&c_in_gpu, &b_host[..8]))?;
    let mixed = engine.wait_all()?;
    let rate_of = |direction: SwapDirection| {
        mixed
            .iter()
            .filter(|r| r.direction == direction)
            .map(|r| r.bytes as f64 / (r.end_ns.saturating_sub(r.start_ns)).max(1) as f64)
            .fold(0.0, f64::max)
    };
    let (mixed_out, mixed_in) = (rate_of(SwapDirection::Out), rate_of(SwapDirection::In));
    let after_mixed = pool_bytes(ctx, pool)?;
    let mixed_in_matches = c_in_gpu
        .iter()
        .zip(&b_gpu)
        .all(|(&to, &from)| block(&after_mixed, to) == block(&original, from));
    let mixed_out_matches = c_out_gpu.iter().zip(&c_out_host).all(|(&from, &to)| {
        // SAFETY: every swap was reported by wait_all, so no copy touches the host block.
        let host_block = unsafe { engine.host_pool().block(to) };
        host_block == &block(&original, from)[..]
    });
    // 8 pieces, the first released at once: at most 8/7 of the cap.
    let mixed_ok = capped_in_only
        && mixed.len() == 2
        && mixed_out >= 5.0 * CAP_GB_PER_S
        && (CAP_GB_PER_S * 0.8..=CAP_GB_PER_S * 8.0 / 7.0 * 1.05).contains(&mixed_in)
        && mixed_in_matches
        && mixed_out_matches;
    Ok(vec![
        outcome(
            "paced swap-outs queued back to back move at the cap (2 GB/s per direction)",
            rate_ok,
            format!("{out_gb_per_s:.3} GB/s over {out_bytes} bytes in 2 swaps"),
        ),
        outcome(
            "a paced swap-out then swap-in into different device blocks is bit-exact and capped",
            back_matches && in_rate_ok,
            format!("swap-in at {in_gb_per_s:.3} GB/s, 16 blocks of {block_bytes} bytes"),
        ),
        outcome(
            "swap-in capped alone: a concurrent swap-out runs at link speed, both bit-exact",
            mixed_ok,
            format!(
                "swap-out {mixed_out:.2} GB/s (uncapped), swap-in {mixed_in:.3} GB/s (cap {CAP_GB_PER_S}), in exact {mixed_in_matches}, out exact {mixed_out_matches}"
            ),
        ),
    ])
}

pub(super) fn busy_blocks(ctx: &Arc<CudaContext>) -> Result<Vec<CheckOutcome>, SwapCheckError> {
    let block_bytes = 1 << 20;
    let buffer = DeviceBuffer::alloc(ctx, block_bytes * 8, "the busy-block check's device pool")?;
    let pool = GpuKvPoolRef {
        base: buffer.ptr(),
        block_bytes,
        block_count: 8,
    };
    let host = PinnedHostPool::new(ctx, block_bytes, 8)?;
    let mut engine = CudaSwapEngine::new(
        ctx,
        pool,
        host,
        None,
        CopyMethod::Batched,
        4,
        Instant::now(),
    )?;
    let first = engine.submit(1, SwapDirection::Out, &pairs(&[0, 1], &[0, 1]))?;
    let same_gpu = engine.submit(2, SwapDirection::In, &pairs(&[1], &[5]));
    let same_host = engine.submit(2, SwapDirection::In, &pairs(&[6], &[0]));
    let drop_busy = engine.check_drop(&[0], &[]);
    let busy_seen = engine.busy_swap_of_gpu_block(1) == Some(first);
    engine.wait_all()?;
    let after = engine.submit(2, SwapDirection::In, &pairs(&[1], &[5]));
    let drop_after = engine.check_drop(&[0], &[0]);
    engine.wait_all()?;
    let refused = matches!(same_gpu, Err(SwapError::BlockBusy { swap_id, .. }) if swap_id == first)
        && matches!(same_host, Err(SwapError::BlockBusy { swap_id, .. }) if swap_id == first)
        && matches!(drop_busy, Err(SwapError::BlockBusy { .. }))
        && busy_seen;
    Ok(vec![
        outcome(
            "blocks of an unreported swap are refused to other swaps and drops",
            refused,
            format!("{same_gpu:?} / {same_host:?} / {drop_busy:?}"),
        ),
        outcome(
            "blocks are free again once poll reported the swap",
            after.is_ok() && drop_after.is_ok(),
            format!("{after:?} / {drop_after:?}"),
        ),
    ])
}
