//! Models and cards as parameters of the simulated GPU: `--model`/`--card` on the commands, their
//! errors (exit 2, naming the flag or spec field), and the pools every shipped pair leaves.

mod common;
use common::{djinn, fails_with, temp};

use calibration::catalog::{SHIPPED_CARDS, SHIPPED_MODELS};
use calibration::ProfileChoice;
use sim::experiment::SimConfig;
use sim::PolicyKind;

#[test]
fn every_shipped_pair_gives_a_valid_profile_and_a_kv_pool() {
    for (model, _, _) in SHIPPED_MODELS {
        for (card, _, _) in SHIPPED_CARDS {
            let profile = calibration::resolve_profile(ProfileChoice {
                profile: None,
                model: Some(model),
                card: Some(card),
            })
            .unwrap_or_else(|(_, e)| panic!("{model} on {card}: {e}"));
            let config = SimConfig::new(PolicyKind::Djinn, profile);
            // At least one whole window of the model fits the pool.
            let tokens = config.gpu_blocks() as u64 * config.block_size_tokens as u64;
            assert!(
                tokens >= config.profile.max_context_tokens as u64,
                "{model} on {card}: {tokens} tokens"
            );
        }
    }
}

#[test]
fn bad_model_card_and_profile_choices_exit_2_naming_the_flag() {
    let out_dir = temp("models", "bad");
    let out = out_dir.to_str().unwrap();
    let base = ["simulate", "--no-write", "--out", out, "-w", "seed-cliff"];
    let with = |extra: &[&'static str]| -> Vec<&str> {
        base.iter().copied().chain(extra.iter().copied()).collect()
    };
    fails_with(&with(&["--model", "llama9"]), "--model: llama9");
    fails_with(&with(&["--model", "llama9"]), "llama3.1-8b");
    fails_with(&with(&["--card", "tpu-v5"]), "--card: tpu-v5");
    fails_with(&with(&["--card", "tpu-v5"]), "gh200");
    // A profile of another model than --model's.
    fails_with(
        &with(&["--profile", "h100-llama2-7b", "--model", "qwen2.5-7b"]),
        "--model",
    );
    fails_with(
        &[
            "capacity",
            "--out",
            out,
            "-w",
            "seed-cliff",
            "--card",
            "nope",
        ],
        "--card: nope",
    );
    fails_with(&["bench", "sim", "--model", "nope"], "--model: nope");
    // A sweep spec names the file and the key.
    let spec = temp("models", "sweep").with_extension("toml");
    std::fs::write(
        &spec,
        "name = \"s\"\npolicies = [\"djinn\"]\nworkloads = [\"seed-cliff\"]\nagents = [8]\nseeds = [0]\ncard = \"nope\"\n",
    )
    .unwrap();
    fails_with(
        &["sweep", spec.to_str().unwrap(), "--out", out],
        "field `card`",
    );
    assert!(!out_dir.exists(), "an error must write nothing");
    let _ = std::fs::remove_file(&spec);
}

#[test]
fn a_workload_longer_than_the_models_context_is_refused_and_runs_on_a_longer_model() {
    let spec = temp("models", "long").with_extension("toml");
    let text = sim::experiment::shipped_workload("seed-cliff")
        .unwrap()
        .replace("max_context_tokens = 4096", "max_context_tokens = 16384");
    std::fs::write(&spec, text).unwrap();
    let path = spec.to_str().unwrap();
    let args = [
        "simulate",
        "--no-write",
        "-w",
        path,
        "-n",
        "4",
        "-p",
        "djinn",
    ];
    fails_with(&args, "max_context_tokens 16384 exceeds");
    fails_with(
        &[&args[..], &["--model", "llama2-7b", "--card", "h200"]].concat(),
        "llama2-7b",
    );
    let out = djinn()
        .args(args)
        .args(["--model", "llama3.1-8b", "--card", "gh200"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("profile gh200-96gb-llama3.1-8b-bf16-analytic"),
        "{stdout}"
    );
    assert!(stdout.contains("GPU KV pool"), "{stdout}");
    let _ = std::fs::remove_file(&spec);
}

#[test]
fn profiles_lists_models_cards_and_profiles() {
    let out = djinn().arg("profiles").output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    for name in [
        "llama2-7b",
        "llama3.1-8b",
        "qwen2.5-7b",
        "h100-sxm",
        "h200",
        "gh200",
        "b200",
        "UNMEASURED",
        "h100-llama2-7b-fitted",
    ] {
        assert!(stdout.contains(name), "{name} missing: {stdout}");
    }
}
