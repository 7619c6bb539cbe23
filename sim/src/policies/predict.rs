//! Pause predictors: what a hint-using policy believes about how long a pause will last.
//!
//! The workload decides what the scheduler is told (`hint` exact, noisy with a log-normal sigma,
//! or none); the predictor decides what the policy does with it:
//! - [`PredictorMode::Hint`]: believe the hint (exact or noisy, as the workload gives it); when a
//!   pause comes without one, fall back to the agent's own history (EWMA), then the workload's.
//! - [`PredictorMode::Ewma`]: ignore hints; predict from the agent's own observed pauses (EWMA),
//!   falling back to the EWMA over all agents.
//! - [`PredictorMode::Off`]: no prediction at all (the policy's no-information behaviour).
//!
//! So the four predictor settings of a study are: exact = hint exact + `Hint`; noisy = hint noisy
//! + `Hint`; EWMA = any hint + `Ewma`; none = any hint + `Off`.

use crate::ids::AgentId;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PredictorMode {
    #[default]
    Hint,
    Ewma,
    Off,
}

impl PredictorMode {
    pub const ALL: [PredictorMode; 3] =
        [PredictorMode::Hint, PredictorMode::Ewma, PredictorMode::Off];

    pub fn name(self) -> &'static str {
        match self {
            PredictorMode::Hint => "hint",
            PredictorMode::Ewma => "ewma",
            PredictorMode::Off => "none",
        }
    }

    pub fn parse(name: &str) -> Option<PredictorMode> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// Weight of the newest observation in the EWMAs.
pub const EWMA_ALPHA: f64 = 0.3;

/// Per-agent and workload-wide EWMAs of observed pauses, and the prediction rule of a mode.
#[derive(Clone, Debug, Default)]
pub struct PausePredictor {
    pub mode: PredictorMode,
    /// Each agent's EWMA by agent id, NaN before its first observation (dense: one lookup per
    /// returning turn, and 8 bytes an agent where a map of a million agents took several times
    /// that and a tree search each).
    per_agent_ns: Vec<f64>,
    global_ns: Option<f64>,
}

impl PausePredictor {
    pub fn new(mode: PredictorMode) -> Self {
        PausePredictor {
            mode,
            per_agent_ns: Vec::new(),
            global_ns: None,
        }
    }

    fn ewma(old: Option<f64>, new: f64) -> f64 {
        match old {
            Some(o) => EWMA_ALPHA * new + (1.0 - EWMA_ALPHA) * o,
            None => new,
        }
    }

    /// Learns a finished pause of `agent` (call when its next turn arrives).
    pub fn observe(&mut self, agent: AgentId, observed_ns: u64) {
        let observed = observed_ns as f64;
        let i = agent as usize;
        if self.per_agent_ns.len() <= i {
            self.per_agent_ns.resize(i + 1, f64::NAN);
        }
        self.per_agent_ns[i] = Self::ewma(self.agent_ewma(agent), observed);
        self.global_ns = Some(Self::ewma(self.global_ns, observed));
    }

    fn agent_ewma(&self, agent: AgentId) -> Option<f64> {
        let v = *self.per_agent_ns.get(agent as usize)?;
        (!v.is_nan()).then_some(v)
    }

    fn history(&self, agent: AgentId) -> Option<u64> {
        self.agent_ewma(agent)
            .or(self.global_ns)
            .map(|v| v.max(0.0) as u64)
    }

    /// The predicted length of a pause that starts now, given the hint the scheduler was told.
    pub fn predict(&self, agent: AgentId, hint_ns: Option<u64>) -> Option<u64> {
        match self.mode {
            PredictorMode::Hint => hint_ns.or_else(|| self.history(agent)),
            PredictorMode::Ewma => self.history(agent),
            PredictorMode::Off => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_use_hint_history_or_nothing() {
        let mut p = PausePredictor::new(PredictorMode::Hint);
        assert_eq!(p.predict(0, Some(5)), Some(5));
        assert_eq!(p.predict(0, None), None);
        p.observe(0, 1000);
        p.observe(0, 2000);
        // 0.3 x 2000 + 0.7 x 1000
        assert_eq!(p.predict(0, None), Some(1300));
        assert_eq!(
            p.predict(1, None),
            Some(1300),
            "an agent without history gets the workload's"
        );
        p.mode = PredictorMode::Ewma;
        assert_eq!(p.predict(0, Some(5)), Some(1300), "EWMA ignores the hint");
        p.mode = PredictorMode::Off;
        assert_eq!(p.predict(0, Some(5)), None);
    }
}
