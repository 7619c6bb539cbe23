//! The multi-row streaming GEMV (`gemv_batch*`, decode steps of 2-32 rows) against cuBLAS: at the
//! kernel level on seeded random operands of any shape (every output kind, and gate_up with SiLU-mul
//! fused against cuBLAS + SiLU-mul on the host), and at the model level (decode steps whose linear
//! layers run on it against the same steps on cuBLAS).

use cudarc::driver::result as dr;

use super::check::diff_logits;
use crate::batch::SeqStep;
use crate::config::DType;
use crate::cuda::gemm_tune::GemmOut;
use crate::cuda::{
    drv, kargs, CudaError, CudaModel, DecodeGemm, DeviceBuffer, BATCH_GEMV_MAX_ROWS,
};

/// One comparison: what, max |candidate - reference|, max |reference|, and the bound relative to
/// the latter.
#[derive(Clone, Debug)]
pub struct GemvComparison {
    pub name: String,
    pub max_abs_diff: f32,
    pub ref_max_abs: f32,
    pub tolerance_rel: f32,
}

impl GemvComparison {
    /// Whether the difference is within `tolerance_rel` of the reference's largest magnitude.
    pub fn passed(&self) -> bool {
        self.max_abs_diff <= self.tolerance_rel * self.ref_max_abs.max(1e-3)
    }
}

/// Bound of a comparison relative to the largest reference value. Both sides sum the same products
/// in f32 (only the order differs), so f32 outputs agree to far below 1e-3; outputs rounded to the
/// weights' type may round 1 ulp apart (2^-7 of the largest value in bf16, 2^-10 in fp16), and
/// the fused SiLU-mul rounds gate and up first, so twice that again.
fn tolerance(dtype: DType, out_f32: bool, silu: bool) -> f32 {
    let ulp = if dtype == DType::Bf16 {
        1.0 / 128.0
    } else {
        1.0 / 1024.0
    };
    match (out_f32, silu) {
        (true, _) => 1e-3,
        (false, false) => 2.0 * ulp,
        (false, true) => 4.0 * ulp,
    }
}

/// A weight shape `W[n, k]` to check (`silu`: also as a gate_up of `n / 2` outputs, SiLU fused).
#[derive(Clone, Copy, Debug)]
pub struct GemvShape {
    pub name: &'static str,
    pub n: usize,
    pub k: usize,
    pub silu: bool,
}

/// Llama-3.1-8B's linear layers (qkv, o_proj, gate_up, down_proj, LM head), an odd row count and an
/// inner size that ends in a partial 32-element group.
pub const LLAMA3_8B_SHAPES: [GemvShape; 7] = [
    GemvShape {
        name: "qkv",
        n: 6144,
        k: 4096,
        silu: false,
    },
    GemvShape {
        name: "o_proj",
        n: 4096,
        k: 4096,
        silu: false,
    },
    GemvShape {
        name: "gate_up",
        n: 28672,
        k: 4096,
        silu: true,
    },
    GemvShape {
        name: "down_proj",
        n: 4096,
        k: 14336,
        silu: false,
    },
    GemvShape {
        name: "lm_head",
        n: 128256,
        k: 4096,
        silu: false,
    },
    GemvShape {
        name: "odd n",
        n: 1001,
        k: 4096,
        silu: false,
    },
    GemvShape {
        name: "k off the groups",
        n: 512,
        k: 4104,
        silu: true,
    },
];

/// Row counts the kernel checks cover: every tile count, whole and partial tiles.
pub const CHECK_ROWS: [usize; 6] = [2, 3, 5, 8, 17, 32];

/// Device operands of one shape: W, x (`BATCH_GEMV_MAX_ROWS` rows), and two outputs (f32-sized).
struct Operands<'a> {
    model: &'a CudaModel,
    n: usize,
    k: usize,
    w: DeviceBuffer,
    x: DeviceBuffer,
    reference: DeviceBuffer,
    candidate: DeviceBuffer,
}

