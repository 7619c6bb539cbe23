//! Deterministic core.
