//! Shared prefix blocks through the engine behind `sim`'s Backend seam (CPU model and swap
//! engine): whole runs of the shared run loop over a workload with a prefix group generate exactly
//! the tokens of the same workload run unshared (every agent prefilling its own copy of the same
//! prefix tokens), with the prefix computed fewer times; and the engine refuses what would change
//! a shared block under the agents that read it.

mod run_loop_common;

use engine::config::ModelConfig;
use engine::weights::WeightSet;
use run_loop_common::{backend, settings, CpuBackend};
use sim::backend::{Backend, BatchSeq, StepBatch};
use sim::driver;
use sim::kv::{KvManager, SwapDirection, SwapJob};
use sim::time::{SimTime, VirtualClock};
use sim::workload::{AgentProgram, PauseProgram, SharedPrefix, TurnProgram, Workload};
use sim::PolicyKind;

const BLOCK: u32 = 4;
const PREFIX: u32 = 16;

/// Five agents, four in one prefix group (a 16-token prefix inside their first prompt), three
/// turns each with pauses long enough for a swapping policy to move paused KV out.
fn workload(shared: bool) -> Workload {
    let agents = (0..5u32)
        .map(|agent_id| AgentProgram {
            agent_id,
            prefix: (shared && agent_id < 4).then_some(SharedPrefix {
                group: 0,
                tokens: PREFIX,
            }),
            arrival: SimTime::from_millis(3 * agent_id as u64),
            turns: (0..3)
                .map(|turn| TurnProgram {
                    new_tokens: if turn == 0 {
                        PREFIX + 3 + agent_id
                    } else {
                        5 + turn
                    },
                    generated_tokens: 4 + turn,
                    pause_after: (turn < 2).then_some(PauseProgram {
                        true_ns: 40_000_000,
                        hint_ns: Some(40_000_000),
                    }),
                    context_tokens: None,
                })
                .collect(),
        })
        .collect();
    Workload {
        name: "shared-prefix-run-test".into(),
        max_context_tokens: 128,
        agents,
    }
}

struct RunResult {
    /// Each agent's sequence as run (inputs and generated tokens).
    sequences: Vec<Vec<u32>>,
    generated: Vec<Vec<u32>>,
    prefilled: u64,
    swaps: usize,
    recomputed: u64,
}

/// One policy over the workload on the engine. The engine always knows the prefix (its tokens
/// are the group's); `share` says whether the KV mechanism shares its blocks.
fn run(policy: PolicyKind, share: bool, gpu_blocks: u32, host_blocks: u32) -> RunResult {
    let config = ModelConfig::tiny_gqa();
    let weights = WeightSet::random(&config, 5);
    let mut engine = backend(&weights, BLOCK as usize, gpu_blocks, host_blocks);
    let with_prefix = workload(true);
    let loop_workload = workload(share);
    engine.begin_run(0, &with_prefix).unwrap();
    let mut scheduler = policy.build(&loop_workload);
    let output = driver::run(
        &settings(BLOCK, gpu_blocks, host_blocks, &config),
        &loop_workload,
        scheduler.as_mut(),
        &mut engine,
        &mut VirtualClock::default(),
    )
    .unwrap_or_else(|e| panic!("{} (shared: {share}): {e}", policy.name()));
    assert!(output
        .turns
        .iter()
        .all(|t| !t.rejected && t.finished_ns.is_some()));
    assert_eq!(engine.swap_records().len(), output.swaps.len());
    RunResult {
        sequences: (0..5).map(|a| engine.sequence(a).to_vec()).collect(),
        generated: (0..5).map(|a| engine.generated(a).to_vec()).collect(),
        prefilled: output.turns.iter().map(|t| t.tokens_prefilled as u64).sum(),
        swaps: output.swaps.len(),
        recomputed: output
            .turns
            .iter()
            .map(|t| t.tokens_recomputed as u64)
            .sum(),
    }
}

fn check_same_generation(policy: PolicyKind, gpu_blocks: u32, host_blocks: u32) -> RunResult {
    let shared = run(policy, true, gpu_blocks, host_blocks);
    let unshared = run(policy, false, gpu_blocks, host_blocks);
    for agent in 0..5 {
        assert_eq!(
            shared.sequences[agent],
            unshared.sequences[agent],
            "{}: agent {agent}'s sequence",
            policy.name()
        );
        assert_eq!(
            shared.generated[agent],
            unshared.generated[agent],
            "{}: agent {agent}'s greedy tokens",
            policy.name()
        );
    }
    let prefix = &shared.sequences[0][..PREFIX as usize];
    for agent in 1..4 {
        assert_eq!(&shared.sequences[agent][..PREFIX as usize], prefix);
    }
    assert_ne!(
        &shared.sequences[4][..PREFIX as usize],
        prefix,
        "agent 4 has no group"
    );
    eprintln!(
        "{}: shared prefilled {} tokens ({} swaps, {} recomputed), unshared {} ({} swaps, {} recomputed)",
        policy.name(),
        shared.prefilled,
        shared.swaps,
        shared.recomputed,
        unshared.prefilled,
        unshared.swaps,
        unshared.recomputed
    );
    assert!(
        shared.prefilled < unshared.prefilled,
        "sharing computed the prefix fewer times ({} vs {} tokens)",
        shared.prefilled,
        unshared.prefilled
    );
    shared
}

#[test]
fn a_swapping_policy_on_shared_prefix_blocks_generates_what_unshared_agents_generate() {
    let shared = check_same_generation(PolicyKind::Swap, 48, 128);
    assert!(shared.swaps >= 4, "agents swapped ({})", shared.swaps);
}

