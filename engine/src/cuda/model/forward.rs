//! One step of the forward: the batch staged into the step buffers, the layer loop enqueued on the
//! compute stream (or a captured decode graph replayed), the greedy tokens or logits read back.

use cudarc::driver::{result as dr, sys as dsys};

use super::mlp::{GemmPath, LayerTail};
use super::weights::LayerOffsets;
use super::{
    drv, kargs, trace, CudaError, CudaModel, Logits, SeqStep, NORM_ROWS_MIN_TOKENS, TUNE_MIN_ROWS,
};
use crate::cuda::gemm_tune::GemmOut;
use crate::cuda::tuning::DecodeGemm;

/// A step that has not finished after this long is reported as hung.
const STEP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// How attention runs in one enqueued forward.
#[derive(Clone, Copy)]
pub(super) enum AttnMode {
    /// One new token per sequence (row b = sequence b), split-KV with `splits` splits.
    Decode { splits: usize },
    /// Any number of new tokens per sequence, `num_tiles` query tiles.
    Prefill { num_tiles: usize },
}

/// What every layer of one enqueued step shares.
struct StepPlan {
    n_tokens: usize,
    n_seqs: usize,
    mode: AttnMode,
    /// Batch 1: RoPE + KV write ride on the qkv GEMV, SiLU-mul on the gate/up GEMV.
    fused_gemv: bool,
    /// How GEMMs of more than one row run: large prefill GEMMs take the algorithm the cuBLASLt
    /// timing picked (gemm_tune/); decode steps of 2-32 rows the multi-row GEMV if chosen.
    path: GemmPath,
    /// rope_kv_write rotates q too (decode; prefill kernels that do not rotate q on load).
    rotate_q: i32,
    /// The residual stream in the weights' type (else f32).
    half_resid: bool,
    /// The last layer runs attention, o_proj and the MLP on each sequence's last row only.
    prune_last: bool,
}

impl CudaModel {
    /// RMSNorm kernel and threads per row for `rows` rows of the step's residual stream.
    fn norm_for(&self, rows: usize, half_resid: bool) -> (dsys::CUfunction, u32) {
        let k = &self.kernels;
        // add_rmsnorm handles 4 elements per thread.
        let threads = ((self.config.hidden_size / 4).div_ceil(32) * 32).min(1024) as u32;
        match (rows >= NORM_ROWS_MIN_TOKENS, half_resid) {
            (true, true) => (k.add_rmsnorm_rows_h, 256),
            (true, false) => (k.add_rmsnorm_rows, 256),
            (false, true) => (k.add_rmsnorm_h, threads),
            (false, false) => (k.add_rmsnorm, threads),
        }
    }

