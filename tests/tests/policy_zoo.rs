//! Each zoo policy's distinctive decision on a tiny hand-built workload, run through the real
//! driver with full invariant checks after every step.

use sim::driver::{self, CheckLevel, RunOutput};
use sim::experiment::SimConfig;
use sim::policies::{PolicyOptions, PredictorMode};
use sim::time::{SimTime, VirtualClock};
use sim::workload::{AgentProgram, PauseProgram, TurnProgram, Workload};
use sim::{backend::SimGpu, PolicyKind};
use traces::{SwapRecord, TurnRecord};

fn run_with(
    policy: PolicyKind,
    predictor: PredictorMode,
    agents: Vec<AgentProgram>,
    gpu_blocks: u32,
    host_blocks: u32,
) -> RunOutput {
    let workload = Workload {
        name: "tiny".into(),
        max_context_tokens: 4096,
        agents,
    };
    let mut config = SimConfig::new(policy, calibration::load_profile("h100-llama2-7b").unwrap());
    config.check = CheckLevel::Full;
    // The hand-built timelines assume each prompt prefills in one step (e.g. two agents pausing
    // together); the batch policy is not what these tests are about.
    config.sched.batching = sim::BatchPolicy::Fill;
    let mut settings = config.settings();
    settings.gpu_blocks = gpu_blocks;
    settings.host_blocks = host_blocks;
    let mut scheduler = policy.build_with(PolicyOptions { predictor }, &workload);
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

fn run(
    policy: PolicyKind,
    agents: Vec<AgentProgram>,
    gpu_blocks: u32,
    host_blocks: u32,
) -> RunOutput {
    run_with(policy, PredictorMode::Hint, agents, gpu_blocks, host_blocks)
}

/// (new tokens, generated tokens, pause s, hint s)
type Turn = (u32, u32, Option<(f64, f64)>);

fn agent(id: u32, arrival_s: f64, turns: &[Turn]) -> AgentProgram {
    AgentProgram {
        agent_id: id,
        prefix: None,
        arrival: SimTime::from_secs_f64(arrival_s),
        turns: turns
            .iter()
            .map(|&(new_tokens, generated_tokens, pause)| TurnProgram {
                new_tokens,
                generated_tokens,
                pause_after: pause.map(|(p, h)| PauseProgram {
                    true_ns: SimTime::from_secs_f64(p).as_nanos(),
                    hint_ns: Some(SimTime::from_secs_f64(h).as_nanos()),
                }),
                context_tokens: None,
            })
            .collect(),
    }
}

fn exact(new_tokens: u32, generated: u32, pause_s: f64) -> Turn {
    (new_tokens, generated, Some((pause_s, pause_s)))
}

fn turn(out: &RunOutput, agent: u32, index: u32) -> &TurnRecord {
    out.turns
        .iter()
        .find(|t| t.agent_id == agent && t.turn_index == index)
        .unwrap_or_else(|| panic!("no turn {agent}/{index}"))
}

fn swaps<'a>(out: &'a RunOutput, agent: u32, direction: &str) -> Vec<&'a SwapRecord> {
    out.swaps
        .iter()
        .filter(|s| s.agent_id == agent && s.direction == direction)
        .collect()
}

fn restore_ns(t: &TurnRecord) -> u64 {
    analysis::decompose(t).unwrap().kv_restore_ns
}

#[test]
fn infercept_swaps_the_costliest_pause_within_its_per_iteration_budget_and_preserves_a_short_one() {
    // Agent 0: 1000-token context paused 60 s (preserving wastes most); agent 1: 320 tokens
    // paused 5 ms (preserving wastes less than recomputing). One iteration moves ~30 blocks.
    let out = run(
        PolicyKind::InferCept,
        vec![
            agent(0, 0.0, &[exact(990, 10, 60.0), (10, 10, None)]),
            agent(1, 0.0, &[exact(310, 10, 0.005), (10, 10, None)]),
        ],
        1000,
        1000,
    );
    let outs = swaps(&out, 0, "out");
    let total_blocks: u32 = outs.iter().map(|s| s.block_count).sum();
    assert!(
        outs.len() >= 2,
        "the long pause goes out over several iterations, tail first: {outs:?}"
    );
    assert!(outs[0].block_count < 63 && total_blocks == 63, "{outs:?}");
    assert_eq!(turn(&out, 0, 1).kv_source, "swapped_in");
    assert!(
        swaps(&out, 1, "out").is_empty(),
        "the short pause is preserved"
    );
    assert_eq!(turn(&out, 1, 1).kv_source, "resident");
}

#[test]
fn infercept_h_preserves_swaps_or_drops_by_static_thresholds() {
    let program = |p: f64| [exact(300, 10, p), (10, 10, None)];
    let out = run(
        PolicyKind::InferCeptH,
        vec![
            agent(0, 0.0, &program(2.0)),
            agent(1, 0.0, &program(5.0)),
            agent(2, 0.0, &program(10.0)),
        ],
        1000,
        1000,
    );
    assert_eq!(turn(&out, 0, 1).kv_source, "resident");
    assert_eq!(turn(&out, 1, 1).kv_source, "swapped_in");
    assert_eq!(turn(&out, 2, 1).kv_source, "recomputed");
}

