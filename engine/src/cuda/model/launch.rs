//! Kernel launches: plain, and with programmatic dependent launch (PDL) on sm_90+, where each
//! kernel may start while the previous one drains and waits for it on the device.

use std::ffi::c_void;

use cudarc::driver::{result as dr, sys as dsys};

use super::{drv, CudaError, CudaModel};

/// A kernel's argument array: pointers to named locals (never temporaries) in signature order.
macro_rules! kargs {
    ($($x:expr),* $(,)?) => {
        &mut [$(&$x as *const _ as *mut std::ffi::c_void),*]
    };
}
pub(crate) use kargs;

impl CudaModel {
    pub(crate) fn launch(
        &self,
        f: dsys::CUfunction,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        args: &mut [*mut c_void],
    ) -> Result<(), CudaError> {
        self.launch_smem(f, grid, block, 0, args)
    }

    pub(crate) fn launch_smem(
        &self,
        f: dsys::CUfunction,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_mem_bytes: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), CudaError> {
        // SAFETY: each kernel's argument list matches its signature in kernels/*.cu; all pointers are
        // into buffers this model owns, sized at start-up for the largest step.
        drv("launching a kernel", unsafe {
            dr::launch_kernel(
                f,
                grid,
                block,
                shared_mem_bytes,
                self.device.stream.cu_stream(),
                args,
            )
        })
    }

    /// Launches one of the forward's kernels with programmatic dependent launch (when enabled):
    /// it may start while the previous kernel still runs and waits for it in `pdl_wait()` (every
    /// kernel launched here calls it before touching activations; see kernels/common.cu). Inside a graph
    /// capture this becomes a programmatic edge, so a replayed step overlaps each kernel's launch
    /// and prologue (the GEMVs' first weight loads) with the tail of the previous one.
    pub(crate) fn launch_fwd(
        &self,
        f: dsys::CUfunction,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_mem_bytes: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), CudaError> {
        if !self.use_pdl {
            return self.launch_smem(f, grid, block, shared_mem_bytes, args);
        }
        // SAFETY: zeroed attribute, then the id and its value set; plain C data.
        let mut attr: dsys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = dsys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = dsys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block.0,
            blockDimY: block.1,
            blockDimZ: block.2,
            sharedMemBytes: shared_mem_bytes,
            hStream: self.device.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: as in `launch_smem`; `config` and `attr` outlive the call.
        drv(
            "launching a kernel (programmatic dependent launch)",
            unsafe {
                dsys::cuLaunchKernelEx(&config, f, args.as_mut_ptr(), std::ptr::null_mut()).result()
            },
        )
    }

    /// Records an event closing the work of `category` while a profiling probe runs a step (a no-op
    /// otherwise).
    pub(super) fn mark(&self, category: &'static str) -> Result<(), CudaError> {
        if let Some(events) = self.profiler.borrow_mut().as_mut() {
            let event = drv(
                "creating a profiling event",
                dr::event::create(dsys::CUevent_flags::CU_EVENT_DEFAULT),
            )?;
            drv("recording a profiling event", unsafe {
                dr::event::record(event, self.device.stream.cu_stream())
            })?;
            events.push((event, category));
        }
        Ok(())
    }
}
