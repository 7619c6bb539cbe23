//! A run directory: `manifest.json`, `turns.csv`, `steps.csv`, `swaps.csv`, `summary.json`.

use std::path::Path;

use crate::io::{csv_bytes_with_header, TraceError};
use crate::{RunManifest, RunSummary, StepRecord, SwapRecord, TurnRecord};

/// The files of a run directory, in the order they are written.
pub const RUN_DIR_FILES: [&str; 5] = [
    "manifest.json",
    "turns.csv",
    "steps.csv",
    "swaps.csv",
    "summary.json",
];

/// Writes a run directory. The files go to a temporary sibling directory that is renamed into
/// place at the end, so an interrupted write never leaves a directory that looks complete.
pub fn write_run_dir(
    dir: &Path,
    manifest: &RunManifest,
    turns: &[TurnRecord],
    steps: &[StepRecord],
    swaps: &[SwapRecord],
    summary: &RunSummary,
) -> Result<(), TraceError> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| TraceError::io(parent, e))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TraceError::io(&tmp, e))?;
    }
    let result = (|| -> Result<(), TraceError> {
        std::fs::create_dir_all(&tmp).map_err(|e| TraceError::io(&tmp, e))?;
        let csv_err = |path: &Path, e: csv::Error| TraceError::Parse {
            path: path.to_path_buf(),
            location: "serialize".into(),
            message: e.to_string(),
        };
        let write = |file: &str, bytes: Vec<u8>| -> Result<(), TraceError> {
            let path = tmp.join(file);
            std::fs::write(&path, bytes).map_err(|e| TraceError::io(&path, e))
        };
        let json = |value: &dyn erased::Json| -> Vec<u8> { value.to_json() };
        write("manifest.json", json(manifest))?;
        write(
            "turns.csv",
            csv_bytes_with_header(turns).map_err(|e| csv_err(&tmp.join("turns.csv"), e))?,
        )?;
        write(
            "steps.csv",
            csv_bytes_with_header(steps).map_err(|e| csv_err(&tmp.join("steps.csv"), e))?,
        )?;
        write(
            "swaps.csv",
            csv_bytes_with_header(swaps).map_err(|e| csv_err(&tmp.join("swaps.csv"), e))?,
        )?;
        write("summary.json", json(summary))?;
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| TraceError::io(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| TraceError::io(dir, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

mod erased {
    /// Pretty JSON with a trailing newline, for the two JSON files of a run directory.
    pub trait Json {
        fn to_json(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Vec<u8> {
            let mut text =
                serde_json::to_string_pretty(self).expect("run records always serialize");
            text.push('\n');
            text.into_bytes()
        }
    }
}