    /// Enqueues one forward over `n_tokens` rows / `n_seqs` sequences whose inputs are already in
    /// the step buffer: logits of each sequence's last row in `logits`, argmax in `argmax`.
    pub(super) fn enqueue_forward(
        &self,
        n_tokens: usize,
        n_seqs: usize,
        mode: AttnMode,
        layer_gates: &[cudarc::driver::CudaEvent],
    ) -> Result<(), CudaError> {
        let c = &self.config;
        let h = c.hidden_size;
        let eps = c.rms_norm_eps as f32;
        let sl = self.step_layout;
        let (tokens, last_rows) = (self.step_ptr(sl.tokens), self.step_ptr(sl.last_rows));
        let (h_i, null) = (h as i32, 0u64);
        let is_prefill = matches!(mode, AttnMode::Prefill { .. });
        let half_resid = n_tokens >= self.half_resid_min_tokens;
        // A prefill step's logits read the last layer's output at each sequence's last token
        // only: that layer writes every row's KV, then runs attention (as a decode batch), o_proj
        // and the MLP on the last rows alone (3/4 of a layer's FLOPs, ~2.4% of prefill 2048).
        let step = StepPlan {
            n_tokens,
            n_seqs,
            mode,
            fused_gemv: n_tokens == 1 && !is_prefill,
            path: match (is_prefill, self.decode_gemm) {
                (true, _) if n_tokens >= TUNE_MIN_ROWS => GemmPath::Tuned,
                (false, DecodeGemm::Gemv) => GemmPath::BatchGemv,
                _ => GemmPath::Cublas,
            },
            rotate_q: i32::from(!is_prefill || !self.prefill.rotates_q()),
            half_resid,
            prune_last: self.prune_last_layer && is_prefill && n_tokens > n_seqs,
        };
        let (embed_kernel, final_norm_kernel) = if half_resid {
            (self.kernels.embed_h, self.kernels.add_rmsnorm_h)
        } else {
            (self.kernels.embed, self.kernels.add_rmsnorm)
        };
        self.mark("start")?;
        self.launch_fwd(
            embed_kernel,
            (n_tokens as u32, 1, 1),
            (256, 1, 1),
            0,
            kargs![
                tokens,
                self.wptr(self.layout.embed),
                self.buf.resid.ptr(),
                h_i
            ],
        )?;
        self.mark("embed")?;
        for (layer, lw) in self.layout.layers.iter().enumerate() {
            if let Some(gate) = layer_gates.get(layer) {
                // This layer's KV may still be arriving (a layer-by-layer swap-in).
                drv(
                    "waiting for a layer's KV on the compute stream",
                    self.device.stream.wait(gate),
                )?;
            }
            self.enqueue_layer(&step, layer, lw)?;
        }
        // The pruned last layer left its rows compact in last_resid.
        let (final_resid, final_rows) = if step.prune_last {
            (self.buf.last_resid.ptr(), null)
        } else {
            (self.buf.resid.ptr(), last_rows)
        };
        let (_, norm_threads) = self.norm_for(0, false);
        self.launch_fwd(
            final_norm_kernel,
            (n_seqs as u32, 1, 1),
            (norm_threads, 1, 1),
            0,
            kargs![
                final_resid,
                null,
                self.wptr(self.layout.final_norm),
                self.buf.final_normed.ptr(),
                final_rows,
                h_i,
                eps
            ],
        )?;
        self.mark("rmsnorm")?;
        // A decode step's LM head runs on its n_tokens (= n_seqs) rows, as its other GEMMs.
        let lm_path = if is_prefill {
            GemmPath::Cublas
        } else {
            step.path
        };
        self.gemm(
            self.buf.final_normed.ptr(),
            self.wptr(self.layout.lm_head),
            self.buf.logits.ptr(),
            n_seqs,
            c.vocab_size,
            h,
            GemmOut::F32,
            lm_path,
        )?;
        self.mark("lm_head")?;
        let vocab_i = c.vocab_size as i32;
        self.launch_fwd(
            self.kernels.argmax_rows,
            (n_seqs as u32, 1, 1),
            (1024, 1, 1),
            0,
            kargs![self.buf.logits.ptr(), vocab_i, self.buf.argmax.ptr()],
        )?;
        self.mark("argmax")?;
        Ok(())
    }