impl<'a> Operands<'a> {
    fn new(model: &'a CudaModel, n: usize, k: usize, seed: u64) -> Result<Self, CudaError> {
        let ctx = &model.device.ctx;
        let elem = model.options.dtype.size_bytes();
        let rows = BATCH_GEMV_MAX_ROWS;
        let ops = Operands {
            model,
            n,
            k,
            w: DeviceBuffer::alloc(ctx, n * k * elem, "GEMV check weights")?,
            x: DeviceBuffer::alloc(ctx, rows * k * elem, "GEMV check activations")?,
            reference: DeviceBuffer::alloc(ctx, rows * n * 4, "GEMV check reference output")?,
            candidate: DeviceBuffer::alloc(ctx, rows * n * 4, "GEMV check output")?,
        };
        // W uniform with variance 3/k, x in [-1, 1]: outputs of unit spread.
        ops.fill(ops.w.ptr(), n * k, seed, 3.0 / (k as f32).sqrt())?;
        ops.fill(ops.x.ptr(), rows * k, seed ^ 0x9e37, 1.0)?;
        Ok(ops)
    }

    fn fill(&self, ptr: u64, len: usize, seed: u64, scale: f32) -> Result<(), CudaError> {
        let m = self.model;
        let (n, bias) = (len as u64, 0.0f32);
        let grid = (len.div_ceil(256).min(65536)) as u32;
        m.launch(
            m.kernels.random_fill,
            (grid, 1, 1),
            (256, 1, 1),
            kargs![ptr, n, seed, scale, bias],
        )
    }

    /// Both outputs set to 1.5 in the output's type (so an accumulating kernel that overwrote
    /// instead would be off by 1.5 everywhere).
    fn preset_outputs(&self, out: GemmOut, len: usize) -> Result<(), CudaError> {
        self.model.device.synchronize()?;
        for buf in [&self.reference, &self.candidate] {
            drv("presetting a GEMV check output", unsafe {
                if out.is_f32() {
                    dr::memcpy_htod_sync(buf.ptr(), &vec![1.5f32; len])
                } else {
                    dr::memcpy_htod_sync(buf.ptr(), &vec![self.half_bits(1.5); len])
                }
            })?;
        }
        Ok(())
    }

    fn half_bits(&self, v: f32) -> u16 {
        match self.model.options.dtype {
            DType::Bf16 => half::bf16::from_f32(v).to_bits(),
            _ => half::f16::from_f32(v).to_bits(),
        }
    }

    /// `len` outputs at `ptr` (f32, or the weights' type) as f32; synchronises.
    fn download(&self, ptr: u64, len: usize, f32_out: bool) -> Result<Vec<f32>, CudaError> {
        self.model.device.synchronize()?;
        if f32_out {
            let mut host = vec![0f32; len];
            drv("downloading a GEMV check output", unsafe {
                dr::memcpy_dtoh_sync(&mut host, ptr)
            })?;
            return Ok(host);
        }
        let mut host = vec![0u16; len];
        drv("downloading a GEMV check output", unsafe {
            dr::memcpy_dtoh_sync(&mut host, ptr)
        })?;
        let bf16 = self.model.options.dtype == DType::Bf16;
        Ok(host
            .into_iter()
            .map(|b| match bf16 {
                true => half::bf16::from_bits(b).to_f32(),
                false => half::f16::from_bits(b).to_f32(),
            })
            .collect())
    }

    /// The multi-row GEMV against `cublasGemmEx` on `m` rows writing `out`.
    fn compare_plain(&self, m: usize, out: GemmOut) -> Result<GemvComparison, CudaError> {
        let (n, k, model) = (self.n, self.k, self.model);
        let (x, w) = (self.x.ptr(), self.w.ptr());
        self.preset_outputs(out, m * n)?;
        model.gemm_ex(x, w, self.reference.ptr(), m, n, k, out)?;
        model.launch_batch_gemv(x, w, self.candidate.ptr(), m, n, k, out)?;
        let reference = self.download(self.reference.ptr(), m * n, out.is_f32())?;
        let candidate = self.download(self.candidate.ptr(), m * n, out.is_f32())?;
        Ok(compare(
            format!("{m} x {n} x {k} {out:?}"),
            &candidate,
            &reference,
            tolerance(model.options.dtype, out.is_f32(), false),
        ))
    }

