// norm.cu: Embedding into the residual stream, fused residual-add + RMSNorm (one row per CTA, and 256-thread rows for large steps), and the gather of each sequence's last row for the pruned last layer.
// Part of the kernel source compiled by NVRTC (see model/kernels.rs for the order).

// ------------------------------------------------------------------------------------------------
// resid[t, :] = embed[tokens[t], :]. The residual stream is f32 (`embed`) or the weights' type T
// (`embed_h`): steps of >= `half_residual_min_tokens` rows (model/forward.rs) use T, as HF's fp16
// Llama does.
template <typename R>
__device__ __forceinline__ void embed_impl(const u32* tokens, const T* table, R* resid, int hidden) {
    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.x;
    const u64 row = tokens[t];
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        if constexpr (sizeof(R) == 4) resid[(u64)t * hidden + i] = to_f(table[row * hidden + i]);
        else resid[(u64)t * hidden + i] = table[row * hidden + i];
    }
}
extern "C" __global__ void embed(const u32* tokens, const T* table, float* resid, int hidden) {
    embed_impl(tokens, table, resid, hidden);
}
extern "C" __global__ void embed_h(const u32* tokens, const T* table, T* resid, int hidden) {
    embed_impl(tokens, table, resid, hidden);
}

// Four consecutive residual elements (index i of the row in units of 4) as floats, and back. A T
// residual is rounded once on the store, and the stored (rounded) values are what the norm uses.
__device__ __forceinline__ float4 resid_load4(const float* row, int i) {
    return reinterpret_cast<const float4*>(row)[i];
}
__device__ __forceinline__ float4 resid_load4(const T* row, int i) {
    const uint2 raw = reinterpret_cast<const uint2*>(row)[i];
    const float2 a = to_f2(*reinterpret_cast<const T2*>(&raw.x)), b = to_f2(*reinterpret_cast<const T2*>(&raw.y));
    return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ float4 resid_store4(float* row, int i, float4 v) {
    reinterpret_cast<float4*>(row)[i] = v;
    return v;
}
__device__ __forceinline__ float4 resid_store4(T* row, int i, float4 v) {
    uint2 raw;
    *reinterpret_cast<T2*>(&raw.x) = from_f2(v.x, v.y);
    *reinterpret_cast<T2*>(&raw.y) = from_f2(v.z, v.w);
    reinterpret_cast<uint2*>(row)[i] = raw;
    const float2 a = to_f2(*reinterpret_cast<const T2*>(&raw.x)), b = to_f2(*reinterpret_cast<const T2*>(&raw.y));
    return make_float4(a.x, a.y, b.x, b.y);
}

__device__ __forceinline__ float block_sum(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.0f;
    const int warps = (blockDim.x + 31) >> 5;
    for (int w = 0; w < warps; ++w) total += scratch[w];
    return total;
}

// Fused residual add + RMSNorm. For output row r, source row s = row_index ? row_index[r] : r:
//   if delta: resid[s] += delta[s];  out[r] = resid[s] * rsqrt(mean(resid[s]^2) + eps) * weight.
// The residual R is f32 (`add_rmsnorm*`) or T (`add_rmsnorm*_h`), as chosen per step in model/forward.rs.
// With row_index it gathers the last token of each sequence for the LM head. 4 elements per step
// (hidden is a multiple of 8). One pass over memory: each thread keeps its (up to NORM_KEEP) float4
// of the row in registers between the sum of squares and the scaling; wider rows re-read the rest.
#define NORM_KEEP 2
template <typename R>
__device__ __forceinline__ float4 norm_load(R* x, const T* delta, u64 s, int hidden, int i) {
    float4 v = resid_load4(x, i);
    if (delta) {
        const uint2 raw = *reinterpret_cast<const uint2*>(delta + s * hidden + 4 * i);
        const float2 a = to_f2(*reinterpret_cast<const T2*>(&raw.x)), b = to_f2(*reinterpret_cast<const T2*>(&raw.y));
        v.x += a.x;
        v.y += a.y;
        v.z += b.x;
        v.w += b.y;
        v = resid_store4(x, i, v);
    }
    return v;
}

__device__ __forceinline__ void norm_store(T* out_row, const T* weight, int i, float4 v, float inv) {
    const uint2 wraw = *reinterpret_cast<const uint2*>(weight + 4 * i);
    const float2 wa = to_f2(*reinterpret_cast<const T2*>(&wraw.x)), wb = to_f2(*reinterpret_cast<const T2*>(&wraw.y));
    uint2 o;
    *reinterpret_cast<T2*>(&o.x) = from_f2(v.x * inv * wa.x, v.y * inv * wa.y);
    *reinterpret_cast<T2*>(&o.y) = from_f2(v.z * inv * wb.x, v.w * inv * wb.y);
    *reinterpret_cast<uint2*>(out_row + 4 * i) = o;
}

template <int KEEP, typename R>
__device__ __forceinline__ void add_rmsnorm_impl(R* resid, const T* delta, const T* weight, T* out,
                                                 const int* row_index, int hidden, float eps) {
    __shared__ float scratch[32];
    pdl_trigger();
    pdl_wait();
    const int r = blockIdx.x;
    const u64 s = row_index ? (u64)row_index[r] : (u64)r;
    R* x = resid + s * hidden;
    const int n4 = hidden / 4;
    const int kept = KEEP * blockDim.x;
    float sq = 0.0f;
    float4 keep[KEEP];
#pragma unroll
    for (int j = 0; j < KEEP; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < n4) {
            keep[j] = norm_load(x, delta, s, hidden, i);
            sq += keep[j].x * keep[j].x + keep[j].y * keep[j].y + keep[j].z * keep[j].z + keep[j].w * keep[j].w;
        }
    }
    for (int i = threadIdx.x + kept; i < n4; i += blockDim.x) {
        const float4 v = norm_load(x, delta, s, hidden, i);
        sq += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    const float inv = rsqrtf(block_sum(sq, scratch) / (float)hidden + eps);
    T* o = out + (u64)r * hidden;
#pragma unroll
    for (int j = 0; j < KEEP; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < n4) norm_store(o, weight, i, keep[j], inv);
    }
    for (int i = threadIdx.x + kept; i < n4; i += blockDim.x) norm_store(o, weight, i, resid_load4(x, i), inv);
}

