//! Turn-by-turn replay with compacting agents under every policy: the run loop's full checks
//! (KV audit and token conservation after every step) hold, a compacted turn prefills its new
//! tokens without counting the obsolete history as recomputed, and a memory-short run (where
//! swaps are in flight when compacting turns arrive) finishes every turn.

use std::path::Path;

use sim::driver::CheckLevel;
use sim::experiment::{simulate, SimConfig};
use sim::PolicyKind;
use traces::WorkloadSpec;

/// Two sessions; agent `a` compacts twice (turns 2 and 4), `b` drops hidden reasoning once.
/// The pauses before turns a2 and b1 are shorter than a swap of their contexts, so a policy
/// that swaps out at the pause start still moves the KV when the compacting turn arrives.
const TURNS: &str = "session,turn,new_tokens,output_tokens,pause_s,context_tokens\n\
a,0,1900,40,0.05,\n\
a,1,300,40,0.004,\n\
a,2,200,30,0.02,400\n\
a,3,500,30,3.0,\n\
a,4,100,20,,150\n\
b,0,1700,50,0.003,\n\
b,1,120,60,0.01,850\n\
b,2,80,20,,\n";

fn spec(dir: &Path) -> WorkloadSpec {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("turns.csv"), TURNS).unwrap();
    let text =
        "schema_version = 1\nname = \"compacting\"\nagents = 12\nmax_context_tokens = 4096\n\
                [arrival]\nkind = \"ramp\"\nramp_s = 2.0\n\
                [replay]\nformat = \"turns\"\npath = \"turns.csv\"\ncycle = true\n\
                [hint]\nkind = \"exact\"\n";
    let spec_path = dir.join("w.toml");
    std::fs::write(&spec_path, text).unwrap();
    let mut spec = WorkloadSpec::read(&spec_path).unwrap();
    sim::replay::resolve_trace_paths(&mut spec, &spec_path);
    spec
}

#[test]
fn compacting_agents_keep_every_invariant_under_every_policy() {
    let dir = std::env::temp_dir().join(format!("djinn-turns-replay-{}", std::process::id()));
    let spec = spec(&dir);
    let profile = calibration::load_profile(calibration::DEFAULT_PROFILE).unwrap();
    for utilization in [0.9, 0.18] {
        for policy in PolicyKind::ALL {
            let mut config = SimConfig::new(policy, profile.clone());
            config.gpu_memory_utilization = utilization;
            config.check = CheckLevel::Full;
            let (workload, out) = simulate(&spec, None, &config)
                .unwrap_or_else(|e| panic!("{} at {utilization}: {e}", policy.name()));
            let done = out.turns.iter().filter(|t| t.finished_ns.is_some()).count();
            let rejected = out.turns.iter().filter(|t| t.rejected).count();
            assert_eq!(done + rejected, out.turns.len(), "{}", policy.name());
            assert_eq!(workload.turn_count() as usize, 12 / 2 * 8);
            for t in out.turns.iter().filter(|t| t.finished_ns.is_some()) {
                let program = &workload.agents[t.agent_id as usize];
                let turn = program.turns[t.turn_index as usize];
                if turn.context_tokens.is_some() {
                    // The new tokens are computed once; the old history beyond the kept prefix
                    // is neither computed again nor counted as a recompute of lost KV.
                    assert!(
                        t.tokens_prefilled >= turn.new_tokens
                            && t.tokens_prefilled < turn.new_tokens + turn.generated_tokens,
                        "{}: {t:?}",
                        policy.name()
                    );
                    assert!(t.context_tokens_at_admit <= turn.context_tokens.unwrap());
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
