//! KV swap between the device block pool and a host block pool.
//!
//! The scheduler's plan names, for each swap, the agent and the `(gpu block, host block)` pairs to
//! move; the shared KV mechanism in `sim` chose those ids. The swap engine never allocates blocks:
//! it validates the ids, refuses any block that another swap still touches, enqueues the copies
//! and reports completions through a non-blocking [`SwapEngine::poll`], so the run loop can plan
//! the next step while copies are in flight.
//!
//! Both pools use the block-major [`crate::config::KvLayout`], so one block (all layers, K and V)
//! is one contiguous range in both pools and a swap of `n` blocks is at most `n` large copies;
//! runs of consecutive ids on both sides are merged into one copy ([`coalesce_runs`]).
//!
//! Two implementations share the types here:
//! - [`cpu::CpuSwapEngine`]: over the CPU backend's KV pool and a plain host pool; copies run
//!   synchronously inside `submit`, completions are still delivered by `poll` (CI path);
//! - `cuda::CudaSwapEngine` (feature `cuda`): a pinned host pool, one copy stream per direction,
//!   one batched copy call per swap, completion by CUDA events.
//!
//! Architecture invariant: a block stays busy from `submit` until `poll` has reported its swap
//! complete; no other swap or drop may name it meanwhile, and the run loop must not run an agent
//! whose blocks are busy ([`SwapEngine::busy_swap_of_gpu_block`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub mod backend;
pub mod cpu;
pub mod host_pool;

#[cfg(feature = "cuda")]
pub mod cuda;

/// Identifies one submitted swap within one engine (dense, from 0).
pub type SwapId = u64;

/// Agent identifier as the plan names it.
pub type AgentId = u32;

/// Direction of a swap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SwapDirection {
    /// Device pool -> host pool (the agent pauses).
    Out,
    /// Host pool -> device pool (the agent comes back).
    In,
}

impl SwapDirection {
    pub fn as_str(self) -> &'static str {
        match self {
            SwapDirection::Out => "out",
            SwapDirection::In => "in",
        }
    }
}

/// One block to move: the device block and the host block it pairs with (either direction).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockPair {
    pub gpu_block: u32,
    pub host_block: u32,
}

impl BlockPair {
    /// The pairs of a `sim::kv::SwapJob` (`(GPU block, host block)`, in the agent's order).
    pub fn from_job(pairs: &[(u32, u32)]) -> Vec<BlockPair> {
        pairs
            .iter()
            .map(|&(gpu_block, host_block)| BlockPair {
                gpu_block,
                host_block,
            })
            .collect()
    }
}

/// What the copy engine did for one swap; the fields match `traces::SwapRecord` (swaps.csv).
///
/// `start_ns` / `end_ns` are nanoseconds since the engine's epoch (the run's clock origin) at
/// which the copy began and ended on the copy engine; on the GPU they come from CUDA events, so a
/// swap queued behind another one of the same direction starts when that one ends.
/// `concurrent_swaps_at_start` counts the swaps in flight when this one's copy began, this one
/// included: every swap submitted by then whose copy had not ended (either direction, copying or
/// queued).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapRecord {
    pub swap_id: SwapId,
    pub agent_id: AgentId,
    pub direction: SwapDirection,
    pub block_count: u32,
    pub bytes: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    pub concurrent_swaps_at_start: u32,
}

impl SwapRecord {
    /// Effective bandwidth of this swap in GB/s (1e9 bytes per second).
    pub fn bandwidth_gb_per_s(&self) -> f64 {
        let duration_ns = self.end_ns.saturating_sub(self.start_ns).max(1);
        self.bytes as f64 / duration_ns as f64
    }

    /// The swaps.csv row of this swap.
    pub fn to_trace(&self) -> traces::SwapRecord {
        traces::SwapRecord {
            swap_id: self.swap_id,
            agent_id: self.agent_id,
            direction: self.direction.as_str().to_string(),
            block_count: self.block_count,
            bytes: self.bytes,
            start_ns: self.start_ns,
            end_ns: self.end_ns,
            concurrent_swaps_at_start: self.concurrent_swaps_at_start,
        }
    }
}

/// Which of the two pools a block id refers to (for error messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolSide {
    Gpu,
    Host,
}

impl std::fmt::Display for PoolSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PoolSide::Gpu => "gpu",
            PoolSide::Host => "host",
        })
    }
}

