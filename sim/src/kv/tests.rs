//! Unit tests of the KV mechanism.

use super::*;

#[test]
fn grow_swap_out_in_round_trip_keeps_accounting() {
    let mut kv = KvManager::new(16, 10, 10, 2);
    kv.ensure_capacity(0, 40).unwrap();
    assert_eq!(kv.blocks(0), 3);
    kv.advance(0, 40).unwrap();
    let out = kv.start_swap_out(0, u32::MAX).unwrap();
    assert_eq!(kv.swap_job(out).unwrap().pairs.len(), 3);
    assert_eq!(kv.state(0), KvState::SwappingOut);
    assert_eq!(
        kv.gpu_blocks_free(),
        7,
        "GPU copies stay held while moving out"
    );
    kv.audit().unwrap();
    kv.complete_swap(out).unwrap();
    assert_eq!(
        (kv.state(0), kv.gpu_blocks_free(), kv.host_blocks_free()),
        (KvState::Host, 10, 7)
    );
    let inn = kv.start_swap_in(0).unwrap();
    assert!(kv.advance(0, 1).is_err(), "no compute while swapping in");
    kv.complete_swap(inn).unwrap();
    assert_eq!((kv.state(0), kv.kv_tokens(0)), (KvState::Gpu, 40));
    kv.audit().unwrap();
}

#[test]
fn drop_and_recompute_conserves_tokens() {
    let mut kv = KvManager::new(16, 10, 0, 1);
    kv.ensure_capacity(0, 50).unwrap();
    kv.advance(0, 50).unwrap();
    assert_eq!(
        kv.drop_tail(0, 20).unwrap(),
        34,
        "keeps one whole block (16 tokens)"
    );
    kv.audit().unwrap();
    kv.ensure_capacity(0, 51).unwrap();
    assert_eq!(kv.advance(0, 35).unwrap(), 34, "34 recomputed, 1 new");
    kv.audit().unwrap();
}

#[test]
fn a_compaction_keeps_the_prefix_and_forgets_the_rest_without_counting_drops() {
    let mut kv = KvManager::new(16, 8, 8, 2);
    kv.ensure_capacity(0, 70).unwrap();
    kv.advance(0, 70).unwrap();
    kv.drop_tail(0, 48).unwrap(); // 22 tokens dropped by a policy
    kv.forget_beyond(0, 40).unwrap();
    // The block holding tokens 32..40 stays; the policy's drop below 40 still counts.
    assert_eq!((kv.kv_tokens(0), kv.blocks(0)), (40, 3));
    assert_eq!(kv.tokens_dropped_total(0), 0);
    kv.audit().unwrap();
    // A cached prefix keeps only its full blocks within the kept prefix.
    kv.release_to_cache(0).unwrap();
    kv.forget_beyond(0, 40).unwrap();
    assert_eq!(kv.reclaimable_prefix_blocks(0), 2);
    kv.audit().unwrap();
    assert_eq!(kv.reclaim_cached(0).unwrap(), 32);
    kv.audit().unwrap();
    // Moving KV is refused (the run loop waits for the swap).
    kv.start_swap_out(0, 2).unwrap();
    assert!(matches!(
        kv.forget_beyond(0, 8),
        Err(KvError::SwapInFlight { .. })
    ));
}

#[test]
fn prefix_cache_survives_until_reused_tail_first() {
    let mut kv = KvManager::new(16, 6, 0, 2);
    kv.ensure_capacity(0, 64).unwrap();
    kv.advance(0, 63).unwrap();
    kv.release_to_cache(0).unwrap();
    assert_eq!(kv.gpu_blocks_free(), 6);
    assert_eq!(
        kv.reclaimable_prefix_blocks(0),
        3,
        "three full blocks cached, the partial one not"
    );
    // Agent 1 takes 4 blocks: agent 0's partial (uncached) last block, which went to the
    // front of the free queue, the 2 never-used ones, then the oldest freed cached block,
    // which is agent 0's tail.
    kv.ensure_capacity(1, 64).unwrap();
    kv.advance(1, 64).unwrap();
    assert_eq!(kv.counters.cache_evicted_blocks, 1);
    assert_eq!(kv.reclaimable_prefix_blocks(0), 2);
    kv.audit().unwrap();
    assert_eq!(kv.reclaim_cached(0).unwrap(), 32);
    kv.audit().unwrap();
    assert_eq!(kv.kv_tokens(0), 32);
}

#[test]
fn audit_catches_a_leaked_block() {
    let mut kv = KvManager::new(16, 4, 0, 1);
    kv.ensure_capacity(0, 16).unwrap();
    // Corrupt on purpose: pretend the block is free without unlinking the owner.
    kv.gpu.owner[0] = NONE;
    assert!(kv.audit().is_err());
}

/// Two agents of one group (prefix of 40 tokens: 2 full blocks of 16) and one without.
fn shared_setup() -> KvManager {
    let mut kv = KvManager::new(16, 12, 8, 3);
    kv.set_shared_prefix(0, 0, 40).unwrap();
    kv.set_shared_prefix(1, 0, 40).unwrap();
    kv
}