    /// One layer: input RMSNorm, qkv projection with RoPE and the KV write, attention, then the
    /// tail (o_proj, post-attention RMSNorm, MLP) on every row or, pruned, on the last rows.
    fn enqueue_layer(
        &self,
        step: &StepPlan,
        layer: usize,
        lw: &LayerOffsets,
    ) -> Result<(), CudaError> {
        let c = &self.config;
        let (h_i, eps, null) = (c.hidden_size as i32, c.rms_norm_eps as f32, 0u64);
        let pruned = step.prune_last && layer + 1 == self.layout.layers.len();
        // attn_decode reads q rotated: the pruned layer has rope_kv_write rotate it.
        let rotate_q = if pruned { 1 } else { step.rotate_q };
        let (norm_kernel, norm_threads) = self.norm_for(step.n_tokens, step.half_resid);
        self.launch_fwd(
            norm_kernel,
            (step.n_tokens as u32, 1, 1),
            (norm_threads, 1, 1),
            0,
            kargs![
                self.buf.resid.ptr(),
                null,
                self.wptr(lw.input_norm),
                self.buf.normed.ptr(),
                null,
                h_i,
                eps
            ],
        )?;
        self.mark("rmsnorm")?;
        self.enqueue_qkv(step, layer, lw, rotate_q)?;
        let resid_out = if step.half_resid {
            GemmOut::AddHalf
        } else {
            GemmOut::AddF32
        };
        let tail = match step.mode {
            AttnMode::Decode { splits } => {
                self.launch_decode_attention(self.buf.buf_a.ptr(), step.n_seqs, splits, layer)?;
                None
            }
            AttnMode::Prefill { .. } if pruned => {
                self.enqueue_pruned_attention(step, layer)?;
                let (norm_kernel, norm_threads) = self.norm_for(step.n_seqs, step.half_resid);
                Some(LayerTail {
                    rows: step.n_seqs,
                    resid: self.buf.last_resid.ptr(),
                    out_kind: resid_out,
                    norm_kernel,
                    norm_threads,
                    gemv: step.n_seqs == 1,
                    path: GemmPath::Cublas,
                })
            }
            AttnMode::Prefill { num_tiles } => {
                self.launch_prefill_attention(num_tiles, layer)?;
                None
            }
        };
        self.mark("attention")?;
        let tail = tail.unwrap_or(LayerTail {
            rows: step.n_tokens,
            resid: self.buf.resid.ptr(),
            out_kind: resid_out,
            norm_kernel,
            norm_threads,
            gemv: step.fused_gemv,
            path: step.path,
        });
        self.enqueue_layer_tail(layer, lw, &tail)
    }

    /// The qkv projection of one layer into buf_a, with the q/k/v biases, RoPE and the paged KV
    /// write: fused into the GEMV at batch 1, else a GEMM followed by `rope_kv_write` (which adds
    /// the biases: it reads every q/k/v value anyway, so they cost no extra pass).
    fn enqueue_qkv(
        &self,
        step: &StepPlan,
        layer: usize,
        lw: &LayerOffsets,
        rotate_q: i32,
    ) -> Result<(), CudaError> {
        let c = &self.config;
        let (h, hd) = (c.hidden_size, c.head_dim());
        let (nh, nkv, nl) = (
            c.num_attention_heads as i32,
            c.num_key_value_heads as i32,
            c.num_hidden_layers as i32,
        );
        let qkv_width = (c.num_attention_heads + 2 * c.num_key_value_heads) * hd;
        let sl = self.step_layout;
        let (positions, slots) = (self.step_ptr(sl.positions), self.step_ptr(sl.slots));
        let pool = self.pool.base_device_ptr();
        let layer_i = layer as i32;
        // 0: no biases (the kernels test the pointer).
        let bias = lw.qkv_bias.map_or(0, |offset| self.wptr(offset));
        if step.fused_gemv {
            let (k_i, w) = (h as i32, self.wptr(lw.qkv));
            self.launch_fwd(
                self.kernels.gemv_rope,
                Self::gemv_grid(qkv_width / 2),
                (super::GEMV_THREADS as u32, 1, 1),
                0,
                kargs![
                    w,
                    self.buf.normed.ptr(),
                    self.buf.buf_a.ptr(),
                    bias,
                    k_i,
                    positions,
                    slots,
                    self.buf.rope.ptr(),
                    pool,
                    layer_i,
                    nh,
                    nkv,
                    nl
                ],
            )?;
            return self.mark("gemv_qkv_rope_kv");
        }
        self.gemm(
            self.buf.normed.ptr(),
            self.wptr(lw.qkv),
            self.buf.buf_a.ptr(),
            step.n_tokens,
            qkv_width,
            h,
            GemmOut::Half,
            step.path,
        )?;
        self.mark("gemm_qkv")?;
        // One CTA per token looping over the (head, pair) items.
        self.launch_fwd(
            self.kernels.rope_kv_write,
            (step.n_tokens as u32, 1, 1),
            (256, 1, 1),
            0,
            kargs![
                self.buf.buf_a.ptr(),
                bias,
                positions,
                slots,
                self.buf.rope.ptr(),
                pool,
                layer_i,
                nh,
                nkv,
                nl,
                rotate_q
            ],
        )?;
        self.mark("rope_kv_write")
    }

