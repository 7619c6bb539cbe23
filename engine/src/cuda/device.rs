//! Opening the GPU: library checks, context and stream, NVRTC compilation.

use std::ffi::CString;
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{sys as dsys, CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use super::{drv, CudaError};

/// The CUDA include directory (the one holding `cuda_fp16.h`): `$CUDA_HOME/include`,
/// `$CUDA_PATH/include`, then `/usr/local/cuda/include`.
pub fn cuda_include_dir() -> Result<PathBuf, CudaError> {
    let mut tried = Vec::new();
    let roots = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|var| std::env::var_os(var).map(PathBuf::from))
        .chain(std::iter::once(PathBuf::from("/usr/local/cuda")));
    for root in roots {
        let include = root.join("include");
        if include.join("cuda_fp16.h").is_file() {
            return Ok(include);
        }
        tried.push(include);
    }
    Err(CudaError::IncludeDirNotFound { tried })
}

/// One opened GPU: its context (event tracking off: we order work on one stream ourselves), the
/// compute stream every forward runs on, and what the kernels are compiled for.
pub struct GpuDevice {
    pub ctx: Arc<CudaContext>,
    /// The stream all forward work (kernels, GEMMs, graph replays) is enqueued on. A swap engine
    /// orders its copies against it with events.
    pub stream: Arc<CudaStream>,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub num_sms: usize,
    pub total_memory_bytes: usize,
    pub include_dir: PathBuf,
}

impl GpuDevice {
    /// Checks the driver, NVRTC and cuBLAS libraries and the CUDA headers, then opens device
    /// `ordinal`. Every missing piece is an error, never a panic (cudarc panics if a library is used
    /// while absent, so the presence checks come first).
    pub fn open(ordinal: usize) -> Result<GpuDevice, CudaError> {
        // SAFETY: these only try to dlopen the libraries.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CudaError::LibraryMissing {
                library: "libcuda",
                hint: "no NVIDIA driver on this machine",
            });
        }
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(CudaError::LibraryMissing {
                library: "libnvrtc",
                hint: "the run-time compiler compiles the kernels at start-up",
            });
        }
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(CudaError::LibraryMissing {
                library: "libcublas",
                hint: "GEMMs run through cuBLAS",
            });
        }
        let include_dir = cuda_include_dir()?;
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| CudaError::NoDevice(format!("device {ordinal}: {e:?}")))?;
        // SAFETY: called before any slice or stream exists; all our work is ordered on one stream
        // and synchronised explicitly, and graph capture needs tracking off.
        unsafe { ctx.disable_event_tracking() };
        let stream = drv("creating the compute stream", ctx.new_stream())?;
        let name = drv("reading the device name", ctx.name())?;
        let compute_capability = drv("reading the compute capability", ctx.compute_capability())?;
        let num_sms = drv(
            "reading the multiprocessor count",
            ctx.attribute(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
        )? as usize;
        let (_, total_memory_bytes) = drv("reading memory info", ctx.mem_get_info())?;
        if compute_capability.0 < 8 {
            return Err(CudaError::Unsupported(format!(
                "{name} has compute capability {}.{}; the kernels use mma.sync bf16/fp16 (sm_80 or newer)",
                compute_capability.0, compute_capability.1
            )));
        }
        Ok(GpuDevice {
            ctx,
            stream,
            name,
            compute_capability,
            num_sms,
            total_memory_bytes,
            include_dir,
        })
    }

    /// `sm_XY` of this device.
    pub fn arch(&self) -> String {
        // sm_90a: Hopper's arch-specific features (wgmma, used by the wgmma prefill attention and
        // the own GEMM); the CUBIN is built for this device only anyway.
        let suffix = if self.has_wgmma() { "a" } else { "" };
        format!(
            "sm_{}{}{suffix}",
            self.compute_capability.0, self.compute_capability.1
        )
    }

    /// Whether kernels are compiled for sm_90a (warpgroup MMA available).
    pub fn has_wgmma(&self) -> bool {
        self.compute_capability == (9, 0)
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize), CudaError> {
        drv("reading memory info", self.ctx.mem_get_info())
    }

    /// Compiles `source` to a CUBIN for this device with NVRTC (`defines` become `-DNAME=VALUE`) and
    /// loads it. A compile error carries NVRTC's log.
    pub fn compile(
        &self,
        source: &str,
        defines: &[(&str, String)],
    ) -> Result<Arc<CudaModule>, CudaError> {
        use cudarc::nvrtc::{result as nr, sys as ns};
        let arch = self.arch();
        let src = CString::new(source).map_err(|_| CudaError::KernelCompile {
            arch: arch.clone(),
            log: "kernel source contains a NUL byte".into(),
        })?;
        let compile_err = |log: String| CudaError::KernelCompile {
            arch: arch.clone(),
            log,
        };
        let prog = nr::create_program(&src, None).map_err(|e| compile_err(format!("{e:?}")))?;
        let mut options = vec![
            format!("--gpu-architecture={arch}"),
            format!("-I{}", self.include_dir.display()),
            "--std=c++17".to_string(),
            "--use_fast_math".to_string(),
        ];
        options.extend(defines.iter().map(|(k, v)| format!("-D{k}={v}")));
        // SAFETY: prog is a live program; options are plain strings.
        let compiled = unsafe { nr::compile_program(prog, &options) };
        let log = unsafe { nr::get_program_log(prog) }
            .map(|raw| {
                let bytes: Vec<u8> = raw
                    .iter()
                    .map(|&c| c as u8)
                    .take_while(|&c| c != 0)
                    .collect();
                String::from_utf8_lossy(&bytes).into_owned()
            })
            .unwrap_or_default();
        if compiled.is_err() {
            let _ = unsafe { nr::destroy_program(prog) };
            return Err(compile_err(log));
        }
        let mut size = 0usize;
        let cubin = unsafe {
            ns::nvrtcGetCUBINSize(prog, &mut size)
                .result()
                .map_err(|e| compile_err(format!("nvrtcGetCUBINSize: {e:?}")))?;
            let mut bytes = vec![0u8; size];
            ns::nvrtcGetCUBIN(prog, bytes.as_mut_ptr() as *mut _)
                .result()
                .map_err(|e| compile_err(format!("nvrtcGetCUBIN: {e:?}")))?;
            let _ = nr::destroy_program(prog);
            bytes
        };
        drv(
            "loading the kernel module",
            self.ctx.load_module(Ptx::from_binary(cubin)),
        )
    }

    pub fn function(
        &self,
        module: &Arc<CudaModule>,
        name: &str,
    ) -> Result<CudaFunction, CudaError> {
        drv(
            &format!("loading kernel `{name}`"),
            module.load_function(name),
        )
    }

    pub fn synchronize(&self) -> Result<(), CudaError> {
        drv(
            "synchronising the compute stream",
            self.stream.synchronize(),
        )
    }
}
