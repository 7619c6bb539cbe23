//! Results are never lost or stale: a results folder or file that exists is refused (exit 2,
//! before any work) unless `--overwrite`, which replaces it whole; two workloads of one name are
//! an error; a manifest's reproduce line names its input files with content hashes and refuses
//! to run on a changed one; trace paths in a spec are relative to the spec; defaults write under
//! `runs/`.

use std::path::{Path, PathBuf};
mod common;
use common::{djinn, fails_with, temp};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `djinn args` and asserts success; returns stdout.
fn ok(args: &[&str]) -> String {
    let out = djinn().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    n.sort();
    n
}

/// A copy of a shipped workload under another name, as a spec file.
fn renamed_workload(path: &Path, shipped: &str, name: &str) -> PathBuf {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let text = sim::experiment::shipped_workload(shipped).unwrap().replace(
        &format!("name = \"{shipped}\""),
        &format!("name = \"{name}\""),
    );
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

#[test]
fn simulate_refuses_to_replace_results_and_overwrite_replaces_the_folder_whole() {
    let dir = temp("outputs", "simulate");
    let out = dir.to_str().unwrap();
    let base = ["simulate", "-w", "seed-cliff", "-n", "8", "--out", out];
    ok(&[&base[..], &["-p", "pin", "-p", "djinn"]].concat());
    let manifest = dir.join("seed-cliff/pin/manifest.json");
    let before = std::fs::read(&manifest).unwrap();
    fails_with(
        &[&base[..], &["-p", "pin", "--seed", "3"]].concat(),
        "already holds results",
    );
    assert_eq!(
        std::fs::read(&manifest).unwrap(),
        before,
        "nothing replaced"
    );
    // --overwrite replaces the workload folder whole: no run directory of the earlier results
    // survives beside the new comparison.csv.
    ok(&[&base[..], &["-p", "djinn", "--overwrite"]].concat());
    assert_eq!(names(&dir), vec!["seed-cliff"], "no staging folder left");
    assert_eq!(
        names(&dir.join("seed-cliff")),
        vec!["comparison.csv", "djinn"]
    );
    let csv = std::fs::read_to_string(dir.join("seed-cliff/comparison.csv")).unwrap();
    assert_eq!(csv.lines().count(), 2, "header + the one policy beside it");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn two_workloads_with_one_name_are_an_error_naming_both_files() {
    let dir = temp("outputs", "same-name");
    let a = renamed_workload(&dir.join("a.toml"), "seed-exp1", "same");
    let b = renamed_workload(&dir.join("b.toml"), "seed-cliff", "same");
    let out = dir.join("out");
    let (a, b, out) = (
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    for args in [
        vec!["simulate", "-w", a, "-w", b, "-n", "4", "--out", out],
        vec!["capacity", "-w", a, "-w", b, "-p", "pin", "--out", out],
    ] {
        let outcome = djinn().args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&outcome.stderr);
        assert_eq!(outcome.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("a.toml") && stderr.contains("b.toml") && stderr.contains("`same`"),
            "{stderr}"
        );
    }
    assert!(!Path::new(out).exists(), "nothing written");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_reproduce_line_hashes_its_input_files_and_refuses_a_changed_one() {
    let dir = temp("outputs", "reproduce");
    let workload = renamed_workload(&dir.join("in/w.toml"), "seed-cliff", "mine");
    let profile = dir.join("in/p.json");
    std::fs::write(&profile, calibration::SHIPPED_PROFILES[0].2).unwrap();
    let out = dir.join("a");
    ok(&[
        "simulate",
        "-w",
        workload.to_str().unwrap(),
        "--profile",
        profile.to_str().unwrap(),
        "-p",
        "djinn",
        "-n",
        "6",
        "--out",
        out.to_str().unwrap(),
    ]);
    let manifest: traces::RunManifest =
        traces::read_json(&out.join("mine/djinn/manifest.json")).unwrap();
    let line = manifest.reproduce;
    for file in [&workload, &profile] {
        let flag = format!("--expect-sha256 {}=", file.display());
        assert!(line.contains(&flag), "{line}");
    }
    assert!(
        line.contains(&format!("--workload {}", workload.display())),
        "the file, not the spec's name: {line}"
    );
    // The line reproduces the run...
    let words: Vec<&str> = line.split_whitespace().skip(1).collect();
    let again = dir.join("b");
    ok(&[&words[..], &["--out", again.to_str().unwrap()]].concat());
    for file in ["turns.csv", "steps.csv", "summary.json"] {
        assert_eq!(
            std::fs::read(out.join("mine/djinn").join(file)).unwrap(),
            std::fs::read(again.join("mine/djinn").join(file)).unwrap(),
            "{file}"
        );
    }
    // ...and refuses once an input file changed.
    let text = std::fs::read_to_string(&workload).unwrap();
    std::fs::write(&workload, text.replace("ramp_s = 5.0", "ramp_s = 6.0")).unwrap();
    fails_with(
        &[&words[..], &["--out", dir.join("c").to_str().unwrap()]].concat(),
        "changed since the run",
    );
    assert!(!dir.join("c").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_replay_trace_path_is_relative_to_its_spec_file() {
    let dir = temp("outputs", "replay");
    let specs = dir.join("specs");
    std::fs::create_dir_all(&specs).unwrap();
    std::fs::copy(
        root().join("sim/workloads/traces/mooncake_conversation_sample.jsonl"),
        specs.join("my-trace.jsonl"),
    )
    .unwrap();
    let text = std::fs::read_to_string(root().join("sim/workloads/chat.toml"))
        .unwrap()
        .replace("name = \"chat\"", "name = \"my-chat\"")
        .replace("mooncake_conversation_sample.jsonl", "my-trace.jsonl");
    std::fs::write(specs.join("w.toml"), text).unwrap();
    // Run from another folder: the trace is found beside the spec, not in the working folder.
    let out = djinn()
        .current_dir(&dir)
        .args([
            "simulate",
            "-w",
            "specs/w.toml",
            "-p",
            "djinn",
            "-n",
            "5",
            "--out",
            "out",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest: traces::RunManifest =
        traces::read_json(&dir.join("out/my-chat/djinn/manifest.json")).unwrap();
    let trace = Path::new("specs").join("my-trace.jsonl");
    assert!(
        manifest
            .reproduce
            .contains(&format!("--expect-sha256 {}=", trace.display())),
        "the trace is an input too: {}",
        manifest.reproduce
    );
    // A trace that is not there names the spec and the field.
    std::fs::remove_file(specs.join("my-trace.jsonl")).unwrap();
    let spec = specs.join("w.toml");
    fails_with(
        &["simulate", "-w", spec.to_str().unwrap(), "--no-write"],
        "replay.path",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn capacity_checks_its_output_before_any_probe() {
    let dir = temp("outputs", "capacity");
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("capacity.csv");
    std::fs::write(&csv, b"earlier results\n").unwrap();
    let quick = [
        "capacity",
        "-w",
        "seed-cliff",
        "-p",
        "pin",
        "--seeds",
        "1",
        "--min-agents",
        "8",
        "--max-agents",
        "8",
        "--out",
    ];
    let started = std::time::Instant::now();
    fails_with(
        &[&quick[..], &[csv.to_str().unwrap()]].concat(),
        "already exists",
    );
    assert_eq!(std::fs::read(&csv).unwrap(), b"earlier results\n");
    let blocked = csv.join("x.csv");
    fails_with(
        &[&quick[..], &[blocked.to_str().unwrap()]].concat(),
        "not a folder",
    );
    assert!(
        started.elapsed().as_secs_f64() < 30.0,
        "refused before probing"
    );
    ok(&[&quick[..], &[csv.to_str().unwrap(), "--overwrite"]].concat());
    let text = std::fs::read_to_string(&csv).unwrap();
    assert!(text.starts_with("workload,policy"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn default_outputs_go_under_runs_not_the_committed_results() {
    for args in [
        vec!["simulate", "--help"],
        vec!["sweep", "--help"],
        vec!["sweep", "merge", "--help"],
        vec!["capacity", "--help"],
        vec!["engine", "run", "--help"],
    ] {
        let help = ok(&args);
        assert!(help.contains("[default: runs/"), "{args:?}: {help}");
        assert!(!help.contains("results/"), "{args:?}: {help}");
        assert!(help.contains("--overwrite"), "{args:?}: {help}");
    }
}

/// A real run directory from the CPU engine (tiny model): `<out>/engine-run-tiny/djinn`.
fn tiny_engine_run(out: &Path, extra: &[&str]) -> std::process::Output {
    let w = root().join("tests/data/engine-run-tiny.toml");
    djinn()
        .args([
            "engine",
            "run",
            "--backend",
            "cpu",
            "--model",
            "tiny",
            "-w",
            w.to_str().unwrap(),
            "-p",
            "djinn",
            "--block-size",
            "4",
            "--gpu-kv-blocks",
            "64",
            "--host-kv-blocks",
            "64",
            "--out",
            out.to_str().unwrap(),
        ])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn engine_run_keeps_earlier_results_and_calibrate_names_bad_inputs() {
    let dir = temp("outputs", "engine");
    let out = dir.join("real");
    let first = tiny_engine_run(&out, &[]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let run = out.join("engine-run-tiny/djinn");
    let steps = std::fs::read(run.join("steps.csv")).unwrap();
    // A second run into the same folder is refused before the engine starts.
    let again = tiny_engine_run(&out, &[]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds results"));
    assert_eq!(std::fs::read(run.join("steps.csv")).unwrap(), steps);

    // calibrate fit -o and validate --csv never replace a file silently.
    let fitted = dir.join("fitted.json");
    std::fs::write(&fitted, b"{}").unwrap();
    let run_arg = run.to_str().unwrap();
    fails_with(
        &["calibrate", "fit", run_arg, "-o", fitted.to_str().unwrap()],
        "already exists",
    );
    assert_eq!(std::fs::read(&fitted).unwrap(), b"{}");
    fails_with(
        &[
            "calibrate",
            "validate",
            run_arg,
            "--csv",
            fitted.to_str().unwrap(),
        ],
        "already exists",
    );

    // A bad value is named by its column, an empty steps.csv by its file.
    let broken = dir.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for file in traces::RUN_DIR_FILES {
        std::fs::copy(run.join(file), broken.join(file)).unwrap();
    }
    let text = String::from_utf8(steps.clone()).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let mut cells: Vec<&str> = lines[1].split(',').collect();
    cells[2] = "fast";
    lines[1] = cells.join(",");
    std::fs::write(broken.join("steps.csv"), lines.join("\n") + "\n").unwrap();
    let broken_arg = broken.to_str().unwrap();
    fails_with(&["calibrate", "fit", broken_arg], "column `duration_ns`");
    std::fs::write(broken.join("steps.csv"), format!("{}\n", lines[0])).unwrap();
    for command in ["fit", "validate"] {
        fails_with(&["calibrate", command, broken_arg], "steps.csv: no steps");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

const SWEEP: &str = r#"
name = "t"
workloads = ["seed-exp1"]
policies = ["djinn", "vllm"]
agents = [2]
seeds = [0, 1]
"#;

#[test]
fn sweep_resumes_only_results_of_the_same_inputs() {
    let dir = temp("outputs", "sweep");
    std::fs::create_dir_all(&dir).unwrap();
    let spec = dir.join("s.toml");
    let profile = dir.join("p.json");
    std::fs::write(&profile, calibration::SHIPPED_PROFILES[0].2).unwrap();
    let with_profile = format!("{SWEEP}profile = {:?}\n", profile.to_str().unwrap());
    std::fs::write(&spec, &with_profile).unwrap();
    let out = dir.join("out");
    let args = [
        "sweep",
        spec.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
        "--threads",
        "2",
    ];
    ok(&args);
    let results = std::fs::read(out.join("results.csv")).unwrap();
    assert!(out.join("sweep.json").is_file());
    // Same inputs: resumes (nothing left to run).
    assert!(ok(&args).contains("4 already done, 0 to run"));
    // Another SLO: refused, naming the field; nothing touched.
    std::fs::write(&spec, format!("{with_profile}slo_ms = 100.0\n")).unwrap();
    fails_with(&args, "spec field `slo_ms`");
    assert_eq!(std::fs::read(out.join("results.csv")).unwrap(), results);
    // Same spec, changed profile file: refused, naming the profile.
    std::fs::write(&spec, &with_profile).unwrap();
    let changed = calibration::SHIPPED_PROFILES[0].2.replacen(
        "\"per_sequence_ns\": ",
        "\"per_sequence_ns\": 1",
        1,
    );
    assert_ne!(changed, calibration::SHIPPED_PROFILES[0].2);
    std::fs::write(&profile, changed).unwrap();
    fails_with(&args, "profile `");
    // --overwrite discards the earlier results and runs every configuration again.
    let rerun = ok(&[&args[..], &["--overwrite"]].concat());
    assert!(rerun.contains("0 already done, 4 to run"), "{rerun}");
    // A grid point listed twice is an error, not a race.
    std::fs::write(&spec, SWEEP.replace("seeds = [0, 1]", "seeds = [0, 1, 0]")).unwrap();
    fails_with(&args, "field `seeds`");
    // Shards of different sweeps do not merge.
    std::fs::write(&spec, SWEEP).unwrap();
    let other = dir.join("other");
    ok(&[
        "sweep",
        spec.to_str().unwrap(),
        "--out",
        other.to_str().unwrap(),
        "--quiet",
    ]);
    let merged = dir.join("merged.csv");
    fails_with(
        &[
            "sweep",
            "merge",
            out.to_str().unwrap(),
            other.to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
        ],
        "different sweep inputs",
    );
    assert!(!merged.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
