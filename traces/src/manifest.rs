//! `manifest.json`: everything that fixes a run (seed, config, backend, profile, code version).
//! It holds no wall-clock time, so two runs of the same inputs write the same bytes.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunManifest {
    pub schema_version: u32,
    pub tool: String,
    pub code_version: String,
    /// "sim" or "cuda" / "cpu" for real runs.
    pub backend: String,
    pub seed: u64,
    pub policy: String,
    pub agents: u32,
    pub workload: crate::WorkloadSpec,
    /// Name of the GPU profile (and its provenance kind) the simulated GPU used.
    pub profile_name: String,
    pub profile_provenance: String,
    /// Device, driver and model of a real run (empty for simulations).
    pub device: String,
    pub model: String,
    /// Every run option as `key = value`, sorted, so diffs between runs read easily.
    pub options: std::collections::BTreeMap<String, String>,
    /// The command line that reproduces this run.
    pub reproduce: String,
}
