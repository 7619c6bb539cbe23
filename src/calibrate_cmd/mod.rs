//! `djinn calibrate`: real traces feed the simulator.
//!
//! `fit` fits a GPU profile's cost coefficients (calibration::fit, calibration::table) to the
//! steps.csv and swaps.csv of real engine runs (`djinn engine run`) or of a profiling grid;
//! `profile` times a grid of step shapes on the engine for a fit from the grid alone;
//! `validate` replays each real run's workload, seed,
//! policy, pools and batch limits on the simulated GPU under one or more profiles and prints real
//! against simulated turn latency and step time, so a profile's error is a number, not a belief;
//! `validate-suite` makes those real runs itself (workloads of several shapes x policies on the
//! engine) and writes the error table against the accuracy targets.

mod fit;
mod forms;
mod inputs;
mod profile;
mod profile_engines;
mod suite;
mod suite_capacity;
mod suite_scale;
mod suite_table;
mod validate;

use anyhow::Result;
use clap::{Args, Subcommand};

pub use fit::FitArgs;
pub use validate::ValidateArgs;

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    #[command(subcommand)]
    pub command: CalibrateCommand,
}

#[derive(Subcommand, Debug)]
pub enum CalibrateCommand {
    /// Fit a profile's step and copy coefficients to real runs and write it as JSON.
    Fit(FitArgs),
    /// Re-simulate real runs under profiles and print real vs simulated figures.
    Validate(ValidateArgs),
    /// Time a grid of step shapes (decode, prefill chunks on cached context, mixed, beside
    /// swaps) on the engine within a time budget and write them as step and swap records.
    Profile(profile::GridArgs),
    /// Run workloads of several shapes under several policies on the engine, each beside its
    /// simulation under a profile, and write the error table (P50/P99 latency, TTFT,
    /// throughput, swaps, drops, policy ranking) against the accuracy targets.
    ValidateSuite(suite::SuiteArgs),
}

pub fn run(args: CalibrateArgs) -> Result<()> {
    match args.command {
        CalibrateCommand::Fit(a) => fit::run_fit(a),
        CalibrateCommand::Validate(a) => validate::run_validate(a),
        CalibrateCommand::Profile(a) => profile::run_profile(a),
        CalibrateCommand::ValidateSuite(a) => suite::run_suite(a),
    }
}

/// The base profile of `fit` and the profile of other subcommands: `--base` (or `--profile`),
/// `--model`, `--card` resolved by the same rule as `djinn simulate`'s flags.
pub(crate) fn base_profile(
    profile: Option<&str>,
    model: &Option<String>,
    card: &Option<String>,
) -> Result<traces::GpuProfile> {
    let choice = calibration::ProfileChoice {
        profile,
        model: model.as_deref(),
        card: card.as_deref(),
    };
    let names = crate::runio::profile_args::PartNames {
        profile: "--base",
        model: "--model",
        card: "--card",
    };
    Ok(crate::runio::profile_args::resolve(choice, &names)?.profile)
}
