//! The shipped scheduling policies, selected by a closed enum (no string registries).

pub mod autellix;
pub mod base;
pub mod batching;
pub mod common;
pub mod continuum;
pub mod djinn;
pub mod infercept;
pub mod next_use;
pub mod oracle;
pub mod pin;
pub mod predict;
pub mod swap;
pub mod vllm;

use crate::sched::Scheduler;

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
    Oracle,
}

/// Options every policy is built with (beyond its own defaults).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyOptions {
    /// What hint-using policies do with pause hints.
    pub predictor: PredictorMode,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 14] = [
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
        PolicyKind::Oracle,
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
            PolicyKind::Oracle => "oracle",
        }
    }

    pub fn parse(name: &str) -> Option<PolicyKind> {
        Self::ALL.into_iter().find(|p| p.name() == name)
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

    /// A fresh scheduler of this kind with default parameters.
    pub fn build(self) -> Box<dyn Scheduler + Send> {
        self.build_with(PolicyOptions::default())
    }

    pub fn build_with(self, options: PolicyOptions) -> Box<dyn Scheduler + Send> {
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
            PolicyKind::Oracle => Box::new(oracle::oracle()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in PolicyKind::ALL {
            assert_eq!(PolicyKind::parse(p.name()), Some(p));
            assert_eq!(p.build().name(), p.name());
        }
        assert_eq!(PolicyKind::parse("autellix-vllm"), None);
    }
}
