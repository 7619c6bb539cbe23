//! A run directory: `manifest.json`, `turns.csv`, `steps.csv`, `swaps.csv`, `summary.json`.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

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
///
/// An existing run directory is never replaced: earlier results are not this writer's to delete
/// (commands that replace results on request do so for a whole results folder, beside the
/// tables that summarise it). A target that exists and is not an empty directory is an error.
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
    refuse_existing(dir)?;
    std::fs::create_dir_all(parent).map_err(|e| TraceError::io(parent, e))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into());
    // Process id and a counter: two writers (processes or threads) never share a temporary.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tmp = parent.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
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
        // Checked again: another writer may have finished the same directory meanwhile. rename(2)
        // itself refuses a non-empty target directory.
        refuse_existing(dir)?;
        std::fs::rename(&tmp, dir).map_err(|e| TraceError::io(dir, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Errors when `dir` exists as anything but an empty directory.
fn refuse_existing(dir: &Path) -> Result<(), TraceError> {
    let occupied = match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_some(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        // A file, or a directory we cannot list: either way not ours to write into.
        Err(_) => dir.exists(),
    };
    if occupied {
        return Err(TraceError::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "already exists; a run directory is never replaced (write to a new folder)",
            ),
        ));
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_existing_run_directory_is_never_replaced() {
        let root = std::env::temp_dir().join(format!("djinn-rundir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = root.join("run");
        let manifest: RunManifest = serde_json::from_value(serde_json::json!({
            "schema_version": 1, "tool": "t", "code_version": "t", "backend": "sim", "seed": 0,
            "policy": "p", "agents": 1, "profile_name": "p", "profile_provenance": "analytic",
            "device": "", "model": "", "options": {}, "reproduce": "",
            "workload": crate::WorkloadSpec::from_toml_str(Path::new("w.toml"), WORKLOAD).unwrap(),
        }))
        .unwrap();
        let summary = RunSummary::default();
        write_run_dir(&dir, &manifest, &[], &[], &[], &summary).unwrap();
        let before = std::fs::read(dir.join("manifest.json")).unwrap();
        let mut other = manifest.clone();
        other.seed = 7;
        let err = write_run_dir(&dir, &other, &[], &[], &[], &summary).unwrap_err();
        assert!(err.to_string().contains("never replaced"), "{err}");
        assert_eq!(std::fs::read(dir.join("manifest.json")).unwrap(), before);
        let names: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary left behind: {names:?}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    const WORKLOAD: &str = r#"
schema_version = 1
name = "t"
agents = 1
max_context_tokens = 64
[arrival]
kind = "ramp"
ramp_s = 0.0
[agent]
turns = { kind = "constant", value = 1 }
first_prompt_tokens = { kind = "constant", value = 8 }
new_tokens = { kind = "constant", value = 1 }
generated_tokens = { kind = "constant", value = 1 }
pause_s = { kind = "constant", value = 0.0 }
[hint]
kind = "exact"
"#;
}
