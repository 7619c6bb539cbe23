//! `grid.json`: the manifest of a profiling grid (`djinn calibrate profile`), written beside its
//! steps.csv and swaps.csv (the same records as a real run's). It names what a profile fitted
//! from the grid will record as its origin: card, driver, model, engine commit and the shapes.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::io::TraceError;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GridManifest {
    pub schema_version: u32,
    pub tool: String,
    /// "cuda" or "cpu".
    pub backend: String,
    /// The card (CUDA device name) or the CPU.
    pub device: String,
    /// Driver version (empty on the CPU backend).
    #[serde(default)]
    pub driver: String,
    /// Engine model preset (or weights file) profiled.
    pub model: String,
    pub engine_commit: String,
    /// Shapes measured per kind, as planned and as run.
    pub decode_shapes: u32,
    pub prefill_shapes: u32,
    pub mixed_shapes: u32,
    pub swap_shapes: u32,
    /// Shapes the plan dropped, each with why (memory, budget).
    #[serde(default)]
    pub skipped: Vec<String>,
    pub warmup_reps: u32,
    pub reps: u32,
    pub budget_s: f64,
    /// Wall seconds the grid took.
    pub elapsed_s: f64,
    /// The command line that reproduces the grid.
    pub reproduce: String,
}

impl GridManifest {
    /// A one-line summary for a fitted profile's provenance.
    pub fn summary(&self) -> String {
        let driver = if self.driver.is_empty() {
            String::new()
        } else {
            format!(", driver {}", self.driver)
        };
        format!(
            "a {}-shape grid of {} ({} decode, {} prefill, {} mixed, {} beside swaps; {} reps) on {}{driver}, engine {}",
            self.decode_shapes + self.prefill_shapes + self.mixed_shapes + self.swap_shapes,
            self.model,
            self.decode_shapes,
            self.prefill_shapes,
            self.mixed_shapes,
            self.swap_shapes,
            self.reps,
            self.device,
            self.engine_commit
        )
    }

    pub fn read(path: &Path) -> Result<Self, TraceError> {
        let m: GridManifest = crate::read_json(path)?;
        crate::check_schema_version(path, m.schema_version)?;
        Ok(m)
    }
}
