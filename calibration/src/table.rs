//! The `roofline-table-v1` fit: the roofline's coefficients (`fit::fit_steps`) plus, per step
//! kind, a correction table of the log ratio of measured to roofline time, tabulated at the
//! shapes the data has (`traces::correction`), and the held-out error of either form.
//!
//! Table nodes are the distinct shape coordinates of the data (at most `MAX_NODES` per axis, the
//! rest merged by quantile). A node's value is the kernel-weighted median of the residuals around
//! it (Gaussian in log2 units, `BANDWIDTH_LOG2`): at a measured shape it is that shape's median
//! residual, at a hole of the grid (a shape that did not fit memory) the nearest shapes' residual;
//! a median, not a mean, so warm-up steps inside real runs cannot pull it. Deterministic: the same
//! samples give the same table.

use std::collections::BTreeMap;

use traces::correction::{table_coordinates, MAX_LOG_FACTOR};
use traces::{CorrectionTable, GpuProfile, StepCorrections};

use crate::fit::{fit_steps, FitError, StepKind, StepSample};

/// Most nodes per table axis the fit makes.
pub const MAX_NODES: usize = 16;

/// Kernel width in log2 units: half an octave, so a node takes its own shape's steps and not
/// the next grid point's (grids are spaced an octave or more apart).
pub const BANDWIDTH_LOG2: f64 = 0.5;

/// The two step forms the fit can produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// Roofline coefficients only.
    Roofline,
    /// Roofline coefficients and correction tables.
    Table,
}

impl Form {
    pub fn name(self) -> &'static str {
        match self {
            Form::Roofline => "roofline-v1",
            Form::Table => "roofline-table-v1",
        }
    }
}

fn kind_index(kind: StepKind) -> usize {
    kind as usize
}

/// Distinct values of `v` (to 1e-6), at most `MAX_NODES`: when there are more, evenly spaced
/// quantiles of them, first and last kept.
fn axis(values: &[f64]) -> Vec<f64> {
    let mut v: Vec<f64> = values.iter().map(|x| (x * 1e6).round() / 1e6).collect();
    v.sort_by(f64::total_cmp);
    v.dedup();
    if v.len() <= MAX_NODES {
        return v;
    }
    let last = v.len() - 1;
    let mut picked: Vec<f64> = (0..MAX_NODES)
        .map(|i| v[i * last / (MAX_NODES - 1)])
        .collect();
    picked.dedup();
    picked
}

/// Median of `values` weighted by `weights` (both non-empty, weights >= 0, some > 0).
fn weighted_median(mut pairs: Vec<(f64, f64)>) -> f64 {
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: f64 = pairs.iter().map(|p| p.1).sum();
    let mut seen = 0.0;
    for (value, weight) in &pairs {
        seen += weight;
        if seen >= total / 2.0 {
            return *value;
        }
    }
    pairs.last().map_or(0.0, |p| p.0)
}

/// One table from (x, y, residual) points (non-empty).
fn table_from(points: &[(f64, f64, f64)]) -> CorrectionTable {
    let xs = axis(&points.iter().map(|p| p.0).collect::<Vec<_>>());
    let ys = axis(&points.iter().map(|p| p.1).collect::<Vec<_>>());
    let h2 = 2.0 * BANDWIDTH_LOG2 * BANDWIDTH_LOG2;
    let mut log_factor = Vec::with_capacity(xs.len() * ys.len());
    for &x in &xs {
        for &y in &ys {
            let d2: Vec<f64> = points
                .iter()
                .map(|p| (p.0 - x).powi(2) + (p.1 - y).powi(2))
                .collect();
            // Relative to the nearest point, so a hole far from every point still has weights.
            let nearest = d2.iter().copied().fold(f64::INFINITY, f64::min);
            let pairs: Vec<(f64, f64)> = points
                .iter()
                .zip(&d2)
                .map(|(p, d)| (p.2, (-(d - nearest) / h2).exp()))
                .collect();
            log_factor.push(weighted_median(pairs).clamp(-MAX_LOG_FACTOR, MAX_LOG_FACTOR));
        }
    }
    CorrectionTable {
        x: xs,
        y: ys,
        log_factor,
    }
}

