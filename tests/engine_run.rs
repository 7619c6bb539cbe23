//! `djinn engine run` on the CPU engine (tiny model): the simulator's run loop drives the real
//! forward and swap engine on a wall clock and writes complete run directories whose swap records
//! are the swap engine's own measurements; bad flags exit 2 with a message naming the flag.

use std::path::Path;
mod common;
use common::{djinn, fails_with, temp};

fn workload() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/engine-run-tiny.toml")
        .to_str()
        .unwrap()
        .to_string()
}

/// `djinn engine run --backend cpu --compare-sim` of `workload` with blocks of 4 tokens and a
/// 40-block GPU pool; returns its stdout after checking it succeeded.
fn run_cpu_engine(
    workload: &str,
    model: &str,
    policies: &[&str],
    host_blocks: &str,
    out_dir: &Path,
) -> String {
    let mut args = vec![
        "engine",
        "run",
        "--backend",
        "cpu",
        "--model",
        model,
        "-w",
        workload,
    ];
    for p in policies {
        args.extend(["-p", p]);
    }
    args.extend([
        "--block-size",
        "4",
        "--gpu-kv-blocks",
        "40",
        "--host-kv-blocks",
        host_blocks,
        "--compare-sim",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let out = djinn().args(&args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn engine_run_on_the_cpu_engine_writes_run_directories_with_measured_swaps() {
    let out_dir = temp("engine-run", "good");
    let w = workload();
    // 6 agents need up to 90 blocks of 4 tokens; a 40-block pool makes paused agents leave.
    let stdout = run_cpu_engine(&w, "tiny", &["swap", "djinn"], "128", &out_dir);
    assert!(
        stdout.contains("REAL ENGINE") && stdout.contains("REAL vs SIMULATED"),
        "{stdout}"
    );
    assert!(stdout.contains("real/sim"), "{stdout}");
    for policy in ["swap", "djinn"] {
        let dir = out_dir.join("engine-run-tiny").join(policy);
        for file in traces::RUN_DIR_FILES {
            assert!(dir.join(file).is_file(), "{policy}/{file}");
        }
        for file in traces::RUN_DIR_FILES {
            assert!(
                out_dir
                    .join("engine-run-tiny")
                    .join(format!("{policy}.sim"))
                    .join(file)
                    .is_file(),
                "{policy}.sim/{file}"
            );
        }
        let manifest: traces::RunManifest = traces::read_json(&dir.join("manifest.json")).unwrap();
        assert_eq!(manifest.backend, "cpu");
        assert_eq!(manifest.policy, policy);
        assert!(manifest
            .reproduce
            .starts_with("djinn engine run --backend cpu"));
        let summary: traces::RunSummary = traces::read_json(&dir.join("summary.json")).unwrap();
        assert_eq!(summary.turns_total, 18);
        assert_eq!(summary.turns_completed, 18, "{policy}: every turn finishes");
        let turns: Vec<traces::TurnRecord> = traces::read_csv(&dir.join("turns.csv")).unwrap();
        assert_eq!(turns.len(), 18);
        assert!(turns.iter().all(|t| t.finished_ns.is_some()));
        let steps: Vec<traces::StepRecord> = traces::read_csv(&dir.join("steps.csv")).unwrap();
        assert!(!steps.is_empty());
        assert!(
            steps.iter().all(|s| s.duration_ns > 0),
            "measured step times"
        );
        assert!(
            steps
                .windows(2)
                .all(|w| w[1].start_ns >= w[0].start_ns + w[0].duration_ns),
            "{policy}: steps follow one another on the wall clock"
        );
        let swaps: Vec<traces::SwapRecord> = traces::read_csv(&dir.join("swaps.csv")).unwrap();
        let block_bytes: u64 = manifest.options["block_bytes"].parse().unwrap();
        for s in &swaps {
            assert!(s.bytes > 0, "{policy}: swap {} has no bytes", s.swap_id);
            assert_eq!(s.bytes, s.block_count as u64 * block_bytes);
            assert!(
                s.end_ns >= s.start_ns,
                "{policy}: swap {} ends before it starts",
                s.swap_id
            );
            assert!(s.concurrent_swaps_at_start >= 1);
            assert!(s.direction == "out" || s.direction == "in");
        }
        let outs = swaps.iter().filter(|s| s.direction == "out").count() as u64;
        let ins = swaps.len() as u64 - outs;
        assert_eq!(outs, summary.swaps_out);
        assert_eq!(ins, summary.swaps_in);
        if policy == "swap" {
            assert!(
                outs >= 6 && ins >= 6,
                "the swap policy swapped ({outs} out, {ins} in)"
            );
        }
    }
    let rows = std::fs::read_to_string(out_dir.join("engine-run-tiny/comparison.csv")).unwrap();
    assert_eq!(rows.lines().count(), 3, "header + one row per policy");
    std::fs::remove_dir_all(&out_dir).unwrap();
}

#[test]
fn engine_run_rejects_bad_flags_with_exit_2_and_writes_nothing() {
    let out_dir = temp("engine-run", "bad");
    let out = out_dir.to_str().unwrap();
    let w = workload();
    let base = [
        "engine",
        "run",
        "--backend",
        "cpu",
        "--out",
        out,
        "-w",
        w.as_str(),
    ];
    let with = |extra: &[&'static str]| -> Vec<String> {
        base.iter()
            .map(|s| s.to_string())
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    };
    let check = |extra: &[&'static str], needle: &str| {
        let args = with(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_with(&refs, needle);
    };
    check(&["--policy", "nope"], "unknown policy `nope`");
    check(&["--model", "nope"], "unknown model preset `nope`");
    check(&["--agents", "0"], "--agents");
    check(&["--gpu-kv-blocks", "0"], "--gpu-kv-blocks");
    check(&["--host-kv-gib", "0"], "--host-kv-gib");
    check(&["--block-size", "0"], "--block-size");
    check(&["--model", "llama2-7b"], "too large for the CPU backend");
    check(
        &["--swap-in-copy", "kernel"],
        "--swap-in-copy kernel needs --backend cuda",
    );
    check(
        &["--gpu-kv-blocks", "4", "--gpu-kv-gib", "1"],
        "--gpu-kv-gib",
    );
    check(&["--weights", "/no/such/weights"], "/no/such/weights");
    check(
        &["--swap-in-rate-cap-gbps", "0"],
        "--swap-in-rate-cap-gbps must be a finite number of GB/s > 0",
    );
    check(
        &["--swap-out-rate-cap-gbps", "nan"],
        "--swap-out-rate-cap-gbps must be a finite number of GB/s > 0",
    );
    check(
        &["--swap-in-rate-cap-gbps", "30"],
        "--swap-in-rate-cap-gbps needs --backend cuda",
    );
    fails_with(
        &[
            "engine",
            "run",
            "--backend",
            "cpu",
            "--out",
            out,
            "-w",
            "nope",
        ],
        "unknown workload `nope`",
    );
    if !cfg!(feature = "cuda") {
        fails_with(
            &[
                "engine",
                "run",
                "--backend",
                "cuda",
                "--out",
                out,
                "-w",
                w.as_str(),
            ],
            "built without the CUDA backend",
        );
    }
    assert!(!out_dir.exists(), "nothing written for bad input");
}

/// Prefix hits of a run directory: first turns admitted with KV already covering part of their
/// prompt (a first turn has none of its own), and the tokens covered.
fn prefix_hits(dir: &Path) -> (usize, u64) {
    let turns: Vec<traces::TurnRecord> = traces::read_csv(&dir.join("turns.csv")).unwrap();
    assert!(turns.iter().all(|t| t.finished_ns.is_some() && !t.rejected));
    let hits: Vec<u64> = turns
        .iter()
        .filter(|t| t.turn_index == 0 && t.context_tokens_at_admit > 0)
        .map(|t| t.context_tokens_at_admit as u64)
        .collect();
    (hits.len(), hits.iter().sum())
}

#[test]
fn engine_run_executes_shared_prefix_blocks_and_agrees_with_its_twin_on_prefix_hits() {
    let out_dir = temp("engine-run", "shared");
    let w = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/engine-run-shared.toml")
        .to_str()
        .unwrap()
        .to_string();
    let stdout = run_cpu_engine(&w, "tiny-gqa", &["djinn", "vllm", "swap"], "64", &out_dir);
    assert!(stdout.contains("prefix hits"), "{stdout}");
    let root = out_dir.join("engine-run-shared");
    for policy in ["djinn", "vllm", "swap"] {
        let real = prefix_hits(&root.join(policy));
        let sim = prefix_hits(&root.join(format!("{policy}.sim")));
        // 4 of the 6 agents share the 16-token prefix (4 full blocks of 4 tokens) and arrive
        // 200 ms apart (a prefill takes a few ms): the first computes it, the other three hit it.
        assert_eq!(real, (3, 48), "{policy}: real prefix hits");
        assert_eq!(real, sim, "{policy}: real vs simulated prefix hits");
        let summary: traces::RunSummary =
            traces::read_json(&root.join(policy).join("summary.json")).unwrap();
        assert_eq!(summary.turns_completed, 18, "{policy}");
    }
    std::fs::remove_dir_all(&out_dir).unwrap();
}
