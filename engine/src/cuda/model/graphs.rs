//! Decode steps replay CUDA graphs: one per batch-size bucket, captured once (at start-up or on
//! first use) and replayed with fresh per-step data in the fixed step buffers.

use cudarc::driver::sys as dsys;

use super::forward::AttnMode;
use super::{drv, trace, CudaError, CudaModel, MAX_DECODE_SPLITS};

impl CudaModel {
    /// Decode-attention splits for a bucket: enough CTAs to cover the SMs ~8 times over (small
    /// batches otherwise leave most SMs idle while a few CTAs walk long contexts).
    pub(super) fn decode_splits(&self, bucket: usize) -> usize {
        let heads = if self.decode_per_kv_head {
            self.config.num_key_value_heads
        } else {
            self.config.num_attention_heads
        };
        let ctas = bucket * heads;
        (8 * self.device.num_sms)
            .div_ceil(ctas)
            .clamp(1, MAX_DECODE_SPLITS)
    }

    /// Graph bucket for a decode batch of `n` sequences: 1, 2, 4, 8, then multiples of 8.
    pub(super) fn bucket_for(&self, n: usize) -> usize {
        let b = if n <= 8 {
            n.next_power_of_two()
        } else {
            n.div_ceil(8) * 8
        };
        b.min(self.options.max_seqs_per_step)
    }

    pub(super) fn capture_decode_graph(
        &mut self,
        bucket: usize,
        mode: AttnMode,
    ) -> Result<(), CudaError> {
        // An eager run first: cuBLAS picks its kernels (and loads them) outside the capture.
        trace!("capturing the decode graph of bucket {bucket}: eager warm-up");
        self.enqueue_forward(bucket, bucket, mode, &[])?;
        self.wait("the eager warm-up before a graph capture")?;
        trace!("capturing the decode graph of bucket {bucket}: capture");
        let stream = self.device.stream.clone();
        drv(
            "beginning graph capture",
            stream.begin_capture(dsys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
        )?;
        let enqueued = self.enqueue_forward(bucket, bucket, mode, &[]);
        let graph = stream.end_capture(dsys::CUgraphInstantiate_flags(0));
        enqueued?;
        let graph = drv("ending graph capture", graph)?.ok_or_else(|| CudaError::Driver {
            context: "graph capture".into(),
            message: "the capture produced no graph".into(),
        })?;
        drv("uploading the graph", graph.upload())?;
        trace!("captured the decode graph of bucket {bucket}");
        self.graphs.insert(bucket, graph);
        Ok(())
    }

    /// Captures the decode graphs of every bucket up to `max_batch` now (start-up), so no step pays
    /// for a capture later.
    pub fn capture_decode_graphs(&mut self, max_batch: usize) -> Result<(), CudaError> {
        let mut n = 1;
        while n <= max_batch.min(self.options.max_seqs_per_step) {
            let bucket = self.bucket_for(n);
            if !self.graphs.contains_key(&bucket) {
                // Inputs for the eager warm-up run: padding rows (no KV writes, empty contexts).
                self.stage_padding(bucket)?;
                let mode = AttnMode::Decode {
                    splits: self.decode_splits(bucket),
                };
                self.capture_decode_graph(bucket, mode)?;
            }
            n = bucket + 1;
        }
        self.device.synchronize()
    }

    fn stage_padding(&mut self, rows: usize) -> Result<(), CudaError> {
        let sl = self.step_layout;
        self.step_host.slice_mut::<u32>(sl.tokens, rows).fill(0);
        self.step_host.slice_mut::<i32>(sl.positions, rows).fill(0);
        self.step_host.slice_mut::<i64>(sl.slots, rows).fill(-1);
        self.step_host.slice_mut::<i32>(sl.seq_lens, rows).fill(0);
        for (i, v) in self
            .step_host
            .slice_mut::<i32>(sl.last_rows, rows)
            .iter_mut()
            .enumerate()
        {
            *v = i as i32;
        }
        for (offset, bytes) in [
            (sl.tokens, 4 * rows),
            (sl.positions, 4 * rows),
            (sl.slots, 8 * rows),
            (sl.seq_lens, 4 * rows),
            (sl.last_rows, 4 * rows),
        ] {
            self.upload_staged(offset, bytes)?;
        }
        Ok(())
    }
}