#[derive(Debug, Error)]
pub enum SwapError {
    /// A plan named a block the pool does not have (a bug in the plan; fatal for the run).
    #[error("{side} block {block} is out of range: the {side} pool has {block_count} blocks")]
    BlockOutOfRange {
        side: PoolSide,
        block: u32,
        block_count: u32,
    },
    /// The same block appears twice in one swap (a bug in the plan; fatal for the run).
    #[error("{side} block {block} appears twice in one swap")]
    DuplicateBlock { side: PoolSide, block: u32 },
    /// A block is still being copied by an earlier swap that `poll` has not reported complete.
    #[error("{side} block {block} is busy: swap {swap_id} still copies it")]
    BlockBusy {
        side: PoolSide,
        block: u32,
        swap_id: SwapId,
    },
    /// `is_complete` / `wait` asked about a swap this engine never issued.
    #[error("swap {0} was never submitted to this engine")]
    UnknownSwap(SwapId),
    /// More swaps in flight than the engine was sized for at start-up.
    #[error(
        "{limit} swaps are already in flight (the engine's limit); poll before submitting more"
    )]
    TooManyInFlight { limit: usize },
    /// The device pool handed to the engine does not have the size the engine was built for.
    #[error("device KV pool has {actual} elements, expected {expected} ({block_count} blocks of {block_elems})")]
    PoolSizeMismatch {
        actual: usize,
        expected: usize,
        block_count: u32,
        block_elems: usize,
    },
    /// A pool configuration that cannot work (zero-sized blocks, overflow).
    #[error("invalid pool configuration: {0}")]
    InvalidPool(String),
    /// The pinned host pool could not be allocated at start-up.
    #[error(
        "could not allocate a pinned host pool of {requested_bytes} bytes ({requested_gib:.2} GiB, \
         {block_count} blocks of {block_bytes} bytes): host has MemTotal {mem_total_gib:.2} GiB, \
         MemAvailable {mem_available_gib:.2} GiB (/proc/meminfo); {reason}",
        requested_gib = *requested_bytes as f64 / GIB,
        mem_total_gib = *mem_total_bytes as f64 / GIB,
        mem_available_gib = *mem_available_bytes as f64 / GIB
    )]
    PinnedAllocFailed {
        requested_bytes: u64,
        block_count: u32,
        block_bytes: u64,
        mem_total_bytes: u64,
        mem_available_bytes: u64,
        reason: String,
    },
    /// A CUDA driver call failed (fatal: the device state is unknown).
    #[error("CUDA driver error in the swap engine while {during}: {detail}")]
    Driver {
        during: &'static str,
        detail: String,
    },
}

const GIB: f64 = (1u64 << 30) as f64;

/// A run of consecutive blocks on both sides: moved as one copy of `block_count` blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRun {
    pub gpu_first: u32,
    pub host_first: u32,
    pub block_count: u32,
}

/// Sorts the pairs by device block and merges pairs whose device and host ids both continue
/// the previous pair's, so an agent whose blocks happen to be contiguous moves in one copy.
/// Sorting never splits such a run (device ids are unique), so this is never worse than the
/// plan's order.
pub fn coalesce_runs(pairs: &[BlockPair]) -> Vec<BlockRun> {
    let mut sorted: Vec<BlockPair> = pairs.to_vec();
    sorted.sort_unstable();
    let mut runs: Vec<BlockRun> = Vec::with_capacity(sorted.len());
    for pair in sorted {
        if let Some(last) = runs.last_mut() {
            if last.gpu_first + last.block_count == pair.gpu_block
                && last.host_first + last.block_count == pair.host_block
            {
                last.block_count += 1;
                continue;
            }
        }
        runs.push(BlockRun {
            gpu_first: pair.gpu_block,
            host_first: pair.host_block,
            block_count: 1,
        });
    }
    debug_assert_eq!(
        runs.iter().map(|r| r.block_count as usize).sum::<usize>(),
        pairs.len()
    );
    runs
}

