//! The simulated GPU of a command: `--profile`, `--model` and `--card`, one flattened clap struct
//! for every command that simulates, and the checks that go with it.

use anyhow::{anyhow, bail, Result};
use clap::Args;
use traces::GpuProfile;

use super::inputs::{profile_input, shell_word, Input};
use calibration::catalog::{SHIPPED_CARDS, SHIPPED_MODELS};
use calibration::{ChoicePart, ProfileChoice};

#[derive(Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct ProfileArgs {
    /// GPU profile: a shipped name (h100-llama2-7b, the analytic default; h100-llama2-7b-fitted,
    /// fitted to real H100 runs by `djinn calibrate fit`; h200-llama2-7b) or a path to a profile
    /// JSON. Given with --model or --card, it must be a profile of that model and card (a fitted
    /// profile refining the pair) and is used as it is.
    #[arg(long, value_name = "NAME|PATH")]
    pub profile: Option<String>,
    /// Model the profile is derived from: llama2-7b, llama3.1-8b, qwen2.5-7b, or a path to a model
    /// TOML (docs/models-and-cards.md). Without --card: on h100-sxm.
    #[arg(long, value_name = "NAME|PATH")]
    pub model: Option<String>,
    /// Card the profile is derived from: h100-sxm, h200 (measured), gh200, b200 (specification
    /// sheets, unmeasured), or a path to a card TOML. Without --model: llama2-7b.
    #[arg(long, value_name = "NAME|PATH")]
    pub card: Option<String>,
}

/// How the three are named in errors: flags on a command line, keys in a spec file.
pub struct PartNames<'a> {
    pub profile: &'a str,
    pub model: &'a str,
    pub card: &'a str,
}

pub const FLAGS: PartNames<'static> = PartNames {
    profile: "--profile",
    model: "--model",
    card: "--card",
};

/// The profile a run uses, with the files (or shipped texts) it was made from.
pub struct ResolvedProfile {
    pub profile: GpuProfile,
    pub inputs: Vec<Input>,
}

impl ProfileArgs {
    pub fn choice(&self) -> ProfileChoice<'_> {
        ProfileChoice {
            profile: self.profile.as_deref(),
            model: self.model.as_deref(),
            card: self.card.as_deref(),
        }
    }

    /// The profile, with errors naming the flag.
    pub fn resolve(&self) -> Result<ResolvedProfile> {
        resolve(self.choice(), &FLAGS)
    }

    /// The flags that give this profile again, for reproduce lines: the default profile by name
    /// when nothing was given (as before models and cards existed), a derived pair with both.
    pub fn reproduce_flags(&self) -> String {
        let mut out = String::new();
        if self.profile.is_some() || (self.model.is_none() && self.card.is_none()) {
            let p = self
                .profile
                .as_deref()
                .unwrap_or(calibration::DEFAULT_PROFILE);
            out.push_str(&format!(" --profile {}", shell_word(p)));
        }
        if self.profile.is_none() && (self.model.is_some() || self.card.is_some()) {
            let m = self
                .model
                .as_deref()
                .unwrap_or(calibration::catalog::DEFAULT_MODEL);
            let c = self
                .card
                .as_deref()
                .unwrap_or(calibration::catalog::DEFAULT_CARD);
            out.push_str(&format!(
                " --model {} --card {}",
                shell_word(m),
                shell_word(c)
            ));
        } else {
            for (flag, v) in [("--model", &self.model), ("--card", &self.card)] {
                if let Some(v) = v {
                    out.push_str(&format!(" {flag} {}", shell_word(v)));
                }
            }
        }
        out
    }
}

/// Resolves `choice` by calibration's rule (nothing: the default profile; model/card: derived;
/// a profile with model/card: that profile if it matches them). Errors name the part as `names`
/// says.
pub fn resolve(choice: ProfileChoice, names: &PartNames) -> Result<ResolvedProfile> {
    let profile = calibration::resolve_profile(choice).map_err(|(part, err)| {
        let name = match part {
            ChoicePart::Profile => names.profile,
            ChoicePart::Model => names.model,
            ChoicePart::Card => names.card,
        };
        anyhow!("{name}: {err}")
    })?;
    let mut inputs = Vec::new();
    let derived = choice.profile.is_none() && (choice.model.is_some() || choice.card.is_some());
    if !derived {
        inputs.push(profile_input(
            choice.profile.unwrap_or(calibration::DEFAULT_PROFILE),
        )?);
    }
    for (role, shipped, given) in [
        ("model", &SHIPPED_MODELS[..], choice.model),
        ("card", &SHIPPED_CARDS[..], choice.card),
    ] {
        if let Some(name) = given {
            inputs.push(match shipped.iter().find(|(n, _, _)| *n == name) {
                Some((n, _, text)) => Input::shipped(role, n, text),
                None => Input::file(role, name)?,
            });
        }
    }
    Ok(ResolvedProfile { profile, inputs })
}

/// A workload whose window is longer than the model's maximum context cannot run on it.
pub fn check_context(profile: &GpuProfile, workload: &str, max_context_tokens: u32) -> Result<()> {
    if max_context_tokens > profile.max_context_tokens {
        bail!(
            "workload `{workload}`: max_context_tokens {max_context_tokens} exceeds the maximum context of model `{}` ({} tokens, profile {}); choose a longer-context model (--model llama3.1-8b: 131072) or shrink the workload",
            profile.model_name,
            profile.max_context_tokens,
            profile.name
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(profile: Option<&str>, model: Option<&str>, card: Option<&str>) -> ProfileArgs {
        ProfileArgs {
            profile: profile.map(Into::into),
            model: model.map(Into::into),
            card: card.map(Into::into),
        }
    }

    #[test]
    fn reproduce_flags_keep_the_default_line_and_spell_out_a_pair() {
        assert_eq!(
            args(None, None, None).reproduce_flags(),
            " --profile h100-llama2-7b"
        );
        assert_eq!(
            args(None, Some("llama3.1-8b"), None).reproduce_flags(),
            " --model llama3.1-8b --card h100-sxm"
        );
        assert_eq!(
            args(Some("h100-llama2-7b-fitted"), None, Some("h100-sxm")).reproduce_flags(),
            " --profile h100-llama2-7b-fitted --card h100-sxm"
        );
    }

    #[test]
    fn errors_name_the_flag_and_inputs_name_what_was_used() {
        let err = args(None, Some("nope"), None)
            .resolve()
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with("--model:") && err.contains("llama3.1-8b"),
            "{err}"
        );
        let r = args(None, Some("qwen2.5-7b"), Some("gh200"))
            .resolve()
            .unwrap();
        let roles: Vec<&str> = r.inputs.iter().map(|i| i.role.as_str()).collect();
        assert_eq!(roles, ["model", "card"]);
        assert_eq!(r.profile.kv_bytes_per_token, 57_344);
        let default = args(None, None, None).resolve().unwrap();
        assert_eq!(
            default.inputs,
            vec![profile_input("h100-llama2-7b").unwrap()]
        );
        assert!(check_context(&default.profile, "w", 4096).is_ok());
        let err = check_context(&default.profile, "w", 8192)
            .unwrap_err()
            .to_string();
        assert!(err.contains("8192") && err.contains("llama2-7b"), "{err}");
    }
}
