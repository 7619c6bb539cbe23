//! The shipped scheduling policies, selected by a closed enum (no string registries).

pub mod autellix;
pub mod base;
pub mod batching;
pub mod common;
pub mod continuum;
pub mod djinn;
pub mod djinn_true_pauses;
pub mod infercept;
pub mod next_use;
pub mod offline;
pub mod pin;
pub mod predict;
pub mod swap;
pub mod vllm;

use crate::sched::Scheduler;
use crate::workload::Programs;

pub use autellix::Placement;
pub use batching::BatchPolicy;
pub use predict::PredictorMode;

/// Every shipped policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKind {
    Djinn,
    Vllm,
    VllmNoApc,
    Pin,
    Swap,
    InferCept,
    InferCeptH,
    Continuum,
    ContinuumFixed,
    Autellix(Placement),
    NextUse,
    DjinnTruePauses,
    Offline,
}

/// Policy names no longer accepted, with what to use instead.
const RETIRED_NAMES: [(&str, &str); 1] = [(
    "oracle",
    "it was djinn told the true pauses, not an upper bound: use `djinn-true-pauses` for that, \
     or `offline` for the reference that knows the whole future",
)];

/// Options every policy is built with (beyond its own defaults).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyOptions {
    /// What hint-using policies do with pause hints.
    pub predictor: PredictorMode,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 15] = [
        PolicyKind::Djinn,
        PolicyKind::Vllm,
        PolicyKind::VllmNoApc,
        PolicyKind::Pin,
        PolicyKind::Swap,
        PolicyKind::InferCept,
        PolicyKind::InferCeptH,
        PolicyKind::Continuum,
        PolicyKind::ContinuumFixed,
        PolicyKind::Autellix(Placement::Vllm),
        PolicyKind::Autellix(Placement::Swap),
        PolicyKind::Autellix(Placement::Continuum),
        PolicyKind::NextUse,
        PolicyKind::DjinnTruePauses,
        PolicyKind::Offline,
    ];
    /// The four policies of the original comparison (the default of `djinn simulate`).
    pub const DEFAULT_SET: [PolicyKind; 4] = [
        PolicyKind::Djinn,
        PolicyKind::Vllm,
        PolicyKind::Pin,
        PolicyKind::Swap,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Djinn => "djinn",
            PolicyKind::Vllm => "vllm",
            PolicyKind::VllmNoApc => "vllm-noapc",
            PolicyKind::Pin => "pin",
            PolicyKind::Swap => "swap",
            PolicyKind::InferCept => "infercept",
            PolicyKind::InferCeptH => "infercept-h",
            PolicyKind::Continuum => "continuum",
            PolicyKind::ContinuumFixed => "continuum-fixed",
            PolicyKind::Autellix(Placement::Vllm) => "autellix",
            PolicyKind::Autellix(Placement::Swap) => "autellix-swap",
            PolicyKind::Autellix(Placement::Continuum) => "autellix-continuum",
            PolicyKind::NextUse => "next-use",
            PolicyKind::DjinnTruePauses => "djinn-true-pauses",
            PolicyKind::Offline => "offline",
        }
    }

    pub fn parse(name: &str) -> Option<PolicyKind> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Parses a policy name; an unknown one gets a message that lists the known names, and a
    /// retired one says what replaced it.
    pub fn parse_explained(name: &str) -> Result<PolicyKind, String> {
        if let Some(p) = Self::parse(name) {
            return Ok(p);
        }
        match RETIRED_NAMES.iter().find(|(old, _)| *old == name) {
            Some((_, why)) => Err(format!("policy `{name}` no longer exists: {why}")),
            None => Err(format!(
                "unknown policy `{name}` (known: {})",
                Self::names().join(", ")
            )),
        }
    }

    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|p| p.name()).collect()
    }

    /// True for policies whose decisions use pause hints (they run with every predictor).
    pub fn uses_hints(self) -> bool {
        matches!(
            self,
            PolicyKind::Djinn
                | PolicyKind::InferCept
                | PolicyKind::InferCeptH
                | PolicyKind::NextUse
        )
    }

    /// A fresh scheduler of this kind with default parameters, to run `workload`.
    pub fn build(self, workload: &dyn Programs) -> Box<dyn Scheduler + Send> {
        self.build_with(PolicyOptions::default(), workload)
    }

    /// A fresh scheduler of this kind to run `workload`. Only the `offline` reference is given
    /// the workload's future ([`offline::Future`]); every other policy is built without it and
    /// learns the run only through its events and view.
    pub fn build_with(
        self,
        options: PolicyOptions,
        workload: &dyn Programs,
    ) -> Box<dyn Scheduler + Send> {
        match self {
            PolicyKind::Djinn => Box::new(djinn::Djinn::new(djinn::DjinnParams {
                predictor: options.predictor,
                ..Default::default()
            })),
            PolicyKind::Vllm => Box::new(vllm::Vllm::new(true)),
            PolicyKind::VllmNoApc => Box::new(vllm::Vllm::new(false)),
            PolicyKind::Pin => Box::new(pin::Pin::default()),
            PolicyKind::Swap => Box::new(swap::Swap::default()),
            PolicyKind::InferCept => Box::new(infercept::InferCept::new(false, options.predictor)),
            PolicyKind::InferCeptH => Box::new(infercept::InferCept::new(true, options.predictor)),
            PolicyKind::Continuum => Box::new(continuum::Continuum::new(false)),
            PolicyKind::ContinuumFixed => Box::new(continuum::Continuum::new(true)),
            PolicyKind::Autellix(p) => Box::new(autellix::Autellix::new(p, Default::default())),
            PolicyKind::NextUse => Box::new(next_use::NextUse::new(options.predictor)),
            PolicyKind::DjinnTruePauses => Box::new(djinn_true_pauses::djinn_true_pauses()),
            PolicyKind::Offline => Box::new(offline::Offline::new(offline::Future::of(workload))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Workload;

    #[test]
    fn names_round_trip() {
        for p in PolicyKind::ALL {
            assert_eq!(PolicyKind::parse(p.name()), Some(p));
            let empty = Workload {
                name: "empty".into(),
                max_context_tokens: 1,
                agents: Vec::new(),
            };
            assert_eq!(p.build(&empty).name(), p.name());
        }
        assert_eq!(PolicyKind::parse("autellix-vllm"), None);
        let retired = PolicyKind::parse_explained("oracle").unwrap_err();
        assert!(
            retired.contains("djinn-true-pauses") && retired.contains("offline"),
            "{retired}"
        );
        let unknown = PolicyKind::parse_explained("orcale").unwrap_err();
        assert!(unknown.contains("known: djinn,"), "{unknown}");
    }
}