/// Checks a swap's pairs against the pool sizes: ids in range, no block named twice.
pub fn validate_pairs(
    pairs: &[BlockPair],
    gpu_block_count: u32,
    host_block_count: u32,
) -> Result<(), SwapError> {
    let mut gpu_seen = std::collections::BTreeSet::new();
    let mut host_seen = std::collections::BTreeSet::new();
    for pair in pairs {
        if pair.gpu_block >= gpu_block_count {
            return Err(SwapError::BlockOutOfRange {
                side: PoolSide::Gpu,
                block: pair.gpu_block,
                block_count: gpu_block_count,
            });
        }
        if pair.host_block >= host_block_count {
            return Err(SwapError::BlockOutOfRange {
                side: PoolSide::Host,
                block: pair.host_block,
                block_count: host_block_count,
            });
        }
        if !gpu_seen.insert(pair.gpu_block) {
            return Err(SwapError::DuplicateBlock {
                side: PoolSide::Gpu,
                block: pair.gpu_block,
            });
        }
        if !host_seen.insert(pair.host_block) {
            return Err(SwapError::DuplicateBlock {
                side: PoolSide::Host,
                block: pair.host_block,
            });
        }
    }
    Ok(())
}

/// Which swap currently holds each block (device and host side), from submit until poll.
#[derive(Debug, Default)]
pub struct BusyBlocks {
    gpu: BTreeMap<u32, SwapId>,
    host: BTreeMap<u32, SwapId>,
}

impl BusyBlocks {
    /// Fails with the first busy block among `pairs`.
    pub fn check_free(&self, pairs: &[BlockPair]) -> Result<(), SwapError> {
        for pair in pairs {
            if let Some(&swap_id) = self.gpu.get(&pair.gpu_block) {
                return Err(SwapError::BlockBusy {
                    side: PoolSide::Gpu,
                    block: pair.gpu_block,
                    swap_id,
                });
            }
            if let Some(&swap_id) = self.host.get(&pair.host_block) {
                return Err(SwapError::BlockBusy {
                    side: PoolSide::Host,
                    block: pair.host_block,
                    swap_id,
                });
            }
        }
        Ok(())
    }

    pub fn check_gpu_free(&self, blocks: &[u32]) -> Result<(), SwapError> {
        match blocks
            .iter()
            .find_map(|b| self.gpu.get(b).map(|&id| (*b, id)))
        {
            Some((block, swap_id)) => Err(SwapError::BlockBusy {
                side: PoolSide::Gpu,
                block,
                swap_id,
            }),
            None => Ok(()),
        }
    }

    pub fn check_host_free(&self, blocks: &[u32]) -> Result<(), SwapError> {
        match blocks
            .iter()
            .find_map(|b| self.host.get(b).map(|&id| (*b, id)))
        {
            Some((block, swap_id)) => Err(SwapError::BlockBusy {
                side: PoolSide::Host,
                block,
                swap_id,
            }),
            None => Ok(()),
        }
    }

    pub fn mark(&mut self, swap_id: SwapId, pairs: &[BlockPair]) {
        for pair in pairs {
            let previous_gpu = self.gpu.insert(pair.gpu_block, swap_id);
            let previous_host = self.host.insert(pair.host_block, swap_id);
            assert!(
                previous_gpu.is_none() && previous_host.is_none(),
                "marked a busy block (check_free was skipped)"
            );
        }
    }

    pub fn release(&mut self, swap_id: SwapId, pairs: &[BlockPair]) {
        for pair in pairs {
            assert_eq!(
                self.gpu.remove(&pair.gpu_block),
                Some(swap_id),
                "released a gpu block another swap held"
            );
            assert_eq!(
                self.host.remove(&pair.host_block),
                Some(swap_id),
                "released a host block another swap held"
            );
        }
    }

    pub fn gpu_block_owner(&self, block: u32) -> Option<SwapId> {
        self.gpu.get(&block).copied()
    }

    pub fn is_empty(&self) -> bool {
        self.gpu.is_empty() && self.host.is_empty()
    }
}

/// Completion side of a swap engine, common to the CPU and CUDA implementations (submission
/// differs: the CPU engine borrows the backend's KV pool for each copy, the CUDA engine holds the
/// device pool's base pointer).
pub trait SwapEngine {
    /// True once the swap's copies have finished (non-blocking). Its blocks stay busy until
    /// [`SwapEngine::poll`] has reported it.
    fn is_complete(&mut self, swap_id: SwapId) -> Result<bool, SwapError>;

    /// Reports every swap that completed since the last poll, in swap-id order, and releases
    /// their blocks (non-blocking).
    fn poll(&mut self) -> Result<Vec<SwapRecord>, SwapError>;

    /// Blocks until every swap submitted so far has completed, then polls.
    fn wait_all(&mut self) -> Result<Vec<SwapRecord>, SwapError>;

    /// Swaps submitted and not yet reported by `poll`.
    fn in_flight_count(&self) -> usize;