/// Correction tables for `roofline` (a profile of form roofline-v1) from the residuals of
/// `samples`; `None` when no sample has a shape.
///
/// A prefill-only step of several sequences informs the roofline (it separates the GEMMs, which
/// see all its tokens, from attention, which sees each sequence's), not the prefill table: that
/// table is indexed by tokens per sequence, where a shared chunk's GEMMs would read as a short
/// prompt's.
pub fn fit_corrections(roofline: &GpuProfile, samples: &[StepSample]) -> Option<StepCorrections> {
    let mut by_kind: [Vec<(f64, f64, f64)>; 3] = Default::default();
    for s in samples {
        let several_prefill_sequences =
            s.kind == StepKind::Prefill && s.shape.sequences - s.shape.decode_sequences > 1.0;
        if several_prefill_sequences {
            continue;
        }
        if let Some((_, x, y)) = table_coordinates(&s.shape) {
            let r = (s.duration_ns / roofline.step_ns(&s.shape)).ln();
            if r.is_finite() {
                by_kind[kind_index(s.kind)].push((x, y, r));
            }
        }
    }
    let table = |points: &Vec<(f64, f64, f64)>| (!points.is_empty()).then(|| table_from(points));
    let c = StepCorrections {
        decode: table(&by_kind[kind_index(StepKind::Decode)]),
        prefill: table(&by_kind[kind_index(StepKind::Prefill)]),
        mixed: table(&by_kind[kind_index(StepKind::Mixed)]),
    };
    (c.decode.is_some() || c.prefill.is_some() || c.mixed.is_some()).then_some(c)
}

/// Fits `base` to `samples` in `form`.
pub fn fit_form(
    base: &GpuProfile,
    samples: &[StepSample],
    form: Form,
) -> Result<GpuProfile, FitError> {
    let mut profile = fit_steps(base, samples)?;
    profile.cost.form = "roofline-v1".into();
    profile.cost.corrections = None;
    if form == Form::Table {
        if let Some(c) = fit_corrections(&profile, samples) {
            profile.cost.form = Form::Table.name().into();
            profile.cost.corrections = Some(c);
        }
    }
    Ok(profile)
}

/// Distribution of |ln(predicted / measured)| of one step kind, and the ratio of the summed
/// predicted to the summed measured time: the sign the |log| hides, weighted as a run's latency
/// weighs its steps (below 1: the simulator is optimistic on these steps).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogErrors {
    pub steps: usize,
    pub median: f64,
    pub p90: f64,
    pub p99: f64,
    pub total_ratio: f64,
}