    /// The pruned last layer's attention: each sequence's last row (rotated q and residual)
    /// gathered into compact rows, then decode attention over them.
    fn enqueue_pruned_attention(&self, step: &StepPlan, layer: usize) -> Result<(), CudaError> {
        let c = &self.config;
        let (h, hd) = (c.hidden_size, c.head_dim());
        let qkv_width = (c.num_attention_heads + 2 * c.num_key_value_heads) * hd;
        let last_rows = self.step_ptr(self.step_layout.last_rows);
        let (q_width, qkv_width_i) = ((c.num_attention_heads * hd) as i32, qkv_width as i32);
        let resid_row_bytes = (h * if step.half_resid { self.elem() } else { 4 }) as i32;
        self.launch_fwd(
            self.kernels.gather_last_rows,
            (step.n_seqs as u32, 1, 1),
            (256, 1, 1),
            0,
            kargs![
                self.buf.buf_a.ptr(),
                self.buf.resid.ptr(),
                last_rows,
                self.buf.last_q.ptr(),
                self.buf.last_resid.ptr(),
                q_width,
                qkv_width_i,
                resid_row_bytes
            ],
        )?;
        self.mark("gather_last_rows")?;
        self.launch_decode_attention(
            self.buf.last_q.ptr(),
            step.n_seqs,
            self.decode_splits(step.n_seqs),
            layer,
        )
    }

