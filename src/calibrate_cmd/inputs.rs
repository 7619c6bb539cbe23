//! What `djinn calibrate` reads: real run directories, engine benchmark rows and
//! copy-interference measurements, each checked with errors naming the file and field.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use calibration::fit;
use traces::{RunManifest, RunSummary, StepRecord, SwapRecord};

/// A real run directory, read and checked.
pub struct RealRun {
    pub dir: PathBuf,
    pub manifest: RunManifest,
    pub steps: Vec<StepRecord>,
    pub swaps: Vec<SwapRecord>,
    pub summary: RunSummary,
}

/// Expands folders of run directories and reads every real run.
pub fn real_runs(paths: &[PathBuf]) -> Result<Vec<RealRun>> {
    let mut dirs = Vec::new();
    for path in paths {
        if !path.is_dir() {
            bail!(
                "{}: not a directory (expected a run directory or a folder of them)",
                path.display()
            );
        }
        if path.join("manifest.json").is_file() {
            dirs.push(path.clone());
            continue;
        }
        let mut children: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("listing {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("manifest.json").is_file())
            .filter(|p| !p.extension().is_some_and(|e| e == "sim"))
            .collect();
        children.sort();
        if children.is_empty() {
            bail!(
                "{}: no manifest.json here or in any sub-directory (not a run directory)",
                path.display()
            );
        }
        dirs.extend(children);
    }
    dirs.into_iter().map(|dir| read_real_run(&dir)).collect()
}

pub fn read_real_run(dir: &Path) -> Result<RealRun> {
    let manifest: RunManifest = traces::read_json(&dir.join("manifest.json"))?;
    if manifest.backend == "sim" {
        bail!(
            "{}: a simulated run (manifest backend \"sim\"); calibration needs real runs (`djinn engine run`)",
            dir.join("manifest.json").display()
        );
    }
    let steps_path = dir.join("steps.csv");
    let steps: Vec<StepRecord> = traces::read_csv(&steps_path)?;
    if steps.is_empty() {
        bail!(
            "{}: no steps (a header and no rows): a run without steps can be neither fitted nor validated",
            steps_path.display()
        );
    }
    let swaps: Vec<SwapRecord> = crate::runio::read_swaps(dir)?;
    let summary: RunSummary = traces::read_json(&dir.join("summary.json"))?;
    Ok(RealRun {
        dir: dir.to_path_buf(),
        manifest,
        steps,
        swaps,
        summary,
    })
}

/// The `rows` array of a benchmark JSON file that `writer` (a djinn command) writes.
fn json_rows(path: &Path, writer: &str) -> Result<Vec<serde_json::Value>> {
    let mut json: serde_json::Value = traces::read_json(path)?;
    match json.get_mut("rows").map(serde_json::Value::take) {
        Some(serde_json::Value::Array(rows)) => Ok(rows),
        _ => bail!(
            "{}: no `rows` array (not a `{writer}` JSON file?)",
            path.display()
        ),
    }
}

/// The engine benchmark's own rows (system `djinn-cuda`) as step records: a decode row of batch b
/// at context n is b sequences attending to n tokens each; a prefill row of n tokens starts from
/// an empty cache.
pub fn bench_steps(path: &Path) -> Result<Vec<StepRecord>> {
    let rows = json_rows(path, "djinn engine bench")?;
    let mut steps = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        if row.get("system").and_then(|s| s.as_str()) != Some("djinn-cuda") {
            continue;
        }
        let field = |name: &str| {
            row.get(name)
                .and_then(|v| v.as_f64())
                .filter(|v| v.is_finite() && *v > 0.0)
                .with_context(|| {
                    format!(
                        "{}: rows[{i}].{name} missing or not a positive number",
                        path.display()
                    )
                })
        };
        let (batch, tokens, ms) = (
            field("batch")? as u64,
            field("tokens")? as u64,
            field("ms_p50")?,
        );
        let duration_ns = (ms * 1e6).round() as u64;
        match row.get("kind").and_then(|k| k.as_str()) {
            Some("decode_step") => steps.push(StepRecord {
                decode_batch: batch as u32,
                decode_context_tokens: batch * tokens,
                duration_ns,
                ..StepRecord::default()
            }),
            Some("prefill") => steps.push(StepRecord {
                prefill_tokens: (batch * tokens) as u32,
                prefill_sequences: batch as u32,
                prefill_attention_pairs: batch * tokens * (tokens + 1) / 2,
                duration_ns,
                ..StepRecord::default()
            }),
            other => bail!(
                "{}: rows[{i}].kind = {other:?}, expected \"decode_step\" or \"prefill\"",
                path.display()
            ),
        }
    }
    if steps.is_empty() {
        bail!("{}: no djinn-cuda rows", path.display());
    }
    Ok(steps)
}

