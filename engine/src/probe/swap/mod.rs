//! The swap engine's benchmark and GPU checks (`djinn engine swap-bench`, `djinn engine
//! swap-check`): transfer rates against measured PCIe floors, decode steps while swapping, the
//! interference probe, per-layer readiness, and bit-exactness of every copy path.
//!
//! Every JSON these write carries a [`Provenance`]: the command line, the git commit, the card
//! and its driver, so a figure can be traced to what produced it.

use serde::Serialize;

use crate::cuda::{CudaError, GpuDevice};
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

/// What the caller knows about how it was started: the command line and the git commit it was
/// built from (the engine crate cannot see the binary's build information itself).
#[derive(Clone, Debug, Default)]
pub struct Invocation {
    pub command_line: Vec<String>,
    pub git_commit: String,
}

/// Where a result came from.
#[derive(Clone, Debug, Serialize)]
pub struct Provenance {
    pub command_line: Vec<String>,
    pub git_commit: String,
    /// The card's name as the driver reports it, e.g. "NVIDIA H100 80GB HBM3".
    pub device: String,
    /// The kernel driver's version, e.g. "580.159.04" (from /proc/driver/nvidia/version;
    /// "unknown" where that file is absent).
    pub driver_version: String,
    /// The CUDA version the driver supports, e.g. "13.0" (cuDriverGetVersion).
    pub cuda_driver_api: String,
}

impl Provenance {
    pub fn of(device: &GpuDevice, invocation: Invocation) -> Self {
        Provenance {
            command_line: invocation.command_line,
            git_commit: invocation.git_commit,
            device: device.name.clone(),
            driver_version: kernel_driver_version().unwrap_or_else(|| "unknown".into()),
            cuda_driver_api: cuda_driver_api().unwrap_or_else(|| "unknown".into()),
        }
    }
}

/// "580.159.04" from a line like "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04  ...".
fn kernel_driver_version() -> Option<String> {
    let text = std::fs::read_to_string("/proc/driver/nvidia/version").ok()?;
    parse_kernel_driver_version(&text)
}

fn parse_kernel_driver_version(text: &str) -> Option<String> {
    let line = text.lines().find(|l| l.starts_with("NVRM version:"))?;
    line.split_whitespace()
        .find(|word| {
            word.split('.').count() >= 2
                && word
                    .split('.')
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(str::to_string)
}

fn cuda_driver_api() -> Option<String> {
    let mut version = 0i32;
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }
        .result()
        .ok()?;
    Some(format!("{}.{}", version / 1000, version % 1000 / 10))
}

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
    fn the_kernel_driver_version_is_read_from_the_nvrm_line() {
        let text = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04  Thu Oct 30 2025\nGCC version:  gcc version 12.2.0\n";
        assert_eq!(
            parse_kernel_driver_version(text).as_deref(),
            Some("580.159.04")
        );
        assert_eq!(parse_kernel_driver_version("GCC version: 12.2.0\n"), None);
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(percentile_50(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(percentile_50(&[3.0, 1.0, 2.0]), 2.0);
        assert!(percentile_50(&[]).is_nan());
    }
}
