//! The deterministic core of Djinn.
//!
//! Owns: simulated time ([`time::SimTime`], integer nanoseconds) and the [`time::Clock`] trait;
//! seeded ChaCha sub-streams ([`rng`]); workload generation from specs ([`workload`]); the KV
//! block mechanism shared with the real engine ([`kv`]); the [`sched::Scheduler`] seam and the
//! shipped policies ([`policies`]); the [`backend::Backend`] seam and the simulated GPU
//! ([`backend::SimGpu`]); the run loop with its invariant checks ([`driver`]); and the glue that
//! turns a spec + profile + knobs into a run ([`experiment`]); and the physical upper bounds on
//! the agents a card can serve, from the profile and the generated programs ([`bounds`]).
//!
//! Ordering rule: events are totally ordered by (time, sequence number); at one instant finished
//! swaps come first (in completion order), then due arrivals, then the plan.
//!
//! Must never: read the OS clock, use ambient randomness (`thread_rng`) or iterate a `HashMap` in
//! a decision, or panic on bad input. The same (seed, config, profile, code version) gives
//! byte-identical outputs.

pub mod backend;
pub mod bounds;
pub mod driver;
pub mod experiment;
pub mod ids;
pub mod kv;
pub mod policies;
pub mod replay;
pub mod rng;
pub mod sched;
pub mod time;
pub mod workload;

pub use policies::{BatchPolicy, PolicyKind};