/// The swap engine's operating points of a copy-interference file: the `interference summary`
/// rows whose victim is the engine's decode step and whose aggressor is the swap engine. Each row's
/// `ratio` is the step's busy / quiet time (median over rounds); its note names each direction's
/// rate as `swap-out: <GB> GB moved at <rate> GB/s while running` (and `swap-in: ...`).
pub fn interference_points(path: &Path) -> Result<Vec<fit::InterferencePoint>> {
    let rows = json_rows(path, "djinn engine swap-bench")?;
    let mut points = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let text = |name: &str| row.get(name).and_then(|v| v.as_str()).unwrap_or("");
        let row_name = text("name");
        if text("section") != "interference summary"
            || !row_name.starts_with("engine decode")
            || !row_name.contains("swap engine DMA")
        {
            continue;
        }
        let ratio = row
            .get("ratio")
            .and_then(|v| v.as_f64())
            .filter(|v| v.is_finite() && *v > 0.0)
            .with_context(|| {
                format!(
                    "{}: rows[{i}].ratio missing or not a positive number",
                    path.display()
                )
            })?;
        let note = text("note");
        let rate = |direction: &str| -> Result<f64> {
            let key = format!("swap-{direction}: ");
            let Some(at) = note.find(&key) else {
                return Ok(0.0);
            };
            let rest = &note[at + key.len()..];
            let parsed = rest
                .split_once(" GB moved at ")
                .and_then(|(_, r)| r.split_once(" GB/s"))
                .and_then(|(r, _)| r.trim().parse::<f64>().ok())
                .filter(|r| r.is_finite() && *r >= 0.0);
            parsed.map(|gbps| gbps * 1e9).with_context(|| {
                format!(
                    "{}: rows[{i}].note: expected `swap-{direction}: <GB> GB moved at <rate> GB/s` after `{key}`",
                    path.display()
                )
            })
        };
        // "swap engine DMA: both directions, 2 x 1 GiB queued ... (out full speed, in capped 34 GB/s)"
        // -> "<file>: both directions (out full speed, in capped 34 GB/s)".
        let aggressor = row_name
            .split('|')
            .nth(1)
            .unwrap_or(row_name)
            .trim()
            .trim_start_matches("swap engine DMA: ");
        let what = aggressor.split(',').next().unwrap_or(aggressor);
        let rates = aggressor.find(" (").map_or("", |at| &aggressor[at..]);
        let file = path
            .file_stem()
            .map_or(String::new(), |f| f.to_string_lossy().into_owned());
        let label = format!("{file}: {what}{rates}");
        points.push(fit::InterferencePoint {
            label,
            h2d_bytes_per_s: rate("in")?,
            d2h_bytes_per_s: rate("out")?,
            slowdown: ratio - 1.0,
        });
    }
    if points.is_empty() {
        bail!(
            "{}: no `interference summary` rows of the engine decode step beside the swap engine (written by `djinn engine swap-bench --interference-rounds N`)",
            path.display()
        );
    }
    Ok(points)
}

/// A profiling grid's folder (`djinn calibrate profile`), read and checked.
pub struct GridRun {
    pub dir: PathBuf,
    pub manifest: traces::GridManifest,
    pub steps: Vec<StepRecord>,
    pub swaps: Vec<SwapRecord>,
}

pub fn read_grid(dir: &Path) -> Result<GridRun> {
    let manifest = traces::GridManifest::read(&dir.join("grid.json"))
        .with_context(|| format!("{}: not a profiling grid folder", dir.display()))?;
    let steps_path = dir.join("steps.csv");
    let steps: Vec<StepRecord> = traces::read_csv(&steps_path)?;
    if steps.is_empty() {
        bail!("{}: no steps (a header and no rows)", steps_path.display());
    }
    let swaps: Vec<SwapRecord> = crate::runio::read_swaps(dir)?;
    Ok(GridRun {
        dir: dir.to_path_buf(),
        manifest,
        steps,
        swaps,
    })
}