extern "C" __global__ void __launch_bounds__(1024, 2) add_rmsnorm(float* resid, const T* delta, const T* weight, T* out,
                                                                  const int* row_index, int hidden, float eps) {
    add_rmsnorm_impl<NORM_KEEP>(resid, delta, weight, out, row_index, hidden, eps);
}
extern "C" __global__ void __launch_bounds__(1024, 2) add_rmsnorm_h(T* resid, const T* delta, const T* weight, T* out,
                                                                    const int* row_index, int hidden, float eps) {
    add_rmsnorm_impl<NORM_KEEP>(resid, delta, weight, out, row_index, hidden, eps);
}

// Many rows (prefill): 256 threads per row, 4 float4 each (hidden 4096 in registers), several rows
// per SM at once. The 1024-thread form keeps too few rows in flight: 1.6 TB/s at 2048 rows (H100).
extern "C" __global__ void __launch_bounds__(256, 4) add_rmsnorm_rows(float* resid, const T* delta, const T* weight,
                                                                     T* out, const int* row_index, int hidden,
                                                                     float eps) {
    add_rmsnorm_impl<4>(resid, delta, weight, out, row_index, hidden, eps);
}

// A prefill step's logits read the last layer's output at each sequence's last token only, so that
// layer runs attention, o_proj and the MLP on those rows alone (model/forward.rs, `prune_last`). This
// gathers them: the rotated q of row last_rows[s] into row s of q_out (qkv stride kept, so
// attn_decode reads it as a decode batch) and the residual row (resid_row_bytes: f32 or T) into
// row s of resid_out. Separate outputs: an in-place gather could overwrite a row another CTA reads.
// grid (sequences), 256 threads; q_width and resid_row_bytes are multiples of 4 bytes.
extern "C" __global__ void gather_last_rows(const T* qkv, const unsigned char* resid, const int* last_rows,
                                            T* q_out, unsigned char* resid_out, int q_width, int qkv_width,
                                            int resid_row_bytes) {
    pdl_trigger();
    pdl_wait();
    const int s = blockIdx.x;
    const u64 r = (u64)last_rows[s];
    const u32* q_src = reinterpret_cast<const u32*>(qkv + r * qkv_width);
    u32* q_dst = reinterpret_cast<u32*>(q_out + (u64)s * qkv_width);
    for (int i = threadIdx.x; i < q_width / 2; i += blockDim.x) q_dst[i] = q_src[i];
    const u32* r_src = reinterpret_cast<const u32*>(resid + r * resid_row_bytes);
    u32* r_dst = reinterpret_cast<u32*>(resid_out + (u64)s * resid_row_bytes);
    for (int i = threadIdx.x; i < resid_row_bytes / 4; i += blockDim.x) r_dst[i] = r_src[i];
}

