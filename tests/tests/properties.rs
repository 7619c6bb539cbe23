//! Property tests: random workloads and configurations under every shipped policy, checked after
//! every step (the run loop's `CheckLevel::Full`) and on the records (capacity, ownership,
//! residency, conservation, liveness, fairness); and the canaries that prove the checks bite.
//!
//! A failure prints the proptest seed, the shrunk case, the simulation seed and a one-line
//! `djinn simulate` command (spec and profile written to a temporary folder) that reruns it.

use std::cell::RefCell;
use std::time::Instant;

use djinn_tests::canary;
use djinn_tests::case::{case_strategy, Case, GpuPool};
use djinn_tests::check::{check_policy, PolicyUnderTest, RunFacts, FAIRNESS_WAIT_MULTIPLE};
use djinn_tests::env;
use proptest::strategy::Strategy;
use proptest::test_runner::{TestCaseError, TestError, TestRunner};
use traces::workload::{AgentSpec, Arrival, Distribution, HintSpec, WorkloadSpec};

/// Cases per property in CI (`DJINN_PROPTEST_CASES` raises it for a soak).
const CI_CASES: u32 = 64;

/// Runs a property with the shared configuration and panics with a reproducible report.
fn run_property<S: Strategy>(
    name: &str,
    default_cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), String>,
) where
    S::Value: std::fmt::Debug,
{
    let config = env::proptest_config(default_cases);
    let cases = config.cases;
    let mut runner = TestRunner::new(config);
    let started = Instant::now();
    let result = runner.run(&strategy, |value| test(value).map_err(TestCaseError::fail));
    eprintln!(
        "{name}: {cases} cases in {:.1} s (proptest seed {})",
        started.elapsed().as_secs_f64(),
        env::proptest_seed()
    );
    if let Err(e) = result {
        panic!(
            "property `{name}` failed.\n  rerun this property: DJINN_PROPTEST_SEED={} DJINN_PROPTEST_CASES={cases} cargo test -p djinn-tests --test properties {name}\n{e}",
            env::proptest_seed()
        );
    }
}

#[derive(Default, Debug)]
struct Observed {
    runs: u64,
    steps: u64,
    turns: u64,
    rejected: u64,
    fitting_cases: u64,
    worst_latency_over_bound: f64,
    worst_wait_over_mean: f64,
}

impl Observed {
    fn add(&mut self, facts: &RunFacts) {
        self.runs += 1;
        self.steps += facts.steps;
        self.turns += facts.turns_finished;
        self.rejected += facts.turns_rejected;
        self.worst_latency_over_bound = self
            .worst_latency_over_bound
            .max(facts.max_latency_over_bound);
        if facts.mean_wait_ns > 0 {
            self.worst_wait_over_mean = self
                .worst_wait_over_mean
                .max(facts.max_wait_ns as f64 / facts.mean_wait_ns as f64);
        }
    }
}

#[test]
fn every_shipped_policy_keeps_every_invariant() {
    let policies = PolicyUnderTest::all_shipped();
    let observed = RefCell::new(Observed::default());
    run_property(
        "every_shipped_policy_keeps_every_invariant",
        CI_CASES,
        case_strategy(),
        |case: Case| {
            let m = case.materialize();
            if m.fits() {
                observed.borrow_mut().fitting_cases += 1;
            }
            for put in &policies {
                let facts = check_policy(&case, &m, put)?;
                observed.borrow_mut().add(&facts);
            }
            Ok(())
        },
    );
    let o = observed.into_inner();
    eprintln!("observed: {o:?}");
    assert!(o.runs > 0 && o.steps > 0, "the property ran nothing: {o:?}");
}

// ----- canaries -----

/// A case built by hand: every agent the same program, arrivals listed.
fn fixed_case(
    arrivals_s: Vec<f64>,
    turns: u32,
    prompt: u32,
    generated: u32,
    pause_s: f64,
    gpu_pool: GpuPool,
) -> Case {
    let constant = |value: f64| Distribution::Constant { value };
    Case {
        spec: WorkloadSpec {
            schema_version: traces::SCHEMA_VERSION,
            name: "canary".into(),
            description: String::new(),
            agents: arrivals_s.len() as u32,
            max_context_tokens: 4096,
            arrival: Arrival::Explicit {
                times_s: arrivals_s.clone(),
            },
            agent: AgentSpec {
                turns: constant(turns as f64),
                first_prompt_tokens: constant(prompt as f64),
                new_tokens: constant(16.0),
                generated_tokens: constant(generated as f64),
                pause_s: constant(pause_s),
            },
            hint: HintSpec::Exact,
            replay: None,
            background: None,
            prefix_groups: Vec::new(),
        },
        agents: arrivals_s.len() as u32,
        seed: 7,
        block_size_tokens: 16,
        gpu_pool,
        host_fill: 1.0,
        pcie_bytes_per_s: 25e9,
        max_batch_tokens: 8192,
        batching: sim::BatchPolicy::default(),
    }
}

