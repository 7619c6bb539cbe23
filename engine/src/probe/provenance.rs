//! Where a result came from: every JSON the probes write (`djinn engine bench`, `check`,
//! `swap-bench`, `swap-check`) records the command line, the card, the NVIDIA driver and the git
//! commit the binary was built from, so a figure can be traced to its run without a log beside it.

use serde::Serialize;

use crate::cuda::GpuDevice;

/// What the caller knows about how it was started: the command line and the git commit it was
/// built from (the engine crate cannot see the binary's build information itself).
#[derive(Clone, Debug, Default)]
pub struct Invocation {
    pub command_line: Vec<String>,
    pub git_commit: String,
}

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
    /// The commit the binary was built from.
    pub git_commit: String,
}

impl Provenance {
    /// This process's command line, with the commit the caller was built from.
    pub fn collect(device: &GpuDevice, git_commit: &str) -> Provenance {
        Provenance::of(
            device,
            Invocation {
                command_line: std::env::args().collect(),
                git_commit: git_commit.to_string(),
            },
        )
    }

    pub fn of(device: &GpuDevice, invocation: Invocation) -> Provenance {
        let (major, minor) = device.compute_capability;
        Provenance {
            command_line: invocation.command_line,
            device: device.name.clone(),
            compute_capability: format!("{major}.{minor}"),
            driver_version: kernel_driver_version().unwrap_or_else(|| "unknown".to_string()),
            cuda_driver_api: cuda_driver_api().unwrap_or_else(|| "unknown".to_string()),
            git_commit: invocation.git_commit,
        }
    }
}

/// "580.159.04" from /proc/driver/nvidia/version (Linux); None elsewhere.
fn kernel_driver_version() -> Option<String> {
    let text = std::fs::read_to_string("/proc/driver/nvidia/version").ok()?;
    parse_kernel_driver_version(&text)
}

/// The version word of a line like "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04  ...".
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
    let mut version: std::ffi::c_int = 0;
    // SAFETY: a plain query into a local; the driver library is loaded (a device is open).
    let status = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
    (status == cudarc::driver::sys::CUresult::CUDA_SUCCESS)
        .then(|| format!("{}.{}", version / 1000, version % 1000 / 10))
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
}