    /// gate_up with SiLU-mul fused (`n / 2` outputs per row) against cuBLAS's gate_up output in the
    /// weights' type with SiLU-mul applied on the host.
    fn compare_silu(&self, m: usize) -> Result<GemvComparison, CudaError> {
        let (n, k, model) = (self.n, self.k, self.model);
        let inter = n / 2;
        let (x, w) = (self.x.ptr(), self.w.ptr());
        model.gemm_ex(x, w, self.reference.ptr(), m, n, k, GemmOut::Half)?;
        let gate_up = self.download(self.reference.ptr(), m * n, false)?;
        let reference: Vec<f32> = (0..m * inter)
            .map(|i| {
                let (r, c) = (i / inter, i % inter);
                let (g, u) = (gate_up[r * n + c], gate_up[r * n + inter + c]);
                g / (1.0 + (-g).exp()) * u
            })
            .collect();
        drv("poisoning a GEMV check output", unsafe {
            dr::memset_d8_sync(self.candidate.ptr(), 0xFF, m * inter * 2)
        })?;
        model.launch_batch_gemv_silu(x, w, self.candidate.ptr(), m, inter, k)?;
        let candidate = self.download(self.candidate.ptr(), m * inter, false)?;
        Ok(compare(
            format!("{m} x {inter} x {k} gate_up + SiLU-mul"),
            &candidate,
            &reference,
            tolerance(model.options.dtype, false, true),
        ))
    }
}

/// Every row count of `rows` on every shape: the four output kinds (T, f32, f32 +=, T +=) and, for
/// `silu` shapes, the fused gate_up. Operands are seeded random (`seed`).
pub fn kernel_checks(
    model: &CudaModel,
    shapes: &[GemvShape],
    rows: &[usize],
    seed: u64,
) -> Result<Vec<GemvComparison>, CudaError> {
    let mut results = Vec::new();
    for shape in shapes {
        if shape.k % 8 != 0 || (shape.silu && shape.n % 16 != 0) {
            return Err(CudaError::BadInput(format!(
                "GEMV check shape {} ({} x {}): k must be a multiple of 8 and a SiLU shape's n of 16",
                shape.name, shape.n, shape.k
            )));
        }
        let ops = Operands::new(model, shape.n, shape.k, seed)?;
        for &m in rows {
            if !(2..=BATCH_GEMV_MAX_ROWS).contains(&m) {
                return Err(CudaError::BadInput(format!(
                    "GEMV check at {m} rows: the multi-row GEMV takes 2..={BATCH_GEMV_MAX_ROWS}"
                )));
            }
            for out in [
                GemmOut::Half,
                GemmOut::F32,
                GemmOut::AddF32,
                GemmOut::AddHalf,
            ] {
                let mut c = ops.compare_plain(m, out)?;
                c.name = format!("{}: {}", shape.name, c.name);
                results.push(c);
            }
            if shape.silu {
                let mut c = ops.compare_silu(m)?;
                c.name = format!("{}: {}", shape.name, c.name);
                results.push(c);
            }
        }
    }
    Ok(results)
}

/// Max |candidate - reference| (infinite where the candidate is not finite) and max |reference|,
/// with the bound they are held to.
fn compare(
    name: String,
    candidate: &[f32],
    reference: &[f32],
    tolerance_rel: f32,
) -> GemvComparison {
    let (name, max_abs_diff, ref_max_abs) = super::own_gemm::compare(name, candidate, reference);
    GemvComparison {
        name,
        max_abs_diff,
        ref_max_abs,
        tolerance_rel,
    }
}