fn canary(name: &str) -> PolicyUnderTest {
    canary::all()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no canary {name}"))
}

fn expect_caught(case: &Case, put: &PolicyUnderTest, phrase: &str) {
    let m = case.materialize();
    match check_policy(case, &m, put) {
        Ok(facts) => panic!(
            "canary {} passed every check ({facts:?}): the harness is broken",
            put.name
        ),
        Err(message) => {
            assert!(
                message.contains(phrase),
                "canary {} was caught, but not for `{phrase}`:\n{message}",
                put.name
            );
            assert!(
                message.contains("reproduce with: cargo run --release -- simulate --workload "),
                "{message}"
            );
            assert!(
                message.contains(&format!("seed {}", case.seed)),
                "{message}"
            );
        }
    }
}

#[test]
fn canary_computing_on_host_kv_is_caught_by_the_residency_check() {
    let case = fixed_case(vec![0.0], 2, 64, 4, 1.0, GpuPool::Fits(1.0));
    expect_caught(
        &case,
        &canary("canary-computes-on-host"),
        "ordered to compute while its KV is",
    );
}

#[test]
fn canary_overcommitting_memory_is_caught_by_the_capacity_check() {
    let case = fixed_case(vec![0.0, 0.0, 0.0, 0.0], 1, 256, 8, 0.0, GpuPool::Fits(0.0));
    expect_caught(&case, &canary("canary-overcommits"), "GPU pool exhausted");
}

#[test]
fn canary_starving_an_agent_is_caught_by_termination() {
    let case = fixed_case(vec![0.0, 0.5], 2, 64, 4, 0.01, GpuPool::Fits(1.0));
    expect_caught(&case, &canary("canary-starves-agent-0"), "run error");
}

#[test]
fn canary_serving_last_come_first_is_caught_by_the_fairness_check() {
    // One agent fits the pool at a time. Measure one turn's service time alone, then let a new
    // agent arrive a quarter of that before each completion: last come, first served always
    // picks the newcomer, and the second agent waits for the whole stream.
    let lone = fixed_case(vec![0.0], 1, 200, 20, 0.0, GpuPool::Fits(0.0));
    let m = lone.materialize();
    let out =
        djinn_tests::check::run_policy(&lone, &m, &PolicyUnderTest::shipped(sim::PolicyKind::Pin))
            .expect("a lone agent runs");
    let service_s = out.turns[0].finished_ns.expect("finished") as f64 / 1e9;
    let stream = 60;
    let mut arrivals = vec![0.0, service_s / 8.0];
    arrivals.extend((1..=stream).map(|k| k as f64 * service_s - service_s / 4.0));
    let case = fixed_case(arrivals, 1, 200, 20, 0.0, GpuPool::Fits(0.0));
    expect_caught(
        &case,
        &canary("canary-lcfs"),
        &format!("more than {FAIRNESS_WAIT_MULTIPLE} x the mean wait"),
    );
    // The same stream under first come, first served passes: the check is about order, not load.
    let m = case.materialize();
    check_policy(&case, &m, &PolicyUnderTest::shipped(sim::PolicyKind::Pin))
        .unwrap_or_else(|e| panic!("pin on the fairness stream: {e}"));
}

#[test]
fn shrinking_reduces_a_canary_failure_to_a_small_case_with_its_command() {
    let put = canary("canary-computes-on-host");
    let mut runner = TestRunner::new(env::proptest_config(64));
    let result = runner.run(&case_strategy(), |case: Case| {
        let m = case.materialize();
        check_policy(&case, &m, &put)
            .map(|_| ())
            .map_err(TestCaseError::fail)
    });
    match result {
        Ok(()) => panic!(
            "the canary passed {} random cases: the harness is broken",
            runner.config().cases
        ),
        Err(TestError::Abort(why)) => panic!("proptest aborted: {why}"),
        Err(TestError::Fail(reason, minimal)) => {
            let m = minimal.materialize();
            let turns: usize = m.workload.agents.iter().map(|a| a.turns.len()).sum();
            eprintln!(
                "canary shrunk to {} agents, {turns} turns: {reason}",
                m.workload.agents.len()
            );
            // The fault needs one agent with two turns: shrinking must get close to that.
            assert!(
                m.workload.agents.len() <= 2,
                "shrunk case still has {} agents: {minimal:?}",
                m.workload.agents.len()
            );
            assert!(
                turns <= 4,
                "shrunk case still has {turns} turns: {minimal:?}"
            );
            let reason = reason.to_string();
            assert!(
                reason.contains("reproduce with: cargo run --release -- simulate")
                    && reason.contains(&format!("--seed {}", minimal.seed)),
                "{reason}"
            );
        }
    }
}
