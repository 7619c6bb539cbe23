//! The swap engine's benchmark and GPU checks (`djinn engine swap-bench`, `djinn engine
//! swap-check`): transfer rates against measured PCIe floors, decode steps while swapping, the
//! interference probe, per-layer readiness, and bit-exactness of every copy path.
//!
//! Every JSON these write carries a [`Provenance`]: the command line, the git commit, the card
//! and its driver, so a figure can be traced to what produced it.

use crate::cuda::CudaError;
use crate::swap::SwapError;

pub mod bench;
pub mod check;

/// Why a probe could not run (a check that ran and failed is an outcome, not an error).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Swap(#[from] SwapError),
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error("CUDA driver call failed while {during}: {detail}")]
    Driver {
        during: &'static str,
        detail: String,
    },
    #[error("invalid swap-bench option: {0}")]
    BadOption(String),
}

/// Maps a driver error to [`ProbeError::Driver`], saying what was being done.
pub(crate) fn driver(during: &'static str) -> impl Fn(cudarc::driver::DriverError) -> ProbeError {
    move |error| ProbeError::Driver {
        during,
        detail: format!("{error:?}"),
    }
}

pub use super::provenance::{Invocation, Provenance};

/// Median (the mean of the middle two for an even count); NaN for no values.
pub(crate) fn percentile_50(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
    }
}

pub(crate) fn min_of(values: &[f64]) -> f64 {
    values.iter().cloned().fold(f64::INFINITY, f64::min)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(percentile_50(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(percentile_50(&[3.0, 1.0, 2.0]), 2.0);
        assert!(percentile_50(&[]).is_nan());
    }
}