    /// Runs one step on the GPU (graph replay for decode batches), leaving logits and argmax on
    /// the device. Returns the number of sequence rows computed (the bucket for decode).
    pub(crate) fn run_step(&mut self, batch: &[SeqStep<'_>]) -> Result<usize, CudaError> {
        // A gated step runs eagerly: its waits are not part of any captured graph.
        let layer_gates = std::mem::take(&mut self.layer_gates);
        let use_graph = self.options.use_cuda_graphs && layer_gates.is_empty();
        let (rows, seqs, mode) = self.stage(batch, use_graph)?;
        trace!(
            "step: {} seqs, {rows} rows, {seqs} padded seqs, {}",
            batch.len(),
            match mode {
                AttnMode::Decode { splits } => format!("decode with {splits} splits"),
                AttnMode::Prefill { num_tiles } => format!("prefill with {num_tiles} tiles"),
            }
        );
        match mode {
            AttnMode::Decode { .. } if use_graph => {
                if !self.graphs.contains_key(&seqs) {
                    self.capture_decode_graph(seqs, mode)?;
                }
                let graph = &self.graphs[&seqs];
                drv("replaying the decode graph", graph.launch())?;
            }
            _ => self.enqueue_forward(rows, seqs, mode, &layer_gates)?,
        }
        Ok(seqs)
    }

    /// Checks a batch against the model's limits; returns its new-token count.
    fn validate(&self, batch: &[SeqStep<'_>]) -> Result<usize, CudaError> {
        let c = &self.config;
        let bs = self.options.block_size_tokens;
        let stride = self.options.max_blocks_per_seq;
        if batch.is_empty() {
            return Err(CudaError::BadInput("empty batch".into()));
        }
        if batch.len() > self.options.max_seqs_per_step {
            return Err(CudaError::BadInput(format!(
                "{} sequences in one step; the model was sized for at most {}",
                batch.len(),
                self.options.max_seqs_per_step
            )));
        }
        let n_tokens: usize = batch.iter().map(|s| s.tokens.len()).sum();
        if n_tokens > self.options.max_tokens_per_step {
            return Err(CudaError::BadInput(format!(
                "{n_tokens} new tokens in one step; the model was sized for at most {} (chunk the prefill)",
                self.options.max_tokens_per_step
            )));
        }
        let max_pos = (self.buf.rope.bytes() / 4) / c.head_dim();
        for (i, s) in batch.iter().enumerate() {
            if s.tokens.is_empty() {
                return Err(CudaError::BadInput(format!(
                    "sequence {i} has no new tokens"
                )));
            }
            let end = s.end_len();
            if end > max_pos {
                return Err(CudaError::BadInput(format!(
                    "sequence {i} reaches position {end}, beyond the model's {max_pos} positions"
                )));
            }
            let needed = end.div_ceil(bs);
            if s.block_table.len() < needed || needed > stride {
                return Err(CudaError::BadInput(format!(
                    "sequence {i} needs {needed} blocks for {end} tokens; its table has {} (device tables hold {stride})",
                    s.block_table.len()
                )));
            }
            if let Some(&bad) = s.block_table[..needed]
                .iter()
                .find(|&&b| b as usize >= self.pool.num_blocks())
            {
                return Err(CudaError::BadInput(format!(
                    "sequence {i} names block {bad}, outside the pool of {} blocks",
                    self.pool.num_blocks()
                )));
            }
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(CudaError::BadInput(format!(
                    "sequence {i} has token {bad}, outside the vocabulary of {}",
                    c.vocab_size
                )));
            }
        }
        Ok(n_tokens)
    }

    /// Checks a batch against the model's limits and fills the host staging buffer. Returns
    /// (rows, sequences, attention mode, rows to copy, sequences to copy).
    fn stage(
        &mut self,
        batch: &[SeqStep<'_>],
        pad_decode: bool,
    ) -> Result<(usize, usize, AttnMode), CudaError> {
        let bs = self.options.block_size_tokens;
        let stride = self.options.max_blocks_per_seq;
        let n_tokens = self.validate(batch)?;
        let is_decode = batch.iter().all(|s| s.tokens.len() == 1);
        let (rows, seqs) = if is_decode && pad_decode {
            let b = self.bucket_for(batch.len());
            (b, b)
        } else {
            (n_tokens, batch.len())
        };
        let sl = self.step_layout;
        {
            let tokens = self.step_host.slice_mut::<u32>(sl.tokens, rows);
            let mut r = 0;
            for s in batch {
                tokens[r..r + s.tokens.len()].copy_from_slice(s.tokens);
                r += s.tokens.len();
            }
            tokens[r..].fill(0);
        }
        {
            let positions = self.step_host.slice_mut::<i32>(sl.positions, rows);
            let mut r = 0;
            for s in batch {
                for j in 0..s.tokens.len() {
                    positions[r] = (s.context_len + j) as i32;
                    r += 1;
                }
            }
            positions[r..].fill(0);
        }
        {
            let slots = self.step_host.slice_mut::<i64>(sl.slots, rows);
            let mut r = 0;
            for s in batch {
                for j in 0..s.tokens.len() {
                    let p = s.context_len + j;
                    slots[r] = s.block_table[p / bs] as i64 * bs as i64 + (p % bs) as i64;
                    r += 1;
                }
            }
            slots[r..].fill(-1);
        }
        {
            let seq_lens = self.step_host.slice_mut::<i32>(sl.seq_lens, seqs);
            for (i, s) in batch.iter().enumerate() {
                seq_lens[i] = s.end_len() as i32;
            }
            seq_lens[batch.len()..].fill(0);
        }
        {
            let last_rows = self.step_host.slice_mut::<i32>(sl.last_rows, seqs);
            let mut r = 0;
            for (i, s) in batch.iter().enumerate() {
                r += s.tokens.len();
                last_rows[i] = (r - 1) as i32;
            }
            for (i, v) in last_rows.iter_mut().enumerate().skip(batch.len()) {
                *v = i as i32;
            }
        }
        {
            let tables = self
                .step_host
                .slice_mut::<u32>(sl.block_tables, seqs * stride);
            tables.fill(0);
            for (i, s) in batch.iter().enumerate() {
                let n = s.end_len().div_ceil(bs);
                tables[i * stride..i * stride + n].copy_from_slice(&s.block_table[..n]);
            }
        }
        let mode = if is_decode {
            AttnMode::Decode {
                splits: self.decode_splits(seqs),
            }
        } else {
            let tile_list = self.prefill_tiles(batch);
            assert!(tile_list.len() <= self.max_tiles);
            let tiles = self
                .step_host
                .slice_mut::<[i32; 4]>(sl.tiles, tile_list.len());
            tiles.copy_from_slice(&tile_list);
            AttnMode::Prefill {
                num_tiles: tile_list.len(),
            }
        };
        // Copy the used part of each array to the device (stream-ordered before the forward).
        let stride_bytes = 4 * stride;
        let mut copies = vec![
            (sl.tokens, 4 * rows),
            (sl.positions, 4 * rows),
            (sl.slots, 8 * rows),
            (sl.seq_lens, 4 * seqs),
            (sl.last_rows, 4 * seqs),
            (sl.block_tables, stride_bytes * seqs),
        ];
        if let AttnMode::Prefill { num_tiles } = mode {
            copies.push((sl.tiles, 16 * num_tiles));
        }
        for (offset, bytes) in copies {
            self.upload_staged(offset, bytes)?;
        }
        Ok((rows, seqs, mode))
    }

    pub(super) fn step_ptr(&self, byte_offset: usize) -> u64 {
        self.buf.step_dev.ptr() + byte_offset as u64
    }

    /// Copies `bytes` (a multiple of 4) between device-visible addresses with a kernel on the
    /// compute stream (used with mapped pinned memory, so no copy engine is involved).
    fn copy_on_stream(&self, dst: u64, src: u64, bytes: usize) -> Result<(), CudaError> {
        debug_assert_eq!(bytes % 4, 0);
        let words = (bytes / 4) as i32;
        if words == 0 {
            return Ok(());
        }
        let blocks = ((words as u32).div_ceil(256)).min(1024);
        self.launch(
            self.kernels.copy_words,
            (blocks, 1, 1),
            (256, 1, 1),
            kargs![dst, src, words],
        )
    }

    /// Moves a staged input range from pinned host memory to the step buffer.
    pub(super) fn upload_staged(&self, offset: usize, bytes: usize) -> Result<(), CudaError> {
        self.copy_on_stream(
            self.step_ptr(offset),
            self.step_host.dev_ptr + offset as u64,
            bytes,
        )
    }

    /// Waits for the compute stream with a deadline, so a GPU fault or hang becomes an error naming
    /// the step instead of a process that never returns.
    pub fn wait(&self, what: &str) -> Result<(), CudaError> {
        let stream = self.device.stream.cu_stream();
        let started = std::time::Instant::now();
        loop {
            // SAFETY: querying a live stream.
            let status = unsafe { dsys::cuStreamQuery(stream) };
            match status {
                dsys::cudaError_enum::CUDA_SUCCESS => return Ok(()),
                dsys::cudaError_enum::CUDA_ERROR_NOT_READY => {
                    if started.elapsed() > STEP_DEADLINE {
                        return Err(CudaError::Timeout {
                            what: what.to_string(),
                            seconds: STEP_DEADLINE.as_secs_f64(),
                        });
                    }
                    std::hint::spin_loop();
                }
                other => {
                    return Err(CudaError::Driver {
                        context: format!("waiting for {what}"),
                        message: format!("{other:?}"),
                    })
                }
            }
        }
    }

    /// One step; returns the greedy (argmax) token of each sequence. Only `batch.len()` u32 come back
    /// from the device: this is the serving path.
    pub fn forward_greedy(&mut self, batch: &[SeqStep<'_>]) -> Result<Vec<u32>, CudaError> {
        self.run_step(batch)?;
        let n = batch.len();
        // The tokens go to mapped pinned memory by a kernel (no copy engine: see PinnedBuffer).
        self.copy_on_stream(self.logits_host.dev_ptr, self.buf.argmax.ptr(), 4 * n)?;
        self.wait("a forward step (greedy)")?;
        Ok(self.logits_host.slice_mut::<u32>(0, n).to_vec())
    }

    /// `forward_greedy` with timing (benchmarks: where the wall-vs-GPU gap goes): returns the
    /// tokens and (GPU ms from the first enqueued work to the last, host ms to enqueue the step).
    /// Timing events on the stream before and after the step; otherwise the serving path.
    pub fn forward_greedy_timed(
        &mut self,
        batch: &[SeqStep<'_>],
    ) -> Result<(Vec<u32>, f64, f64), CudaError> {
        let ev = || {
            drv(
                "creating a timing event",
                dr::event::create(dsys::CUevent_flags::CU_EVENT_DEFAULT),
            )
        };
        let (start, end) = (ev()?, ev()?);
        let stream = self.device.stream.cu_stream();
        let host_start = std::time::Instant::now();
        let result = (|| {
            drv("recording an event", unsafe {
                dr::event::record(start, stream)
            })?;
            self.run_step(batch)?;
            let n = batch.len();
            self.copy_on_stream(self.logits_host.dev_ptr, self.buf.argmax.ptr(), 4 * n)?;
            let enqueue_ms = host_start.elapsed().as_secs_f64() * 1e3;
            drv("recording an event", unsafe {
                dr::event::record(end, stream)
            })?;
            self.wait("a forward step (greedy, timed)")?;
            let gpu_ms = drv("reading a timing event", unsafe {
                dr::event::elapsed(start, end)
            })? as f64;
            Ok((
                self.logits_host.slice_mut::<u32>(0, n).to_vec(),
                gpu_ms,
                enqueue_ms,
            ))
        })();
        unsafe {
            let _ = dr::event::destroy(start);
            let _ = dr::event::destroy(end);
        }
        result
    }

    /// One step; returns the f32 logits of each sequence's last new token.
    pub fn forward_logits(&mut self, batch: &[SeqStep<'_>]) -> Result<Logits, CudaError> {
        self.run_step(batch)?;
        let vocab = self.config.vocab_size;
        let n = batch.len() * vocab;
        {
            let dst = self.logits_host.slice_mut::<f32>(0, n);
            drv("reading the logits", unsafe {
                dr::memcpy_dtoh_async(dst, self.buf.logits.ptr(), self.device.stream.cu_stream())
            })?;
        }
        self.wait("a forward step (logits)")?;
        let data = self.logits_host.slice_mut::<f32>(0, n).to_vec();
        Ok(Logits {
            rows: batch.len(),
            vocab,
            data,
        })
    }

    /// Fills the whole KV pool with seeded uniform values in [-scale, scale] (benchmarks: decode
    /// attention then reads realistic, non-zero data without a prefill per sequence).
    pub fn fill_kv_random(&mut self, seed: u64, scale: f32) -> Result<(), CudaError> {
        let n = (self.pool.total_bytes() / self.elem()) as u64;
        let ptr = self.pool.base_device_ptr();
        let grid = (self.device.num_sms * 32) as u32;
        let bias = 0.0f32;
        self.launch(
            self.kernels.random_fill,
            (grid, 1, 1),
            (256, 1, 1),
            kargs![ptr, n, seed, scale, bias],
        )?;
        self.device.synchronize()
    }

    /// Per-layer readiness: the next step's layer `l` waits on the GPU for `gates[l]` (one event per
    /// layer, e.g. from `CudaSwapEngine::submit_layered`), so a step over a context that is still
    /// being swapped in starts at once and each layer runs as soon as its KV has arrived. The gated
    /// step runs without a CUDA graph. Gates are used by exactly one step.
    pub fn gate_next_step_on_layers(
        &mut self,
        gates: Vec<cudarc::driver::CudaEvent>,
    ) -> Result<(), CudaError> {
        if gates.len() != self.config.num_hidden_layers {
            return Err(CudaError::Driver {
                context: "gating a step on per-layer events".into(),
                message: format!(
                    "{} events for a model of {} layers",
                    gates.len(),
                    self.config.num_hidden_layers
                ),
            });
        }
        self.layer_gates = gates;
        Ok(())
    }

    /// Enqueues a step without waiting for it (benchmarks time a stream of these with events).
    pub fn enqueue_step(&mut self, batch: &[SeqStep<'_>]) -> Result<(), CudaError> {
        self.run_step(batch).map(|_| ())
    }
}
