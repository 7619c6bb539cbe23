//! The `djinn` command line: bad input is a clear error with exit code 2 and no output; good input
//! writes complete run directories.

mod common;
use common::{djinn, fails_with, temp};

#[test]
fn bad_input_exits_2_names_the_problem_and_writes_nothing() {
    let out_dir = temp("cli", "bad");
    let out = out_dir.to_str().unwrap();
    fails_with(
        &["simulate", "--out", out, "--policy", "nope"],
        "unknown policy `nope`",
    );
    fails_with(
        &["simulate", "--out", out, "--workload", "nope"],
        "unknown workload `nope`",
    );
    fails_with(
        &[
            "simulate",
            "--out",
            out,
            "--profile",
            "/no/such/profile.json",
        ],
        "/no/such/profile.json",
    );
    fails_with(&["simulate", "--out", out, "--agents", "0"], "--agents");
    fails_with(&["simulate", "--out", out, "--seed", "-3"], "-3");
    let spec = temp("cli", "spec").with_extension("toml");
    let text = sim::experiment::shipped_workload("seed-exp1")
        .unwrap()
        .replace("low = 10.0", "low = -10.0");
    std::fs::write(&spec, text).unwrap();
    fails_with(
        &[
            "simulate",
            "--out",
            out,
            "--workload",
            spec.to_str().unwrap(),
        ],
        "agent.pause_s.low",
    );
    let profile = temp("cli", "profile").with_extension("json");
    std::fs::write(&profile, b"{\"schema_version\": 1, \"name\": 3}").unwrap();
    fails_with(
        &[
            "simulate",
            "--out",
            out,
            "--profile",
            profile.to_str().unwrap(),
        ],
        "line 1",
    );
    assert!(!out_dir.exists(), "no output may be written on bad input");
    let _ = std::fs::remove_file(spec);
    let _ = std::fs::remove_file(profile);
}

#[test]
fn simulate_writes_complete_run_directories_and_prints_the_table() {
    let out_dir = temp("cli", "good");
    let out = djinn()
        .args([
            "simulate",
            "-w",
            "seed-cliff",
            "-p",
            "pin",
            "-p",
            "djinn",
            "-n",
            "20",
            "--out",
            out_dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("p99 ms") && stdout.contains("djinn") && stdout.contains("pin"),
        "{stdout}"
    );
    for policy in ["pin", "djinn"] {
        for file in traces::RUN_DIR_FILES {
            assert!(
                out_dir.join("seed-cliff").join(policy).join(file).is_file(),
                "{policy}/{file}"
            );
        }
    }
    let rows = std::fs::read_to_string(out_dir.join("seed-cliff/comparison.csv")).unwrap();
    assert_eq!(rows.lines().count(), 3, "header + one row per policy");
    let manifest: traces::RunManifest =
        traces::read_json(&out_dir.join("seed-cliff/djinn/manifest.json")).unwrap();
    assert!(manifest
        .reproduce
        .starts_with("djinn simulate --workload seed-cliff --policy djinn --agents 20"));
    std::fs::remove_dir_all(&out_dir).unwrap();
}
