//! Tensor maps (`CUtensorMap`) the TMA-based kernels read through: the KV pool for the
//! warp-specialised prefill attention, and the operands of the own gate_up GEMM.

use std::ffi::c_void;

use cudarc::driver::sys as dsys;

use super::plan::Buffers;
use super::weights::WeightLayout;
use super::{drv, CudaError, CudaModelOptions, GpuDevice, GpuKvPool};
use crate::config::{DType, ModelConfig};

/// Rows of one tile of the own GEMM (GM_BM in gemm_ws.cu): steps need at least one.
pub(super) const OWN_GEMM_TILE_M: usize = 128;

/// A `CUtensorMap` (128 bytes, 64-byte aligned), passed by value to the TMA kernels.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(crate) struct TmaMap([u64; 16]);

/// Tensor maps of the own gate_up GEMM: A over the normed activations ([max tokens, hidden]),
/// B over each layer's gate_up weight ([2 inter, hidden]), both in boxes of 128 rows x 64 elements;
/// the output over the activation buffer buf_b ([max tokens, inter], boxes of 64 x 64).
#[derive(Clone)]
pub(crate) struct OwnGateUpMaps {
    pub normed: TmaMap,
    pub gate_up: Vec<TmaMap>,
    pub act: TmaMap,
}

/// Tensor map of the KV pool for `attn_prefill_wgmma_ws`: the pool seen as a 5-D tensor
/// [block][layer * 2 + K|V][kv head][token in block][dim] (dims listed innermost first below), read
/// in boxes of one block's 64-dim panel (block_size x 64 elements, 128 bytes a row) with the
/// 128-byte swizzle that the kernel's wgmma descriptors expect. Block indices past `num_blocks`
/// read as zeros (the kernel asks for those past a sequence's end).
pub(super) fn encode_kv_tma_map(
    pool: &GpuKvPool,
    config: &ModelConfig,
    options: &CudaModelOptions,
) -> Result<TmaMap, CudaError> {
    let hd = config.head_dim() as u64;
    let bs = options.block_size_tokens as u64;
    let nkv = config.num_key_value_heads as u64;
    let nl = config.num_hidden_layers as u64;
    let elem = 2u64;
    let dims: [u64; 5] = [hd, bs, nkv, 2 * nl, pool.num_blocks() as u64];
    // Byte strides of dims 1..4 (dim 0 is contiguous).
    let strides: [u64; 4] = [
        hd * elem,
        bs * hd * elem,
        nkv * bs * hd * elem,
        2 * nl * nkv * bs * hd * elem,
    ];
    let boxes: [u32; 5] = [64, bs as u32, 1, 1, 1];
    let element_strides: [u32; 5] = [1; 5];
    let data_type = match options.dtype {
        DType::Bf16 => dsys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        _ => dsys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
    };
    let mut map = dsys::CUtensorMap { opaque: [0; 16] };
    // SAFETY: every array has the rank's length; the pool allocation outlives the model (and
    // so every launch that uses the map).
    drv(
        "encoding the KV pool's tensor map (prefill attention)",
        unsafe {
            dsys::cuTensorMapEncodeTiled(
                &mut map,
                data_type,
                5,
                pool.base_device_ptr() as *mut c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                element_strides.as_ptr(),
                dsys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                dsys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                dsys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                dsys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
            .result()
        },
    )?;
    Ok(TmaMap(map.opaque))
}

/// Tensor map of a row-major [rows, cols] fp16/bf16 matrix in boxes of `box_rows` rows x 64
/// columns (128 bytes a row) with the 128-byte swizzle the own GEMM's wgmma descriptors (and its
/// output staging) use. Loads past `rows` / `cols` read zeros; stores there are dropped.
fn encode_matrix_tma_map(
    ptr: u64,
    rows: usize,
    cols: usize,
    box_rows: u32,
    dtype: DType,
    what: &str,
) -> Result<TmaMap, CudaError> {
    let dims: [u64; 2] = [cols as u64, rows as u64];
    let strides: [u64; 1] = [cols as u64 * 2];
    let boxes: [u32; 2] = [64, box_rows];
    let element_strides: [u32; 2] = [1; 2];
    let data_type = match dtype {
        DType::Bf16 => dsys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        _ => dsys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
    };
    let mut map = dsys::CUtensorMap { opaque: [0; 16] };
    // SAFETY: every array has the rank's length; the matrix's allocation outlives the model.
    drv(&format!("encoding the tensor map of {what}"), unsafe {
        dsys::cuTensorMapEncodeTiled(
            &mut map,
            data_type,
            2,
            ptr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            dsys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            dsys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            dsys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            dsys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
        .result()
    })?;
    Ok(TmaMap(map.opaque))
}

/// The own gate_up GEMM's maps where it can run: sm_90a, fp16/bf16, whole 128-column blocks of the
/// intermediate size (one gate box and one up box per tile), rows of 16-byte multiples (TMA
/// strides), tensors at least one box (128 rows x 64 columns) large.
pub(super) fn own_gate_up_maps(
    device: &GpuDevice,
    config: &ModelConfig,
    options: &CudaModelOptions,
    layout: &WeightLayout,
    buf: &Buffers,
) -> Result<Option<OwnGateUpMaps>, CudaError> {
    let (h, inter) = (config.hidden_size, config.intermediate_size);
    let max_t = options.max_tokens_per_step;
    if !(device.has_wgmma()
        && options.dtype != DType::F32
        && inter.is_multiple_of(128)
        && h.is_multiple_of(8)
        && h >= 64
        && max_t >= OWN_GEMM_TILE_M)
    {
        return Ok(None);
    }
    let elem_b = 2u64;
    let mut gate_up = Vec::with_capacity(layout.layers.len());
    for (l, lw) in layout.layers.iter().enumerate() {
        gate_up.push(encode_matrix_tma_map(
            buf.weights.ptr() + lw.gate_up as u64 * elem_b,
            2 * inter,
            h,
            128,
            options.dtype,
            &format!("layer {l}'s gate_up weight"),
        )?);
    }
    Ok(Some(OwnGateUpMaps {
        normed: encode_matrix_tma_map(
            buf.normed.ptr(),
            max_t,
            h,
            128,
            options.dtype,
            "the normed activations",
        )?,
        gate_up,
        act: encode_matrix_tma_map(
            buf.buf_b.ptr(),
            max_t,
            inter,
            64,
            options.dtype,
            "the MLP activations",
        )?,
    }))
}
