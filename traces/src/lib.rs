//! Every on-disk format of Djinn.
//!
//! Owns: the serde types, readers and writers for workload specs (TOML), run manifests (JSON),
//! turn, step and swap records (CSV), summaries (JSON), GPU profiles (JSON), profiling-grid
//! manifests (JSON) and the model and card
//! descriptions profiles are derived from (TOML), with their schema versions, plus the atomic-write
//! helper every result file goes through.
//!
//! Architecture invariant: this crate depends on nothing of ours. Its types are a boundary
//! (serialized formats), kept separate from the in-memory types of `sim` and `engine` and converted
//! at the edge, so a change of internals never silently changes a file format.
//!
//! Must never: panic on bad input. Every reader returns a [`TraceError`] naming the file and the
//! line or field that is wrong.

pub mod correction;
pub mod grid;
pub mod hardware;
pub mod io;
pub mod manifest;
pub mod profile;
pub mod records;
pub mod rundir;
pub mod summary;
pub mod workload;

pub use correction::{CorrectionTable, StepCorrections};
pub use grid::GridManifest;
pub use hardware::{CardSpec, Dtype, ModelSpec};
pub use io::{read_csv, read_json, write_atomic, write_csv_atomic, write_json_atomic, TraceError};
pub use manifest::RunManifest;
pub use profile::{
    CopyChannel, CostModel, GpuProfile, Provenance, StepShape, ValidationCell, ValidationSummary,
};
pub use records::{StepRecord, SwapRecord, TurnRecord};
pub use rundir::{write_run_dir, RUN_DIR_FILES};
pub use summary::{LatencyStats, RunSummary};
pub use workload::{Arrival, Distribution, HintSpec, MixtureComponent, WorkloadSpec};

/// Version of every schema in this crate; bumped whenever any field changes meaning.
pub const SCHEMA_VERSION: u32 = 1;

/// Every versioned format's first check: the file's `schema_version` is this build's.
pub fn check_schema_version(path: &std::path::Path, version: u32) -> Result<(), TraceError> {
    if version != SCHEMA_VERSION {
        return Err(TraceError::invalid(
            path,
            "schema_version",
            format!("this build reads version {SCHEMA_VERSION}, got {version}"),
        ));
    }
    Ok(())
}
