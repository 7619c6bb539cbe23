//! Correction tables of the `roofline-table-v1` step form: a measured, multiplicative correction
//! to the roofline's step time, tabulated over the two numbers that describe a step kind's shape
//! and interpolated bilinearly in log space.
//!
//! Why a table and not more roofline terms: a real forward's departures from the roofline (kernel
//! choice per GEMM shape, attention kernels that switch algorithm with context length, launch
//! overheads that amortise with batch) are smooth in log(shape) but not of any one parametric
//! form. The roofline carries the physics between and beyond the measured shapes; the table
//! carries what the physics misses, and is clamped at its edges (flat extrapolation), so a shape
//! outside the grid gets the nearest measured correction, never an extrapolated trend.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::io::TraceError;
use crate::profile::StepShape;

/// Most nodes a table axis may have: a profiling grid has ~10 per axis; more is a typo or an
/// attempt to make evaluation slow.
pub const MAX_AXIS_NODES: usize = 64;

/// Largest |log factor| a node may hold (a factor of e^3 ~ 20 either way): a correction beyond
/// it means the roofline coefficients are wrong, which a table must not paper over.
pub const MAX_LOG_FACTOR: f64 = 3.0;

/// One table: `log_factor[i * y.len() + j]` is ln(measured / roofline) at (`x[i]`, `y[j]`), both
/// axes in log2 of the shape figure the kind's axes name (`StepCorrections`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorrectionTable {
    pub x: Vec<f64>,
    pub y: Vec<f64>,
    pub log_factor: Vec<f64>,
}

/// Per step kind (the kind of `StepShape`), a table over:
/// - decode: x = log2(decode batch), y = log2(mean context per decoding sequence);
/// - prefill: x = log2(prefill tokens per sequence), y = log2(1 + cached tokens per sequence);
/// - mixed: x = log2(prefill tokens), y = log2(decode batch).
///
/// A kind without a table is priced by the roofline alone.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepCorrections {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<CorrectionTable>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill: Option<CorrectionTable>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mixed: Option<CorrectionTable>,
}

/// Which table a shape reads, and its (x, y) there; `None` for a step that does no work.
pub fn table_coordinates(shape: &StepShape) -> Option<(usize, f64, f64)> {
    let prefill = shape.prefill_tokens > 0.0;
    let decode = shape.decode_sequences > 0.0;
    let prefill_seqs = (shape.sequences - shape.decode_sequences).max(1.0);
    match (prefill, decode) {
        (false, true) => Some((
            0,
            shape.decode_sequences.log2(),
            (shape.decode_context_tokens / shape.decode_sequences)
                .max(1.0)
                .log2(),
        )),
        (true, false) => {
            let per_seq = shape.prefill_tokens / prefill_seqs;
            let cached = (shape.prefill_context_read_tokens / prefill_seqs - per_seq).max(0.0);
            Some((1, per_seq.max(1.0).log2(), (1.0 + cached).log2()))
        }
        (true, true) => Some((
            2,
            shape.prefill_tokens.max(1.0).log2(),
            shape.decode_sequences.log2(),
        )),
        (false, false) => None,
    }
}

impl StepCorrections {
    fn table(&self, index: usize) -> Option<&CorrectionTable> {
        match index {
            0 => self.decode.as_ref(),
            1 => self.prefill.as_ref(),
            _ => self.mixed.as_ref(),
        }
    }

    /// The multiplicative correction for a step of this shape (1 where no table applies).
    pub fn factor(&self, shape: &StepShape) -> f64 {
        match table_coordinates(shape) {
            Some((index, x, y)) => self.table(index).map_or(1.0, |t| t.at(x, y).exp()),
            None => 1.0,
        }
    }

    pub fn validate(&self, path: &Path, field: &str) -> Result<(), TraceError> {
        for (name, table) in [
            ("decode", &self.decode),
            ("prefill", &self.prefill),
            ("mixed", &self.mixed),
        ] {
            if let Some(t) = table {
                t.validate(path, &format!("{field}.{name}"))?;
            }
        }
        if self.decode.is_none() && self.prefill.is_none() && self.mixed.is_none() {
            return Err(TraceError::invalid(
                path,
                field,
                "has no table (give at least one of decode, prefill, mixed)",
            ));
        }
        Ok(())
    }
}

/// Index of the interval of `axis` holding `v` and the weight of its upper node, clamped at the
/// ends (flat extrapolation).
fn locate(axis: &[f64], v: f64) -> (usize, f64) {
    let last = axis.len() - 1;
    if last == 0 || v <= axis[0] {
        return (0, 0.0);
    }
    if v >= axis[last] {
        return (last - 1, 1.0);
    }
    // Tables are small (<= 64 nodes): a partition point is as fast as anything.
    let upper = axis.partition_point(|&a| a <= v).min(last);
    let lower = upper - 1;
    (lower, (v - axis[lower]) / (axis[upper] - axis[lower]))
}

