//! What a sweep's output folder holds results of: `<out>/sweep.json`.
//!
//! Resuming skips finished configurations, which is right only if they were produced by the same
//! spec, profile and workloads. So the folder records what fixed its results (the parsed spec
//! and every input file's content hash) and each configuration's result carries the same
//! fingerprint. A rerun with anything different is refused (exit 2, naming what changed) unless
//! `--overwrite` is given, which discards the folder's sweep results and starts again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::spec::SweepSpec;
use crate::runio::inputs::{sha256_hex, Input};

/// Everything that fixes a sweep's results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepInputs {
    pub spec: SweepSpec,
    /// The profile, each workload and each trace a workload reads, with content hashes.
    pub inputs: Vec<Input>,
}

impl SweepInputs {
    /// One hash of all of it: what every configuration result of the sweep records.
    pub fn fingerprint(&self) -> String {
        sha256_hex(&serde_json::to_vec(self).expect("sweep inputs serialize"))
    }
}

/// `<out>/sweep.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SweepManifest {
    pub tool: String,
    pub code_version: String,
    /// The spec file as given on the command line.
    pub spec_path: String,
    /// [`SweepInputs::fingerprint`] of `fixed_by`.
    pub inputs_sha256: String,
    pub fixed_by: SweepInputs,
}

pub const MANIFEST: &str = "sweep.json";

/// What a sweep writes into its folder (all of it goes with `--overwrite`, nothing else does).
fn is_sweep_output(name: &str) -> bool {
    name == MANIFEST
        || name == "configs"
        || name == "runs"
        || (name.starts_with("results") && name.ends_with(".csv"))
}

/// Temporaries of atomic writes in progress (another shard's, say), not results.
fn is_temporary(name: &str) -> bool {
    name.starts_with('.') && (name.contains(".tmp-") || name.contains(".djinn-write-check-"))
}

fn entries(out: &Path) -> Result<Vec<String>> {
    if !out.exists() {
        return Ok(Vec::new());
    }
    let mut names: Vec<String> = std::fs::read_dir(out)
        .with_context(|| format!("listing {}", out.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !is_temporary(n))
        .collect();
    names.sort();
    Ok(names)
}

/// How the folder stands against this sweep's inputs.
pub enum FolderState {
    /// Nothing there yet, or results of these very inputs (resume).
    Ready { earlier_code: Option<String> },
    /// Results of other inputs (or of unknown ones) that `--overwrite` removes first.
    Replace { paths: Vec<PathBuf> },
}

/// Checks `out` against `manifest`; refuses (naming what differs) when it holds results of other
/// inputs and `overwrite` is off.
pub fn check_folder(out: &Path, manifest: &SweepManifest, overwrite: bool) -> Result<FolderState> {
    let names = entries(out)?;
    if names.is_empty() {
        return Ok(FolderState::Ready { earlier_code: None });
    }
    let path = out.join(MANIFEST);
    let earlier: Option<SweepManifest> = if path.is_file() {
        Some(traces::read_json(&path)?)
    } else {
        None
    };
    let why = match &earlier {
        Some(e) if e.inputs_sha256 == manifest.inputs_sha256 => {
            let earlier_code =
                (e.code_version != manifest.code_version).then(|| e.code_version.clone());
            return Ok(FolderState::Ready { earlier_code });
        }
        Some(e) => format!(
            "its results were produced by other inputs ({}): {}",
            path.display(),
            differences(&e.fixed_by, &manifest.fixed_by).join("; ")
        ),
        None => format!(
            "it holds {} but no {MANIFEST}, so what produced them is unknown",
            names.join(", ")
        ),
    };
    if !overwrite {
        bail!(
            "{}: not resumable: {why}. Use another --out, or --overwrite to discard its sweep results and start again",
            out.display()
        );
    }
    let paths = names
        .iter()
        .filter(|n| is_sweep_output(n))
        .map(|n| out.join(n))
        .collect();
    Ok(FolderState::Replace { paths })
}

/// Removes the earlier sweep's results (`--overwrite` on a folder of other inputs).
pub fn discard(paths: &[PathBuf]) -> Result<()> {
    for p in paths {
        let removed = if p.is_dir() {
            std::fs::remove_dir_all(p)
        } else {
            std::fs::remove_file(p)
        };
        removed.with_context(|| format!("removing the earlier {}", p.display()))?;
    }
    Ok(())
}

fn short(value: &serde_json::Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 60 {
        format!("{}...", text.chars().take(57).collect::<String>())
    } else {
        text
    }
}

/// What differs between two sets of inputs, one phrase each.
pub fn differences(before: &SweepInputs, now: &SweepInputs) -> Vec<String> {
    let mut out = Vec::new();
    let as_map = |spec: &SweepSpec| -> BTreeMap<String, serde_json::Value> {
        match serde_json::to_value(spec).expect("spec serializes") {
            serde_json::Value::Object(m) => m.into_iter().collect(),
            _ => BTreeMap::new(),
        }
    };
    let (a, b) = (as_map(&before.spec), as_map(&now.spec));
    for key in a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))) {
        let null = serde_json::Value::Null;
        let (x, y) = (a.get(key).unwrap_or(&null), b.get(key).unwrap_or(&null));
        if x != y {
            out.push(format!("spec field `{key}` {} -> {}", short(x), short(y)));
        }
    }
    let key = |i: &Input| (i.role.clone(), i.name.clone());
    let old: BTreeMap<_, _> = before.inputs.iter().map(|i| (key(i), i)).collect();
    let new: BTreeMap<_, _> = now.inputs.iter().map(|i| (key(i), i)).collect();
    for ((role, name), i) in &new {
        match old.get(&(role.clone(), name.clone())) {
            None => out.push(format!("{role} `{name}` newly read")),
            Some(o) if o.sha256 != i.sha256 => out.push(format!(
                "{role} `{name}` changed (SHA-256 {}... -> {}...)",
                &o.sha256[..12.min(o.sha256.len())],
                &i.sha256[..12.min(i.sha256.len())]
            )),
            Some(_) => {}
        }
    }
    for (role, name) in old.keys().filter(|k| !new.contains_key(*k)) {
        out.push(format!("{role} `{name}` no longer read"));
    }
    if out.is_empty() {
        out.push("the recorded fingerprint differs".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(agents: Vec<u32>, sha: &str) -> SweepInputs {
        let spec: SweepSpec = toml::from_str(&format!(
            "name = \"t\"\nworkloads = [\"seed-exp1\"]\npolicies = [\"djinn\"]\nagents = {agents:?}\nseeds = [0]\n"
        ))
        .unwrap();
        SweepInputs {
            spec,
            inputs: vec![Input {
                role: "profile".into(),
                name: "p.json".into(),
                file: true,
                sha256: sha.into(),
            }],
        }
    }

    #[test]
    fn differences_name_the_spec_field_and_the_changed_file() {
        let a = inputs(vec![2], "aaaaaaaaaaaaaaaa");
        let b = inputs(vec![2, 3], "bbbbbbbbbbbbbbbb");
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(
            a.fingerprint(),
            inputs(vec![2], "aaaaaaaaaaaaaaaa").fingerprint()
        );
        let d = differences(&a, &b).join("; ");
        assert!(d.contains("spec field `agents` [2] -> [2,3]"), "{d}");
        assert!(d.contains("profile `p.json` changed"), "{d}");
    }
}
