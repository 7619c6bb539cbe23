//! The own warp-specialised wgmma GEMM (sm_90a) on layer 0's gate_up weight against cuBLAS: the
//! plain output and the fused SiLU-mul epilogue, checked element by element and timed
//! (`djinn engine gemm-search --own-gemm`, and the consistency check).

use cudarc::driver::result as dr;

use crate::config::DType;
use crate::cuda::gemm_tune::{GemmOut, TunedGemm};
use crate::cuda::{
    drv, kargs, legacy_stream_done, CudaError, CudaModel, GemmPath, OwnGateUpMaps, TUNE_MIN_ROWS,
};

/// One comparison: (what, max |candidate - reference|, max |reference|).
type Comparison = (String, f32, f32);

/// Layer 0's gate_up on `rows` rows of seeded random activations: the own GEMM against cuBLAS
/// (plain output [rows, 2 inter]) and the own fused SiLU-mul GEMM against cuBLAS + `silu_mul`
/// (output [rows, inter]). Returns (check, max |diff|, max |reference|) per comparison and,
/// with `timing_reps` > 0, report lines with ms per call and TFLOP/s of each arm (two
/// alternated rounds; floor at 989 TFLOP/s dense fp16/bf16).
pub fn own_gemm_check(
    model: &mut CudaModel,
    rows: usize,
    timing_reps: usize,
) -> Result<(Vec<Comparison>, Vec<String>), CudaError> {
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
    let arms = Arms {
        model,
        maps,
        rows,
        h: model.config.hidden_size,
        inter: model.config.intermediate_size,
        w: model.wptr(model.layout.layers[0].gate_up),
    };
    arms.fill_activations()?;
    let checks = arms.compare_outputs()?;
    let lines = if timing_reps > 0 {
        arms.timing(timing_reps)?
    } else {
        Vec::new()
    };
    Ok((checks, lines))
}

/// The four arms on layer 0's gate_up: cuBLAS (plain and + `silu_mul`) and the own GEMM (plain
/// into buf_a, fused SiLU-mul into buf_b), all reading the normed activations.
struct Arms<'a> {
    model: &'a CudaModel,
    maps: OwnGateUpMaps,
    rows: usize,
    h: usize,
    inter: usize,
    /// Layer 0's gate_up weight.
    w: u64,
}