impl LogErrors {
    /// The distribution over `(predicted_ns, measured_ns)` pairs.
    pub fn of_pairs(pairs: &[(f64, f64)]) -> Self {
        if pairs.is_empty() {
            return LogErrors::default();
        }
        let mut v: Vec<f64> = pairs.iter().map(|(p, m)| (p / m).ln().abs()).collect();
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((q * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
        let predicted: f64 = pairs.iter().map(|(p, _)| p).sum();
        let measured: f64 = pairs.iter().map(|(_, m)| m).sum();
        LogErrors {
            steps: v.len(),
            median: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            total_ratio: predicted / measured,
        }
    }
}

/// Per kind (and `None` = all steps), the |log ratio| distribution of `profile` on `samples`.
pub fn log_errors(
    profile: &GpuProfile,
    samples: &[StepSample],
) -> BTreeMap<Option<StepKind>, LogErrors> {
    let mut by: BTreeMap<Option<StepKind>, Vec<(f64, f64)>> = BTreeMap::new();
    for s in samples {
        let r = (profile.step_ns(&s.shape), s.duration_ns);
        by.entry(Some(s.kind)).or_default().push(r);
        by.entry(None).or_default().push(r);
    }
    by.into_iter()
        .map(|(k, v)| (k, LogErrors::of_pairs(&v)))
        .collect()
}

/// A step's shape, rounded, for leave-shape-out splits: every repetition of a shape falls in
/// the same fold, so a fold's error is the error at shapes the fit never saw.
fn shape_key(s: &StepSample) -> (usize, i64, i64) {
    let (index, x, y) = table_coordinates(&s.shape).unwrap_or((3, 0.0, 0.0));
    (index, (x * 16.0).round() as i64, (y * 16.0).round() as i64)
}

/// Leave-shape-out cross-validation: the distinct shapes, in sorted order, are dealt to `folds`
/// folds round-robin; each fold is predicted by a fit to the others. Returns the pooled held-out
/// |log ratio| distribution per kind. Needs at least two shapes.
pub fn held_out_errors(
    base: &GpuProfile,
    samples: &[StepSample],
    form: Form,
    folds: usize,
) -> Result<BTreeMap<Option<StepKind>, LogErrors>, FitError> {
    let mut shapes: Vec<(usize, i64, i64)> = samples.iter().map(shape_key).collect();
    shapes.sort_unstable();
    shapes.dedup();
    let folds = folds.clamp(2, shapes.len().max(2));
    let fold_of: BTreeMap<(usize, i64, i64), usize> = shapes
        .iter()
        .enumerate()
        .map(|(i, k)| (*k, i % folds))
        .collect();
    let mut by: BTreeMap<Option<StepKind>, Vec<(f64, f64)>> = BTreeMap::new();
    for fold in 0..folds {
        let (test, train): (Vec<&StepSample>, Vec<&StepSample>) =
            samples.iter().partition(|s| fold_of[&shape_key(s)] == fold);
        if test.is_empty() || train.is_empty() {
            continue;
        }
        let train: Vec<StepSample> = train.into_iter().cloned().collect();
        let profile = fit_form(base, &train, form)?;
        for s in test {
            let r = (profile.step_ns(&s.shape), s.duration_ns);
            by.entry(Some(s.kind)).or_default().push(r);
            by.entry(None).or_default().push(r);
        }
    }
    Ok(by
        .into_iter()
        .map(|(k, v)| (k, LogErrors::of_pairs(&v)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use traces::{StepRecord, StepShape};

    fn base() -> GpuProfile {
        crate::load_profile("h100-llama2-7b").unwrap()
    }

    /// Decode steps timed by a "card" that is the base roofline times a smooth bump in batch
    /// that no roofline coefficient can express (kernel changes at batch 16).
    fn bumpy_steps() -> Vec<StepSample> {
        let truth = base();
        let mut out = Vec::new();
        for batch in [1u32, 2, 4, 8, 16, 32, 64, 128] {
            for ctx in [512u64, 1024, 2048, 4096] {
                let rec = StepRecord {
                    decode_batch: batch,
                    decode_context_tokens: batch as u64 * ctx,
                    ..StepRecord::default()
                };
                let shape = StepShape::from_record(&rec);
                let bump = if batch >= 16 { 1.25 } else { 1.0 };
                for rep in 0..3 {
                    out.push(StepSample {
                        run: "grid".into(),
                        kind: StepKind::Decode,
                        shape,
                        duration_ns: truth.step_ns(&shape) * bump * (1.0 + 0.001 * rep as f64),
                    });
                }
            }
        }
        out
    }

    #[test]
    fn the_table_captures_what_the_roofline_cannot() {
        let samples = bumpy_steps();
        let roofline = fit_form(&base(), &samples, Form::Roofline).unwrap();
        let table = fit_form(&base(), &samples, Form::Table).unwrap();
        assert_eq!(table.cost.form, "roofline-table-v1");
        table.validate(std::path::Path::new("fitted.json")).unwrap();
        let r = log_errors(&roofline, &samples)[&None].clone();
        let t = log_errors(&table, &samples)[&None].clone();
        assert!(t.p90 < 0.01, "table in-sample p90 {}", t.p90);
        assert!(r.p90 > 5.0 * t.p90, "roofline {r:?} vs table {t:?}");
        // Leave-shape-out: held-out shapes between measured ones are still predicted well.
        let held = held_out_errors(&base(), &samples, Form::Table, 4).unwrap();
        assert_eq!(held[&None].steps, samples.len());
        assert!(held[&None].median < r.median, "{:?} vs {r:?}", held[&None]);
    }

    #[test]
    fn the_table_fit_is_deterministic_and_small() {
        let samples = bumpy_steps();
        let one = fit_form(&base(), &samples, Form::Table).unwrap();
        let two = fit_form(&base(), &samples, Form::Table).unwrap();
        assert_eq!(one, two);
        let d = one.cost.corrections.unwrap().decode.unwrap();
        assert_eq!((d.x.len(), d.y.len()), (8, 4));
        let many: Vec<f64> = (0..100).map(f64::from).collect();
        assert_eq!(axis(&many).len(), MAX_NODES);
    }

    #[test]
    fn weighted_median_ignores_a_far_outlier() {
        let m = weighted_median(vec![(0.1, 1.0), (0.1, 1.0), (2.0, 1.0)]);
        assert_eq!(m, 0.1);
    }
}
