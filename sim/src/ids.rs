//! Identifiers. Ids are dense indices owned by one run (never global counters).

/// An agent: dense index `0..agent_count` in arrival order.
pub type AgentId = u32;
/// A KV block in the GPU or host pool: dense index into that pool.
pub type BlockId = u32;
/// An asynchronous swap, numbered in the order it was started.
pub type SwapId = u64;
