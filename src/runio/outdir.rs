//! Where results go, and the rule that protects earlier ones.
//!
//! No command deletes or silently replaces results. A result file or results folder that already
//! exists is refused (exit 2, before any work runs) unless the command was given `--overwrite`;
//! then it is replaced whole. A results folder (a workload's run directories and the
//! `comparison.csv` that summarises them) is written into a hidden staging folder beside its
//! target and published by one rename, so a reader only ever sees no folder, the earlier folder
//! or the complete new one: the table always matches the run directories beside it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context, Result};

/// A name no other writer (process or thread) uses at the same time.
fn unique_suffix() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The folder a path lives in (`.` for a bare file name).
fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Checks that files can be created under `dir` (created later if missing): its nearest
/// existing ancestor must be a folder we can write in. Leaves nothing behind.
pub fn check_writable(dir: &Path) -> Result<()> {
    let mut existing = dir;
    while !existing.exists() {
        existing = match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
    }
    if !existing.is_dir() {
        bail!(
            "{}: not a folder, so {} cannot be created",
            existing.display(),
            dir.display()
        );
    }
    let probe = existing.join(format!(".djinn-write-check-{}", unique_suffix()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .with_context(|| format!("{}: cannot write results here", existing.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Checks, before any work runs, that a single result file may be written to `path`: its folder
/// is writable and the file does not exist yet (unless `overwrite`).
pub fn check_new_file(path: &Path, flag: &str, overwrite: bool) -> Result<()> {
    if path.is_dir() {
        bail!(
            "{flag} {}: is a folder, expected a file path",
            path.display()
        );
    }
    if path.exists() && !overwrite {
        bail!(
            "{flag} {}: the file already exists (earlier results are never replaced silently); pass --overwrite to replace it, or choose another path",
            path.display()
        );
    }
    check_writable(parent_of(path))
}

/// Checks, before any work runs, that a results folder may be written at `target`: it does not
/// exist yet (unless `overwrite`) and its parent is writable.
pub fn check_new_folder(target: &Path, overwrite: bool) -> Result<()> {
    if target.exists() && !overwrite {
        bail!(
            "{}: already holds results (earlier results are never replaced silently); pass --overwrite to replace that folder whole, or choose another --out",
            target.display()
        );
    }
    if target.exists() && !target.is_dir() {
        bail!("{}: exists and is not a folder", target.display());
    }
    check_writable(parent_of(target))
}

/// A results folder being written. Files go into a hidden staging folder beside `target`;
/// [`Staging::publish`] renames it into place. Dropped unpublished (an error), the staging folder
/// is removed, or kept and named on stderr when its partial results are worth keeping (real
/// engine runs).
pub struct Staging {
    target: PathBuf,
    dir: PathBuf,
    keep_on_failure: bool,
    published: bool,
}

impl Staging {
    pub fn new(target: &Path, keep_on_failure: bool) -> Result<Staging> {
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .with_context(|| format!("{}: not a folder name", target.display()))?;
        let dir = parent_of(target).join(format!(".{name}.partial-{}", unique_suffix()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Staging {
            target: target.to_path_buf(),
            dir,
            keep_on_failure,
            published: false,
        })
    }

    /// Where the files go until publication.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Moves the staged folder into place. An existing target is replaced only with `overwrite`
    /// (moved aside first, removed once the new folder is in place, restored if that fails).
    pub fn publish(mut self, overwrite: bool) -> Result<()> {
        let target = self.target.clone();
        if target.exists() {
            if !overwrite {
                // Checked before the run; another writer got there meanwhile. Keep this run.
                self.keep_on_failure = true;
                bail!(
                    "{}: appeared while this run was writing; not replaced",
                    target.display()
                );
            }
            let name = target.file_name().unwrap_or_default().to_string_lossy();
            let aside = parent_of(&target).join(format!(".{name}.replaced-{}", unique_suffix()));
            std::fs::rename(&target, &aside)
                .with_context(|| format!("moving the earlier {} aside", target.display()))?;
            if let Err(e) = std::fs::rename(&self.dir, &target) {
                let _ = std::fs::rename(&aside, &target);
                return Err(e).with_context(|| format!("publishing {}", target.display()));
            }
            self.published = true;
            std::fs::remove_dir_all(&aside)
                .with_context(|| format!("removing the replaced {}", aside.display()))?;
            return Ok(());
        }
        std::fs::rename(&self.dir, &target)
            .with_context(|| format!("publishing {}", target.display()))?;
        self.published = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.published {
            return;
        }
        if self.keep_on_failure {
            eprintln!(
                "the results finished so far are kept, incomplete, in {}",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("djinn-outdir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_folder_is_published_whole_and_replaced_only_on_request() {
        let root = scratch("publish");
        let target = root.join("w");
        check_new_folder(&target, false).unwrap();
        assert!(!root.exists(), "checking writes nothing");
        let staging = Staging::new(&target, false).unwrap();
        std::fs::write(staging.path().join("a"), b"1").unwrap();
        staging.publish(false).unwrap();
        assert_eq!(std::fs::read(target.join("a")).unwrap(), b"1");
        let err = check_new_folder(&target, false).unwrap_err().to_string();
        assert!(err.contains("--overwrite"), "{err}");
        // Without --overwrite a folder that appeared meanwhile is kept, and so is this run.
        let staging = Staging::new(&target, false).unwrap();
        let staged = staging.path().to_path_buf();
        std::fs::write(staged.join("b"), b"2").unwrap();
        assert!(staging.publish(false).is_err());
        assert!(target.join("a").is_file() && staged.join("b").is_file());
        std::fs::remove_dir_all(&staged).unwrap();
        // With it, the folder is replaced whole: no file of the earlier one survives.
        let staging = Staging::new(&target, false).unwrap();
        std::fs::write(staging.path().join("b"), b"2").unwrap();
        staging.publish(true).unwrap();
        assert!(!target.join("a").exists() && target.join("b").is_file());
        let names: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("w")],
            "nothing else left"
        );
        // Dropped unpublished: removed.
        let staging = Staging::new(&root.join("x"), false).unwrap();
        let staged = staging.path().to_path_buf();
        drop(staging);
        assert!(!staged.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_result_file_is_checked_before_the_work() {
        let root = scratch("file");
        let path = root.join("sub/out.csv");
        check_new_file(&path, "--out", false).unwrap();
        assert!(!root.exists(), "checking writes nothing");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"x").unwrap();
        let err = check_new_file(&path, "--out", false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("already exists") && err.contains("out.csv"),
            "{err}"
        );
        check_new_file(&path, "--out", true).unwrap();
        let blocker = root.join("file");
        std::fs::write(&blocker, b"x").unwrap();
        let err = check_new_file(&blocker.join("out.csv"), "--out", false).unwrap_err();
        assert!(err.to_string().contains("not a folder"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