#[test]
fn djinn_dropping_and_swapping_on_shared_prefix_blocks_generates_what_unshared_agents_generate() {
    // Small pools: djinn swaps some paused agents and drops others (recomputed later).
    let shared = check_same_generation(PolicyKind::Djinn, 28, 4);
    assert!(shared.swaps >= 1 && shared.recomputed > 0);
}

#[test]
fn vllm_prefix_caching_on_shared_prefix_blocks_generates_what_unshared_agents_generate() {
    check_same_generation(PolicyKind::Vllm, 40, 8);
}

/// Agent 0 prefills the prefix and publishes it; agent 1 is admitted with a hit.
fn published(engine: &mut CpuBackend) -> KvManager {
    let mut kv = KvManager::new(BLOCK, 32, 16, 5);
    for agent in 0..4 {
        kv.set_shared_prefix(agent, 0, PREFIX).unwrap();
    }
    engine.begin_run(0, &workload(true)).unwrap();
    run_step(engine, &mut kv, 0, 0, PREFIX + 3).unwrap();
    assert_eq!(kv.reclaim_cached(1).unwrap(), PREFIX);
    kv
}

fn run_step(
    engine: &mut CpuBackend,
    kv: &mut KvManager,
    agent: u32,
    context_tokens: u32,
    tokens: u32,
) -> Result<(), String> {
    kv.ensure_capacity(agent, context_tokens + tokens).unwrap();
    let batch = StepBatch {
        prefill: vec![BatchSeq {
            agent,
            context_tokens,
            tokens,
        }],
        decode: vec![],
    };
    engine
        .execute_step(SimTime::ZERO, &batch, kv)
        .map_err(|e| e.to_string())?;
    kv.advance(agent, tokens).unwrap();
    Ok(())
}

#[test]
fn the_engine_refuses_a_step_that_would_write_a_shared_block() {
    let weights = WeightSet::random(&ModelConfig::tiny_gqa(), 3);
    let mut engine = backend(&weights, BLOCK as usize, 32, 16);
    let kv = published(&mut engine);
    // Agent 1's KV covers the prefix; a step that recomputes position 8 on writes blocks 2 and 3,
    // the group's.
    let batch = StepBatch {
        prefill: vec![BatchSeq {
            agent: 1,
            context_tokens: 8,
            tokens: 8,
        }],
        decode: vec![],
    };
    let err = engine
        .execute_step(SimTime::ZERO, &batch, &kv)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("would write") && err.contains("shared block"),
        "{err}"
    );
}

#[test]
fn the_engine_refuses_a_swap_that_names_a_shared_block() {
    let weights = WeightSet::random(&ModelConfig::tiny_gqa(), 3);
    let mut engine = backend(&weights, BLOCK as usize, 32, 16);
    let kv = published(&mut engine);
    let shared_block = kv.group_prefix_block(0, 0).unwrap();
    let job = SwapJob {
        id: 0,
        agent: 1,
        direction: SwapDirection::Out,
        pairs: vec![(shared_block, 0)],
    };
    let err = engine
        .start_swap(SimTime::ZERO, &job, &kv)
        .unwrap_err()
        .to_string();
    assert!(err.contains("shared") && err.contains("private"), "{err}");
}

#[test]
fn a_hit_continues_from_the_shared_part_with_the_group_tokens() {
    let weights = WeightSet::random(&ModelConfig::tiny_gqa(), 3);
    let mut engine = backend(&weights, BLOCK as usize, 32, 16);
    let mut kv = published(&mut engine);
    run_step(&mut engine, &mut kv, 1, PREFIX, 4).unwrap();
    assert_eq!(engine.sequence(1).len(), PREFIX as usize + 4);
    assert_eq!(
        engine.sequence(1)[..PREFIX as usize],
        engine.sequence(0)[..PREFIX as usize],
        "the hit positions hold the group's tokens"
    );
    assert_ne!(
        engine.sequence(1)[PREFIX as usize..PREFIX as usize + 3],
        engine.sequence(0)[PREFIX as usize..],
        "after the prefix each agent has its own tokens"
    );
}

#[test]
fn kv_the_engine_never_computed_outside_a_shared_prefix_is_refused() {
    let weights = WeightSet::random(&ModelConfig::tiny_gqa(), 3);
    let mut engine = backend(&weights, BLOCK as usize, 32, 16);
    let mut kv = KvManager::new(BLOCK, 32, 16, 5);
    for agent in 0..4 {
        kv.set_shared_prefix(agent, 0, PREFIX).unwrap();
    }
    // The mechanism shares a prefix, but the run's workload (what the engine was told) has none:
    // the engine's tokens would not be the group's.
    engine.begin_run(0, &workload(false)).unwrap();
    let err = run_step(&mut engine, &mut kv, 0, 0, 4).unwrap_err();
    assert!(
        err.contains("prefix group 0") && err.contains("no shared prefix"),
        "{err}"
    );
    // An agent that claims context the engine never ran, outside any shared prefix.
    engine.begin_run(0, &workload(true)).unwrap();
    kv.ensure_capacity(4, 8).unwrap();
    kv.advance(4, 4).unwrap();
    let batch = StepBatch {
        prefill: vec![BatchSeq {
            agent: 4,
            context_tokens: 4,
            tokens: 4,
        }],
        decode: vec![],
    };
    let err = engine
        .execute_step(SimTime::ZERO, &batch, &kv)
        .unwrap_err()
        .to_string();
    assert!(err.contains("ran only its first 0 positions"), "{err}");
}
