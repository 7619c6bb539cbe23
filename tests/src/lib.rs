//! Integration, property, determinism and golden tests live in `tests/tests/`.
