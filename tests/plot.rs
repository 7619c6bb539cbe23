//! `djinn plot`: the shipped cliff sweep (results/sim/cliff-seed-cliff.csv) becomes an SVG with
//! one line per policy, pin's line marked where it stops (it starts rejecting turns); bad columns
//! and flags exit 2 naming them.

use std::path::Path;
mod common;
use common::{djinn, fails_with, temp};

fn cliff_csv() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("results/sim/cliff-seed-cliff.csv")
        .to_str()
        .unwrap()
        .to_string()
}

#[test]
fn the_cliff_sweep_plots_one_line_per_policy() {
    let dir = temp("plot", "cliff");
    std::fs::create_dir_all(&dir).unwrap();
    let svg_path = dir.join("cliff.svg");
    let out = djinn()
        .args(["plot", &cliff_csv(), "--where", "turns_rejected=0"])
        .args([
            "--hline",
            "5000",
            "--log-y",
            "--vline",
            "229=binding bound",
            "-o",
        ])
        .arg(&svg_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("6 lines"), "{stdout}");
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.starts_with("<svg"));
    for label in [
        "offline",
        "djinn",
        "vllm",
        "swap",
        "infercept",
        "pin (to 64)",
        "SLO",
        "binding bound",
    ] {
        assert!(svg.contains(label), "legend lacks `{label}`");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_plot_inputs_exit_2_naming_the_problem() {
    let csv = cliff_csv();
    fails_with(
        &["plot", &csv, "--y", "latency_p99"],
        "no column `latency_p99`",
    );
    fails_with(
        &["plot", &csv, "--where", "policy"],
        "expected COLUMN=VALUE",
    );
    fails_with(&["plot", &csv, "--where", "policy=nope"], "no rows match");
    fails_with(&["plot", "/no/such.csv"], "/no/such.csv");
    fails_with(&["plot", &csv, "--vline", "x=bound"], "--vline `x=bound`");
    fails_with(
        &["plot", &csv, "--y", "drops", "--log-y"],
        "has a value <= 0",
    );
}