// T residual, many rows, 16-byte accesses (8 elements per step; hidden is a multiple of 8): 256 threads
// per row, each keeping 2 uint4 of the row (hidden 4096) in registers.
__device__ __forceinline__ void unpack8(const uint4& raw, float (&v)[8]) {
    const T2* p = reinterpret_cast<const T2*>(&raw);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const float2 f = to_f2(p[k]);
        v[2 * k] = f.x;
        v[2 * k + 1] = f.y;
    }
}
__device__ __forceinline__ uint4 pack8(const float (&v)[8]) {
    uint4 raw;
    T2* p = reinterpret_cast<T2*>(&raw);
#pragma unroll
    for (int k = 0; k < 4; ++k) p[k] = from_f2(v[2 * k], v[2 * k + 1]);
    return raw;
}
#define NORM8_KEEP 2
extern "C" __global__ void __launch_bounds__(256, 4) add_rmsnorm_rows_h(T* resid, const T* delta, const T* weight,
                                                                        T* out, const int* row_index, int hidden,
                                                                        float eps) {
    __shared__ float scratch[32];
    pdl_trigger();
    pdl_wait();
    const int r = blockIdx.x;
    const u64 s = row_index ? (u64)row_index[r] : (u64)r;
    uint4* x = reinterpret_cast<uint4*>(resid + s * hidden);
    const uint4* d = delta ? reinterpret_cast<const uint4*>(delta + s * hidden) : nullptr;
    const uint4* w = reinterpret_cast<const uint4*>(weight);
    uint4* o = reinterpret_cast<uint4*>(out + (u64)r * hidden);
    const int n8 = hidden / 8;
    float sq = 0.0f;
    uint4 keep[NORM8_KEEP];
    // Loads first (all in flight), then the adds and sums.
#pragma unroll
    for (int j = 0; j < NORM8_KEEP; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < n8) keep[j] = x[i];
    }
    auto load_add = [&](int i, uint4 raw) {
        float v[8];
        unpack8(raw, v);
        if (d) {
            float dv[8];
            unpack8(d[i], dv);
#pragma unroll
            for (int k = 0; k < 8; ++k) v[k] += dv[k];
            raw = pack8(v);  // rounded once; the norm uses the stored values
            x[i] = raw;
            unpack8(raw, v);
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) sq += v[k] * v[k];
        return raw;
    };
#pragma unroll
    for (int j = 0; j < NORM8_KEEP; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < n8) keep[j] = load_add(i, keep[j]);
    }
    for (int i = threadIdx.x + NORM8_KEEP * blockDim.x; i < n8; i += blockDim.x) load_add(i, x[i]);
    const float inv = rsqrtf(block_sum(sq, scratch) / (float)hidden + eps);
    auto store = [&](int i, const uint4& raw) {
        float v[8], wv[8];
        unpack8(raw, v);
        unpack8(w[i], wv);
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = v[k] * inv * wv[k];
        o[i] = pack8(v);
    };
#pragma unroll
    for (int j = 0; j < NORM8_KEEP; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < n8) store(i, keep[j]);
    }
    for (int i = threadIdx.x + NORM8_KEEP * blockDim.x; i < n8; i += blockDim.x) store(i, x[i]);
}
