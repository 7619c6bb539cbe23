//! `djinn calibrate profile` on the CPU engine with a tiny preset (the plumbing, not the
//! accuracy): the grid writes the records of real runs and a manifest, a profile fitted from the
//! grid alone records where it came from, and `djinn simulate` says so in its header.

mod common;

use std::path::Path;

use common::*;

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn a_tiny_cpu_grid_feeds_a_fit_that_records_its_origin() {
    let dir = temp("calibrate-grid", "tiny");
    let grid = dir.join("grid");
    let out = djinn()
        .args([
            "calibrate",
            "profile",
            "--backend",
            "cpu",
            "--model",
            "tiny",
        ])
        .args(["--budget-s", "60", "--reps", "3", "--warmup", "1"])
        .args(["--gpu-kv-blocks", "256", "--host-kv-blocks", "256"])
        .args([
            "--max-batch-tokens",
            "128",
            "--max-batch-sequences",
            "8",
            "--out",
        ])
        .arg(&grid)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let manifest = json(&grid.join("grid.json"));
    assert_eq!(manifest["backend"], "cpu");
    assert_eq!(manifest["model"], "tiny");
    assert!(
        manifest["decode_shapes"].as_u64().unwrap() >= 2,
        "{manifest}"
    );
    assert!(
        manifest["prefill_shapes"].as_u64().unwrap() >= 1,
        "{manifest}"
    );
    // Shapes the tiny model cannot hold are listed with why, not silently dropped.
    let skipped = manifest["skipped"].as_array().unwrap();
    assert!(skipped
        .iter()
        .any(|s| s.as_str().unwrap().contains("longer than the model")));
    let steps = std::fs::read_to_string(grid.join("steps.csv")).unwrap();
    assert!(
        steps.starts_with("step_index,start_ns,duration_ns,prefill_tokens"),
        "{steps}"
    );
    assert!(steps.lines().count() > 6);

    let fitted = dir.join("fitted.json");
    let stdout = stdout_of_success(
        djinn()
            .args(["calibrate", "fit", "--folds", "2", "--grid"])
            .arg(&grid)
            .arg("-o")
            .arg(&fitted),
    );
    assert!(
        stdout.contains("held out: 2 leave-shape-out folds"),
        "{stdout}"
    );
    let profile = json(&fitted);
    assert_eq!(profile["cost"]["form"], "roofline-table-v1");
    let from = profile["provenance"]["fitted_from"].as_str().unwrap();
    assert!(
        from.contains("grid of tiny") && from.contains("cpu"),
        "{from}"
    );

    let simulate = [
        "simulate",
        "--workload",
        "seed-exp1",
        "--agents",
        "4",
        "--no-write",
    ];
    let stdout = stdout_of_success(djinn().args(simulate).arg("--profile").arg(&fitted));
    assert!(
        stdout.contains("fitted on cpu (candle reference forward, f32) from a ")
            && stdout.contains(": not validated"),
        "{stdout}"
    );
    assert!(stdout_of_success(djinn().args(simulate)).contains("analytic: not validated"));
}

#[test]
fn bad_grid_flags_exit_2_naming_the_flag() {
    for (flag, value) in [("--budget-s", "0"), ("--model", "nope"), ("--reps", "0")] {
        fails_with(
            &[
                "calibrate",
                "profile",
                "--backend",
                "cpu",
                "--out",
                "/tmp/never-written-grid",
                flag,
                value,
            ],
            flag,
        );
    }
}