impl Arms<'_> {
    /// Activations like a normed hidden state: uniform in [-1.5, 1.5].
    fn fill_activations(&self) -> Result<(), CudaError> {
        let model = self.model;
        let (n, seed, scale, bias) = ((self.rows * self.h) as u64, 0x6a8u64, 1.5f32, 0.0f32);
        let grid = ((self.rows * self.h).div_ceil(256).min(65536 * 4)) as u32;
        let normed = model.buf.normed.ptr();
        model.launch(
            model.kernels.random_fill,
            (grid, 1, 1),
            (256, 1, 1),
            kargs![normed, n, seed, scale, bias],
        )
    }

    fn cublas_plain(&self) -> Result<(), CudaError> {
        let m = self.model;
        m.gemm(
            m.buf.normed.ptr(),
            self.w,
            m.buf.buf_a.ptr(),
            self.rows,
            2 * self.inter,
            self.h,
            GemmOut::Half,
            if self.rows >= TUNE_MIN_ROWS {
                GemmPath::Tuned
            } else {
                GemmPath::Cublas
            },
        )
    }

    fn silu(&self) -> Result<(), CudaError> {
        self.model.launch_silu_mul(self.rows)
    }

    fn own_plain(&self) -> Result<(), CudaError> {
        let maps = &self.maps;
        self.model.launch_own_gemm(
            false,
            maps.normed,
            maps.gate_up[0],
            maps.normed,
            self.model.buf.buf_a.ptr(),
            self.rows,
            2 * self.inter,
            self.h,
        )
    }

    fn own_fused(&self) -> Result<(), CudaError> {
        let maps = &self.maps;
        self.model.launch_own_gemm(
            true,
            maps.normed,
            maps.gate_up[0],
            maps.act,
            self.model.buf.buf_b.ptr(),
            self.rows,
            self.inter,
            self.h,
        )
    }

    /// `len` fp16/bf16 values at `ptr`, as f32 (synchronises).
    fn download(&self, ptr: u64, len: usize) -> Result<Vec<f32>, CudaError> {
        let bf16 = self.model.options.dtype == DType::Bf16;
        let mut host = vec![0u16; len];
        self.model.device.synchronize()?;
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
    }

    /// NaN bytes (0xFF) in an output first, so an output the kernel does not write fails.
    fn poison(&self, ptr: u64, bytes: usize) -> Result<(), CudaError> {
        self.model.device.synchronize()?;
        drv("poisoning a GEMM check output", unsafe {
            dr::memset_d8_sync(ptr, 0xFF, bytes)
        })?;
        legacy_stream_done("poisoning a GEMM check output")
    }

    /// The own plain and fused outputs against cuBLAS's.
    fn compare_outputs(&self) -> Result<Vec<Comparison>, CudaError> {
        let (rows, h, inter) = (self.rows, self.h, self.inter);
        let (buf_a, buf_b) = (self.model.buf.buf_a.ptr(), self.model.buf.buf_b.ptr());
        let mut checks = Vec::new();
        self.cublas_plain()?;
        let ref_plain = self.download(buf_a, rows * 2 * inter)?;
        self.silu()?;
        let ref_act = self.download(buf_b, rows * inter)?;
        self.poison(buf_a, rows * 2 * inter * 2)?;
        self.own_plain()?;
        let plain = self.download(buf_a, rows * 2 * inter)?;
        checks.push(compare(
            format!(
                "own wgmma GEMM == cuBLAS (gate_up, {rows} x {} x {h})",
                2 * inter
            ),
            &plain,
            &ref_plain,
        ));
        self.poison(buf_b, rows * inter * 2)?;
        self.own_fused()?;
        let fused = self.download(buf_b, rows * inter)?;
        checks.push(compare(
            format!("own fused gate_up + SiLU-mul == cuBLAS + silu_mul ({rows} x {inter})"),
            &fused,
            &ref_act,
        ));
        Ok(checks)
    }

    /// Two alternated rounds of every arm, `reps` calls each: one report line per round.
    fn timing(&self, reps: usize) -> Result<Vec<String>, CudaError> {
        let (rows, h, inter) = (self.rows, self.h, self.inter);
        let stream = self.model.device.stream.cu_stream();
        let flop = 2.0 * rows as f64 * (2 * inter) as f64 * h as f64;
        let tflops = |ms: f64| flop / (ms * 1e-3) / 1e12;
        let floor_ms = flop / 989e12 * 1e3;
        let mut lines = Vec::new();
        for round in 1..=2 {
            let cb = TunedGemm::time_reps(stream, reps, || self.cublas_plain())?;
            let cs = TunedGemm::time_reps(stream, reps, || {
                self.cublas_plain()?;
                self.silu()
            })?;
            let op = TunedGemm::time_reps(stream, reps, || self.own_plain())?;
            let of = TunedGemm::time_reps(stream, reps, || self.own_fused())?;
            lines.push(format!(
                "own gemm {rows} x {} x {h} round {round} (ms per call, {reps} reps; floor {floor_ms:.4} ms at 989 TFLOP/s): cuBLAS gate_up {cb:.4} ({:.0} TFLOP/s, x{:.2} floor), cuBLAS gate_up + silu_mul {cs:.4}, own gate_up {op:.4} ({:.0} TFLOP/s, x{:.2} floor), own fused gate_up + SiLU {of:.4} ({:.0} TFLOP/s, x{:.2} floor); fused / (cuBLAS + silu_mul) {:.3}",
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
        Ok(lines)
    }
}

/// Max |candidate - reference| (infinite where the candidate is not finite) and max |reference|.
pub(crate) fn compare(name: String, cand: &[f32], reference: &[f32]) -> Comparison {
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
}
