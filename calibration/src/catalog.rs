//! The shipped models and cards, lookup by name or path, and the one rule that turns a choice of
//! profile, model and card into the profile a run uses.

use std::path::Path;

use traces::{CardSpec, GpuProfile, ModelSpec, TraceError};

use crate::derive::derive_profile;

/// Shipped model descriptions, embedded: (name, file name, TOML).
pub const SHIPPED_MODELS: [(&str, &str, &str); 3] = [
    (
        "llama2-7b",
        "calibration/models/llama2-7b.toml",
        include_str!("../models/llama2-7b.toml"),
    ),
    (
        "llama3.1-8b",
        "calibration/models/llama3.1-8b.toml",
        include_str!("../models/llama3.1-8b.toml"),
    ),
    (
        "qwen2.5-7b",
        "calibration/models/qwen2.5-7b.toml",
        include_str!("../models/qwen2.5-7b.toml"),
    ),
];

/// Shipped card descriptions, embedded: (name, file name, TOML).
pub const SHIPPED_CARDS: [(&str, &str, &str); 4] = [
    (
        "h100-sxm",
        "calibration/cards/h100-sxm.toml",
        include_str!("../cards/h100-sxm.toml"),
    ),
    (
        "h200",
        "calibration/cards/h200.toml",
        include_str!("../cards/h200.toml"),
    ),
    (
        "gh200",
        "calibration/cards/gh200.toml",
        include_str!("../cards/gh200.toml"),
    ),
    (
        "b200",
        "calibration/cards/b200.toml",
        include_str!("../cards/b200.toml"),
    ),
];

/// The model and card of the default profile (`h100-llama2-7b`): what a missing `model` or
/// `card` means.
pub const DEFAULT_MODEL: &str = "llama2-7b";
pub const DEFAULT_CARD: &str = "h100-sxm";

/// Looks `name_or_path` up among `shipped`, else reads it as a file; `what` names the kind of
/// thing in the error (and is the field it names).
pub(crate) fn load_named<T>(
    what: &str,
    shipped: &[(&str, &str, &str)],
    name_or_path: &str,
    parse: impl Fn(&Path, &str) -> Result<T, TraceError>,
) -> Result<T, TraceError> {
    if let Some((_, file, text)) = shipped.iter().find(|(n, _, _)| *n == name_or_path) {
        return parse(Path::new(file), text);
    }
    let path = Path::new(name_or_path);
    if !path.is_file() {
        let known: Vec<&str> = shipped.iter().map(|(n, _, _)| *n).collect();
        return Err(TraceError::invalid(
            path,
            what,
            format!(
                "no such file, and not a shipped {what} name (known: {})",
                known.join(", ")
            ),
        ));
    }
    parse(path, &traces::io::read_text(path)?)
}

/// A model by shipped name or path to a TOML description.
pub fn load_model(name_or_path: &str) -> Result<ModelSpec, TraceError> {
    load_named(
        "model",
        &SHIPPED_MODELS,
        name_or_path,
        ModelSpec::from_toml_str,
    )
}

/// A card by shipped name or path to a TOML description.
pub fn load_card(name_or_path: &str) -> Result<CardSpec, TraceError> {
    load_named(
        "card",
        &SHIPPED_CARDS,
        name_or_path,
        CardSpec::from_toml_str,
    )
}

/// What a run was asked to use: a profile (name or path), a model, a card, each optional.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProfileChoice<'a> {
    pub profile: Option<&'a str>,
    pub model: Option<&'a str>,
    pub card: Option<&'a str>,
}

/// Which of the three a resolution error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChoicePart {
    Profile,
    Model,
    Card,
}