/// Prompt tokens of each sequence in `decode_checks`.
const DECODE_CHECK_PROMPT: usize = 20;

/// Whether `decode_checks` can run a batch of `batch` sequences on this model (sequences per step,
/// tokens of the batched prefill, KV blocks).
pub fn decode_check_fits(model: &CudaModel, batch: usize) -> bool {
    let blocks = (DECODE_CHECK_PROMPT + 1).div_ceil(model.options.block_size_tokens);
    batch <= model.options.max_seqs_per_step
        && batch * DECODE_CHECK_PROMPT <= model.options.max_tokens_per_step
        && batch * blocks <= model.kv_pool().num_blocks()
}

/// Decode steps of each batch size in `batches` (each `decode_check_fits`) with the linear layers on the multi-row GEMV against
/// the same steps on cuBLAS: every sequence first gets a prompt of its own (one batched prefill,
/// 20 tokens each), then each arm decodes one token per sequence at position 20 (both arms write
/// the same KV slots). Returns (check, max |diff| of the logits, passed at `tolerance_rel` of the
/// largest logit with argmax differences only at near ties). The model's choice is restored.
pub fn decode_checks(
    model: &mut CudaModel,
    batches: &[usize],
    tolerance_rel: f32,
) -> Result<Vec<(String, f32, bool)>, CudaError> {
    let (vocab, bs) = (model.config.vocab_size, model.options.block_size_tokens);
    let prompt_len = DECODE_CHECK_PROMPT;
    let blocks = (prompt_len + 1).div_ceil(bs);
    let most = batches.iter().copied().max().unwrap_or(0);
    if let Some(&bad) = batches
        .iter()
        .find(|&&b| b < 2 || !decode_check_fits(model, b))
    {
        return Err(CudaError::BadInput(format!(
            "decode GEMV check at batch {bad}: needs 2 or more sequences, and the model takes {} sequences and {} tokens per step and {} KV blocks",
            model.options.max_seqs_per_step,
            model.options.max_tokens_per_step,
            model.kv_pool().num_blocks()
        )));
    }
    let tables: Vec<Vec<u32>> = (0..most)
        .map(|s| ((s * blocks) as u32..((s + 1) * blocks) as u32).collect())
        .collect();
    let prompts: Vec<Vec<u32>> = (0..most)
        .map(|s| {
            (0..prompt_len)
                .map(|i| ((s * 7919 + i * 104729 + 13) % vocab) as u32)
                .collect()
        })
        .collect();
    let next: Vec<[u32; 1]> = (0..most).map(|s| [((s * 31 + 5) % vocab) as u32]).collect();
    let was = model.decode_gemm();
    let mut results = Vec::new();
    for &batch in batches {
        let prefill: Vec<SeqStep<'_>> = (0..batch)
            .map(|s| SeqStep {
                block_table: &tables[s],
                context_len: 0,
                tokens: &prompts[s],
            })
            .collect();
        let decode: Vec<SeqStep<'_>> = (0..batch)
            .map(|s| SeqStep {
                block_table: &tables[s],
                context_len: prompt_len,
                tokens: &next[s],
            })
            .collect();
        model.forward_logits(&prefill)?;
        model.set_decode_gemm(DecodeGemm::Cublas);
        let cublas = model.forward_logits(&decode);
        model.set_decode_gemm(DecodeGemm::Gemv);
        let gemv = model.forward_logits(&decode);
        model.set_decode_gemm(was);
        let d = diff_logits(0, &gemv?, &cublas?, tolerance_rel);
        let ok = d.max_abs_diff <= tolerance_rel * d.ref_max_abs.max(1.0)
            && d.argmax_mismatches == d.argmax_near_ties;
        results.push((
            format!("decode batch {batch}: multi-row GEMV == cuBLAS"),
            d.max_abs_diff,
            ok,
        ));
    }
    Ok(results)
}
