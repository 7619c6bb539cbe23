//! Host block pools: a plain one for the CPU backend, and what both need to know about the host.
//!
//! The pinned pool of the CUDA backend lives in `swap::cuda` (it needs a CUDA context); both
//! mirror the device pool's block-major layout, so block `i` is the element range
//! `[i * block_elems, (i + 1) * block_elems)`.

use super::{PoolSide, SwapError};

/// Host memory as /proc/meminfo reports it (bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostMemory {
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
}

impl HostMemory {
    /// Reads MemTotal and MemAvailable from /proc/meminfo; `None` where it is missing (not Linux).
    pub fn read() -> Option<Self> {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        Self::parse(&text)
    }

    /// Parses the text of /proc/meminfo (values are in kB = KiB).
    pub fn parse(text: &str) -> Option<Self> {
        let field = |name: &str| -> Option<u64> {
            let line = text.lines().find(|line| line.starts_with(name))?;
            let kib: u64 = line[name.len()..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some(kib * 1024)
        };
        Some(HostMemory {
            mem_total_bytes: field("MemTotal:")?,
            mem_available_bytes: field("MemAvailable:")?,
        })
    }
}

/// A host block pool in ordinary memory, for the CPU backend (copies are plain memcpys).
#[derive(Debug)]
pub struct HostPool<T> {
    data: Vec<T>,
    block_elems: usize,
    block_count: u32,
}

impl<T: Copy + Default> HostPool<T> {
    /// Allocates `block_count` blocks of `block_elems` elements once, zeroed (`T::default()`).
    pub fn new(block_elems: usize, block_count: u32) -> Result<Self, SwapError> {
        if block_elems == 0 {
            return Err(SwapError::InvalidPool(
                "host pool blocks must hold at least one element".into(),
            ));
        }
        let total = block_elems
            .checked_mul(block_count as usize)
            .ok_or_else(|| {
                SwapError::InvalidPool(format!(
                    "{block_count} blocks of {block_elems} elements overflow"
                ))
            })?;
        Ok(HostPool {
            data: vec![T::default(); total],
            block_elems,
            block_count,
        })
    }

    pub fn block_elems(&self) -> usize {
        self.block_elems
    }

    pub fn block_count(&self) -> u32 {
        self.block_count
    }

    pub fn block(&self, block: u32) -> Result<&[T], SwapError> {
        let range = self.range(block)?;
        Ok(&self.data[range])
    }

    pub fn block_mut(&mut self, block: u32) -> Result<&mut [T], SwapError> {
        let range = self.range(block)?;
        Ok(&mut self.data[range])
    }

    fn range(&self, block: u32) -> Result<std::ops::Range<usize>, SwapError> {
        if block >= self.block_count {
            return Err(SwapError::BlockOutOfRange {
                side: PoolSide::Host,
                block,
                block_count: self.block_count,
            });
        }
        let start = block as usize * self.block_elems;
        Ok(start..start + self.block_elems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_parses_total_and_available() {
        let text =
            "MemTotal:       131072000 kB\nMemFree:         1000 kB\nMemAvailable:   65536000 kB\n";
        let memory = HostMemory::parse(text).unwrap();
        assert_eq!(memory.mem_total_bytes, 131072000 * 1024);
        assert_eq!(memory.mem_available_bytes, 65536000 * 1024);
        assert_eq!(HostMemory::parse("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn host_pool_blocks_are_disjoint_ranges() {
        let mut pool = HostPool::<f32>::new(3, 2).unwrap();
        pool.block_mut(1).unwrap().copy_from_slice(&[1.0, 2.0, 3.0]);
        assert_eq!(pool.block(0).unwrap(), &[0.0; 3]);
        assert_eq!(pool.block(1).unwrap(), &[1.0, 2.0, 3.0]);
        assert!(matches!(
            pool.block(2),
            Err(SwapError::BlockOutOfRange {
                side: PoolSide::Host,
                block: 2,
                block_count: 2
            })
        ));
        assert!(matches!(
            HostPool::<f32>::new(0, 2),
            Err(SwapError::InvalidPool(_))
        ));
    }
}
