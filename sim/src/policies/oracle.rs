//! `oracle`: the upper bound. It is the semantic policy's machinery fed the true pause of every
//! pause (`PauseNotice::true_ns_for_oracle`) instead of a hint or a prediction: it keeps while
//! memory is plentiful, swaps out with a prefetch timed to the true return when the pause hides
//! the round trip, drops when the host is full or recompute is cheaper than the stall a late swap
//! would cause, and under memory pressure evicts the agent whose KV idles longest (the most
//! block-seconds freed per block moved). No real policy can know `d`; this bounds what better
//! prediction could buy.

use super::djinn::{Djinn, DjinnParams};

pub fn oracle() -> Djinn {
    Djinn::new(DjinnParams {
        knows_true_pauses: true,
        ..DjinnParams::default()
    })
}
