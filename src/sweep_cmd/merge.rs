//! `djinn sweep merge`: the configuration results of several shards (or output folders) joined
//! into one CSV, refused when they come from different sweeps.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::spec::{expand, read_spec};
use super::{results_csv, sweep_inputs, ConfigResult};
use crate::runio::outdir::check_new_file;

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Output folders of the shards (each holding configs/*.json).
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
    /// The merged CSV. An existing file is never replaced silently: the merge refuses unless
    /// --overwrite is given.
    #[arg(long, default_value = "runs/sweep/merged.csv")]
    pub out: PathBuf,
    /// Replace an existing --out file.
    #[arg(long)]
    pub overwrite: bool,
    /// The sweep spec: when given, the merge checks every configuration is present and that the
    /// results were produced by this spec with today's profile and workload files.
    #[arg(long)]
    pub spec: Option<PathBuf>,
}

/// A configuration result and the file it came from.
struct Found {
    result: ConfigResult,
    path: PathBuf,
}

/// Every configuration result under `dirs`, in folder then file order.
fn collect(dirs: &[PathBuf]) -> Result<Vec<Found>> {
    let mut found = Vec::new();
    for dir in dirs {
        let configs = dir.join("configs");
        let entries = std::fs::read_dir(&configs)
            .with_context(|| format!("reading {}", configs.display()))?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        for path in paths {
            let result: ConfigResult = traces::read_json(&path)
                .with_context(|| format!("{}: not a configuration result", path.display()))?;
            found.push(Found { result, path });
        }
    }
    Ok(found)
}

/// The results by configuration index; two results of one index must be one configuration.
fn by_index(found: Vec<Found>) -> Result<BTreeMap<usize, Found>> {
    let mut out: BTreeMap<usize, Found> = BTreeMap::new();
    for f in found {
        if let Some(prev) = out.get(&f.result.config_index) {
            if prev.result.config_id != f.result.config_id {
                bail!(
                    "{}: configuration {} is {} here but {} in {} (different sweep specs?)",
                    f.path.display(),
                    f.result.config_index,
                    f.result.config_id,
                    prev.result.config_id,
                    prev.path.display()
                );
            }
        }
        out.insert(f.result.config_index, f);
    }
    Ok(out)
}

/// All results must carry one input fingerprint (the same sweep inputs); `want`, when known,
/// is the fingerprint of the spec given to the merge.
fn check_fingerprints(found: &[Found], want: Option<&str>) -> Result<()> {
    let mut first: Option<&Found> = None;
    for f in found {
        if f.result.inputs_sha256.is_empty() {
            bail!(
                "{}: records no input fingerprint (written by an older djinn), so which sweep produced it is unknown; rerun that shard into a new folder",
                f.path.display()
            );
        }
        if let Some(want) = want {
            if f.result.inputs_sha256 != want {
                bail!(
                    "{}: produced by other inputs than the spec, profile and workload files given now (fingerprint {} vs {want}); its folder's sweep.json says what produced it",
                    f.path.display(),
                    f.result.inputs_sha256
                );
            }
        }
        match first {
            Some(a) if a.result.inputs_sha256 != f.result.inputs_sha256 => bail!(
                "{} and {} were produced by different sweep inputs (fingerprints {} and {}); merge results of one sweep only",
                a.path.display(),
                f.path.display(),
                a.result.inputs_sha256,
                f.result.inputs_sha256
            ),
            Some(_) => {}
            None => first = Some(f),
        }
    }
    Ok(())
}

pub fn merge(args: MergeArgs) -> Result<()> {
    check_new_file(&args.out, "--out", args.overwrite)?;
    let all = collect(&args.dirs)?;
    let spec_inputs = match &args.spec {
        Some(spec_path) => Some(sweep_inputs(spec_path, &read_spec(spec_path)?)?),
        None => None,
    };
    let want = spec_inputs.as_ref().map(|l| l.fixed.fingerprint());
    check_fingerprints(&all, want.as_deref())?;
    let found = by_index(all)?;
    if let (Some(spec_path), Some(loaded)) = (&args.spec, &spec_inputs) {
        let configs = expand(&loaded.fixed.spec)?;
        let missing: Vec<&str> = configs
            .iter()
            .filter(|c| {
                found
                    .get(&c.index)
                    .map(|f| f.result.config_id != c.id)
                    .unwrap_or(true)
            })
            .map(|c| c.id.as_str())
            .collect();
        if !missing.is_empty() {
            bail!(
                "{} of {} configurations of {} missing, e.g. {}",
                missing.len(),
                configs.len(),
                spec_path.display(),
                missing[..missing.len().min(3)].join(", ")
            );
        }
    }
    let results: Vec<ConfigResult> = found.into_values().map(|f| f.result).collect();
    traces::write_atomic(&args.out, &results_csv(&results)?)?;
    println!(
        "merged {} configurations from {} folders into {}",
        results.len(),
        args.dirs.len(),
        args.out.display()
    );
    Ok(())
}