/// The rule:
/// - nothing: the default profile (`h100-llama2-7b`, its shipped file);
/// - a model and/or a card, no profile: the profile derived from them (a missing one is the
///   default profile's: `llama2-7b`, `h100-sxm`);
/// - a profile with a model and/or card: the profile as it is (a fitted profile refines its
///   pair), provided its `model_name` is the model's name and its `gpu_name` the card's; otherwise
///   an error, since the run would not be what the command line says.
pub fn resolve_profile(choice: ProfileChoice) -> Result<GpuProfile, (ChoicePart, TraceError)> {
    let model = choice
        .model
        .map(load_model)
        .transpose()
        .map_err(|e| (ChoicePart::Model, e))?;
    let card = choice
        .card
        .map(load_card)
        .transpose()
        .map_err(|e| (ChoicePart::Card, e))?;
    let Some(profile_arg) = choice.profile else {
        if model.is_none() && card.is_none() {
            return crate::load_profile(crate::DEFAULT_PROFILE)
                .map_err(|e| (ChoicePart::Profile, e));
        }
        let model = match model {
            Some(m) => m,
            None => load_model(DEFAULT_MODEL).map_err(|e| (ChoicePart::Model, e))?,
        };
        let card = match card {
            Some(c) => c,
            None => load_card(DEFAULT_CARD).map_err(|e| (ChoicePart::Card, e))?,
        };
        return derive_checked(&model, &card);
    };
    let profile = crate::load_profile(profile_arg).map_err(|e| (ChoicePart::Profile, e))?;
    let path = Path::new(profile_arg);
    if let Some(m) = &model {
        if m.name != profile.model_name {
            let msg = format!(
                "profile `{}` is of model `{}`, not `{}`: give the model alone to derive its profile, or a profile of that model",
                profile.name, profile.model_name, m.name
            );
            return Err((
                ChoicePart::Model,
                TraceError::invalid(path, "model_name", msg),
            ));
        }
    }
    if let Some(c) = &card {
        if c.gpu_name != profile.gpu_name {
            let msg = format!(
                "profile `{}` is of GPU `{}`, not card `{}` (`{}`): give the card alone to derive its profile, or a profile of that card",
                profile.name, profile.gpu_name, c.name, c.gpu_name
            );
            return Err((ChoicePart::Card, TraceError::invalid(path, "gpu_name", msg)));
        }
    }
    Ok(profile)
}

