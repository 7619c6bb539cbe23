//! Calibration: GPU profiles for the simulated GPU.
//!
//! Owns: the profiles shipped under `calibration/profiles/` (analytic roofline profiles, and
//! profiles fitted to real runs) with their lookup by name or path; the model and card
//! descriptions shipped under `calibration/models/` and `calibration/cards/`, and the derivation
//! of a profile from a (model, card) pair (`derive`, `catalog`); and the fit itself (`fit`):
//! cost-model coefficients from the steps.csv / swaps.csv of real engine runs or a profiling
//! grid, and the correction tables of the `roofline-table-v1` form with their held-out error
//! (`table`).
//!
//! Architecture invariant: depends on `traces` only (so the simulator's commands and the engine
//! can both read the model and card descriptions); a profile is data (form, coefficients,
//! provenance, fit error), never code.
//!
//! Must never: panic on a bad name or file; every lookup returns a `TraceError` naming it and the
//! known names.

pub mod catalog;
pub mod derive;
pub mod fit;
pub mod table;

pub use catalog::{load_card, load_model, resolve_profile, ChoicePart, ProfileChoice};

use traces::{GpuProfile, TraceError};

/// Shipped profiles, embedded so the binary works anywhere: (name, file name, JSON).
pub const SHIPPED_PROFILES: [(&str, &str, &str); 3] = [
    (
        "h100-llama2-7b",
        "calibration/profiles/h100-llama2-7b.json",
        include_str!("../profiles/h100-llama2-7b.json"),
    ),
    (
        "h100-llama2-7b-fitted",
        "calibration/profiles/h100-llama2-7b-fitted.json",
        include_str!("../profiles/h100-llama2-7b-fitted.json"),
    ),
    (
        "h200-llama2-7b",
        "calibration/profiles/h200-llama2-7b.json",
        include_str!("../profiles/h200-llama2-7b.json"),
    ),
];

/// The default profile: Llama-2-7B fp16 on an H100 80 GB.
pub const DEFAULT_PROFILE: &str = "h100-llama2-7b";

/// The same card and model fitted to real engine runs (`djinn calibrate fit`).
pub const FITTED_PROFILE: &str = "h100-llama2-7b-fitted";

/// Loads a profile by shipped name, or from a JSON file path.
pub fn load_profile(name_or_path: &str) -> Result<GpuProfile, TraceError> {
    catalog::load_named(
        "profile",
        &SHIPPED_PROFILES,
        name_or_path,
        GpuProfile::from_json_str,
    )
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn shipped_profiles_load_and_say_where_they_came_from() {
        for (name, _, _) in SHIPPED_PROFILES {
            let p = load_profile(name).unwrap();
            let want = if name.ends_with("-fitted") {
                "fitted"
            } else {
                "analytic"
            };
            assert_eq!(p.provenance.kind, want, "{name}");
            assert_eq!(p.kv_bytes_per_token, 512 * 1024);
        }
        // The fitted profile carries its fit error, and the analytic ones the ideal roofline.
        assert!(load_profile(FITTED_PROFILE)
            .unwrap()
            .provenance
            .fit_error
            .is_some());
        assert_eq!(
            load_profile(DEFAULT_PROFILE).unwrap().cost.serial_fraction,
            0.0
        );
    }

    #[test]
    fn unknown_profile_is_a_clear_error() {
        let err = load_profile("no-such-gpu").unwrap_err().to_string();
        assert!(
            err.contains("no-such-gpu") && err.contains("h100-llama2-7b"),
            "{err}"
        );
    }

    #[test]
    fn bad_profile_field_is_named() {
        let text = SHIPPED_PROFILES[0].2.replace(
            "\"memory_bandwidth_bytes_per_s\": 3000000000000.0",
            "\"memory_bandwidth_bytes_per_s\": -1.0",
        );
        assert_ne!(text, SHIPPED_PROFILES[0].2, "the replacement must hit");
        let err = GpuProfile::from_json_str(Path::new("p.json"), &text)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("p.json") && err.contains("cost.memory_bandwidth_bytes_per_s"),
            "{err}"
        );
    }
}