#[test]
fn continuum_fixed_pins_for_two_seconds_and_continuum_cold_start_does_not_pin_cheap_contexts() {
    let programs = || {
        vec![
            agent(0, 0.0, &[exact(300, 10, 1.0), (10, 10, None)]),
            agent(1, 0.0, &[exact(300, 10, 3.0), (10, 10, None)]),
        ]
    };
    let fixed = run(PolicyKind::ContinuumFixed, programs(), 1000, 0);
    assert_eq!(
        turn(&fixed, 0, 1).kv_source,
        "resident",
        "back within the 2 s TTL: still pinned"
    );
    assert_eq!(
        turn(&fixed, 1, 1).kv_source,
        "partial_recompute",
        "TTL expired: released to the prefix cache, the partial tail block recomputed"
    );
    // Cold start: B = Tq (0) + R(310 tokens) is far below 1 s, so tau* = 0: released at once.
    let cdf = run(PolicyKind::Continuum, programs(), 1000, 0);
    assert_eq!(turn(&cdf, 0, 1).kv_source, "partial_recompute");
}

#[test]
fn autellix_admits_the_agent_with_less_attained_service_first() {
    // Pool of 40 blocks. Agent 0 runs a 100-token turn and comes back at once; agent 2 then holds
    // most of the pool for ~1 s; agent 1 (no service yet) arrives meanwhile. When agent 2 ends,
    // only one of agents 0 and 1 fits.
    let agents = || {
        vec![
            agent(0, 0.0, &[exact(250, 100, 0.01), (10, 10, None)]),
            agent(1, 0.6, &[(300, 10, None)]),
            agent(2, 0.001, &[(300, 200, None)]),
        ]
    };
    let out = run(
        PolicyKind::Autellix(sim::policies::Placement::Vllm),
        agents(),
        40,
        0,
    );
    let (a0, a1) = (turn(&out, 0, 1), turn(&out, 1, 0));
    assert!(a1.arrival_ns > a0.arrival_ns);
    assert!(
        a1.admitted_ns.unwrap() < a0.admitted_ns.unwrap(),
        "least attained service goes first: {a0:?} {a1:?}"
    );
    let fcfs = run(
        PolicyKind::Autellix(sim::policies::Placement::Swap),
        agents(),
        40,
        100,
    );
    assert!(
        turn(&fcfs, 1, 0).admitted_ns.unwrap() < turn(&fcfs, 0, 1).admitted_ns.unwrap(),
        "ordering holds with swap placement"
    );
    assert!(
        !swaps(&fcfs, 0, "out").is_empty(),
        "swap placement copies the paused KV out"
    );
    let vllm = run(PolicyKind::Vllm, agents(), 40, 0);
    assert!(
        turn(&vllm, 0, 1).admitted_ns.unwrap() < turn(&vllm, 1, 0).admitted_ns.unwrap(),
        "vllm is first come, first served"
    );
}

#[test]
fn next_use_offloads_only_pauses_that_hide_a_round_trip_and_prefetches_them() {
    let out = run(
        PolicyKind::NextUse,
        vec![
            agent(0, 0.0, &[exact(300, 10, 0.002), (10, 10, None)]),
            agent(1, 0.0, &[exact(300, 10, 5.0), (10, 10, None)]),
        ],
        1000,
        1000,
    );
    assert!(
        out.swaps.iter().all(|s| s.agent_id == 1),
        "a 2 ms pause does not hide a round trip: kept"
    );
    assert_eq!(turn(&out, 0, 1).kv_source, "resident");
    let back = turn(&out, 1, 1);
    assert_eq!(back.kv_source, "swapped_in");
    assert_eq!(
        restore_ns(back),
        0,
        "prefetched before the predicted return: {back:?}"
    );
}

#[test]
fn next_use_evicts_the_furthest_predicted_return_first() {
    // Pool 60 blocks; two paused agents of 20 blocks each are kept (no host: nothing offloads),
    // then a 30-block turn arrives: one must go, the one predicted back last.
    let out = run(
        PolicyKind::NextUse,
        vec![
            agent(0, 0.0, &[exact(310, 10, 3.0), (10, 10, None)]),
            agent(1, 0.0, &[exact(310, 10, 9.0), (10, 10, None)]),
            agent(2, 1.0, &[(460, 10, None)]),
        ],
        60,
        0,
    );
    assert_eq!(turn(&out, 0, 1).kv_source, "resident");
    assert_eq!(turn(&out, 1, 1).kv_source, "recomputed");
}

