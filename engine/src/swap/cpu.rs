//! The swap engine of the CPU backend: the same API as the CUDA one over the CPU KV pool (one
//! `Vec` in block-major order) and a plain host pool.
//!
//! Copies run synchronously inside `submit` (a memcpy per coalesced run), but a swap is reported
//! complete only by the next `poll`, and its blocks stay busy until then, exactly as on the GPU;
//! so the run loop's handling of in-flight swaps is exercised in CI.

use std::collections::BTreeMap;
use std::time::Instant;

use super::host_pool::HostPool;
use super::{
    coalesce_runs, validate_pairs, AgentId, BlockPair, BusyBlocks, SwapDirection, SwapEngine,
    SwapError, SwapId, SwapRecord,
};

/// A copied swap waiting for `poll` to report it.
#[derive(Debug)]
struct PendingSwap {
    pairs: Vec<BlockPair>,
    record: SwapRecord,
}

#[derive(Debug)]
pub struct CpuSwapEngine<T> {
    host_pool: HostPool<T>,
    gpu_block_count: u32,
    max_in_flight: usize,
    epoch: Instant,
    next_swap_id: SwapId,
    pending: BTreeMap<SwapId, PendingSwap>,
    busy: BusyBlocks,
}

impl<T: Copy + Default> CpuSwapEngine<T> {
    /// `gpu_block_count` blocks of `block_elems` elements on the "device" side (the CPU backend's
    /// KV pool), `host_block_count` host blocks allocated here once. Times in the records are
    /// nanoseconds since `epoch` (the run's clock origin).
    pub fn new(
        block_elems: usize,
        gpu_block_count: u32,
        host_block_count: u32,
        max_in_flight: usize,
        epoch: Instant,
    ) -> Result<Self, SwapError> {
        Ok(CpuSwapEngine {
            host_pool: HostPool::new(block_elems, host_block_count)?,
            gpu_block_count,
            max_in_flight,
            epoch,
            next_swap_id: 0,
            pending: BTreeMap::new(),
            busy: BusyBlocks::default(),
        })
    }

    pub fn host_pool(&self) -> &HostPool<T> {
        &self.host_pool
    }

    pub fn block_elems(&self) -> usize {
        self.host_pool.block_elems()
    }

    /// Copies the named blocks between `device_pool` (the CPU backend's KV pool) and the host
    /// pool and returns the swap's id; `poll` reports it.
    pub fn submit(
        &mut self,
        device_pool: &mut [T],
        agent_id: AgentId,
        direction: SwapDirection,
        pairs: &[BlockPair],
    ) -> Result<SwapId, SwapError> {
        let block_elems = self.host_pool.block_elems();
        let expected = block_elems * self.gpu_block_count as usize;
        if device_pool.len() != expected {
            return Err(SwapError::PoolSizeMismatch {
                actual: device_pool.len(),
                expected,
                block_count: self.gpu_block_count,
                block_elems,
            });
        }
        validate_pairs(pairs, self.gpu_block_count, self.host_pool.block_count())?;
        self.busy.check_free(pairs)?;
        if self.pending.len() >= self.max_in_flight {
            return Err(SwapError::TooManyInFlight {
                limit: self.max_in_flight,
            });
        }

        let swap_id = self.next_swap_id;
        self.next_swap_id += 1;
        let start_ns = self.epoch.elapsed().as_nanos() as u64;
        for run in coalesce_runs(pairs) {
            let elems = run.block_count as usize * block_elems;
            let device_start = run.gpu_first as usize * block_elems;
            let host_start = run.host_first as usize * block_elems;
            let device = &mut device_pool[device_start..device_start + elems];
            // The host pool hands out one block at a time; a run's blocks are adjacent there too.
            for i in 0..run.block_count as usize {
                let host_block = self.host_pool.block_mut(run.host_first + i as u32)?;
                let device_block = &mut device[i * block_elems..(i + 1) * block_elems];
                match direction {
                    SwapDirection::Out => host_block.copy_from_slice(device_block),
                    SwapDirection::In => device_block.copy_from_slice(host_block),
                }
            }
            debug_assert_eq!(
                host_start + elems,
                (run.host_first + run.block_count) as usize * block_elems
            );
        }
        let end_ns = self.epoch.elapsed().as_nanos() as u64;

        self.busy.mark(swap_id, pairs);
        let record = SwapRecord {
            swap_id,
            agent_id,
            direction,
            block_count: pairs.len() as u32,
            bytes: (pairs.len() * block_elems * std::mem::size_of::<T>()) as u64,
            start_ns,
            end_ns,
            // Copies run one at a time inside submit: every earlier swap's copy has ended, so
            // only this one is in flight at its start.
            concurrent_swaps_at_start: 1,
        };
        self.pending.insert(
            swap_id,
            PendingSwap {
                pairs: pairs.to_vec(),
                record,
            },
        );
        Ok(swap_id)
    }
}

impl<T: Copy + Default> SwapEngine for CpuSwapEngine<T> {
    fn is_complete(&mut self, swap_id: SwapId) -> Result<bool, SwapError> {
        if swap_id < self.next_swap_id {
            Ok(true)
        } else {
            Err(SwapError::UnknownSwap(swap_id))
        }
    }

    fn poll(&mut self) -> Result<Vec<SwapRecord>, SwapError> {
        let pending = std::mem::take(&mut self.pending);
        let mut records = Vec::with_capacity(pending.len());
        for (swap_id, swap) in pending {
            self.busy.release(swap_id, &swap.pairs);
            records.push(swap.record);
        }
        debug_assert!(self.busy.is_empty());
        Ok(records)
    }

    fn wait_all(&mut self) -> Result<Vec<SwapRecord>, SwapError> {
        self.poll()
    }

    fn in_flight_count(&self) -> usize {
        self.pending.len()
    }

    fn busy_swap_of_gpu_block(&self, gpu_block: u32) -> Option<SwapId> {
        self.busy.gpu_block_owner(gpu_block)
    }

    fn check_drop(&self, gpu_blocks: &[u32], host_blocks: &[u32]) -> Result<(), SwapError> {
        self.busy.check_gpu_free(gpu_blocks)?;
        self.busy.check_host_free(host_blocks)
    }
}