    /// The swap that still holds this device block, if any; an agent must not run while any of
    /// its blocks is held.
    fn busy_swap_of_gpu_block(&self, gpu_block: u32) -> Option<SwapId>;

    /// Forgets a dropped agent's blocks: nothing is copied (the plan frees the ids and the
    /// agent's KV is recomputed later), but a drop may not name a block an in-flight swap still
    /// touches, since the mechanism would hand it to someone else while the copy engine uses it.
    fn check_drop(&self, gpu_blocks: &[u32], host_blocks: &[u32]) -> Result<(), SwapError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(gpu_block: u32, host_block: u32) -> BlockPair {
        BlockPair {
            gpu_block,
            host_block,
        }
    }

    #[test]
    fn coalesce_merges_runs_that_continue_on_both_sides() {
        let runs = coalesce_runs(&[
            pair(5, 10),
            pair(3, 8),
            pair(4, 9),
            pair(7, 11),
            pair(8, 12),
            pair(9, 20),
        ]);
        assert_eq!(
            runs,
            vec![
                BlockRun {
                    gpu_first: 3,
                    host_first: 8,
                    block_count: 3
                },
                BlockRun {
                    gpu_first: 7,
                    host_first: 11,
                    block_count: 2
                },
                BlockRun {
                    gpu_first: 9,
                    host_first: 20,
                    block_count: 1
                },
            ]
        );
    }

    #[test]
    fn coalesce_keeps_scattered_blocks_separate() {
        let runs = coalesce_runs(&[pair(0, 3), pair(1, 1), pair(2, 2)]);
        assert_eq!(runs.len(), 2);
        assert_eq!(
            runs[1],
            BlockRun {
                gpu_first: 1,
                host_first: 1,
                block_count: 2
            }
        );
    }

    #[test]
    fn validate_rejects_out_of_range_and_duplicates() {
        assert!(matches!(
            validate_pairs(&[pair(4, 0)], 4, 4),
            Err(SwapError::BlockOutOfRange {
                side: PoolSide::Gpu,
                block: 4,
                block_count: 4
            })
        ));
        assert!(matches!(
            validate_pairs(&[pair(0, 9)], 4, 4),
            Err(SwapError::BlockOutOfRange {
                side: PoolSide::Host,
                ..
            })
        ));
        assert!(matches!(
            validate_pairs(&[pair(1, 0), pair(1, 2)], 4, 4),
            Err(SwapError::DuplicateBlock {
                side: PoolSide::Gpu,
                block: 1
            })
        ));
        assert!(matches!(
            validate_pairs(&[pair(1, 2), pair(0, 2)], 4, 4),
            Err(SwapError::DuplicateBlock {
                side: PoolSide::Host,
                block: 2
            })
        ));
        assert!(validate_pairs(&[pair(0, 3), pair(3, 0)], 4, 4).is_ok());
    }

    #[test]
    fn records_convert_to_the_swaps_csv_row() {
        let record = SwapRecord {
            swap_id: 4,
            agent_id: 9,
            direction: SwapDirection::In,
            block_count: 2,
            bytes: 16,
            start_ns: 10,
            end_ns: 30,
            concurrent_swaps_at_start: 2,
        };
        let row = record.to_trace();
        assert_eq!(
            (row.swap_id, row.agent_id, row.direction.as_str()),
            (4, 9, "in")
        );
        assert_eq!(
            (row.block_count, row.bytes, row.start_ns, row.end_ns),
            (2, 16, 10, 30)
        );
        assert_eq!(row.concurrent_swaps_at_start, 2);
        assert_eq!(record.bandwidth_gb_per_s(), 0.8);
    }

    #[test]
    fn busy_blocks_name_the_holding_swap() {
        let mut busy = BusyBlocks::default();
        busy.mark(7, &[pair(1, 2)]);
        assert!(matches!(
            busy.check_free(&[pair(0, 0), pair(1, 5)]),
            Err(SwapError::BlockBusy {
                side: PoolSide::Gpu,
                block: 1,
                swap_id: 7
            })
        ));
        assert!(matches!(
            busy.check_host_free(&[2]),
            Err(SwapError::BlockBusy {
                side: PoolSide::Host,
                block: 2,
                swap_id: 7
            })
        ));
        busy.release(7, &[pair(1, 2)]);
        assert!(busy.is_empty());
        assert!(busy.check_free(&[pair(1, 2)]).is_ok());
    }
}
