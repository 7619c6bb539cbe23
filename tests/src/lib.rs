//! Shared pieces of the cross-crate tests in `tests/tests/`: random cases (workload spec + pool
//! sizes + PCIe profile + seed) with the command that reproduces one, the record-level checks
//! that run beside the run loop's own checker, deliberately broken policies (canaries), and run
//! digests for the determinism and golden tests. See `docs/testing.md` for how to run them.

pub mod canary;
pub mod case;
pub mod check;
pub mod digest;
pub mod env;
