//! `djinn calibrate`: a profile fitted to the shipped real H100 runs (results/h100/real-runs) is
//! valid, reproducible, closer to the real steps than the analytic profile, and simulates the real
//! runs' turn latencies more closely; bad inputs exit 2 naming what is wrong.

use std::path::Path;
mod common;
use common::{djinn, fails_with, temp};

const RUNS: &str = "results/h100/real-runs/seed-cliff-48agents-24gib/seed-cliff";
const BENCH: &str = "results/h100/engine-bench-llama2-7b-fit-input.json";
/// The decode step beside the swap engine at measured rates (H100).
const INTERFERENCE: [&str; 3] = [
    "results/h100/swap-interference-probe.json",
    "results/h100/swap-interference-swap-in-caps.json",
    "results/h100/swap-interference-crossing.json",
];
/// A folder of result files that holds no run directory.
const NOT_RUNS: &str = "results/h100";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn fit_reproduces_the_shipped_fitted_profile_from_the_shipped_traces() {
    let dir = temp("calibrate", "fit");
    std::fs::create_dir_all(&dir).unwrap();
    let out_path = dir.join("fitted.json");
    let out = djinn()
        .current_dir(root())
        .args(["calibrate", "fit", RUNS, "--bench", BENCH])
        .args(INTERFERENCE.iter().flat_map(|f| ["--interference", f]))
        .args(["--name", "h100-80gb-llama2-7b-fp16-fitted", "-o"])
        .arg(&out_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("leave-one-run-out"), "{stdout}");
    let fitted = json(&out_path);
    let shipped = json(&root().join("calibration/profiles/h100-llama2-7b-fitted.json"));
    assert_eq!(fitted["provenance"]["kind"], "fitted");
    assert_eq!(
        fitted["provenance"]["source"],
        shipped["provenance"]["source"]
    );
    // Same traces, same code: the same coefficients (compared to 1e-6, not bytes, so a libm that
    // rounds exp() differently in the last place does not fail the test).
    for key in [
        "step_overhead_ns",
        "per_sequence_ns",
        "memory_bandwidth_bytes_per_s",
        "matmul_flops_per_s",
        "attention_flops_per_s",
        "serial_fraction",
    ] {
        let (a, b) = (
            fitted["cost"][key].as_f64().unwrap(),
            shipped["cost"][key].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() <= 1e-6 * b.abs().max(1.0),
            "{key}: {a} vs shipped {b}"
        );
    }
    // What copies cost a decode step beside them: a byte written into HBM (host->device) costs
    // the step more than a byte read (device->host), as measured.
    let cost = |profile: &serde_json::Value, channel: &str| {
        profile[channel]["step_memory_bytes_per_copied_byte"]
            .as_f64()
            .unwrap()
    };
    for channel in ["host_to_device", "device_to_host"] {
        let (a, b) = (cost(&fitted, channel), cost(&shipped, channel));
        assert!((a - b).abs() <= 1e-6 * b, "{channel}: {a} vs shipped {b}");
    }
    assert!(cost(&fitted, "host_to_device") > 2.0 * cost(&fitted, "device_to_host"));
    assert!(
        stdout.contains("copy costs to a step beside them"),
        "{stdout}"
    );
    let fit_error = fitted["provenance"]["fit_error"].as_f64().unwrap();
    assert!(fit_error < 0.06, "fit error {fit_error}");
    // The analytic profile's error on the same steps is printed beside it and is worse.
    let all = stdout.lines().find(|l| l.starts_with("all ")).unwrap();
    let cells: Vec<&str> = all.split_whitespace().collect();
    let base_mape: f64 = cells[2].trim_end_matches('%').parse().unwrap();
    let fit_mape: f64 = cells[4].trim_end_matches('%').parse().unwrap();
    assert!(fit_mape < base_mape / 2.0, "{all}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn validate_shows_the_fitted_profile_simulating_real_runs_more_closely() {
    let dir = temp("calibrate", "validate");
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("validation.csv");
    let twins = dir.join("twins");
    let out = djinn()
        .current_dir(root())
        .args(["calibrate", "validate", RUNS, "--csv"])
        .arg(&csv)
        .arg("--twins-out")
        .arg(&twins)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let headers = reader.headers().unwrap().clone();
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
    assert_eq!(rows.len(), 6, "3 runs x 2 profiles");
    let mean_p50_error = |profile: &str| {
        let errs: Vec<f64> = rows
            .iter()
            .filter(|r| &r[col("profile")] == profile)
            .map(|r| {
                let real: f64 = r[col("latency_ms_p50_real")].parse().unwrap();
                let sim: f64 = r[col("latency_ms_p50_sim")].parse().unwrap();
                ((sim - real) / real).abs()
            })
            .collect();
        assert_eq!(errs.len(), 3, "{profile}");
        errs.iter().sum::<f64>() / 3.0
    };
    let analytic = mean_p50_error("h100-llama2-7b");
    let fitted = mean_p50_error("h100-llama2-7b-fitted");
    assert!(
        fitted < 0.1 && fitted < analytic / 2.0,
        "p50 error analytic {analytic}, fitted {fitted}"
    );
    // Every twin is a run directory whose summary is the CSV row's simulated side.
    let twin_dirs: Vec<std::path::PathBuf> = std::fs::read_dir(&twins)
        .unwrap()
        .flat_map(|w| std::fs::read_dir(w.unwrap().path()).unwrap())
        .map(|d| d.unwrap().path())
        .collect();
    assert_eq!(twin_dirs.len(), 6, "{twin_dirs:?}");
    for d in &twin_dirs {
        for f in [
            "manifest.json",
            "turns.csv",
            "steps.csv",
            "swaps.csv",
            "summary.json",
        ] {
            assert!(d.join(f).is_file(), "{}: no {f}", d.display());
        }
    }
    let fitted_twin = twin_dirs
        .iter()
        .find(|d| d.to_string_lossy().ends_with(".h100-llama2-7b-fitted.sim"))
        .unwrap();
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fitted_twin.join("summary.json")).unwrap())
            .unwrap();
    let p50_ms = summary["turn_latency"]["p50_ns"].as_f64().unwrap() / 1e6;
    let policy = summary["policy"].as_str().unwrap();
    let row = rows
        .iter()
        .find(|r| {
            &r[col("profile")] == "h100-llama2-7b-fitted"
                && &r[col("policy")] == policy
                && fitted_twin.to_string_lossy().contains(&format!(
                    "/{policy}-x{}-seed{}.",
                    &r[col("agents")],
                    0
                ))
        })
        .unwrap();
    let csv_p50: f64 = row[col("latency_ms_p50_sim")].parse().unwrap();
    assert!((p50_ms - csv_p50).abs() < 1e-6, "{p50_ms} vs {csv_p50}");
    // A second write to the same folder is refused without --overwrite.
    let again = djinn()
        .current_dir(root())
        .args(["calibrate", "validate", RUNS, "--twins-out"])
        .arg(&twins)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_calibration_inputs_exit_2_naming_the_problem() {
    let root = root().to_str().unwrap().to_string();
    let runs = format!("{root}/{RUNS}");
    fails_with(
        &["calibrate", "fit", &format!("{runs}/djinn.sim")],
        "a simulated run",
    );
    fails_with(&["calibrate", "fit", "/no/such/dir"], "not a directory");
    fails_with(
        &["calibrate", "fit", &format!("{root}/{NOT_RUNS}")],
        "no manifest.json",
    );
    let dir = temp("calibrate", "bad");
    std::fs::create_dir_all(&dir).unwrap();
    let bench = dir.join("bench.json");
    std::fs::write(
        &bench,
        r#"{"rows": [{"system": "djinn-cuda", "kind": "decode_step", "batch": 1, "tokens": 512}]}"#,
    )
    .unwrap();
    fails_with(
        &[
            "calibrate",
            "fit",
            &runs,
            "--bench",
            bench.to_str().unwrap(),
        ],
        "rows[0].ms_p50",
    );
    // An interference file without the swap engine's operating points, and one whose note has
    // lost its rate.
    let interference = dir.join("interference.json");
    std::fs::write(
        &interference,
        r#"{"rows": [{"section": "floor", "name": "x"}]}"#,
    )
    .unwrap();
    let fit_with = |file: &std::path::Path| {
        vec![
            "calibrate".to_string(),
            "fit".into(),
            runs.clone(),
            "--interference".into(),
            file.to_str().unwrap().into(),
        ]
    };
    let args = fit_with(&interference);
    fails_with(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "no `interference summary` rows",
    );
    std::fs::write(
        &interference,
        r#"{"rows": [{"section": "interference summary", "ratio": 1.05,
            "name": "engine decode (b32) | swap engine DMA: swap-in only (in full speed)",
            "note": "swap-in: 40 GB moved at fast GB/s while running"}]}"#,
    )
    .unwrap();
    let args = fit_with(&interference);
    fails_with(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "rows[0].note",
    );
    fails_with(
        &["calibrate", "validate", &runs, "--profile", "h900-nope"],
        "not a shipped profile name",
    );
    let _ = std::fs::remove_dir_all(&dir);
}