impl CorrectionTable {
    /// Bilinear interpolation of the log factor at (x, y), clamped to the table's edges.
    pub fn at(&self, x: f64, y: f64) -> f64 {
        let ny = self.y.len();
        let (i, wx) = locate(&self.x, x);
        let (j, wy) = locate(&self.y, y);
        let i1 = (i + 1).min(self.x.len() - 1);
        let j1 = (j + 1).min(ny - 1);
        let v = |a: usize, b: usize| self.log_factor[a * ny + b];
        (1.0 - wx) * ((1.0 - wy) * v(i, j) + wy * v(i, j1))
            + wx * ((1.0 - wy) * v(i1, j) + wy * v(i1, j1))
    }

    pub fn validate(&self, path: &Path, field: &str) -> Result<(), TraceError> {
        for (axis_name, axis) in [("x", &self.x), ("y", &self.y)] {
            if axis.is_empty() || axis.len() > MAX_AXIS_NODES {
                return Err(TraceError::invalid(
                    path,
                    format!("{field}.{axis_name}"),
                    format!("must have 1 to {MAX_AXIS_NODES} nodes, got {}", axis.len()),
                ));
            }
            let finite = axis
                .iter()
                .all(|v| v.is_finite() && (0.0..=64.0).contains(v));
            let increasing = axis.windows(2).all(|w| w[0] < w[1]);
            if !finite || !increasing {
                return Err(TraceError::invalid(
                    path,
                    format!("{field}.{axis_name}"),
                    "must be strictly increasing log2 values in [0, 64]",
                ));
            }
        }
        let want = self.x.len() * self.y.len();
        if self.log_factor.len() != want {
            return Err(TraceError::invalid(
                path,
                format!("{field}.log_factor"),
                format!(
                    "must have x nodes x y nodes = {want} values, got {}",
                    self.log_factor.len()
                ),
            ));
        }
        if let Some(bad) = self
            .log_factor
            .iter()
            .find(|v| !(v.is_finite() && v.abs() <= MAX_LOG_FACTOR))
        {
            return Err(TraceError::invalid(
                path,
                format!("{field}.log_factor"),
                format!("values must be finite and within +-{MAX_LOG_FACTOR}, got {bad}"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> CorrectionTable {
        CorrectionTable {
            x: vec![0.0, 2.0],
            y: vec![9.0, 11.0],
            log_factor: vec![0.0, 0.2, 0.4, 0.6],
        }
    }

    #[test]
    fn interpolates_bilinearly_and_clamps_at_the_edges() {
        let t = table();
        let close = |got: f64, want: f64| assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        close(t.at(0.0, 9.0), 0.0);
        close(t.at(2.0, 11.0), 0.6);
        close(t.at(1.0, 10.0), 0.3);
        close(t.at(1.0, 9.0), 0.2);
        // Outside: the nearest edge, never an extrapolated trend.
        close(t.at(-5.0, 9.0), 0.0);
        close(t.at(9.0, 20.0), 0.6);
        let single = CorrectionTable {
            x: vec![3.0],
            y: vec![4.0],
            log_factor: vec![0.1],
        };
        close(single.at(0.0, 100.0), 0.1);
    }

    #[test]
    fn a_decode_shape_reads_the_decode_table() {
        let c = StepCorrections {
            decode: Some(table()),
            ..StepCorrections::default()
        };
        // Batch 2 (x = 1) at 1,024 tokens each (y = 10): the middle of the table.
        let decode = StepShape {
            decode_sequences: 2.0,
            decode_context_tokens: 2048.0,
            sequences: 2.0,
            ..StepShape::default()
        };
        assert!((c.factor(&decode) - 0.3f64.exp()).abs() < 1e-12);
        // No prefill table: a prefill step is the roofline's.
        let prefill = StepShape {
            prefill_tokens: 512.0,
            prefill_context_read_tokens: 512.0,
            sequences: 1.0,
            ..StepShape::default()
        };
        assert_eq!(c.factor(&prefill), 1.0);
        assert_eq!(table_coordinates(&prefill), Some((1, 9.0, 0.0)));
    }

    #[test]
    fn bad_tables_are_named() {
        let p = Path::new("p.json");
        let mut t = table();
        t.log_factor.pop();
        let err = t
            .validate(p, "cost.corrections.decode")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cost.corrections.decode.log_factor"), "{err}");
        let mut t = table();
        t.x = vec![2.0, 1.0];
        let err = t.validate(p, "c").unwrap_err().to_string();
        assert!(err.contains("c.x") && err.contains("increasing"), "{err}");
        let mut t = table();
        t.log_factor[0] = 9.0;
        assert!(t.validate(p, "c").is_err());
        let err = StepCorrections::default()
            .validate(p, "cost.corrections")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no table"), "{err}");
    }
}
