//! The files a run reads, with their content hashes.
//!
//! A manifest's reproduce line names each input file with `--expect-sha256 FILE=HASH`; rerunning
//! the line on a file that changed since is refused (exit 2) instead of quietly producing a
//! different run under the same command. Inputs shipped inside the binary (workloads, profiles,
//! sample traces by name) are hashed too, for fingerprints, but need no flag: the code version
//! in the manifest fixes them.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use traces::WorkloadSpec;

/// One input of a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Input {
    /// What it is: `workload`, `profile`, `replay trace`, `background trace`, `sweep spec`.
    pub role: String,
    /// The path as given (on the command line or in a spec), or the shipped name.
    pub name: String,
    /// A file on disk (true) or shipped inside the binary (false).
    pub file: bool,
    pub sha256: String,
}

impl Input {
    pub fn shipped(role: &str, name: &str, text: &str) -> Input {
        Input {
            role: role.into(),
            name: name.into(),
            file: false,
            sha256: sha256_hex(text.as_bytes()),
        }
    }

    /// Reads and hashes the file at `path`.
    pub fn file(role: &str, path: &str) -> Result<Input> {
        let bytes = std::fs::read(path).with_context(|| format!("{path}: reading the {role}"))?;
        Ok(Input {
            role: role.into(),
            name: path.into(),
            file: true,
            sha256: sha256_hex(&bytes),
        })
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The traces a workload replays or mixes in (`spec` loaded from `spec_name`, its trace paths
/// already resolved): shipped samples by name, files read and hashed.
pub fn trace_inputs(spec_name: &str, spec: &WorkloadSpec) -> Result<Vec<Input>> {
    let traces = [
        (
            "replay trace",
            "replay.path",
            spec.replay.as_ref().map(|r| &r.path),
        ),
        (
            "background trace",
            "background.path",
            spec.background.as_ref().map(|b| &b.path),
        ),
    ];
    let mut out = Vec::new();
    for (role, field, path) in traces {
        let Some(path) = path else { continue };
        out.push(match sim::replay::shipped_trace(path) {
            Some((name, text)) => Input::shipped(role, name, text),
            None => Input::file(role, path).with_context(|| {
                format!(
                    "{spec_name}: field `{field}` (a relative path is relative to the spec's folder)"
                )
            })?,
        });
    }
    Ok(out)
}

/// The input of a profile given by shipped name or path.
pub fn profile_input(name_or_path: &str) -> Result<Input> {
    match calibration::SHIPPED_PROFILES
        .iter()
        .find(|(n, _, _)| *n == name_or_path)
    {
        Some((name, _, text)) => Ok(Input::shipped("profile", name, text)),
        None => Input::file("profile", name_or_path),
    }
}

/// A word of a shell command line: quoted when it holds anything a shell would split or expand.
pub fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,+@%".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// ` --expect-sha256 FILE=HASH` for every file among `inputs` (each file once).
pub fn expect_flags(inputs: &[Input]) -> String {
    let mut seen = std::collections::BTreeSet::new();
    inputs
        .iter()
        .filter(|i| i.file && seen.insert(i.name.as_str()))
        .map(|i| {
            format!(
                " --expect-sha256 {}",
                shell_word(&format!("{}={}", i.name, i.sha256))
            )
        })
        .collect()
}

/// Checks every `--expect-sha256 FILE=HASH`: the file's content must still have that hash.
pub fn check_expected(flags: &[String]) -> Result<()> {
    for flag in flags {
        let Some((path, want)) = flag.rsplit_once('=') else {
            bail!("--expect-sha256 must be FILE=SHA256, got {flag:?}");
        };
        if want.len() != 64 || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("--expect-sha256 {flag}: the hash must be 64 hex digits (SHA-256)");
        }
        let bytes =
            std::fs::read(path).with_context(|| format!("--expect-sha256: reading {path}"))?;
        let have = sha256_hex(&bytes);
        if !have.eq_ignore_ascii_case(want) {
            bail!(
                "{path} changed since the run this command reproduces: its SHA-256 is {have}, the run read {want}"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_hashes_detect_a_changed_file() {
        let dir = std::env::temp_dir().join(format!("djinn-inputs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p q.json");
        std::fs::write(&path, b"one").unwrap();
        let input = Input::file("profile", path.to_str().unwrap()).unwrap();
        let flags = expect_flags(&[input.clone(), input.clone()]);
        assert_eq!(flags.matches("--expect-sha256").count(), 1, "{flags}");
        assert!(
            flags.contains("'"),
            "a path with a space is quoted: {flags}"
        );
        let flag = format!("{}={}", input.name, input.sha256);
        check_expected(std::slice::from_ref(&flag)).unwrap();
        std::fs::write(&path, b"two").unwrap();
        let err = format!("{:#}", check_expected(&[flag]).unwrap_err());
        assert!(
            err.contains("changed since the run") && err.contains("p q.json"),
            "{err}"
        );
        assert!(check_expected(&["x=12".into()]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
