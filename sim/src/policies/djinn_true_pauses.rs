//! `djinn-true-pauses`: the semantic policy's machinery fed the true length of every pause
//! (`PauseNotice::true_ns_reference_only`) instead of a hint or a prediction. Everything else is
//! `djinn`'s: it keeps while memory is plentiful, swaps out with a prefetch timed to the true
//! return when the pause hides the round trip, drops when the host is full or recompute is cheaper
//! than the stall a late swap would cause, and under memory pressure evicts the agent that returns
//! last.
//!
//! It measures what better pause prediction could buy djinn, nothing more. It is **not** an upper
//! bound: with exact hints it is djinn itself, and other policies can beat it. The offline
//! reference that knows the whole future is `offline` (`super::offline`).

use super::djinn::{Djinn, DjinnParams};

pub fn djinn_true_pauses() -> Djinn {
    Djinn::new(DjinnParams {
        knows_true_pauses: true,
        ..DjinnParams::default()
    })
}
