//! Analysis of trace files.
//!
//! Owns: percentiles, the latency decomposition (queue wait, KV restore, prefill, decode), run
//! summaries, comparison tables and CSV exports, and a run's timeline in the Chrome trace-event
//! format (`timeline`).
//!
//! Architecture invariant: this crate reads trace types only (`traces`), never `sim`, so changing
//! a policy cannot break a report: a report is a function of trace files.

pub mod plot;
pub mod summary;
pub mod table;
pub mod timeline;

pub use summary::{decompose, percentile, summarize, SummaryInputs, TurnParts};
pub use table::comparison_table;
