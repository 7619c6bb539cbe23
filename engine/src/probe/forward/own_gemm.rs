//! The own warp-specialised wgmma GEMM (sm_90a) on layer 0's gate_up weight against cuBLAS: the
//! plain output and the fused SiLU-mul epilogue, checked element by element and timed
//! (`djinn engine gemm-search --own-gemm`, and the consistency check).

use cudarc::driver::result as dr;

use crate::config::DType;
use crate::cuda::gemm_tune::{GemmOut, TunedGemm};
use crate::cuda::{drv, kargs, legacy_stream_done, CudaError, CudaModel, TUNE_MIN_ROWS};

/// Layer 0's gate_up on `rows` rows of seeded random activations: the own GEMM against cuBLAS
/// (plain output [rows, 2 inter]) and the own fused SiLU-mul GEMM against cuBLAS + `silu_mul`
/// (output [rows, inter]). Returns (check, max |diff|, max |reference|) per comparison and,
/// with `timing_reps` > 0, report lines with ms per call and TFLOP/s of each arm (two
/// alternated rounds; floor at 989 TFLOP/s dense fp16/bf16).
#[allow(clippy::type_complexity)]
pub fn own_gemm_check(
    model: &mut CudaModel,
    rows: usize,
    timing_reps: usize,
) -> Result<(Vec<(String, f32, f32)>, Vec<String>), CudaError> {
    let Some(maps) = model.own_gate_up.clone() else {
        return Err(CudaError::Unsupported(
            "the own wgmma GEMM needs sm_90, fp16/bf16 weights and an intermediate size that is a multiple of 128".into(),
        ));
    };
    if rows == 0 || rows > model.options.max_tokens_per_step {
        return Err(CudaError::BadInput(format!(
            "own GEMM check at {rows} rows: expected 1..={} (the model's step size)",
            model.options.max_tokens_per_step
        )));
    }
    let (h, inter) = (model.config.hidden_size, model.config.intermediate_size);
    let w = model.wptr(model.layout.layers[0].gate_up);
    let (normed, buf_a, buf_b) = (model.buf.normed.ptr(), model.buf.buf_a.ptr(), model.buf.buf_b.ptr());
    // Activations like a normed hidden state: uniform in [-1.5, 1.5].
    let (n, seed, scale, bias) = ((rows * h) as u64, 0x6a8u64, 1.5f32, 0.0f32);
    let grid = ((rows * h).div_ceil(256).min(65536 * 4)) as u32;
    model.launch(
        model.kernels.random_fill,
        (grid, 1, 1),
        (256, 1, 1),
        kargs![normed, n, seed, scale, bias],
    )?;
    let bf16 = model.options.dtype == DType::Bf16;
    let download = |ptr: u64, len: usize| -> Result<Vec<f32>, CudaError> {
        let mut host = vec![0u16; len];
        model.device.synchronize()?;
        drv("downloading a GEMM check output", unsafe {
            dr::memcpy_dtoh_sync(&mut host, ptr)
        })?;
        Ok(host
            .into_iter()
            .map(|b| {
                if bf16 {
                    half::bf16::from_bits(b).to_f32()
                } else {
                    half::f16::from_bits(b).to_f32()
                }
            })
            .collect())
    };
    let compare = |name: String, cand: &[f32], reference: &[f32]| {
        let (mut max_diff, mut ref_max) = (0f32, 0f32);
        for (a, b) in cand.iter().zip(reference) {
            let d = if a.is_finite() {
                (a - b).abs()
            } else {
                f32::INFINITY
            };
            max_diff = max_diff.max(d);
            ref_max = ref_max.max(b.abs());
        }
        (name, max_diff, ref_max)
    };
    let cublas_plain = || {
        model.gemm(
            normed,
            w,
            buf_a,
            rows,
            2 * inter,
            h,
            GemmOut::Half,
            rows >= TUNE_MIN_ROWS,
        )
    };
    let silu = || model.launch_silu_mul(rows);
    let own_plain = || {
        model.launch_own_gemm(
            false,
            maps.normed,
            maps.gate_up[0],
            maps.normed,
            buf_a,
            rows,
            2 * inter,
            h,
        )
    };
    let own_fused = || {
        model.launch_own_gemm(
            true,
            maps.normed,
            maps.gate_up[0],
            maps.act,
            buf_b,
            rows,
            inter,
            h,
        )
    };
    let mut checks = Vec::new();
    cublas_plain()?;
    let ref_plain = download(buf_a, rows * 2 * inter)?;
    silu()?;
    let ref_act = download(buf_b, rows * inter)?;
    // NaN bytes (0xFF) in both outputs first, so an output the kernel does not write fails.
    let poison = |ptr: u64, bytes: usize| {
        model.device.synchronize()?;
        drv("poisoning a GEMM check output", unsafe {
            dr::memset_d8_sync(ptr, 0xFF, bytes)
        })?;
        legacy_stream_done("poisoning a GEMM check output")
    };
    poison(buf_a, rows * 2 * inter * 2)?;
    own_plain()?;
    let plain = download(buf_a, rows * 2 * inter)?;
    checks.push(compare(
        format!(
            "own wgmma GEMM == cuBLAS (gate_up, {rows} x {} x {h})",
            2 * inter
        ),
        &plain,
        &ref_plain,
    ));
    poison(buf_b, rows * inter * 2)?;
    own_fused()?;
    let fused = download(buf_b, rows * inter)?;
    checks.push(compare(
        format!("own fused gate_up + SiLU-mul == cuBLAS + silu_mul ({rows} x {inter})"),
        &fused,
        &ref_act,
    ));
    let mut lines = Vec::new();
    if timing_reps > 0 {
        let stream = model.device.stream.cu_stream();
        let flop = 2.0 * rows as f64 * (2 * inter) as f64 * h as f64;
        let tflops = |ms: f64| flop / (ms * 1e-3) / 1e12;
        let floor_ms = flop / 989e12 * 1e3;
        for round in 1..=2 {
            let cb = TunedGemm::time_reps(stream, timing_reps, cublas_plain)?;
            let cs = TunedGemm::time_reps(stream, timing_reps, || {
                cublas_plain()?;
                silu()
            })?;
            let op = TunedGemm::time_reps(stream, timing_reps, own_plain)?;
            let of = TunedGemm::time_reps(stream, timing_reps, own_fused)?;
            lines.push(format!(
                "own gemm {rows} x {} x {h} round {round} (ms per call, {timing_reps} reps; floor {floor_ms:.4} ms at 989 TFLOP/s): cuBLAS gate_up {cb:.4} ({:.0} TFLOP/s, x{:.2} floor), cuBLAS gate_up + silu_mul {cs:.4}, own gate_up {op:.4} ({:.0} TFLOP/s, x{:.2} floor), own fused gate_up + SiLU {of:.4} ({:.0} TFLOP/s, x{:.2} floor); fused / (cuBLAS + silu_mul) {:.3}",
                2 * inter,
                tflops(cb),
                cb / floor_ms,
                tflops(op),
                op / floor_ms,
                tflops(of),
                of / floor_ms,
                of / cs
            ));
        }
    }
    Ok((checks, lines))
}
