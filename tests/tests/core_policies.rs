//! Behaviour tests: determinism of whole run directories, and each shipped policy's
//! distinctive decision on a tiny hand-built workload.

use std::path::{Path, PathBuf};

use sim::driver::{self, CheckLevel, RunOutput};
use sim::experiment::{self, SimConfig};
use sim::time::{SimTime, VirtualClock};
use sim::workload::{AgentProgram, PauseProgram, TurnProgram, Workload};
use sim::{backend::SimGpu, PolicyKind};
use traces::{TurnRecord, WorkloadSpec};

fn profile() -> traces::GpuProfile {
    calibration::load_profile("h100-llama2-7b").unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("djinn-core-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Simulates `spec` like `djinn simulate` does and writes the run directory.
fn simulate_to_dir(spec: &WorkloadSpec, agents: u32, seed: u64, policy: PolicyKind, dir: &Path) {
    let mut config = SimConfig::new(policy, profile());
    config.seed = seed;
    let (_, out) = experiment::simulate(spec, Some(agents), &config).unwrap();
    let inputs = analysis::SummaryInputs {
        policy: policy.name().into(),
        workload: spec.name.clone(),
        agents,
        seed,
        turns_planned: out.turns_planned,
        block_bytes: config.block_bytes(),
        gpu_blocks_total: config.gpu_blocks(),
        host_blocks_total: config.host_blocks(),
        slo_ns: 5_000_000_000,
    };
    let summary = analysis::summarize(&inputs, &out.turns, &out.steps, &out.swaps);
    let manifest = experiment::manifest(spec, agents, &config, "test", "test".into());
    traces::write_run_dir(dir, &manifest, &out.turns, &out.steps, &out.swaps, &summary).unwrap();
}

fn shipped(name: &str) -> WorkloadSpec {
    WorkloadSpec::from_toml_str(Path::new(name), experiment::shipped_workload(name).unwrap())
        .unwrap()
}

#[test]
fn same_seed_gives_byte_identical_run_directories_and_another_seed_does_not() {
    let spec = shipped("seed-cliff");
    let root = temp_dir("determinism");
    for policy in PolicyKind::DEFAULT_SET {
        let (a, b, c) = (
            root.join(format!("{}-a", policy.name())),
            root.join(format!("{}-b", policy.name())),
            root.join(format!("{}-c", policy.name())),
        );
        simulate_to_dir(&spec, 60, 7, policy, &a);
        simulate_to_dir(&spec, 60, 7, policy, &b);
        simulate_to_dir(&spec, 60, 8, policy, &c);
        for file in traces::RUN_DIR_FILES {
            let (x, y) = (
                std::fs::read(a.join(file)).unwrap(),
                std::fs::read(b.join(file)).unwrap(),
            );
            assert!(
                x == y,
                "{}: {file} differs between two runs of seed 7",
                policy.name()
            );
        }
        assert_ne!(
            std::fs::read(a.join("turns.csv")).unwrap(),
            std::fs::read(c.join("turns.csv")).unwrap(),
            "{}: seeds 7 and 8 gave the same turns",
            policy.name()
        );
    }
    std::fs::remove_dir_all(&root).unwrap();
}

/// Runs a hand-built workload with explicit pool sizes, checking invariants after every step.
fn run_tiny(
    policy: PolicyKind,
    agents: Vec<AgentProgram>,
    gpu_blocks: u32,
    host_blocks: u32,
) -> RunOutput {
    let workload = Workload {
        name: "tiny".into(),
        max_context_tokens: 4096,
        agents,
    };
    let mut config = SimConfig::new(policy, profile());
    config.check = CheckLevel::Full;
    let mut settings = config.settings();
    settings.gpu_blocks = gpu_blocks;
    settings.host_blocks = host_blocks;
    let mut scheduler = policy.build(&workload);
    let mut backend = SimGpu::new(config.profile.clone(), config.block_size_tokens);
    driver::run(
        &settings,
        &workload,
        scheduler.as_mut(),
        &mut backend,
        &mut VirtualClock::default(),
    )
    .unwrap()
}

fn agent(id: u32, arrival_s: f64, turns: &[(u32, u32, Option<f64>)]) -> AgentProgram {
    AgentProgram {
        agent_id: id,
        prefix: None,
        arrival: SimTime::from_secs_f64(arrival_s),
        turns: turns
            .iter()
            .map(|&(new_tokens, generated_tokens, pause_s)| TurnProgram {
                new_tokens,
                generated_tokens,
                pause_after: pause_s.map(|p| {
                    let ns = SimTime::from_secs_f64(p).as_nanos();
                    PauseProgram {
                        true_ns: ns,
                        hint_ns: Some(ns),
                    }
                }),
                context_tokens: None,
            })
            .collect(),
    }
}

fn turn(out: &RunOutput, agent: u32, index: u32) -> &TurnRecord {
    out.turns
        .iter()
        .find(|t| t.agent_id == agent && t.turn_index == index)
        .unwrap_or_else(|| panic!("no turn {agent}/{index}"))
}

#[test]
fn pin_holds_a_turn_back_until_memory_frees_and_rejects_when_nothing_can_free() {
    // Each agent needs 10 blocks (144 + 16 tokens); the pool has 25.
    let one_turn = [(144, 16, None)];
    let out = run_tiny(
        PolicyKind::Pin,
        vec![
            agent(0, 0.0, &one_turn),
            agent(1, 0.0, &one_turn),
            agent(2, 0.0, &one_turn),
        ],
        25,
        0,
    );
    let (t0, t2) = (turn(&out, 0, 0), turn(&out, 2, 0));
    assert!(!t2.rejected);
    assert!(
        t2.admitted_ns.unwrap()
            >= t0
                .finished_ns
                .unwrap()
                .min(turn(&out, 1, 0).finished_ns.unwrap()),
        "agent 2 must wait for memory"
    );

    // Now the first two pause for a minute holding their blocks: agent 2 can never fit.
    let paused = [(144, 16, Some(60.0)), (16, 16, None)];
    let out = run_tiny(
        PolicyKind::Pin,
        vec![
            agent(0, 0.0, &paused),
            agent(1, 0.0, &paused),
            agent(2, 0.0, &one_turn),
        ],
        25,
        0,
    );
    assert!(
        turn(&out, 2, 0).rejected,
        "pin rejects the turn that cannot fit while paused agents hold memory"
    );
    assert!(turn(&out, 0, 1).finished_ns.is_some() && turn(&out, 1, 1).finished_ns.is_some());
    assert_eq!(out.swaps.len(), 0, "pin never swaps");
}

#[test]
fn djinn_swaps_out_at_pause_start_and_prefetch_hides_the_restore() {
    // Two agents fill most of a 40-block pool (pressure is high), then pause 5 s with exact hints.
    let program = [(300, 20, Some(5.0)), (40, 20, None)];
    let out = run_tiny(
        PolicyKind::Djinn,
        vec![agent(0, 0.0, &program), agent(1, 0.0, &program)],
        45,
        100,
    );
    for a in 0..2 {
        let first = turn(&out, a, 0);
        let out_swap = out
            .swaps
            .iter()
            .find(|s| s.agent_id == a && s.direction == "out")
            .expect("swapped out");
        assert_eq!(
            out_swap.start_ns,
            first.finished_ns.unwrap(),
            "agent {a}: swap-out starts at the pause start"
        );
        let second = turn(&out, a, 1);
        assert_eq!(second.kv_source, "swapped_in");
        assert!(
            second.restore_end_ns.unwrap() <= second.arrival_ns,
            "agent {a}: prefetch finished before the agent returned: {second:?} swaps {:?}",
            out.swaps
        );
        assert_eq!(analysis::decompose(second).unwrap().kv_restore_ns, 0);
        assert_eq!(second.tokens_recomputed, 0);
    }
    // The `swap` policy swaps on return instead, so its restore is visible.
    let out = run_tiny(
        PolicyKind::Swap,
        vec![agent(0, 0.0, &program), agent(1, 0.0, &program)],
        45,
        100,
    );
    let second = turn(&out, 0, 1);
    assert_eq!(second.kv_source, "swapped_in");
    assert!(
        analysis::decompose(second).unwrap().kv_restore_ns > 0,
        "swap restores after the return"
    );
}

#[test]
fn djinn_keeps_kv_on_the_gpu_while_memory_is_plentiful() {
    let program = [(300, 20, Some(5.0)), (40, 20, None)];
    let out = run_tiny(PolicyKind::Djinn, vec![agent(0, 0.0, &program)], 1000, 100);
    assert!(out.swaps.is_empty());
    assert_eq!(turn(&out, 0, 1).kv_source, "resident");
}

#[test]
fn vllm_recomputes_after_its_cached_prefix_was_evicted() {
    // Alone, agent 0 reclaims its cached prefix: only the partial last block is recomputed.
    let a0 = [(100, 12, Some(10.0)), (20, 8, None)];
    let out = run_tiny(PolicyKind::Vllm, vec![agent(0, 0.0, &a0)], 20, 0);
    let back = turn(&out, 0, 1);
    assert!(
        back.tokens_recomputed > 0 && back.tokens_recomputed < 16,
        "partial block only: {}",
        back.tokens_recomputed
    );
    assert_eq!(back.kv_source, "partial_recompute");
    // Agent 1 needs the whole pool during the pause (300 + 19 tokens = 20 blocks): agent 0's
    // prefix is evicted and recomputed.
    let a1 = [(300, 20, None)];
    let out = run_tiny(
        PolicyKind::Vllm,
        vec![agent(0, 0.0, &a0), agent(1, 1.0, &a1)],
        20,
        0,
    );
    let back = turn(&out, 0, 1);
    assert_eq!(back.kv_source, "recomputed");
    assert_eq!(
        back.tokens_recomputed,
        100 + 12 - 1,
        "the whole previous context is recomputed"
    );
    assert!(
        out.steps
            .iter()
            .map(|s| s.cache_evicted_blocks)
            .sum::<u32>()
            > 0
    );
    // vllm-noapc recomputes even without pressure.
    let out = run_tiny(PolicyKind::VllmNoApc, vec![agent(0, 0.0, &a0)], 20, 0);
    assert_eq!(turn(&out, 0, 1).kv_source, "recomputed");
}

#[test]
fn vllm_preempts_the_latest_admitted_request_by_recompute() {
    // Two long generations outgrow a small pool: the later one is preempted and recomputed.
    let long = [(40, 200, None)];
    let out = run_tiny(
        PolicyKind::Vllm,
        vec![agent(0, 0.0, &long), agent(1, 0.001, &long)],
        20,
        0,
    );
    assert_eq!(
        turn(&out, 0, 0).tokens_recomputed,
        0,
        "the first request is never preempted"
    );
    assert!(
        turn(&out, 1, 0).tokens_recomputed > 0,
        "the later request was preempted and recomputed"
    );
    assert!(turn(&out, 1, 0).finished_ns.unwrap() > turn(&out, 0, 0).finished_ns.unwrap());
    // The preemption is visible on the turn and in the steps, apart from drops.
    let (first, later) = (turn(&out, 0, 0), turn(&out, 1, 0));
    assert_eq!((first.preemptions, first.requeued_ns), (0, 0));
    assert!(later.preemptions >= 1 && later.requeued_ns > 0, "{later:?}");
    let step_preemptions: u32 = out.steps.iter().map(|s| s.preemptions).sum();
    assert_eq!(step_preemptions, later.preemptions);
    let summary = analysis::summarize(&Default::default(), &out.turns, &out.steps, &out.swaps);
    assert_eq!(
        (summary.preemptions, summary.turns_preempted),
        (later.preemptions as u64, 1)
    );
}

#[test]
fn the_default_experiment_shows_the_cliff_for_pin_only() {
    let mut config = SimConfig::new(PolicyKind::Pin, profile());
    let spec = shipped("seed-cliff");
    let (_, pin) = experiment::simulate(&spec, Some(80), &config).unwrap();
    assert!(
        pin.turns.iter().any(|t| t.rejected),
        "pin runs out of memory at 80 agents"
    );
    for policy in [PolicyKind::Djinn, PolicyKind::Vllm, PolicyKind::Swap] {
        config.policy = policy;
        let (_, out) = experiment::simulate(&spec, Some(80), &config).unwrap();
        assert!(
            out.turns
                .iter()
                .all(|t| !t.rejected && t.finished_ns.is_some()),
            "{} completes every turn",
            policy.name()
        );
    }
    // With 40 agents (40 x 144 blocks after turn 2 = 5760 < 7056) pin completes everything.
    config.policy = PolicyKind::Pin;
    let (_, pin) = experiment::simulate(&spec, Some(40), &config).unwrap();
    assert!(pin.turns.iter().all(|t| !t.rejected));
}
