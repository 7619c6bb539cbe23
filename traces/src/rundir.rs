//! The run directory: manifest, turn / step / swap records and summary of one run, written as a
//! unit. This is the one writer of run directories (`djinn simulate` and the tests use it), so
//! the determinism tests compare exactly the bytes users get.

use std::path::Path;

use crate::io::{write_csv_atomic, write_json_atomic, TraceError};
use crate::{RunManifest, RunSummary, StepRecord, SwapRecord, TurnRecord};

/// Writes one run directory (manifest.json, turns.csv, steps.csv, swaps.csv, summary.json). The
/// files go to a temporary sibling directory that is renamed into place at the end, so an
/// interrupted write never leaves a directory that looks complete.
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
        write_json_atomic(&tmp.join("manifest.json"), manifest)?;
        write_csv_atomic(&tmp.join("turns.csv"), turns)?;
        write_csv_atomic(&tmp.join("steps.csv"), steps)?;
        write_csv_atomic(&tmp.join("swaps.csv"), swaps)?;
        write_json_atomic(&tmp.join("summary.json"), summary)?;
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| TraceError::io(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| TraceError::io(dir, e))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}
