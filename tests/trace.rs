//! `djinn trace`: a run directory becomes a Chrome trace-event timeline with one slice per step on
//! the engine's step track, one per swap on its direction's track, and per-agent phases; a folder
//! that is not a run directory exits 2.

mod common;
use common::{djinn, fails_with, temp};

#[test]
fn a_simulated_run_becomes_a_timeline_with_every_step_and_swap() {
    let out = temp("trace", "run");
    let status = djinn()
        .args([
            "simulate",
            "-w",
            "seed-cliff",
            "-p",
            "swap",
            "--agents",
            "90",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let run = out.join("seed-cliff").join("swap");
    let trace_path = out.join("trace.json");
    let result = djinn()
        .arg("trace")
        .arg(&run)
        .args(["--agents", "10", "-o"])
        .arg(&trace_path)
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let trace: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace_path).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    let slices = |pid: u64, tid: u64| {
        events
            .iter()
            .filter(|e| e["ph"] == "X" && e["pid"] == pid && e["tid"] == tid)
            .count()
    };
    let lines = |file: &str| {
        std::fs::read_to_string(run.join(file))
            .unwrap()
            .lines()
            .count()
            - 1
    };
    let swaps_in = std::fs::read_to_string(run.join("swaps.csv"))
        .unwrap()
        .lines()
        .filter(|l| l.contains(",in,"))
        .count();
    assert_eq!(slices(1, 1), lines("steps.csv"));
    assert!(swaps_in > 0, "90 agents under swap must swap");
    assert_eq!(slices(1, 2), swaps_in);
    assert_eq!(slices(1, 2) + slices(1, 3), lines("swaps.csv"));
    // Agent tracks: only agents 0..10, each with its phases, none of negative length.
    let agent_tids: std::collections::BTreeSet<u64> = events
        .iter()
        .filter(|e| e["ph"] == "X" && e["pid"] == 2)
        .map(|e| e["tid"].as_u64().unwrap())
        .collect();
    assert_eq!(agent_tids, (1..=10).collect());
    assert!(events
        .iter()
        .filter(|e| e["ph"] == "X")
        .all(|e| e["dur"].as_f64().unwrap() >= 0.0));
    for phase in ["prefill", "decode", "pause"] {
        assert!(
            events.iter().any(|e| e["pid"] == 2 && e["name"] == phase),
            "no `{phase}` slice"
        );
    }
    assert_eq!(trace["otherData"]["policy"], "swap");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn trace_of_a_folder_that_is_not_a_run_directory_exits_2() {
    let dir = temp("trace", "empty");
    std::fs::create_dir_all(&dir).unwrap();
    fails_with(&["trace", dir.to_str().unwrap()], "not a run directory");
    let _ = std::fs::remove_dir_all(&dir);
}
