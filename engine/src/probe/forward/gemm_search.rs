//! `djinn engine gemm-search`: cuBLASLt configurations for the four prefill GEMMs of a prompt,
//! screened cool, timed hot and optionally inside real back-to-back prefills; the winners are the
//! lines of the table the engine reads with `--gemm-tuning table`.

use crate::batch::SeqStep;
use crate::config::DType;
use crate::cuda::gemm_tune::{GemmArgs, GemmOut, TableChoice};
use crate::cuda::{CudaError, CudaModel, CUBLAS_WORKSPACE_BYTES, TUNE_MIN_ROWS};

pub use crate::cuda::gemm_tune::GemmSearchOptions;

/// Searches cuBLASLt configurations for the four prefill GEMMs of a `rows`-token prompt
/// (layer 0's weights, the activations of a real prefill) and times the best hot (gemm_tune.rs).
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
    let Some(tuned) = model.tuned_gemm.as_ref() else {
        return Err(CudaError::Unsupported(
            "the GEMM search needs libcublasLt and the tuned path (GEMM tuning on)"
                .into(),
        ));
    };
    let _ = tuned;
    // A real prefill first, so every GEMM input holds realistic activations.
    let (table, prompt) = super::bench::synthetic_prompt(model, rows);
    model.forward_greedy(&[SeqStep {
        block_table: &table,
        context_len: 0,
        tokens: &prompt,
    }])?;
    let c = &model.config;
    let (h, inter, hd) = (c.hidden_size, c.intermediate_size, c.head_dim());
    let qkv_width = (c.num_attention_heads + 2 * c.num_key_value_heads) * hd;
    let lw = &model.layout.layers[0];
    // The same output kind as the forward of a `rows`-token step (fp16/bf16 residual from
    // `half_resid_min_tokens` rows on, f32 below).
    let resid_out = if rows >= model.half_resid_min_tokens {
        GemmOut::AddHalf
    } else {
        GemmOut::AddF32
    };
    let (layer_out, layer_out_kind) = (model.buf.resid.ptr(), resid_out);
    let (o_out, o_kind) = (layer_out, layer_out_kind);
    let shapes = [
        (
            "qkv",
            model.buf.normed.ptr(),
            model.wptr(lw.qkv),
            model.buf.buf_a.ptr(),
            qkv_width,
            h,
            GemmOut::Half,
        ),
        (
            "o",
            model.buf.buf_b.ptr(),
            model.wptr(lw.o),
            o_out,
            h,
            c.num_attention_heads * hd,
            o_kind,
        ),
        (
            "gate_up",
            model.buf.normed.ptr(),
            model.wptr(lw.gate_up),
            model.buf.buf_a.ptr(),
            2 * inter,
            h,
            GemmOut::Half,
        ),
        (
            "down",
            model.buf.buf_b.ptr(),
            model.wptr(lw.down),
            layer_out,
            h,
            inter,
            layer_out_kind,
        ),
    ];
    let tuned = model.tuned_gemm.as_ref().expect("checked above");
    let (mut report, mut lines) = (Vec::new(), Vec::new());
    let mut finalists = Vec::new();
    for (name, x, w, y, n, k, out) in shapes {
        let args = GemmArgs {
            x,
            w,
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
        let gemm_ex = || model.gemm_ex(x, w, y, rows, n, k, out);
        let outcome = tuned.search(&args, &gemm_ex, search)?;
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
            model.tuned_gemm
                .as_ref()
                .expect("checked above")
                .force_choice(args, entry.choice)?;
        }
        let step = SeqStep {
            block_table: &table,
            context_len: 0,
            tokens: &prompt,
        };
        for (name, args, entry, arms) in finalists.iter_mut() {
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
                    model.tuned_gemm
                        .as_ref()
                        .expect("checked above")
                        .force_choice(args, candidates[i].0)?;
                    model.forward_greedy(&[step])?; // first call after a switch: untimed
                    let mut times = Vec::new();
                    for _ in 0..search.in_forward_reps {
                        let started = std::time::Instant::now();
                        model.forward_greedy(&[step])?;
                        times.push(started.elapsed().as_secs_f64() * 1e3);
                    }
                    times.sort_by(|a, b| a.total_cmp(b));
                    walls[i].push(times[times.len() / 2]);
                }
            }
            let med = |v: &Vec<f64>| {
                let mut v = v.clone();
                v.sort_by(|a, b| a.total_cmp(b));
                v[v.len() / 2]
            };
            let best = (0..candidates.len())
                .min_by(|&a, &b| med(&walls[a]).total_cmp(&med(&walls[b])))
                .expect("at least one arm");
            report.push(format!(
                "{name}: in-forward (prefill {rows} p50 wall ms, median of {} rounds x {} prefills; the other GEMMs at their current choice):",
                search.in_forward_rounds, search.in_forward_reps
            ));
            for (i, (choice, hot)) in candidates.iter().enumerate() {
                report.push(format!(
                    "  {:<7} prefill {:.3} ms (rounds {})  hot-loop {hot:.4} ms/call  [{}]",
                    if i == best { "CHOSEN" } else { "" },
                    med(&walls[i]),
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
            model.tuned_gemm
                .as_ref()
                .expect("checked above")
                .force_choice(args, choice)?;
            entry.choice = choice;
            entry.hot_ms = hot;
        }
    }
    for (_, _, entry, _) in &finalists {
        lines.push(entry.to_line());
    }
    Ok((report, lines))
}