#[test]
fn the_first_agent_publishes_the_prefix_and_the_next_one_hits_it() {
    let mut kv = shared_setup();
    kv.ensure_capacity(0, 50).unwrap();
    kv.advance(0, 50).unwrap();
    assert_eq!(
        (kv.shared_blocks(0), kv.blocks(0), kv.table_blocks(0)),
        (2, 2, 4)
    );
    assert_eq!(kv.gpu_blocks_held(0), 2, "private blocks only");
    assert_eq!(
        (kv.prefix_hit_blocks(1), kv.prefix_hit_free_blocks(1)),
        (2, 2)
    );
    assert_eq!(kv.prefix_hit_blocks(2), 0, "no group, no hit");
    assert_eq!(kv.reclaim_cached(1).unwrap(), 32);
    assert_eq!(kv.computed_high_water(1), 32);
    assert_eq!(kv.gpu_blocks_used(), 4, "the prefix is held once");
    let b = kv.group_prefix_block(0, 0).unwrap();
    assert_eq!(kv.shared_block_refs(b), 2);
    kv.audit().unwrap();
    // A swap moves only private blocks; the shared ones stay for the group.
    kv.ensure_capacity(1, 60).unwrap();
    kv.advance(1, 28).unwrap();
    let out = kv.start_swap_out(1, u32::MAX).unwrap();
    assert_eq!(kv.swap_job(out).unwrap().pairs.len(), 2);
    kv.complete_swap(out).unwrap();
    assert_eq!(kv.shared_block_refs(b), 2);
    kv.audit().unwrap();
    // The last reference gone, the prefix waits in the free queue, cached for the group.
    kv.free_all(0).unwrap();
    kv.drop_tail(1, 0).unwrap();
    assert_eq!((kv.gpu_blocks_used(), kv.shared_block_refs(b)), (0, 0));
    assert_eq!(
        (kv.prefix_hit_blocks(1), kv.prefix_hit_free_blocks(1)),
        (2, 0)
    );
    kv.audit().unwrap();
    assert_eq!(kv.reclaim_cached(1).unwrap(), 32);
    assert_eq!(kv.tokens_dropped_total(1), 60 - 32);
    kv.audit().unwrap();
}

#[test]
fn a_concurrent_copy_of_the_prefix_is_folded_into_the_shared_one() {
    let mut kv = shared_setup();
    kv.ensure_capacity(0, 40).unwrap();
    kv.ensure_capacity(1, 40).unwrap();
    kv.advance(0, 40).unwrap();
    let free = kv.gpu_blocks_free();
    kv.advance(1, 40).unwrap();
    assert_eq!(kv.gpu_blocks_free(), free + 2, "agent 1's copies freed");
    assert_eq!(kv.shared_blocks(1), 2);
    kv.audit().unwrap();
    // A compaction that cuts into a shared block drops that block from the agent's table.
    kv.forget_beyond(1, 20).unwrap();
    assert_eq!(
        (kv.kv_tokens(1), kv.table_blocks(1), kv.shared_blocks(1)),
        (16, 1, 1)
    );
    assert_eq!(
        kv.tokens_dropped_total(1),
        4,
        "the kept tokens of the cut block are recomputed"
    );
    kv.audit().unwrap();
    kv.ensure_capacity(1, 20).unwrap();
    kv.advance(1, 4).unwrap();
    assert_eq!(
        kv.shared_blocks(1),
        1,
        "beyond the cut nothing is shared any more"
    );
    kv.audit().unwrap();
}

#[test]
fn release_keeps_shared_blocks_for_the_group_and_reclaim_brings_them_back() {
    let mut kv = shared_setup();
    kv.ensure_capacity(0, 70).unwrap();
    kv.advance(0, 70).unwrap();
    kv.release_to_cache(0).unwrap();
    assert_eq!(kv.gpu_blocks_used(), 0);
    kv.audit().unwrap();
    assert_eq!(
        kv.reclaimable_prefix_blocks(0),
        4,
        "2 shared + 2 own cached"
    );
    assert_eq!(kv.prefix_hit_blocks(1), 2);
    kv.reclaim_cached(1).unwrap();
    kv.audit().unwrap();
    assert_eq!(kv.reclaim_cached(0).unwrap(), 64);
    kv.audit().unwrap();
    assert_eq!(kv.gpu_blocks_used(), 4);
}

#[test]
fn audit_catches_a_wrong_reference_count() {
    let mut kv = shared_setup();
    kv.ensure_capacity(0, 40).unwrap();
    kv.advance(0, 40).unwrap();
    let b = kv.group_prefix_block(0, 1).unwrap();
    kv.gpu.refs[b as usize] = 2;
    assert!(kv.audit().unwrap_err().contains("references"));
}

#[test]
fn audit_catches_a_cached_block_at_the_front_of_the_free_queue() {
    let mut kv = KvManager::new(16, 4, 0, 1);
    kv.ensure_capacity(0, 32).unwrap();
    kv.free_all(0).unwrap();
    assert_eq!(
        kv.gpu.front.len(),
        2,
        "freed blocks without a key go to the front"
    );
    kv.audit().unwrap();
    // Corrupt on purpose: a block at the front tagged as a cached prefix would be reused
    // before the blocks it should outlive.
    kv.gpu.cache_tag[kv.gpu.front[0] as usize] = (0, 0);
    assert!(kv.audit().is_err());
}

#[test]
fn blocks_for_rounds_up_with_and_without_a_power_of_two_block() {
    for block in [1u32, 16, 24] {
        let kv = KvManager::new(block, 4, 0, 1);
        for tokens in [0u32, 1, 15, 16, 17, 23, 24, 25, 4_000_000_000, u32::MAX] {
            assert_eq!(
                kv.blocks_for(tokens),
                tokens.div_ceil(block),
                "{tokens} / {block}"
            );
        }
    }
}
