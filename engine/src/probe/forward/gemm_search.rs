//! `djinn engine gemm-search`: cuBLASLt configurations for the four prefill GEMMs of a prompt,
//! screened cool, timed hot and optionally inside real back-to-back prefills; the winners are the
//! lines of the table the engine reads with `--gemm-tuning table`. The per-shape search is
//! lt_search.rs.

use super::lt_search::{self, force_choice, median};
use crate::batch::SeqStep;
use crate::config::DType;
use crate::cuda::gemm_tune::{GemmArgs, GemmOut, TableChoice, TableEntry};
use crate::cuda::{CudaError, CudaModel, CUBLAS_WORKSPACE_BYTES, TUNE_MIN_ROWS};

pub use super::lt_search::GemmSearchOptions;

/// One searched shape: its name, operands, the table entry it will get, and its hot arms
/// (choice, hot ms per call), fastest first.
type Finalist = (&'static str, GemmArgs, TableEntry, Vec<(TableChoice, f64)>);

/// Searches cuBLASLt configurations for the four prefill GEMMs of a `rows`-token prompt
/// (layer 0's weights, the activations of a real prefill) and times the best hot (lt_search.rs).
/// Returns (report lines, table lines for engine/data/gemm_configs.tsv). The search scribbles
/// over activation buffers; later steps recompute them.
pub fn gemm_search(
    model: &mut CudaModel,
    rows: usize,
    search: &GemmSearchOptions,
) -> Result<(Vec<String>, Vec<String>), CudaError> {
    if rows < TUNE_MIN_ROWS || rows > model.options.max_tokens_per_step {
        return Err(CudaError::BadInput(format!(
            "gemm search at {rows} rows: expected {TUNE_MIN_ROWS}..={} (the tuned prefill GEMM range of this model's step size)",
            model.options.max_tokens_per_step
        )));
    }
    if model.tuned_gemm.is_none() {
        return Err(CudaError::Unsupported(
            "the GEMM search needs libcublasLt and the tuned path (GEMM tuning on)".into(),
        ));
    }
    // A real prefill first, so every GEMM input holds realistic activations.
    let (table, prompt) = super::bench::synthetic_prompt(model, rows);
    let step = SeqStep {
        block_table: &table,
        context_len: 0,
        tokens: &prompt,
    };
    model.forward_greedy(&[step])?;
    let tuned = model.tuned_gemm.as_ref().expect("checked above");
    let mut report = Vec::new();
    let mut finalists: Vec<Finalist> = Vec::new();
    for (name, args) in prefill_gemms(model, rows) {
        let (x, w, y, n, k, out) = (args.x, args.w, args.y, args.n, args.k, args.out);
        let gemm_ex = || model.gemm_ex(x, w, y, rows, n, k, out);
        let outcome = lt_search::search(tuned, &args, &gemm_ex, search)?;
        for l in outcome.lines {
            report.push(format!("{name}: {l}"));
        }
        finalists.push((name, args, outcome.entry, outcome.arms));
    }
    model.device.synchronize()?;
    if search.in_forward_arms > 0 {
        // Inside back-to-back prefills the GEMMs share the power budget with attention and the
        // elementwise kernels, so the hot loop's winner need not win there: time the fastest
        // hot arms (and cublasGemmEx) inside real prefills, one shape at a time, the others
        // held at their hot winner, arms interleaved over rounds.
        for (_, args, entry, _) in &finalists {
            force(model, args, entry.choice)?;
        }
        for finalist in finalists.iter_mut() {
            in_forward(model, step, rows, search, finalist, &mut report)?;
        }
    }
    let lines = finalists.iter().map(|(_, _, e, _)| e.to_line()).collect();
    Ok((report, lines))
}

/// The four prefill GEMMs of a `rows`-token step on layer 0 (qkv, o, gate_up, down), with the
/// output kinds the forward uses at that size (fp16/bf16 residual from `half_resid_min_tokens`
/// rows on, f32 below).
fn prefill_gemms(model: &CudaModel, rows: usize) -> [(&'static str, GemmArgs); 4] {
    let c = &model.config;
    let (h, inter, hd) = (c.hidden_size, c.intermediate_size, c.head_dim());
    let qkv_width = (c.num_attention_heads + 2 * c.num_key_value_heads) * hd;
    let lw = &model.layout.layers[0];
    let resid_out = if rows >= model.half_resid_min_tokens {
        GemmOut::AddHalf
    } else {
        GemmOut::AddF32
    };
    let resid = model.buf.resid.ptr();
    let args = |x: u64, w: usize, y: u64, n: usize, k: usize, out: GemmOut| GemmArgs {
        x,
        w: model.wptr(w),
        y,
        m: rows,
        n,
        k,
        out,
        scratch: 0,
        bf16: model.options.dtype == DType::Bf16,
        workspace: model.buf.cublas_workspace.ptr(),
        workspace_bytes: CUBLAS_WORKSPACE_BYTES,
        stream: model.device.stream.cu_stream(),
    };
    let (normed, buf_a, buf_b) = (
        model.buf.normed.ptr(),
        model.buf.buf_a.ptr(),
        model.buf.buf_b.ptr(),
    );
    [
        (
            "qkv",
            args(normed, lw.qkv, buf_a, qkv_width, h, GemmOut::Half),
        ),
        (
            "o",
            args(buf_b, lw.o, resid, h, c.num_attention_heads * hd, resid_out),
        ),
        (
            "gate_up",
            args(normed, lw.gate_up, buf_a, 2 * inter, h, GemmOut::Half),
        ),
        ("down", args(buf_b, lw.down, resid, h, inter, resid_out)),
    ]
}

/// Makes `choice` the algorithm of `args`' shape (lt_search.rs's `force_choice` on the model's
/// tuned GEMM, which `gemm_search` checked is there).
fn force(model: &CudaModel, args: &GemmArgs, choice: TableChoice) -> Result<(), CudaError> {
    let tuned = model.tuned_gemm.as_ref().expect("checked by gemm_search");
    force_choice(tuned, args, choice)
}

/// Times the fastest `in_forward_arms` hot arms of one shape (and cublasGemmEx) inside real
/// prefills of `step`, the other shapes at their current choice, and makes the fastest the
/// shape's table entry and its choice from now on.
fn in_forward(
    model: &mut CudaModel,
    step: SeqStep<'_>,
    rows: usize,
    search: &GemmSearchOptions,
    (name, args, entry, arms): &mut Finalist,
    report: &mut Vec<String>,
) -> Result<(), CudaError> {
    let mut candidates: Vec<(TableChoice, f64)> =
        arms.iter().take(search.in_forward_arms).copied().collect();
    if let Some(ex) = arms.iter().find(|a| a.0 == TableChoice::GemmEx) {
        if !candidates.iter().any(|c| c.0 == TableChoice::GemmEx) {
            candidates.push(*ex);
        }
    }
    let mut walls: Vec<Vec<f64>> = vec![Vec::new(); candidates.len()];
    for round in 0..search.in_forward_rounds {
        for j in 0..candidates.len() {
            let i = (j + round) % candidates.len();
            force(model, args, candidates[i].0)?;
            model.forward_greedy(&[step])?; // first call after a switch: untimed
            let mut times = Vec::new();
            for _ in 0..search.in_forward_reps {
                let started = std::time::Instant::now();
                model.forward_greedy(&[step])?;
                times.push(started.elapsed().as_secs_f64() * 1e3);
            }
            walls[i].push(median(&times));
        }
    }
    let best = (0..candidates.len())
        .min_by(|&a, &b| median(&walls[a]).total_cmp(&median(&walls[b])))
        .expect("at least one arm");
    report.push(format!(
        "{name}: in-forward (prefill {rows} p50 wall ms, median of {} rounds x {} prefills; the other GEMMs at their current choice):",
        search.in_forward_rounds, search.in_forward_reps
    ));
    for (i, (choice, hot)) in candidates.iter().enumerate() {
        report.push(format!(
            "  {:<7} prefill {:.3} ms (rounds {})  hot-loop {hot:.4} ms/call  [{}]",
            if i == best { "CHOSEN" } else { "" },
            median(&walls[i]),
            walls[i]
                .iter()
                .map(|w| format!("{w:.3}"))
                .collect::<Vec<_>>()
                .join(" "),
            match choice {
                TableChoice::GemmEx => "cublasGemmEx".to_string(),
                TableChoice::Lt(cfg) => cfg.to_string(),
            }
        ));
    }
    let (choice, hot) = candidates[best];
    force(model, args, choice)?;
    entry.choice = choice;
    entry.hot_ms = hot;
    Ok(())
}
