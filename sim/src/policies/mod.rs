//! The shipped scheduling policies, selected by a closed enum (no string registries).

pub mod common;
pub mod djinn;
pub mod pin;
pub mod swap;
pub mod vllm;

use crate::sched::Scheduler;

/// Every shipped policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKind {
    Djinn,
    Vllm,
    VllmNoApc,
    Pin,
    Swap,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 5] = [PolicyKind::Djinn, PolicyKind::Vllm, PolicyKind::VllmNoApc, PolicyKind::Pin, PolicyKind::Swap];
    /// The four policies of the original comparison (the default of `djinn simulate`).
    pub const DEFAULT_SET: [PolicyKind; 4] = [PolicyKind::Djinn, PolicyKind::Vllm, PolicyKind::Pin, PolicyKind::Swap];

    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Djinn => "djinn",
            PolicyKind::Vllm => "vllm",
            PolicyKind::VllmNoApc => "vllm-noapc",
            PolicyKind::Pin => "pin",
            PolicyKind::Swap => "swap",
        }
    }

    pub fn parse(name: &str) -> Option<PolicyKind> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|p| p.name()).collect()
    }

    /// A fresh scheduler of this kind with default parameters.
    pub fn build(self) -> Box<dyn Scheduler + Send> {
        match self {
            PolicyKind::Djinn => Box::new(djinn::Djinn::default()),
            PolicyKind::Vllm => Box::new(vllm::Vllm::new(true)),
            PolicyKind::VllmNoApc => Box::new(vllm::Vllm::new(false)),
            PolicyKind::Pin => Box::new(pin::Pin::default()),
            PolicyKind::Swap => Box::new(swap::Swap::default()),
        }
    }
}
