//! Per-kernel GPU time of one step: eager launches with an event after every kernel and GEMM
//! (`djinn engine bench` profiles).

use std::collections::BTreeMap;

use cudarc::driver::result as dr;

use crate::batch::SeqStep;
use crate::cuda::{CudaError, CudaModel};

/// Runs one step with eager launches and an event after every kernel and GEMM; returns the GPU
/// milliseconds spent per category (gemm_qkv, attention, ...) and in total.
pub fn profile_step(
    model: &mut CudaModel,
    batch: &[SeqStep<'_>],
) -> Result<Vec<(String, f64)>, CudaError> {
    let graphs = model.options.use_cuda_graphs;
    model.options.use_cuda_graphs = false;
    *model.profiler.borrow_mut() = Some(Vec::new());
    let ran = model
        .run_step(batch)
        .and_then(|_| model.wait("a profiled step"));
    model.options.use_cuda_graphs = graphs;
    let events = model.profiler.borrow_mut().take().unwrap_or_default();
    let mut totals: BTreeMap<&'static str, f64> = BTreeMap::new();
    let mut result = ran.map(|_| ());
    for pair in events.windows(2) {
        if result.is_ok() {
            match unsafe { dr::event::elapsed(pair[0].0, pair[1].0) } {
                Ok(ms) => *totals.entry(pair[1].1).or_default() += ms as f64,
                Err(e) => {
                    result = Err(CudaError::Driver {
                        context: "reading profiling events".into(),
                        message: format!("{e:?}"),
                    })
                }
            }
        }
    }
    for (event, _) in events {
        let _ = unsafe { dr::event::destroy(event) };
    }
    result?;
    let total: f64 = totals.values().sum();
    let mut out: Vec<(String, f64)> = totals
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    out.push(("total".to_string(), total));
    Ok(out)
}
