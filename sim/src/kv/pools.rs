//! The two block pools: the GPU pool with its LRU free queue (which doubles as the prefix cache)
//! and the host pool with a plain FIFO free list.

use crate::ids::{AgentId, BlockId};

/// "No block / no agent / no tag" in the dense arrays below.
pub(super) const NONE: u32 = u32::MAX;
/// The owner of a GPU block that belongs to a prefix group's shared prefix and is in at least one
/// block table (its references are counted in `refs`).
pub(super) const SHARED: u32 = u32::MAX - 1;
/// The cache tag of a free shared block nobody references, cached for its group (the group and
/// index are in `shared_key`). One tag array for both kinds keeps allocation to one check.
pub(super) const GROUP_CACHED: (u32, u32) = (SHARED, 0);

/// The GPU pool: blocks plus a free queue. Allocation pops the front. Freed blocks without a
/// cache key go to the front (reused first); cached blocks (an agent's released prefix, or a
/// prefix group's shared block nobody references) go to the back, so they survive longest, as
/// vLLM's free queue does. Cached blocks stay in the queue and count as free.
///
/// The queue is kept in two parts: `front`, a stack of the blocks freed to the front (the most
/// recently freed on top), then a doubly linked list over block ids (the pool's initial blocks
/// and every block pushed to the back), so a cached block can be taken back from the middle in
/// O(1). Nothing is ever pushed to the back of the stack or to the front of the list, so the two
/// together are the queue in order. Only blocks without a cache key enter the stack, and only
/// cached blocks are taken from the middle: the stack never needs unlinking, and allocating from
/// it (the hot path: drops and recomputes cycle hundreds of millions of blocks through it in a
/// large run) reads no link and no tag.
#[derive(Clone, Debug)]
pub(super) struct GpuPool {
    pub owner: Vec<AgentId>,
    /// For a free block released by the vllm policy: (agent, logical index) whose KV it still holds;
    /// `GROUP_CACHED` for an unreferenced shared block.
    pub cache_tag: Vec<(AgentId, u32)>,
    /// For a block of a prefix group's shared prefix: (group, logical index). Set while the block
    /// is referenced (`owner == SHARED`) and while it waits, unreferenced, in the free queue.
    pub shared_key: Vec<(u32, u32)>,
    /// Block tables pointing at a shared block (0 for every other block).
    pub refs: Vec<u32>,
    /// The front of the free queue: blocks freed without a cache key, the next one to reuse last.
    pub front: Vec<BlockId>,
    /// The rest of the free queue, linked.
    pub prev: Vec<u32>,
    pub next: Vec<u32>,
    pub head: u32,
    pub tail: u32,
    pub free_count: u32,
}

impl GpuPool {
    pub fn new(blocks: u32) -> Self {
        let n = blocks as usize;
        let mut pool = GpuPool {
            owner: vec![NONE; n],
            cache_tag: vec![(NONE, NONE); n],
            shared_key: vec![(NONE, NONE); n],
            refs: vec![0; n],
            front: Vec::new(),
            prev: vec![NONE; n],
            next: vec![NONE; n],
            head: NONE,
            tail: NONE,
            free_count: 0,
        };
        for b in 0..blocks {
            pool.push_back(b);
        }
        pool
    }

    pub fn push_back(&mut self, b: BlockId) {
        let i = b as usize;
        debug_assert_eq!(self.owner[i], NONE);
        self.prev[i] = self.tail;
        self.next[i] = NONE;
        if self.tail == NONE {
            self.head = b;
        } else {
            self.next[self.tail as usize] = b;
        }
        self.tail = b;
        self.free_count += 1;
    }

    /// Frees a block without a cache key to the front of the queue.
    pub fn push_front(&mut self, b: BlockId) {
        debug_assert_eq!(self.owner[b as usize], NONE);
        debug_assert_eq!(self.cache_tag[b as usize], (NONE, NONE));
        self.front.push(b);
        self.free_count += 1;
    }

    /// Takes the block at the front of the free queue, if it is one freed to the front (it then
    /// carries no cache key).
    pub fn pop_uncached(&mut self) -> Option<BlockId> {
        let b = self.front.pop()?;
        self.free_count -= 1;
        Some(b)
    }

    /// Takes the block at the head of the linked part of the free queue (which must not be
    /// empty; call when the front stack is): `unlink` of the head without its general case.
    pub fn pop_linked(&mut self) -> BlockId {
        debug_assert!(self.front.is_empty() && self.head != NONE);
        let b = self.head;
        let n = self.next[b as usize];
        self.head = n;
        if n == NONE {
            self.tail = NONE;
        } else {
            self.prev[n as usize] = NONE;
        }
        self.next[b as usize] = NONE;
        self.free_count -= 1;
        b
    }

    /// Takes a block (a cached one: it is in the linked part) out of the middle of the queue.
    pub fn unlink(&mut self, b: BlockId) {
        let i = b as usize;
        debug_assert!(
            self.prev[i] != NONE || self.head == b,
            "unlink of an unlinked block"
        );
        let (p, n) = (self.prev[i], self.next[i]);
        if p == NONE {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NONE {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[i] = NONE;
        self.next[i] = NONE;
        self.free_count -= 1;
    }

    /// True when the block is a shared block in some block table.
    pub fn is_shared(&self, b: BlockId) -> bool {
        self.owner[b as usize] == SHARED
    }
}

/// The host pool: a FIFO free list (no caching on the host).
#[derive(Clone, Debug)]
pub(super) struct HostPool {
    pub owner: Vec<AgentId>,
    pub free: std::collections::VecDeque<BlockId>,
}

impl HostPool {
    pub fn new(blocks: u32) -> Self {
        HostPool {
            owner: vec![NONE; blocks as usize],
            free: (0..blocks).collect(),
        }
    }
}