/// Derives and validates; a pair whose weights do not fit the card is an error naming both.
pub fn derive_checked(
    model: &ModelSpec,
    card: &CardSpec,
) -> Result<GpuProfile, (ChoicePart, TraceError)> {
    let profile = derive_profile(model, card);
    let label = format!("{} on {}", model.name, card.name);
    profile
        .validate(Path::new(&label))
        .map_err(|e| (ChoicePart::Card, e))?;
    Ok(profile)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choice<'a>(
        profile: Option<&'a str>,
        model: Option<&'a str>,
        card: Option<&'a str>,
    ) -> ProfileChoice<'a> {
        ProfileChoice {
            profile,
            model,
            card,
        }
    }

    #[test]
    fn the_rule_of_profile_model_and_card() {
        let default = resolve_profile(ProfileChoice::default()).unwrap();
        assert_eq!(
            default,
            crate::load_profile(crate::DEFAULT_PROFILE).unwrap()
        );
        // A fitted profile of the same pair is accepted as is.
        let fitted = resolve_profile(choice(
            Some(crate::FITTED_PROFILE),
            Some("llama2-7b"),
            Some("h100-sxm"),
        ))
        .unwrap();
        assert_eq!(fitted.provenance.kind, "fitted");
        // Another model or card than the profile's is refused, naming which.
        let (part, err) =
            resolve_profile(choice(Some("h100-llama2-7b"), Some("llama3.1-8b"), None)).unwrap_err();
        assert_eq!(part, ChoicePart::Model);
        assert!(err.to_string().contains("llama3.1-8b"), "{err}");
        let (part, _) =
            resolve_profile(choice(Some("h100-llama2-7b"), None, Some("h200"))).unwrap_err();
        assert_eq!(part, ChoicePart::Card);
        // A card alone takes the default model.
        let h200 = resolve_profile(choice(None, None, Some("h200"))).unwrap();
        assert_eq!(h200.model_name, "llama2-7b");
        assert_eq!(h200.gpu_name, "NVIDIA H200");
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let (part, err) = resolve_profile(choice(None, Some("llama9"), None)).unwrap_err();
        assert_eq!(part, ChoicePart::Model);
        let err = err.to_string();
        assert!(
            err.contains("llama9") && err.contains("qwen2.5-7b"),
            "{err}"
        );
        let (part, err) = resolve_profile(choice(None, None, Some("tpu"))).unwrap_err();
        assert_eq!(part, ChoicePart::Card);
        assert!(err.to_string().contains("gh200"), "{err}");
    }

    /// A derived profile against a shipped analytic file: every figure equal, only the wording of
    /// the provenance differs.
    fn assert_same_figures(derived: &GpuProfile, shipped: &GpuProfile) {
        let mut d = derived.clone();
        d.provenance.source = shipped.provenance.source.clone();
        assert_eq!(&d, shipped);
    }

    #[test]
    fn derivation_reproduces_the_shipped_analytic_profiles() {
        for (profile, card) in [("h100-llama2-7b", "h100-sxm"), ("h200-llama2-7b", "h200")] {
            let derived = resolve_profile(choice(None, Some("llama2-7b"), Some(card))).unwrap();
            assert_same_figures(&derived, &crate::load_profile(profile).unwrap());
        }
    }

    #[test]
    fn kv_bytes_per_token_of_the_shipped_models() {
        let kv = |m: &str| load_model(m).unwrap().kv_bytes_per_token();
        assert_eq!(kv("llama2-7b"), 524_288);
        assert_eq!(kv("llama3.1-8b"), 131_072);
        assert_eq!(kv("qwen2.5-7b"), 57_344);
        // Published parameter counts (weights = parameters x 2 bytes).
        assert_eq!(
            load_model("llama3.1-8b").unwrap().parameters(),
            8_030_261_248
        );
        assert_eq!(
            load_model("qwen2.5-7b").unwrap().parameters(),
            7_615_616_512
        );
    }

    #[test]
    fn the_derivation_shares_are_the_measured_h100s() {
        use crate::derive::{BANDWIDTH_SHARE, FLOPS_SHARE, LINK_SHARE, MEMORY_SHARE};
        let h100 = load_card("h100-sxm").unwrap();
        let share = |f: &traces::hardware::Figure| f.measured.unwrap() / f.spec;
        assert_eq!(share(&h100.memory_bytes), MEMORY_SHARE);
        assert_eq!(share(&h100.memory_bandwidth_bytes_per_s), BANDWIDTH_SHARE);
        assert_eq!(share(&h100.dense_flops_per_s), FLOPS_SHARE);
        let link = &h100.host_to_device;
        assert_eq!(link.measured.unwrap() / link.spec, LINK_SHARE);
        // The spec-sheet cards are labelled so in what they derive.
        for name in ["gh200", "b200"] {
            let card = load_card(name).unwrap();
            assert!(!card.fully_measured(), "{name}");
            let p = derive_profile(&load_model("llama3.1-8b").unwrap(), &card);
            assert!(p.provenance.source.contains("UNMEASURED"), "{name}");
        }
    }

    #[test]
    fn every_shipped_pair_derives_a_valid_profile_of_the_models_window() {
        for (m, _, _) in SHIPPED_MODELS {
            for (c, _, _) in SHIPPED_CARDS {
                let p = resolve_profile(choice(None, Some(m), Some(c)))
                    .unwrap_or_else(|(_, e)| panic!("{m} on {c}: {e}"));
                let model = load_model(m).unwrap();
                assert_eq!(p.max_context_tokens, model.max_context_tokens);
                assert_eq!(p.kv_bytes_per_token, model.kv_bytes_per_token());
                assert!(p.name.contains(m), "{}", p.name);
            }
        }
        // The faster host link is what sets gh200 apart from the H100 it carries.
        let h2d = |c: &str| {
            resolve_profile(choice(None, None, Some(c)))
                .unwrap()
                .host_to_device
                .bandwidth_bytes_per_s
        };
        assert!(h2d("gh200") > 5.0 * h2d("h100-sxm"));
    }
}
