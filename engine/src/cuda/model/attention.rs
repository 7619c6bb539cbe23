//! Attention launches: paged split-KV decode attention, per query head or per KV head (decode steps and the pruned last layer of
//! prefill steps) and paged causal prefill attention (the kernel chosen at start-up, see
//! `kernels::PrefillKernel`), with the tile list each prefill step is cut into.

use super::kernels::PrefillKernel;
use super::{kargs, CudaError, CudaModel, SeqStep};

impl CudaModel {
    /// Paged decode attention of `n_seqs` sequences, one query row each (row s of `q`, qkv
    /// stride, rotated), over `seq_lens` tokens of the step's block tables; output in buf_b.
    pub(super) fn launch_decode_attention(
        &self,
        q: u64,
        n_seqs: usize,
        splits: usize,
        layer: usize,
    ) -> Result<(), CudaError> {
        let c = &self.config;
        let (nh, nkv, nl) = (
            c.num_attention_heads as i32,
            c.num_key_value_heads as i32,
            c.num_hidden_layers as i32,
        );
        let (splits_i, layer_i) = (splits as i32, layer as i32);
        let scale = 1.0f32 / (c.head_dim() as f32).sqrt();
        let sl = self.step_layout;
        let (tables, seq_lens) = (self.step_ptr(sl.block_tables), self.step_ptr(sl.seq_lens));
        let table_stride = self.options.max_blocks_per_seq as i32;
        // One thread block per KV head (all query heads of its group) or per query head; both
        // write the same output and partial-result layout.
        let (kernel, heads) = if self.decode_per_kv_head {
            (self.kernels.attn_decode_gqa, nkv)
        } else {
            (self.kernels.attn_decode, nh)
        };
        self.launch_fwd(
            kernel,
            (heads as u32, n_seqs as u32, splits as u32),
            (128, 1, 1),
            0,
            kargs![
                q,
                self.pool.base_device_ptr(),
                tables,
                table_stride,
                seq_lens,
                self.buf.part_out.ptr(),
                self.buf.part_lse.ptr(),
                self.buf.buf_b.ptr(),
                layer_i,
                splits_i,
                scale,
                nh,
                nkv,
                nl
            ],
        )?;
        if splits > 1 {
            self.launch_fwd(
                self.kernels.attn_decode_reduce,
                (nh as u32, n_seqs as u32, 1),
                (c.head_dim() as u32, 1, 1),
                0,
                kargs![
                    self.buf.part_out.ptr(),
                    self.buf.part_lse.ptr(),
                    self.buf.buf_b.ptr(),
                    splits_i,
                    nh
                ],
            )?;
        }
        Ok(())
    }

    /// Paged causal prefill attention of one layer over the step's `num_tiles` query tiles (q in
    /// buf_a, qkv stride; output in buf_b).
    pub(super) fn launch_prefill_attention(
        &self,
        num_tiles: usize,
        layer: usize,
    ) -> Result<(), CudaError> {
        let c = &self.config;
        let (nh, nkv, nl) = (
            c.num_attention_heads as i32,
            c.num_key_value_heads as i32,
            c.num_hidden_layers as i32,
        );
        let scale = 1.0f32 / (c.head_dim() as f32).sqrt();
        let sl = self.step_layout;
        let (tables, tiles) = (self.step_ptr(sl.block_tables), self.step_ptr(sl.tiles));
        let table_stride = self.options.max_blocks_per_seq as i32;
        let pool = self.pool.base_device_ptr();
        let (tiles_i, layer_i) = (num_tiles as i32, layer as i32);
        // Named locals only: the argument arrays hold pointers to them (no temporaries).
        let (qkv_p, out_p, rope_p) = (
            self.buf.buf_a.ptr(),
            self.buf.buf_b.ptr(),
            self.buf.rope.ptr(),
        );
        let (kernel, smem) = self.kernels.prefill(self.prefill);
        match self.prefill {
            PrefillKernel::WarpSpecialized => {
                // Persistent: one CTA per multiprocessor (at most one per item).
                let grid = (
                    (num_tiles * nh as usize).min(self.device.num_sms) as u32,
                    1,
                    1,
                );
                let map = self.kv_tma_map.ok_or_else(|| {
                    CudaError::Unsupported(
                        "warp-specialised prefill attention without a KV tensor map".into(),
                    )
                })?;
                let num_blocks_i = self.pool.num_blocks() as i32;
                self.launch_fwd(
                    kernel,
                    grid,
                    (384, 1, 1),
                    smem as u32,
                    kargs![
                        map,
                        qkv_p,
                        tables,
                        table_stride,
                        tiles,
                        tiles_i,
                        out_p,
                        layer_i,
                        scale,
                        nh,
                        nkv,
                        rope_p,
                        num_blocks_i
                    ],
                )
            }
            PrefillKernel::Mma | PrefillKernel::Wgmma => {
                let threads = if self.prefill == PrefillKernel::Wgmma {
                    256
                } else {
                    128
                };
                self.launch_fwd(
                    kernel,
                    (nh as u32, num_tiles as u32, 1),
                    (threads, 1, 1),
                    smem as u32,
                    kargs![
                        qkv_p,
                        pool,
                        tables,
                        table_stride,
                        tiles,
                        tiles_i,
                        out_p,
                        layer_i,
                        scale,
                        nh,
                        nkv,
                        nl,
                        rope_p
                    ],
                )
            }
            PrefillKernel::Mma64 => self.launch_fwd(
                kernel,
                (nh as u32, num_tiles as u32, 1),
                (128, 1, 1),
                smem as u32,
                kargs![
                    qkv_p,
                    pool,
                    tables,
                    table_stride,
                    tiles,
                    tiles_i,
                    out_p,
                    layer_i,
                    scale,
                    nh,
                    nkv,
                    nl
                ],
            ),
        }
    }

    /// The step's prefill tiles: {sequence, first row, rows, position of the first row}, at most
    /// the kernel's tile rows each.
    pub(super) fn prefill_tiles(&self, batch: &[SeqStep<'_>]) -> Vec<[i32; 4]> {
        let tile_rows = self.prefill.tile_rows();
        let mut tile_list: Vec<[i32; 4]> = Vec::new();
        let mut row0 = 0usize;
        for (i, s) in batch.iter().enumerate() {
            let n = s.tokens.len();
            let mut q = 0;
            while q < n {
                let rows_in_tile = (n - q).min(tile_rows);
                tile_list.push([
                    i as i32,
                    (row0 + q) as i32,
                    rows_in_tile as i32,
                    (s.context_len + q) as i32,
                ]);
                q += rows_in_tile;
            }
            row0 += n;
        }
        if self.prefill == PrefillKernel::WarpSpecialized {
            // The persistent kernel takes the tiles from the end of the list as the longest
            // (most keys) first; the others keep the sequence order.
            tile_list.sort_by_key(|t| t[3] + t[2]);
        }
        tile_list
    }
}
