//! Knobs read from the environment, so a longer soak or a replay is one variable away.
//!
//! - `DJINN_PROPTEST_CASES` (or proptest's own `PROPTEST_CASES`): cases per property.
//! - `DJINN_PROPTEST_SEED`: the proptest runner's seed (default fixed, so CI is repeatable).
//! - `DJINN_GOLDEN_UPDATE=1`: rewrite the golden digests instead of comparing.

use proptest::test_runner::{Config, RngSeed};

/// The runner seed used when `DJINN_PROPTEST_SEED` is not set. CI is repeatable; a soak picks
/// fresh seeds explicitly.
pub const DEFAULT_PROPTEST_SEED: u64 = 0x0d1_22_5eed;

fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    match text.trim().parse::<u64>() {
        Ok(v) => Some(v),
        Err(_) => panic!("{name}={text:?} is not an unsigned integer"),
    }
}

/// Cases per property: the environment's choice, else `default_cases`.
pub fn cases(default_cases: u32) -> u32 {
    env_u64("DJINN_PROPTEST_CASES")
        .or_else(|| env_u64("PROPTEST_CASES"))
        .map_or(default_cases, |v| v.clamp(1, u32::MAX as u64) as u32)
}

pub fn proptest_seed() -> u64 {
    env_u64("DJINN_PROPTEST_SEED").unwrap_or(DEFAULT_PROPTEST_SEED)
}

/// A proptest configuration: fixed seed, no regression files (the failure message carries the
/// seed and a reproducing command instead), bounded shrinking.
pub fn proptest_config(default_cases: u32) -> Config {
    Config {
        cases: cases(default_cases),
        rng_seed: RngSeed::Fixed(proptest_seed()),
        failure_persistence: None,
        max_shrink_iters: 2048,
        max_shrink_time: 120_000,
        ..Config::default()
    }
}

pub fn golden_update() -> bool {
    std::env::var("DJINN_GOLDEN_UPDATE").is_ok_and(|v| v == "1")
}