#[test]
fn djinn_true_pauses_prefetches_on_the_true_return_when_hints_are_wrong() {
    // The hint says 15 s, the pause is 5 s: djinn prefetches too late; told the truth it does not.
    let program = [(300, 20, Some((5.0, 15.0))), (40, 20, None)];
    let agents = || vec![agent(0, 0.0, &program), agent(1, 0.0, &program)];
    let djinn = run(PolicyKind::Djinn, agents(), 45, 100);
    let told = run(PolicyKind::DjinnTruePauses, agents(), 45, 100);
    assert_eq!(djinn.turns.len(), told.turns.len());
    assert!(
        restore_ns(turn(&djinn, 0, 1)) > 0,
        "djinn trusted the wrong hint"
    );
    for a in 0..2 {
        assert_eq!(turn(&told, a, 1).kv_source, "swapped_in");
        assert_eq!(restore_ns(turn(&told, a, 1)), 0);
    }
}

#[test]
fn predictor_modes_change_what_djinn_believes() {
    // Under pressure with an exact hint djinn swaps at pause start; with predictions off it has
    // nothing to time a prefetch by and keeps the KV.
    let program = [exact(300, 20, 5.0), (40, 20, None)];
    let agents = || vec![agent(0, 0.0, &program), agent(1, 0.0, &program)];
    let hinted = run_with(PolicyKind::Djinn, PredictorMode::Hint, agents(), 45, 100);
    assert_eq!(turn(&hinted, 0, 1).kv_source, "swapped_in");
    let off = run_with(PolicyKind::Djinn, PredictorMode::Off, agents(), 45, 100);
    assert_eq!(turn(&off, 0, 1).kv_source, "resident");
    // EWMA has no history for a first pause either: same as off here.
    let ewma = run_with(PolicyKind::Djinn, PredictorMode::Ewma, agents(), 45, 100);
    assert_eq!(turn(&ewma, 0, 1).kv_source, "resident");
}

#[test]
fn vllm_noapc_recomputes_every_return() {
    let out = run(
        PolicyKind::VllmNoApc,
        vec![agent(0, 0.0, &[exact(300, 10, 0.5), (10, 10, None)])],
        1000,
        0,
    );
    assert_eq!(turn(&out, 0, 1).kv_source, "recomputed");
    let apc = run(
        PolicyKind::Vllm,
        vec![agent(0, 0.0, &[exact(300, 10, 0.5), (10, 10, None)])],
        1000,
        0,
    );
    assert_eq!(turn(&apc, 0, 1).kv_source, "partial_recompute");
}

#[test]
fn offline_evicts_the_true_last_return_whatever_the_hints_say() {
    // As above, but the hints are swapped: agent 0 is told 9 s and returns after 3 s, agent 1 is
    // told 3 s and returns after 9 s. Online policies believe the hints and drop agent 0; the
    // offline reference reads the future and drops agent 1.
    let agents = || {
        vec![
            agent(0, 0.0, &[(310, 10, Some((3.0, 9.0))), (10, 10, None)]),
            agent(1, 0.0, &[(310, 10, Some((9.0, 3.0))), (10, 10, None)]),
            agent(2, 1.0, &[(460, 10, None)]),
        ]
    };
    let next_use = run(PolicyKind::NextUse, agents(), 60, 0);
    assert_eq!(turn(&next_use, 0, 1).kv_source, "recomputed");
    let offline = run(PolicyKind::Offline, agents(), 60, 0);
    assert_eq!(turn(&offline, 0, 1).kv_source, "resident");
    assert_eq!(turn(&offline, 1, 1).kv_source, "recomputed");
}

#[test]
fn offline_keeps_while_the_known_future_fits_and_prefetches_by_the_true_return() {
    // Two agents of 20 blocks on 100 GPU blocks: nothing else ever arrives, so the offline
    // reference keeps both pauses (no copy at all) even though they are long.
    let quiet = run(
        PolicyKind::Offline,
        vec![
            agent(0, 0.0, &[exact(310, 10, 20.0), (10, 10, None)]),
            agent(1, 0.0, &[exact(310, 10, 20.0), (10, 10, None)]),
        ],
        100,
        100,
    );
    assert!(quiet.swaps.is_empty(), "{:?}", quiet.swaps);
    // A 60-block turn arrives during the pauses of two 20-block agents on a 70-block pool: the
    // known future does not fit, so each swaps out at pause start (the round trip fits in the
    // 20 s pause) and is back, prefetched, before its return.
    let busy = run(
        PolicyKind::Offline,
        vec![
            agent(0, 0.0, &[(310, 10, Some((20.0, 1.0))), (10, 10, None)]),
            agent(1, 0.0, &[(310, 10, Some((20.0, 1.0))), (10, 10, None)]),
            agent(2, 5.0, &[(950, 10, None)]),
        ],
        70,
        100,
    );
    for a in 0..2 {
        assert_eq!(swaps(&busy, a, "out").len(), 1);
        let back = turn(&busy, a, 1);
        assert_eq!(back.kv_source, "swapped_in");
        assert_eq!(restore_ns(back), 0, "prefetched before the true return");
    }
}
