//! Where a result came from: every JSON that `djinn engine bench` / `check` write records the
//! command line, the card, the NVIDIA driver and the git commit the binary was built from, so a
//! figure can be traced to its run without the log beside it.

use serde::Serialize;

use crate::cuda::GpuDevice;

#[derive(Clone, Debug, Serialize)]
pub struct Provenance {
    /// The process's arguments, program name first.
    pub command_line: Vec<String>,
    /// The card's name as the driver reports it (e.g. "NVIDIA H100 80GB HBM3").
    pub device: String,
    pub compute_capability: String,
    /// The kernel module's version (e.g. "580.159.04"), or "unknown" where it cannot be read.
    pub driver_version: String,
    /// The CUDA version the driver supports (`cuDriverGetVersion`, e.g. "13.0").
    pub cuda_driver_api: String,
    /// The commit the binary was built from (passed in by the caller, which knows how it was
    /// built).
    pub git_commit: String,
}

impl Provenance {
    pub fn collect(device: &GpuDevice, git_commit: &str) -> Provenance {
        let (major, minor) = device.compute_capability;
        Provenance {
            command_line: std::env::args().collect(),
            device: device.name.clone(),
            compute_capability: format!("{major}.{minor}"),
            driver_version: driver_version().unwrap_or_else(|| "unknown".to_string()),
            cuda_driver_api: cuda_driver_api().unwrap_or_else(|| "unknown".to_string()),
            git_commit: git_commit.to_string(),
        }
    }
}

/// The NVIDIA kernel module's version from /proc (Linux); None elsewhere.
fn driver_version() -> Option<String> {
    let text = std::fs::read_to_string("/proc/driver/nvidia/version").ok()?;
    // "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04  <date>"
    text.lines()
        .find(|l| l.starts_with("NVRM version"))?
        .split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()) && w.contains('.'))
        .map(str::to_string)
}

fn cuda_driver_api() -> Option<String> {
    let mut v: std::ffi::c_int = 0;
    // SAFETY: plain query into a local; the driver library is loaded (a device is open).
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    (r == cudarc::driver::sys::CUresult::CUDA_SUCCESS).then(|| format!("{}.{}", v / 1000, (v % 1000) / 10))
}
