//! `djinn calibrate validate-suite` on the CPU engine with the tiny preset and the default
//! workloads shrunk to seconds (the plumbing, not the accuracy): every workload x policy runs on
//! the engine and beside its simulation, the table and the kept run directories are written, the
//! summary lands in the profile, and a resumed suite reuses the runs and reproduces the table.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn shipped_fitted() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("calibration/profiles/h100-llama2-7b-fitted.json")
}

fn suite(profile: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    djinn()
        .args([
            "calibrate",
            "validate-suite",
            "--backend",
            "cpu",
            "--profile",
        ])
        .arg(profile)
        .args([
            "--agents",
            "2",
            "--turns-scale",
            "0.05",
            "--time-scale",
            "0.01",
        ])
        .args(["--token-scale", "0.0625", "--gpu-kv-blocks", "64"])
        .args(["--host-kv-blocks", "256", "--out"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_tiny_cpu_suite_writes_the_table_keeps_the_runs_and_records_the_summary() {
    let dir = temp("calibrate-suite", "tiny");
    std::fs::create_dir_all(&dir).unwrap();
    let profile = dir.join("fitted.json");
    std::fs::copy(shipped_fitted(), &profile).unwrap();
    let out = dir.join("suite");
    let record = ["--record-into", profile.to_str().unwrap()];
    let first = suite(&profile, &out, &record);
    assert!(first.status.success(), "{}", text(&first));

    let csv = std::fs::read_to_string(out.join("validation-suite.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    for column in [
        "latency_ms_p50_real",
        "latency_ms_p99_sim",
        "ttft_ms_p50_real",
        "ttft_ms_p99_sim",
        "throughput_tok_s_real",
        "swaps_out_sim",
        "drops_real",
        "p50_error",
        "p99_error",
        "ranking_identical",
        "run_dir",
    ] {
        assert!(header.contains(&column), "{column} missing: {header:?}");
    }
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    // Five workloads of different shapes x three policies.
    assert_eq!(rows.len(), 15, "{csv}");
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let workloads: std::collections::BTreeSet<&str> = rows.iter().map(|r| r[0]).collect();
    assert_eq!(workloads.len(), 5, "{workloads:?}");
    for r in &rows {
        // The error column is the latency columns' relative difference, not another figure.
        let (real, sim): (f64, f64) = (
            r[col("latency_ms_p50_real")].parse().unwrap(),
            r[col("latency_ms_p50_sim")].parse().unwrap(),
        );
        let e: f64 = r[col("p50_error")].parse().unwrap();
        assert!((e - (sim - real) / real).abs() < 1e-9, "{r:?}");
        let run = Path::new(r[col("run_dir")]);
        for file in ["manifest.json", "steps.csv", "swaps.csv", "summary.json"] {
            assert!(run.join(file).is_file(), "{} lacks {file}", run.display());
        }
        assert_eq!(json(&run.join("manifest.json"))["policy"], r[1]);
    }
    let table = std::fs::read_to_string(out.join("validation-suite.txt")).unwrap();
    assert!(table.contains("overall: P50 within 3% on "), "{table}");
    assert!(table.contains("identical: "), "{table}");

    let recorded = json(&profile)["provenance"]["validation"].clone();
    assert_eq!(
        recorded["cells"].as_array().unwrap().len(),
        15,
        "{recorded}"
    );
    assert!(recorded["against"].as_str().unwrap().contains("tiny"));

    // The kept runs feed `calibrate validate` as they are.
    let seed_cliff = out.join("runs/seed-cliff");
    stdout_of_success(
        djinn()
            .args(["calibrate", "validate", "--profile"])
            .arg(&profile)
            .arg(&seed_cliff),
    );

    // Results and a recorded validation are never replaced silently.
    let again = suite(&profile, &out, &[]);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    let again = suite(&profile, &dir.join("other"), &record);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert!(text(&again).contains("provenance.validation is already set"));
    assert!(
        !dir.join("other/runs").exists(),
        "refused before any engine ran"
    );

    // Resuming keeps every run (no engine starts) and reproduces the table exactly.
    let resumed = suite(&profile, &out, &["--reuse-runs"]);
    assert!(resumed.status.success(), "{}", text(&resumed));
    assert_eq!(text(&resumed).matches("keeping the runs").count(), 5);
    assert_eq!(
        std::fs::read_to_string(out.join("validation-suite.csv")).unwrap(),
        csv
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn recording_into_another_profile_is_refused_before_the_engine_starts() {
    let dir = temp("calibrate-suite", "other-profile");
    std::fs::create_dir_all(&dir).unwrap();
    let other = dir.join("other.json");
    let analytic =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("calibration/profiles/h100-llama2-7b.json");
    std::fs::copy(analytic, &other).unwrap();
    let out = dir.join("suite");
    let run = suite(
        &shipped_fitted(),
        &out,
        &["--record-into", other.to_str().unwrap()],
    );
    assert_eq!(run.status.code(), Some(2), "{}", text(&run));
    assert!(
        text(&run).contains("not the profile under test"),
        "{}",
        text(&run)
    );
    assert!(!out.exists());
    fails_with(
        &[
            "calibrate",
            "validate-suite",
            "--backend",
            "cpu",
            "--profile",
            "h100-llama2-7b",
            "--time-scale",
            "0",
        ],
        "--time-scale must be a number in (0, 100]",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn capacity_at_an_slo_is_measured_real_beside_simulated() {
    let dir = temp("calibrate-suite", "capacity");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("suite");
    // seed-cliff under two policies at 1, 2 and 3 agents, with the SLO (and more) given.
    let capacity = |slo_and_more: &[&str]| {
        let mut words = vec![
            "--workload",
            "seed-cliff",
            "--policy",
            "djinn",
            "--policy",
            "vllm",
            "--capacity-agents",
            "1,2,3",
            "--capacity-slo-ms",
        ];
        words.extend_from_slice(slo_and_more);
        suite(&shipped_fitted(), &out, &words)
    };
    let run = capacity(&["1000000"]);
    assert!(run.status.success(), "{}", text(&run));
    let csv = std::fs::read_to_string(out.join("capacity.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    // Two policies x three agent counts, each a real run with its own directory.
    assert_eq!(rows.len(), 6, "{csv}");
    for r in &rows {
        let agents: u32 = r[col("agents")].parse().unwrap();
        let run = Path::new(r[col("run_dir")]);
        assert_eq!(json(&run.join("manifest.json"))["agents"], agents);
        assert!(run.starts_with(out.join(format!("capacity/agents-{agents}"))));
        // A generous SLO: every count passes on both sides.
        assert_eq!(
            (r[col("passes_real")], r[col("passes_sim")]),
            ("true", "true")
        );
    }
    let table = std::fs::read_to_string(out.join("validation-suite.txt")).unwrap();
    assert!(
        table.contains("capacity real     3, simulated     3"),
        "{table}"
    );
    assert!(
        table.contains("capacity identical on 2/2 policies"),
        "{table}"
    );

    // An SLO no run meets gives capacity 0 on both sides, from the same runs.
    let tight = capacity(&["0.001", "--reuse-runs"]);
    assert!(tight.status.success(), "{}", text(&tight));
    assert_eq!(text(&tight).matches("keeping the runs").count(), 4);
    let table = std::fs::read_to_string(out.join("validation-suite.txt")).unwrap();
    assert!(
        table.contains("capacity real     0, simulated     0"),
        "{table}"
    );
    fails_with(
        &[
            "calibrate",
            "validate-suite",
            "--backend",
            "cpu",
            "--profile",
            "h100-llama2-7b",
            "--capacity-slo-ms=0",
        ],
        "--capacity-slo-ms must be a number in (0, 86400000]",
    );
    let _ = std::fs::remove_dir_all(&dir);
}
