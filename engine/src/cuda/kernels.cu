// Kernels of the CUDA forward, compiled at start-up by NVRTC.
//
// Compile-time parameters (passed as -D by the Rust side): HEAD_DIM (multiple of 16, <= 256),
// BLOCK_SIZE (KV tokens per block), USE_BF16 (0: fp16 weights and KV, 1: bf16).
//
// KV pool layout (block-major, engine::config::KvLayout):
//   [block][layer][K|V][kv_head][token_in_block][HEAD_DIM]
// so one (block, layer, K-or-V, head) piece is BLOCK_SIZE * HEAD_DIM contiguous elements.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#if USE_BF16
typedef __nv_bfloat16 T;
typedef __nv_bfloat162 T2;
__device__ __forceinline__ float to_f(T x) { return __bfloat162float(x); }
__device__ __forceinline__ T from_f(float x) { return __float2bfloat16_rn(x); }
__device__ __forceinline__ float2 to_f2(T2 x) { return __bfloat1622float2(x); }
__device__ __forceinline__ T2 from_f2(float a, float b) { return __floats2bfloat162_rn(a, b); }
#define MMA_TYPE "bf16"
#else
typedef __half T;
typedef __half2 T2;
__device__ __forceinline__ float to_f(T x) { return __half2float(x); }
__device__ __forceinline__ T from_f(float x) { return __float2half_rn(x); }
__device__ __forceinline__ float2 to_f2(T2 x) { return __half22float2(x); }
__device__ __forceinline__ T2 from_f2(float a, float b) { return __floats2half2_rn(a, b); }
#define MMA_TYPE "f16"
#endif

typedef unsigned int u32;
typedef unsigned long long u64;

#define NEG_INF (-__int_as_float(0x7f800000))
#define LOG2E 1.4426950408889634f

// Programmatic dependent launch (Hopper): kernels launched with the programmatic-serialization
// attribute may start while the previous kernel of the stream still runs. pdl_wait() blocks until
// that kernel has finished and its writes are visible, so every such kernel calls it before it
// touches activations (only the GEMVs read their weights, which no kernel writes, before it).
// pdl_trigger() lets the next kernel launch now. Both are no-ops on a normal launch.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ u32 pack2(float a, float b) {
    T2 v = from_f2(a, b);
    return *reinterpret_cast<u32*>(&v);
}

// Offset (in elements) of the start of the (block, layer, kv, head) piece of the pool.
__device__ __forceinline__ u64 kv_piece(u32 block, int layer, int kv, int head, int num_layers, int num_kv_heads) {
    return ((((u64)block * num_layers + layer) * 2 + kv) * num_kv_heads + head) * (u64)(BLOCK_SIZE * HEAD_DIM);
}

// ------------------------------------------------------------------------------------------------
// Seeded random weights: counter-based (splitmix64 of seed and index), so any element is
// reproducible from (seed, index) alone, whatever the launch shape.
__device__ __forceinline__ u64 splitmix64(u64 x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// out[i] = offset + scale * u, u uniform in [-1, 1).
extern "C" __global__ void random_fill(T* out, u64 n, u64 seed, float scale, float offset) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u64 h = splitmix64(seed ^ splitmix64(i));
        float u = (float)(h >> 40) * (1.0f / 16777216.0f);  // 24 random bits in [0, 1)
        out[i] = from_f(offset + scale * (2.0f * u - 1.0f));
    }
}

// ------------------------------------------------------------------------------------------------
// resid[t, :] = embed[tokens[t], :]. The residual stream is f32 (`embed`) or the weights' type T
// (`embed_h`): steps of >= HALF_RESID_MIN_TOKENS (model.rs) use T, as HF's fp16 Llama does.
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
// The residual R is f32 (`add_rmsnorm*`) or T (`add_rmsnorm*_h`), as chosen per step in model.rs.
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
extern "C" __global__ void __launch_bounds__(256, 4) add_rmsnorm_rows_h(T* resid, const T* delta, const T* weight,
                                                                       T* out, const int* row_index, int hidden,
                                                                       float eps) {
    add_rmsnorm_impl<4>(resid, delta, weight, out, row_index, hidden, eps);
}

// A prefill step's logits read the last layer's output at each sequence's last token only, so that
// layer runs attention, o_proj and the MLP on those rows alone (model.rs, `prune_last_layer`). This
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
// per row, each keeping 2 uint4 of the row (hidden 4096) in registers. The default for a T residual;
// DJINN_CUDA_NORM_ROWS_8B=1 selects add_rmsnorm_rows_h (8-byte accesses) for A/B.
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
extern "C" __global__ void __launch_bounds__(256, 4) add_rmsnorm_rows8_h(T* resid, const T* delta, const T* weight,
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

// Two-pass form (re-reads the row for the scaling), kept for A/B: DJINN_CUDA_RMSNORM_V1=1.
template <typename R>
__device__ __forceinline__ void add_rmsnorm_v1_impl(R* resid, const T* delta, const T* weight, T* out,
                                                    const int* row_index, int hidden, float eps) {
    __shared__ float scratch[32];
    pdl_trigger();
    pdl_wait();
    const int r = blockIdx.x;
    const u64 s = row_index ? (u64)row_index[r] : (u64)r;
    R* x = resid + s * hidden;
    const int n4 = hidden / 4;
    float sq = 0.0f;
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
        float4 v = resid_load4(x, i);
        if (delta) {
            const T2* d = reinterpret_cast<const T2*>(delta + s * hidden) + 2 * i;
            const float2 a = to_f2(d[0]), b = to_f2(d[1]);
            v.x += a.x;
            v.y += a.y;
            v.z += b.x;
            v.w += b.y;
            v = resid_store4(x, i, v);
        }
        sq += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    const float inv = rsqrtf(block_sum(sq, scratch) / (float)hidden + eps);
    T2* o = reinterpret_cast<T2*>(out + (u64)r * hidden);
    const T2* w = reinterpret_cast<const T2*>(weight);
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
        const float4 v = resid_load4(x, i);
        const float2 wa = to_f2(w[2 * i]), wb = to_f2(w[2 * i + 1]);
        o[2 * i] = from_f2(v.x * inv * wa.x, v.y * inv * wa.y);
        o[2 * i + 1] = from_f2(v.z * inv * wb.x, v.w * inv * wb.y);
    }
}
extern "C" __global__ void add_rmsnorm_v1(float* resid, const T* delta, const T* weight, T* out, const int* row_index,
                                          int hidden, float eps) {
    add_rmsnorm_v1_impl(resid, delta, weight, out, row_index, hidden, eps);
}
extern "C" __global__ void add_rmsnorm_v1_h(T* resid, const T* delta, const T* weight, T* out, const int* row_index,
                                            int hidden, float eps) {
    add_rmsnorm_v1_impl(resid, delta, weight, out, row_index, hidden, eps);
}

// ------------------------------------------------------------------------------------------------
// RoPE (HF rotate_half convention: pairs (i, i + HEAD_DIM/2)) on q and k of one layer, in place
// in the fused qkv rows [q heads | k heads | v heads], and the KV write of k and v into the pool
// at slot = block * BLOCK_SIZE + offset (slot < 0: padding row, nothing written).
// rope[pos * HEAD_DIM + 2 * i] = cos, [.. + 2 * i + 1] = sin of pos * theta^(-2i/HEAD_DIM).
// rotate_q = 0: q is left alone (attn_prefill_v4 rotates it when it loads its Q tile) and the
// rotated k only goes to the pool: a third less traffic.
// One CTA per token looping over the items, 4-byte accesses (the default; see rope_kv_write).
extern "C" __global__ void rope_kv_write_v1(T* qkv, const int* positions, const long long* slots, const float* rope,
                                         T* pool, int layer, int num_heads, int num_kv_heads, int num_layers,
                                         int rotate_q) {
    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.x;
    const int half = HEAD_DIM / 2;
    const int qkv_width = (num_heads + 2 * num_kv_heads) * HEAD_DIM;
    T* row = qkv + (u64)t * qkv_width;
    const int pos = positions[t];
    const long long slot = slots[t];
    // Each item rotates two adjacent pairs (i, i + half) and (i + 1, i + 1 + half): 4-byte accesses.
    const int first_head = rotate_q ? 0 : num_heads;
    const int items = (num_heads + 2 * num_kv_heads - first_head) * (half / 2);
    for (int item = threadIdx.x; item < items; item += blockDim.x) {
        const int head = first_head + item / (half / 2);  // 0..nh-1 q, nh..nh+nkv-1 k, then v
        const int i = 2 * (item % (half / 2));
        T* h = row + head * HEAD_DIM;
        float2 a = to_f2(*reinterpret_cast<const T2*>(h + i));
        float2 b = to_f2(*reinterpret_cast<const T2*>(h + i + half));
        if (head < num_heads + num_kv_heads) {
            const float4 cs = *reinterpret_cast<const float4*>(rope + (u64)pos * HEAD_DIM + 2 * i);  // c_i s_i c_i+1 s_i+1
            const float2 ra = make_float2(a.x * cs.x - b.x * cs.y, a.y * cs.z - b.y * cs.w);
            const float2 rb = make_float2(b.x * cs.x + a.x * cs.y, b.y * cs.z + a.y * cs.w);
            a = ra;
            b = rb;
            if (rotate_q) {
                *reinterpret_cast<T2*>(h + i) = from_f2(a.x, a.y);
                *reinterpret_cast<T2*>(h + i + half) = from_f2(b.x, b.y);
            }
        }
        if (head >= num_heads && slot >= 0) {
            const int kv = head < num_heads + num_kv_heads ? 0 : 1;
            const int kvh = kv == 0 ? head - num_heads : head - num_heads - num_kv_heads;
            const u32 block = (u32)(slot / BLOCK_SIZE);
            const int off = (int)(slot % BLOCK_SIZE);
            T* dst = pool + kv_piece(block, layer, kv, kvh, num_layers, num_kv_heads) + off * HEAD_DIM;
            *reinterpret_cast<T2*>(dst + i) = from_f2(a.x, a.y);
            *reinterpret_cast<T2*>(dst + i + half) = from_f2(b.x, b.y);
        }
    }
}

// RoPE + KV write with 16-byte accesses (DJINN_CUDA_ROPE_KV_16B=1): item = 8 adjacent pairs (i..i+7,
// i+half..i+half+7) of one head, one item per thread, grid (tokens, ceil(items / blockDim)). The same
// arithmetic and rounding as rope_kv_write_v1, so the results are bit-identical; only the access
// width and the loads in flight per thread change. Not faster on the H100 (0.87 ms per prefill
// 2048 either way, ~2.5 TB/s of mixed read/write traffic), so v1 stays the default.
extern "C" __global__ void rope_kv_write(T* qkv, const int* positions, const long long* slots, const float* rope,
                                         T* pool, int layer, int num_heads, int num_kv_heads, int num_layers,
                                         int rotate_q) {
    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.x;
    const int half = HEAD_DIM / 2;
    const int per_head = HEAD_DIM / 16;  // items per head
    const int first_head = rotate_q ? 0 : num_heads;
    const int items = (num_heads + 2 * num_kv_heads - first_head) * per_head;
    const int item = blockIdx.y * blockDim.x + threadIdx.x;
    if (item >= items) return;
    const int qkv_width = (num_heads + 2 * num_kv_heads) * HEAD_DIM;
    const int head = first_head + item / per_head;  // 0..nh-1 q, nh..nh+nkv-1 k, then v
    const int i = 8 * (item % per_head);
    T* h = qkv + (u64)t * qkv_width + head * HEAD_DIM;
    uint4 lo = *reinterpret_cast<const uint4*>(h + i);
    uint4 hi = *reinterpret_cast<const uint4*>(h + i + half);
    const long long slot = slots[t];
    if (head < num_heads + num_kv_heads) {
        const int pos = positions[t];
        const float4* cs = reinterpret_cast<const float4*>(rope + (u64)pos * HEAD_DIM + 2 * i);  // c_i s_i c_i+1 s_i+1
        T2* a2 = reinterpret_cast<T2*>(&lo);
        T2* b2 = reinterpret_cast<T2*>(&hi);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const float4 c = cs[k];
            const float2 a = to_f2(a2[k]), b = to_f2(b2[k]);
            a2[k] = from_f2(a.x * c.x - b.x * c.y, a.y * c.z - b.y * c.w);
            b2[k] = from_f2(b.x * c.x + a.x * c.y, b.y * c.z + a.y * c.w);
        }
        if (rotate_q) {
            *reinterpret_cast<uint4*>(h + i) = lo;
            *reinterpret_cast<uint4*>(h + i + half) = hi;
        }
    }
    if (head >= num_heads && slot >= 0) {
        const int kv = head < num_heads + num_kv_heads ? 0 : 1;
        const int kvh = kv == 0 ? head - num_heads : head - num_heads - num_kv_heads;
        const u32 block = (u32)(slot / BLOCK_SIZE);
        const int off = (int)(slot % BLOCK_SIZE);
        T* dst = pool + kv_piece(block, layer, kv, kvh, num_layers, num_kv_heads) + off * HEAD_DIM;
        *reinterpret_cast<uint4*>(dst + i) = lo;
        *reinterpret_cast<uint4*>(dst + i + half) = hi;
    }
}

// out[t, i] = silu(gu[t, i]) * gu[t, inter + i] (gate and up projections fused in one GEMM).
// 8 elements (16 bytes) per step; inter is a multiple of 8.
extern "C" __global__ void silu_mul(const T* gu, T* out, int inter, u64 total) {
    pdl_trigger();
    pdl_wait();
    const u64 total8 = total / 8;
    const u64 inter8 = inter / 8;
    for (u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x; idx < total8; idx += (u64)gridDim.x * blockDim.x) {
        const u64 t = idx / inter8, i8 = idx % inter8;
        const uint4 graw = *reinterpret_cast<const uint4*>(gu + t * 2 * inter + i8 * 8);
        const uint4 uraw = *reinterpret_cast<const uint4*>(gu + t * 2 * inter + inter + i8 * 8);
        const T2* g2 = reinterpret_cast<const T2*>(&graw);
        const T2* u2 = reinterpret_cast<const T2*>(&uraw);
        uint4 res;
        T2* r2 = reinterpret_cast<T2*>(&res);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const float2 g = to_f2(g2[k]), u = to_f2(u2[k]);
            r2[k] = from_f2(g.x / (1.0f + __expf(-g.x)) * u.x, g.y / (1.0f + __expf(-g.y)) * u.y);
        }
        *reinterpret_cast<uint4*>(out + idx * 8) = res;
    }
}

// ------------------------------------------------------------------------------------------------
// Paged decode attention, one new token per sequence, split-KV (flash-decoding).
// grid (num_heads, batch, num_splits), 128 threads (4 warps). Sequence b attends to
// seq_lens[b] tokens (its new token included; its KV was written by rope_kv_write). The blocks
// of the sequence are split evenly over the splits; inside a split, each warp takes whole KV
// blocks. A lane holds 8 dims (16 bytes) of one token; HEAD_DIM/8 lanes cover a token.
// Output: with num_splits == 1 the normalised result in out[b, h, :]; otherwise the normalised
// partial result and its log-sum-exp per split, merged by attn_decode_reduce.
#define DEC_WARPS 4
#define LANES_PER_TOKEN (HEAD_DIM / 8)
#define TOKENS_PER_LOAD (32 / LANES_PER_TOKEN)
#define LOADS_PER_BLOCK ((BLOCK_SIZE + TOKENS_PER_LOAD - 1) / TOKENS_PER_LOAD)

extern "C" __global__ void __launch_bounds__(128) attn_decode(
        const T* qkv, const T* pool, const u32* block_tables, int table_stride, const int* seq_lens,
        float* part_out, float* part_lse, T* out, int layer, int num_splits, float scale,
        int num_heads, int num_kv_heads, int num_layers) {
    pdl_trigger();
    pdl_wait();
    const int h = blockIdx.x, b = blockIdx.y, split = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int sub = lane % LANES_PER_TOKEN, tok_in = lane / LANES_PER_TOKEN;
    const int kvh = h / (num_heads / num_kv_heads);
    const int len = seq_lens[b];
    const int nblocks = (len + BLOCK_SIZE - 1) / BLOCK_SIZE;
    const int per_split = (nblocks + num_splits - 1) / num_splits;
    const int blk_begin = split * per_split;
    const int blk_end = min(nblocks, blk_begin + per_split);
    const int qkv_width = (num_heads + 2 * num_kv_heads) * HEAD_DIM;

    float q[8];
    {
        const uint4 raw = *reinterpret_cast<const uint4*>(qkv + (u64)b * qkv_width + h * HEAD_DIM + sub * 8);
        const T2* p = reinterpret_cast<const T2*>(&raw);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            float2 f = to_f2(p[k]);
            q[2 * k] = f.x * scale;
            q[2 * k + 1] = f.y * scale;
        }
    }
    float m = NEG_INF, l = 0.0f, acc[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) acc[k] = 0.0f;

    const u32* table = block_tables + (u64)b * table_stride;
    for (int blk = blk_begin + warp; blk < blk_end; blk += DEC_WARPS) {
        const u32 phys = table[blk];
        const T* kbase = pool + kv_piece(phys, layer, 0, kvh, num_layers, num_kv_heads);
        const T* vbase = kbase + (u64)num_kv_heads * BLOCK_SIZE * HEAD_DIM;
        uint4 kr[LOADS_PER_BLOCK], vr[LOADS_PER_BLOCK];
#pragma unroll
        for (int j = 0; j < LOADS_PER_BLOCK; ++j) {
            const int t = j * TOKENS_PER_LOAD + tok_in;
            if (t < BLOCK_SIZE) {
                kr[j] = *reinterpret_cast<const uint4*>(kbase + t * HEAD_DIM + sub * 8);
                vr[j] = *reinterpret_cast<const uint4*>(vbase + t * HEAD_DIM + sub * 8);
            } else {
                kr[j] = make_uint4(0, 0, 0, 0);
                vr[j] = make_uint4(0, 0, 0, 0);
            }
        }
        float s[LOADS_PER_BLOCK];
        float bmax = NEG_INF;
#pragma unroll
        for (int j = 0; j < LOADS_PER_BLOCK; ++j) {
            const T2* kp = reinterpret_cast<const T2*>(&kr[j]);
            float dot = 0.0f;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                float2 f = to_f2(kp[k]);
                dot += q[2 * k] * f.x + q[2 * k + 1] * f.y;
            }
#pragma unroll
            for (int o = LANES_PER_TOKEN / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
            const int t = j * TOKENS_PER_LOAD + tok_in;
            const int pos = blk * BLOCK_SIZE + t;
            s[j] = (t < BLOCK_SIZE && pos < len) ? dot : NEG_INF;
            bmax = fmaxf(bmax, s[j]);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) bmax = fmaxf(bmax, __shfl_xor_sync(0xffffffffu, bmax, o));
        const float new_m = fmaxf(m, bmax);  // finite: the block's first token is in range
        const float alpha = (m == NEG_INF) ? 0.0f : __expf(m - new_m);
        l *= alpha;
#pragma unroll
        for (int k = 0; k < 8; ++k) acc[k] *= alpha;
#pragma unroll
        for (int j = 0; j < LOADS_PER_BLOCK; ++j) {
            const float p = (s[j] == NEG_INF) ? 0.0f : __expf(s[j] - new_m);
            l += p;
            const T2* vp = reinterpret_cast<const T2*>(&vr[j]);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                float2 f = to_f2(vp[k]);
                acc[2 * k] += p * f.x;
                acc[2 * k + 1] += p * f.y;
            }
        }
        m = new_m;
    }
    // Sum the token groups of the warp (lanes with equal `sub`); m is warp-uniform.
#pragma unroll
    for (int o = 16; o >= LANES_PER_TOKEN; o >>= 1) {
        l += __shfl_xor_sync(0xffffffffu, l, o);
#pragma unroll
        for (int k = 0; k < 8; ++k) acc[k] += __shfl_xor_sync(0xffffffffu, acc[k], o);
    }
    __shared__ float sm_m[DEC_WARPS], sm_l[DEC_WARPS];
    __shared__ float sm_acc[DEC_WARPS][HEAD_DIM];
    if (lane == 0) {
        sm_m[warp] = m;
        sm_l[warp] = l;
    }
    if (tok_in == 0) {
#pragma unroll
        for (int k = 0; k < 8; ++k) sm_acc[warp][sub * 8 + k] = acc[k];
    }
    __syncthreads();
    float big_m = NEG_INF;
#pragma unroll
    for (int w = 0; w < DEC_WARPS; ++w) big_m = fmaxf(big_m, sm_m[w]);
    float weight[DEC_WARPS], total_l = 0.0f;
#pragma unroll
    for (int w = 0; w < DEC_WARPS; ++w) {
        weight[w] = (sm_m[w] == NEG_INF) ? 0.0f : __expf(sm_m[w] - big_m);
        total_l += sm_l[w] * weight[w];
    }
    const float inv_l = total_l > 0.0f ? 1.0f / total_l : 0.0f;
    for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) {
        float v = 0.0f;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) v += sm_acc[w][d] * weight[w];
        v *= inv_l;
        if (num_splits == 1) {
            out[((u64)b * num_heads + h) * HEAD_DIM + d] = from_f(v);
        } else {
            part_out[(((u64)b * num_heads + h) * num_splits + split) * HEAD_DIM + d] = v;
        }
    }
    if (num_splits > 1 && threadIdx.x == 0) {
        part_lse[((u64)b * num_heads + h) * num_splits + split] = total_l > 0.0f ? big_m + __logf(total_l) : NEG_INF;
    }
}

// Merges the splits of attn_decode by their log-sum-exp. grid (num_heads, batch), HEAD_DIM threads.
extern "C" __global__ void attn_decode_reduce(const float* part_out, const float* part_lse, T* out, int num_splits,
                                              int num_heads) {
    pdl_trigger();
    pdl_wait();
    const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
    const u64 base = ((u64)b * num_heads + h) * num_splits;
    float big = NEG_INF;
    for (int s = 0; s < num_splits; ++s) big = fmaxf(big, part_lse[base + s]);
    float num = 0.0f, den = 0.0f;
    if (big != NEG_INF) {
        for (int s = 0; s < num_splits; ++s) {
            const float lse = part_lse[base + s];
            if (lse == NEG_INF) continue;
            const float w = __expf(lse - big);
            num += w * part_out[(base + s) * HEAD_DIM + d];
            den += w;
        }
    }
    out[((u64)b * num_heads + h) * HEAD_DIM + d] = from_f(den > 0.0f ? num / den : 0.0f);
}

// ------------------------------------------------------------------------------------------------
// Prefill attention over paged KV with a causal mask, on tensor cores (mma.sync m16n8k16,
// FlashAttention-2 style online softmax). grid (num_tiles, num_heads), 128 threads; a tile is up to
// 64 query rows of one sequence, each warp 16 rows. tiles[i] = {seq, first qkv row, rows, position
// of the first row}; a query at position p attends to keys 0..=p of its sequence (the KV of the new
// tokens was written by rope_kv_write before this kernel).
#define PF_ROWS 64
#define PF_KEYS 64
#define KS_PITCH (HEAD_DIM + 8)

__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE "." MMA_TYPE
                 ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One 64-key chunk of a warp's 16 query rows: S = Q K^T (mma), causal mask, online softmax, O += P V.
// ks / vs: the chunk's K and V, row-major [key][KS_PITCH]. Keys past the tile's need are zero rows
// (finite), masked out by the causal test for every real query row.
__device__ __forceinline__ void prefill_chunk(const T* ks, const T* vs, int kc, int qpos_lo, int qpos_hi, float scale,
                                              const u32 (&qa)[HEAD_DIM / 16][4], float (&o)[HEAD_DIM / 8][4],
                                              float& m_lo, float& m_hi, float& l_lo, float& l_hi, int lane) {
    const int g = lane >> 2, t4 = lane & 3;
    float s[PF_KEYS / 8][4];
#pragma unroll
    for (int nt = 0; nt < PF_KEYS / 8; ++nt) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
        const T* krow = &ks[(nt * 8 + g) * KS_PITCH];
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
            const u32 b0 = *reinterpret_cast<const u32*>(krow + kk * 16 + t4 * 2);
            const u32 b1 = *reinterpret_cast<const u32*>(krow + kk * 16 + 8 + t4 * 2);
            mma16816(s[nt], qa[kk], b0, b1);
        }
    }
    float mx_lo = NEG_INF, mx_hi = NEG_INF;
#pragma unroll
    for (int nt = 0; nt < PF_KEYS / 8; ++nt) {
        const int kpos = kc + nt * 8 + t4 * 2;
        s[nt][0] = (kpos <= qpos_lo) ? s[nt][0] * scale : NEG_INF;
        s[nt][1] = (kpos + 1 <= qpos_lo) ? s[nt][1] * scale : NEG_INF;
        s[nt][2] = (kpos <= qpos_hi) ? s[nt][2] * scale : NEG_INF;
        s[nt][3] = (kpos + 1 <= qpos_hi) ? s[nt][3] * scale : NEG_INF;
        mx_lo = fmaxf(mx_lo, fmaxf(s[nt][0], s[nt][1]));
        mx_hi = fmaxf(mx_hi, fmaxf(s[nt][2], s[nt][3]));
    }
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, off));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, off));
    }
    const float nm_lo = fmaxf(m_lo, mx_lo), nm_hi = fmaxf(m_hi, mx_hi);
    const float a_lo = (m_lo == NEG_INF) ? 0.0f : __expf(m_lo - nm_lo);
    const float a_hi = (m_hi == NEG_INF) ? 0.0f : __expf(m_hi - nm_hi);
    m_lo = nm_lo;
    m_hi = nm_hi;
    float sum_lo = 0.0f, sum_hi = 0.0f;
#pragma unroll
    for (int nt = 0; nt < PF_KEYS / 8; ++nt) {
        s[nt][0] = (s[nt][0] == NEG_INF) ? 0.0f : __expf(s[nt][0] - nm_lo);
        s[nt][1] = (s[nt][1] == NEG_INF) ? 0.0f : __expf(s[nt][1] - nm_lo);
        s[nt][2] = (s[nt][2] == NEG_INF) ? 0.0f : __expf(s[nt][2] - nm_hi);
        s[nt][3] = (s[nt][3] == NEG_INF) ? 0.0f : __expf(s[nt][3] - nm_hi);
        sum_lo += s[nt][0] + s[nt][1];
        sum_hi += s[nt][2] + s[nt][3];
    }
    l_lo = l_lo * a_lo + sum_lo;
    l_hi = l_hi * a_hi + sum_hi;
#pragma unroll
    for (int nd = 0; nd < HEAD_DIM / 8; ++nd) {
        o[nd][0] *= a_lo;
        o[nd][1] *= a_lo;
        o[nd][2] *= a_hi;
        o[nd][3] *= a_hi;
    }
    // P (C layout of two n8 tiles) is the A operand of a k16 step: no shuffle needed.
    const int mat = lane >> 3, mrow = lane & 7;
#pragma unroll
    for (int kk = 0; kk < PF_KEYS / 16; ++kk) {
        u32 pa[4];
        pa[0] = pack2(s[2 * kk][0], s[2 * kk][1]);
        pa[1] = pack2(s[2 * kk][2], s[2 * kk][3]);
        pa[2] = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pa[3] = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
        // B fragments of V (k = key, n = dim) straight from row-major V with ldmatrix.trans:
        // matrices (keys 0-7 | 8-15) x (dims nd | nd + 1), rows addressed by lanes 0-7, 8-15, ...
#pragma unroll
        for (int nd = 0; nd < HEAD_DIM / 8; nd += 2) {
            const T* addr = &vs[(kk * 16 + (mat & 1) * 8 + mrow) * KS_PITCH + (nd + (mat >> 1)) * 8];
            const u32 saddr = (u32)__cvta_generic_to_shared(addr);
            u32 b0, b1, b2, b3;
            asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                         : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3)
                         : "r"(saddr));
            mma16816(o[nd], pa, b0, b1);
            mma16816(o[nd + 1], pa, b2, b3);
        }
    }
}

__device__ __forceinline__ void prefill_load_q(const T* qkv, int row0, int rows, int h, int qkv_width, int warp, int lane,
                                               u32 (&qa)[HEAD_DIM / 16][4]) {
    const int g = lane >> 2, t4 = lane & 3;
    const int r_lo = warp * 16 + g, r_hi = r_lo + 8;
    const T* q_lo = qkv + (u64)(row0 + r_lo) * qkv_width + h * HEAD_DIM;
    const T* q_hi = qkv + (u64)(row0 + r_hi) * qkv_width + h * HEAD_DIM;
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
        const int c = kk * 16 + t4 * 2;
        qa[kk][0] = r_lo < rows ? *reinterpret_cast<const u32*>(q_lo + c) : 0u;
        qa[kk][1] = r_hi < rows ? *reinterpret_cast<const u32*>(q_hi + c) : 0u;
        qa[kk][2] = r_lo < rows ? *reinterpret_cast<const u32*>(q_lo + c + 8) : 0u;
        qa[kk][3] = r_hi < rows ? *reinterpret_cast<const u32*>(q_hi + c + 8) : 0u;
    }
}

__device__ __forceinline__ void prefill_store(T* out, int row0, int rows, int h, int num_heads, int warp, int lane,
                                              float (&o)[HEAD_DIM / 8][4], float l_lo, float l_hi) {
    const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
        l_lo += __shfl_xor_sync(0xffffffffu, l_lo, off);
        l_hi += __shfl_xor_sync(0xffffffffu, l_hi, off);
    }
    const float inv_lo = l_lo > 0.0f ? 1.0f / l_lo : 0.0f;
    const float inv_hi = l_hi > 0.0f ? 1.0f / l_hi : 0.0f;
    const int r_lo = warp * 16 + g, r_hi = r_lo + 8;
    const int out_width = num_heads * HEAD_DIM;
#pragma unroll
    for (int nd = 0; nd < HEAD_DIM / 8; ++nd) {
        const int c = h * HEAD_DIM + nd * 8 + t4 * 2;
        if (r_lo < rows) {
            *reinterpret_cast<T2*>(out + (u64)(row0 + r_lo) * out_width + c) = from_f2(o[nd][0] * inv_lo, o[nd][1] * inv_lo);
        }
        if (r_hi < rows) {
            *reinterpret_cast<T2*>(out + (u64)(row0 + r_hi) * out_width + c) = from_f2(o[nd][2] * inv_hi, o[nd][3] * inv_hi);
        }
    }
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    const u32 saddr = (u32)__cvta_generic_to_shared(smem);
    const int bytes = valid ? 16 : 0;  // 0: zero-fill, nothing read
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(gmem), "r"(bytes));
}

// v2 (kept for A/B: DJINN_CUDA_PREFILL_V2=1). Double-buffered: the K/V chunk after the current one is
// copied with cp.async while the current one is computed. Dynamic shared memory: 2 stages x (K, V) x
// PF_KEYS x KS_PITCH elements. grid (num_tiles, num_heads).
extern "C" __global__ void __launch_bounds__(128) attn_prefill_v2(
        const T* qkv, const T* pool, const u32* block_tables, int table_stride, const int4* tiles, int num_tiles,
        T* out, int layer, float scale, int num_heads, int num_kv_heads, int num_layers) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* smem = reinterpret_cast<T*>(smem_raw);
    const int stage_elems = PF_KEYS * KS_PITCH;  // one K (or V) chunk
    // Longest tiles (last of each sequence) are listed last: start them first.
    const int4 tile = tiles[num_tiles - 1 - blockIdx.x];
    const int seq = tile.x, row0 = tile.y, rows = tile.z, pos0 = tile.w;
    const int h = blockIdx.y;
    const int kvh = h / (num_heads / num_kv_heads);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int qkv_width = (num_heads + 2 * num_kv_heads) * HEAD_DIM;
    const u32* table = block_tables + (u64)seq * table_stride;
    const int kv_len = pos0 + rows;  // keys needed by the tile's last row
    const int nchunks = (kv_len + PF_KEYS - 1) / PF_KEYS;
    const u64 v_offset = (u64)num_kv_heads * BLOCK_SIZE * HEAD_DIM;

    auto load_chunk = [&](int chunk, int stage) {
        T* ks = smem + stage * 2 * stage_elems;
        T* vs = ks + stage_elems;
        const int kc = chunk * PF_KEYS;
        for (int c = threadIdx.x; c < PF_KEYS * (HEAD_DIM / 8); c += blockDim.x) {
            const int tok = c / (HEAD_DIM / 8), d8 = c % (HEAD_DIM / 8);
            const int kpos = kc + tok;
            const bool valid = kpos < kv_len;
            const T* kp = pool;
            if (valid) {
                const u32 phys = table[kpos / BLOCK_SIZE];
                kp = pool + kv_piece(phys, layer, 0, kvh, num_layers, num_kv_heads) + (kpos % BLOCK_SIZE) * HEAD_DIM + d8 * 8;
            }
            cp_async16(&ks[tok * KS_PITCH + d8 * 8], kp, valid);
            cp_async16(&vs[tok * KS_PITCH + d8 * 8], valid ? kp + v_offset : pool, valid);
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };

    load_chunk(0, 0);
    u32 qa[HEAD_DIM / 16][4];
    prefill_load_q(qkv, row0, rows, h, qkv_width, warp, lane, qa);
    const int g = lane >> 2;
    const int qpos_lo = pos0 + warp * 16 + g, qpos_hi = qpos_lo + 8;
    const int warp_last_pos = pos0 + warp * 16 + 15;
    float m_lo = NEG_INF, m_hi = NEG_INF, l_lo = 0.0f, l_hi = 0.0f;
    float o[HEAD_DIM / 8][4];
#pragma unroll
    for (int nd = 0; nd < HEAD_DIM / 8; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.0f;

    for (int ci = 0; ci < nchunks; ++ci) {
        if (ci + 1 < nchunks) {
            load_chunk(ci + 1, (ci + 1) & 1);
        } else {
            asm volatile("cp.async.commit_group;\n" ::);  // empty group keeps the count uniform
        }
        asm volatile("cp.async.wait_group 1;\n" ::);  // chunk ci has landed (this thread's copies)
        __syncthreads();                              // ... and everyone else's
        const int kc = ci * PF_KEYS;
        // Warp-uniform skip (the mma and shuffles need all 32 lanes): the whole chunk lies after
        // every query row of this warp.
        if (kc <= warp_last_pos) {
            const T* ks = smem + (ci & 1) * 2 * stage_elems;
            prefill_chunk(ks, ks + stage_elems, kc, qpos_lo, qpos_hi, scale, qa, o, m_lo, m_hi, l_lo, l_hi, lane);
        }
        __syncthreads();  // stage ci & 1 is refilled by the next iteration's prefetch
    }
    prefill_store(out, row0, rows, h, num_heads, warp, lane, o, l_lo, l_hi);
}

// v3 of one 64-key chunk (see prefill_chunk): K fragments by ldmatrix (one x4 load feeds two mma
// instead of four 4-byte shared loads), scores scaled into the log2 domain once (exp2), and the
// causal compare only where MASK (the chunk reaches past the warp's first query row).
template <bool MASK>
__device__ __forceinline__ void prefill_chunk_v3(const T* ks, const T* vs, int kc, int qpos_lo, int qpos_hi,
                                                 float scale_log2, const u32 (&qa)[HEAD_DIM / 16][4],
                                                 float (&o)[HEAD_DIM / 8][4], float& m_lo, float& m_hi, float& l_lo,
                                                 float& l_hi, int lane) {
    const int t4 = lane & 3;
    const int mat = lane >> 3, mrow = lane & 7;
    float s[PF_KEYS / 8][4];
#pragma unroll
    for (int nt = 0; nt < PF_KEYS / 8; ++nt) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
        // Matrices: keys nt*8 .. +7 x dims (kk*16 | kk*16+8 | kk*16+16 | kk*16+24).
        const T* kaddr = &ks[(nt * 8 + mrow) * KS_PITCH + mat * 8];
#pragma unroll
        for (int kk = 0; kk + 1 < HEAD_DIM / 16; kk += 2) {
            const u32 saddr = (u32)__cvta_generic_to_shared(kaddr + kk * 16);
            u32 b0, b1, b2, b3;
            asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                         : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3)
                         : "r"(saddr));
            mma16816(s[nt], qa[kk], b0, b1);
            mma16816(s[nt], qa[kk + 1], b2, b3);
        }
        if ((HEAD_DIM / 16) % 2 == 1) {  // HEAD_DIM 16: the last k16 step alone (.x2; lanes 0-15 address it)
            const int kk = HEAD_DIM / 16 - 1;
            const u32 saddr = (u32)__cvta_generic_to_shared(kaddr + kk * 16);
            u32 b0, b1;
            asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                         : "=r"(b0), "=r"(b1)
                         : "r"(saddr));
            mma16816(s[nt], qa[kk], b0, b1);
        }
    }
    float mx_lo = NEG_INF, mx_hi = NEG_INF;
#pragma unroll
    for (int nt = 0; nt < PF_KEYS / 8; ++nt) {
        if (MASK) {
            const int kpos = kc + nt * 8 + t4 * 2;
            s[nt][0] = (kpos <= qpos_lo) ? s[nt][0] * scale_log2 : NEG_INF;
            s[nt][1] = (kpos + 1 <= qpos_lo) ? s[nt][1] * scale_log2 : NEG_INF;
            s[nt][2] = (kpos <= qpos_hi) ? s[nt][2] * scale_log2 : NEG_INF;
            s[nt][3] = (kpos + 1 <= qpos_hi) ? s[nt][3] * scale_log2 : NEG_INF;
        } else {
            s[nt][0] *= scale_log2;
            s[nt][1] *= scale_log2;
            s[nt][2] *= scale_log2;
            s[nt][3] *= scale_log2;
        }
        mx_lo = fmaxf(mx_lo, fmaxf(s[nt][0], s[nt][1]));
        mx_hi = fmaxf(mx_hi, fmaxf(s[nt][2], s[nt][3]));
    }
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, off));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, off));
    }
    // Every row of the warp has at least one unmasked key in any chunk it processes (key kc <= its
    // position), so the new maxima are finite; exp2(-inf) = 0 handles the masked scores and the
    // first chunk's m = -inf.
    const float nm_lo = fmaxf(m_lo, mx_lo), nm_hi = fmaxf(m_hi, mx_hi);
    const float a_lo = exp2f(m_lo - nm_lo);
    const float a_hi = exp2f(m_hi - nm_hi);
    m_lo = nm_lo;
    m_hi = nm_hi;
    float sum_lo = 0.0f, sum_hi = 0.0f;
#pragma unroll
    for (int nt = 0; nt < PF_KEYS / 8; ++nt) {
        s[nt][0] = exp2f(s[nt][0] - nm_lo);
        s[nt][1] = exp2f(s[nt][1] - nm_lo);
        s[nt][2] = exp2f(s[nt][2] - nm_hi);
        s[nt][3] = exp2f(s[nt][3] - nm_hi);
        sum_lo += s[nt][0] + s[nt][1];
        sum_hi += s[nt][2] + s[nt][3];
    }
    l_lo = l_lo * a_lo + sum_lo;
    l_hi = l_hi * a_hi + sum_hi;
#pragma unroll
    for (int nd = 0; nd < HEAD_DIM / 8; ++nd) {
        o[nd][0] *= a_lo;
        o[nd][1] *= a_lo;
        o[nd][2] *= a_hi;
        o[nd][3] *= a_hi;
    }
#pragma unroll
    for (int kk = 0; kk < PF_KEYS / 16; ++kk) {
        u32 pa[4];
        pa[0] = pack2(s[2 * kk][0], s[2 * kk][1]);
        pa[1] = pack2(s[2 * kk][2], s[2 * kk][3]);
        pa[2] = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pa[3] = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int nd = 0; nd < HEAD_DIM / 8; nd += 2) {
            const T* addr = &vs[(kk * 16 + (mat & 1) * 8 + mrow) * KS_PITCH + (nd + (mat >> 1)) * 8];
            const u32 saddr = (u32)__cvta_generic_to_shared(addr);
            u32 b0, b1, b2, b3;
            asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                         : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3)
                         : "r"(saddr));
            mma16816(o[nd], pa, b0, b1);
            mma16816(o[nd + 1], pa, b2, b3);
        }
    }
}

// v3 (default): as v2 (64-row tiles of 4 warps, cp.async double buffering) plus
// - grid (num_heads, num_tiles): the heads vary fastest, so every head's longest tile (listed
//   last) starts in the first wave and the short tiles fill the tail (v2 ran head by head);
// - __launch_bounds__(128, 3): at most 168 registers, so 3 CTAs share an SM (v2 used 171: 2 CTAs);
// - cheaper K/V addressing (one multiply by the block stride per 16-byte copy);
// - prefill_chunk_v3 (ldmatrix K fragments, exp2 softmax, masks only on diagonal chunks).
extern "C" __global__ void __launch_bounds__(128, 3) attn_prefill(
        const T* qkv, const T* pool, const u32* block_tables, int table_stride, const int4* tiles, int num_tiles,
        T* out, int layer, float scale, int num_heads, int num_kv_heads, int num_layers) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    pdl_trigger();
    pdl_wait();
    T* smem = reinterpret_cast<T*>(smem_raw);
    const int stage_elems = PF_KEYS * KS_PITCH;
    const int4 tile = tiles[num_tiles - 1 - blockIdx.y];
    const int seq = tile.x, row0 = tile.y, rows = tile.z, pos0 = tile.w;
    const int h = blockIdx.x;
    const int kvh = h / (num_heads / num_kv_heads);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int qkv_width = (num_heads + 2 * num_kv_heads) * HEAD_DIM;
    const u32* table = block_tables + (u64)seq * table_stride;
    const int kv_len = pos0 + rows;
    const int nchunks = (kv_len + PF_KEYS - 1) / PF_KEYS;
    const u64 v_offset = (u64)num_kv_heads * BLOCK_SIZE * HEAD_DIM;
    const float scale_log2 = scale * LOG2E;

    // Thread c copies 16 bytes (dims d8*8 .. +7) of keys tok0, tok0 + step, ... of each chunk.
    constexpr int D8 = HEAD_DIM / 8;
    constexpr int STEP = 128 / D8;  // keys per pass of the CTA
    const int tok0 = threadIdx.x / D8, d8 = threadIdx.x % D8;
    // kv_piece(block, layer, 0, kvh) = block * block_stride + the (layer, kvh) offset.
    const T* kbase = pool + kv_piece(0, layer, 0, kvh, num_layers, num_kv_heads) + d8 * 8;
    const u64 block_stride = (u64)num_layers * 2 * num_kv_heads * BLOCK_SIZE * HEAD_DIM;
    auto load_chunk = [&](int chunk, int stage) {
        T* ks = smem + stage * 2 * stage_elems;
        T* vs = ks + stage_elems;
        const int kc = chunk * PF_KEYS;
#pragma unroll
        for (int tok = tok0; tok < PF_KEYS; tok += STEP) {
            const int kpos = kc + tok;
            const bool valid = kpos < kv_len;
            const T* kp = valid ? kbase + table[kpos / BLOCK_SIZE] * block_stride + (kpos % BLOCK_SIZE) * HEAD_DIM : pool;
            cp_async16(&ks[tok * KS_PITCH + d8 * 8], kp, valid);
            cp_async16(&vs[tok * KS_PITCH + d8 * 8], valid ? kp + v_offset : pool, valid);
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };

    load_chunk(0, 0);
    u32 qa[HEAD_DIM / 16][4];
    prefill_load_q(qkv, row0, rows, h, qkv_width, warp, lane, qa);
    const int g = lane >> 2;
    const int qpos_lo = pos0 + warp * 16 + g, qpos_hi = qpos_lo + 8;
    const int warp_first_pos = pos0 + warp * 16;
    const int warp_last_pos = warp_first_pos + 15;
    float m_lo = NEG_INF, m_hi = NEG_INF, l_lo = 0.0f, l_hi = 0.0f;
    float o[HEAD_DIM / 8][4];
#pragma unroll
    for (int nd = 0; nd < HEAD_DIM / 8; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.0f;

    for (int ci = 0; ci < nchunks; ++ci) {
        if (ci + 1 < nchunks) {
            load_chunk(ci + 1, (ci + 1) & 1);
        } else {
            asm volatile("cp.async.commit_group;\n" ::);
        }
        asm volatile("cp.async.wait_group 1;\n" ::);
        __syncthreads();
        const int kc = ci * PF_KEYS;
        if (kc <= warp_last_pos) {  // warp-uniform (see attn_prefill_v2)
            const T* ks = smem + (ci & 1) * 2 * stage_elems;
            if (kc + PF_KEYS - 1 > warp_first_pos) {
                prefill_chunk_v3<true>(ks, ks + stage_elems, kc, qpos_lo, qpos_hi, scale_log2, qa, o, m_lo, m_hi,
                                       l_lo, l_hi, lane);
            } else {
                prefill_chunk_v3<false>(ks, ks + stage_elems, kc, qpos_lo, qpos_hi, scale_log2, qa, o, m_lo, m_hi,
                                        l_lo, l_hi, lane);
            }
        }
        __syncthreads();
    }
    prefill_store(out, row0, rows, h, num_heads, warp, lane, o, l_lo, l_hi);
}

// ------------------------------------------------------------------------------------------------
// v4 prefill attention (default for HEAD_DIM <= 128): FlashAttention-2's work split. A tile is up to
// 128 query rows, 4 warps of 32 rows (two m16 tiles each), so every K/V fragment read from shared
// memory feeds two mma (half the shared-memory traffic per mma of v3) and each warp has two
// independent accumulator chains. Q lives in shared memory (loaded once, with RoPE applied on the
// way: rope_kv_write then skips q), K/V chunks of 64 keys are double-buffered with cp.async.
// grid (num_heads, num_tiles), 128 threads, dynamic shared memory (128 + 2 x 2 x 64) x KS_PITCH x 2 B.
#define PF4_ROWS 128

// LEAN (v5): the scale is folded into the exponent's FMA (max taken on raw scores: the scale is
// positive) and the O rescale is skipped when no row max of the warp moved (common after the
// first chunks).
template <bool MASK, int KEYS, int MT, bool LEAN>
__device__ __forceinline__ void prefill_chunk_v4(const T* sq, const T* ks, const T* vs, int kc, int qpos0,
                                                 float scale_log2, float (&o)[MT][HEAD_DIM / 8][4], float (&m)[MT][2],
                                                 float (&l)[MT][2], int warp, int lane) {
    const int g = lane >> 2, t4 = lane & 3;
    const int mat = lane >> 3, mrow = lane & 7;
    float s[MT][KEYS / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < KEYS / 8; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.0f;
    // A fragments (16 x 16 of Q) by ldmatrix.x4: lane l addresses row (l & 7) + 8 ((l >> 3) & 1), column
    // 8 (l >> 4) of the m-tile.
    const T* qaddr = &sq[(warp * 16 * MT + mrow + (mat & 1) * 8) * KS_PITCH + (mat >> 1) * 8];
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
        u32 qa[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const u32 saddr = (u32)__cvta_generic_to_shared(qaddr + mt * 16 * KS_PITCH + kk * 16);
            asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                         : "=r"(qa[mt][0]), "=r"(qa[mt][1]), "=r"(qa[mt][2]), "=r"(qa[mt][3])
                         : "r"(saddr));
        }
        // B fragments: keys nt*8 .. +7 (rows of K) x dims kk*16 .. +15 by ldmatrix.x2 (lanes 0-15).
#pragma unroll
        for (int nt = 0; nt < KEYS / 8; ++nt) {
            const u32 saddr = (u32)__cvta_generic_to_shared(&ks[(nt * 8 + mrow) * KS_PITCH + kk * 16 + (mat & 1) * 8]);
            u32 b0, b1;
            asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(b0), "=r"(b1) : "r"(saddr));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) mma16816(s[mt][nt], qa[mt], b0, b1);
        }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        const int qlo = qpos0 + warp * 16 * MT + mt * 16 + g, qhi = qlo + 8;
        float mx_lo = NEG_INF, mx_hi = NEG_INF;
#pragma unroll
        for (int nt = 0; nt < KEYS / 8; ++nt) {
            float* x = s[mt][nt];
            if (MASK && LEAN) {
                const int kpos = kc + nt * 8 + t4 * 2;
                x[0] = (kpos <= qlo) ? x[0] : NEG_INF;
                x[1] = (kpos + 1 <= qlo) ? x[1] : NEG_INF;
                x[2] = (kpos <= qhi) ? x[2] : NEG_INF;
                x[3] = (kpos + 1 <= qhi) ? x[3] : NEG_INF;
            } else if (MASK) {
                const int kpos = kc + nt * 8 + t4 * 2;
                x[0] = (kpos <= qlo) ? x[0] * scale_log2 : NEG_INF;
                x[1] = (kpos + 1 <= qlo) ? x[1] * scale_log2 : NEG_INF;
                x[2] = (kpos <= qhi) ? x[2] * scale_log2 : NEG_INF;
                x[3] = (kpos + 1 <= qhi) ? x[3] * scale_log2 : NEG_INF;
            } else if (!LEAN) {
                x[0] *= scale_log2;
                x[1] *= scale_log2;
                x[2] *= scale_log2;
                x[3] *= scale_log2;
            }
            mx_lo = fmaxf(mx_lo, fmaxf(x[0], x[1]));
            mx_hi = fmaxf(mx_hi, fmaxf(x[2], x[3]));
        }
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {
            mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, off));
            mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, off));
        }
        // m is finite after the first chunk (key 0 is visible to every row), see prefill_chunk_v3.
        if (LEAN) {
            mx_lo *= scale_log2;  // -inf stays -inf
            mx_hi *= scale_log2;
        }
        const float nm_lo = fmaxf(m[mt][0], mx_lo), nm_hi = fmaxf(m[mt][1], mx_hi);
        const float a_lo = exp2f(m[mt][0] - nm_lo), a_hi = exp2f(m[mt][1] - nm_hi);
        m[mt][0] = nm_lo;
        m[mt][1] = nm_hi;
        float sum_lo = 0.0f, sum_hi = 0.0f;
#pragma unroll
        for (int nt = 0; nt < KEYS / 8; ++nt) {
            float* x = s[mt][nt];
            if (LEAN) {
                x[0] = exp2f(fmaf(x[0], scale_log2, -nm_lo));
                x[1] = exp2f(fmaf(x[1], scale_log2, -nm_lo));
                x[2] = exp2f(fmaf(x[2], scale_log2, -nm_hi));
                x[3] = exp2f(fmaf(x[3], scale_log2, -nm_hi));
            } else {
                x[0] = exp2f(x[0] - nm_lo);
                x[1] = exp2f(x[1] - nm_lo);
                x[2] = exp2f(x[2] - nm_hi);
                x[3] = exp2f(x[3] - nm_hi);
            }
            sum_lo += x[0] + x[1];
            sum_hi += x[2] + x[3];
        }
        l[mt][0] = l[mt][0] * a_lo + sum_lo;
        l[mt][1] = l[mt][1] * a_hi + sum_hi;
        if (LEAN && !__any_sync(0xffffffffu, a_lo != 1.0f || a_hi != 1.0f)) continue;
#pragma unroll
        for (int nd = 0; nd < HEAD_DIM / 8; ++nd) {
            o[mt][nd][0] *= a_lo;
            o[mt][nd][1] *= a_lo;
            o[mt][nd][2] *= a_hi;
            o[mt][nd][3] *= a_hi;
        }
    }
#pragma unroll
    for (int kk = 0; kk < KEYS / 16; ++kk) {
        u32 pa[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            pa[mt][0] = pack2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
            pa[mt][1] = pack2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
            pa[mt][2] = pack2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
            pa[mt][3] = pack2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
        }
#pragma unroll
        for (int nd = 0; nd < HEAD_DIM / 8; nd += 2) {
            const T* addr = &vs[(kk * 16 + (mat & 1) * 8 + mrow) * KS_PITCH + (nd + (mat >> 1)) * 8];
            const u32 saddr = (u32)__cvta_generic_to_shared(addr);
            u32 b0, b1, b2, b3;
            asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                         : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3)
                         : "r"(saddr));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma16816(o[mt][nd], pa[mt], b0, b1);
                mma16816(o[mt][nd + 1], pa[mt], b2, b3);
            }
        }
    }
}

// MT: m16 tiles per warp (2: v4, 4 warps of 32 rows; 1: v5, 8 warps of 16 rows); the CTA has
// PF4_ROWS / (16 MT) warps.
template <int KEYS, int MT, bool LEAN>
__device__ __forceinline__ void attn_prefill_v4_impl(
        const T* qkv, const T* pool, const u32* block_tables, int table_stride, const int4* tiles, int num_tiles,
        T* out, int layer, float scale, int num_heads, int num_kv_heads, int num_layers, const float* rope) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    pdl_trigger();
    pdl_wait();
    T* sq = reinterpret_cast<T*>(smem_raw);
    T* skv = sq + PF4_ROWS * KS_PITCH;
    const int stage_elems = KEYS * KS_PITCH;
    const int4 tile = tiles[num_tiles - 1 - blockIdx.y];
    const int seq = tile.x, row0 = tile.y, rows = tile.z, pos0 = tile.w;
    const int h = blockIdx.x;
    const int kvh = h / (num_heads / num_kv_heads);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int qkv_width = (num_heads + 2 * num_kv_heads) * HEAD_DIM;
    const u32* table = block_tables + (u64)seq * table_stride;
    const int kv_len = pos0 + rows;
    const int nchunks = (kv_len + KEYS - 1) / KEYS;
    const u64 v_offset = (u64)num_kv_heads * BLOCK_SIZE * HEAD_DIM;
    const float scale_log2 = scale * LOG2E;

    constexpr int D8 = HEAD_DIM / 8;
    constexpr int THREADS = 32 * PF4_ROWS / (16 * MT);
    constexpr int STEP = THREADS / D8;
    const int tok0 = threadIdx.x / D8, d8 = threadIdx.x % D8;
    const T* kbase = pool + kv_piece(0, layer, 0, kvh, num_layers, num_kv_heads) + d8 * 8;
    const u64 block_stride = (u64)num_layers * 2 * num_kv_heads * BLOCK_SIZE * HEAD_DIM;
    auto load_chunk = [&](int chunk, int stage) {
        T* ks = skv + stage * 2 * stage_elems;
        T* vs = ks + stage_elems;
        const int kc = chunk * KEYS;
#pragma unroll
        for (int tok = tok0; tok < KEYS; tok += STEP) {
            const int kpos = kc + tok;
            const bool valid = kpos < kv_len;
            const T* kp = valid ? kbase + table[kpos / BLOCK_SIZE] * block_stride + (kpos % BLOCK_SIZE) * HEAD_DIM : pool;
            cp_async16(&ks[tok * KS_PITCH + d8 * 8], kp, valid);
            cp_async16(&vs[tok * KS_PITCH + d8 * 8], valid ? kp + v_offset : pool, valid);
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };
    load_chunk(0, 0);

    // Q tile into shared memory with RoPE (pairs (i, i + HEAD_DIM/2): 8-element vectors v and
    // v + D8/2); rows past the tile are zeros.
    for (int idx = threadIdx.x; idx < PF4_ROWS * (D8 / 2); idx += blockDim.x) {
        const int r = idx / (D8 / 2), v = idx % (D8 / 2);
        uint4 lo = make_uint4(0, 0, 0, 0), hi = make_uint4(0, 0, 0, 0);
        if (r < rows) {
            const T* qrow = qkv + (u64)(row0 + r) * qkv_width + h * HEAD_DIM;
            const uint4 lraw = *reinterpret_cast<const uint4*>(qrow + v * 8);
            const uint4 hraw = *reinterpret_cast<const uint4*>(qrow + (v + D8 / 2) * 8);
            const T2* l2 = reinterpret_cast<const T2*>(&lraw);
            const T2* h2 = reinterpret_cast<const T2*>(&hraw);
            T2* lo2 = reinterpret_cast<T2*>(&lo);
            T2* hi2 = reinterpret_cast<T2*>(&hi);
            const float* cs = rope + (u64)(pos0 + r) * HEAD_DIM + 2 * (v * 8);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float2 a = to_f2(l2[k]), b = to_f2(h2[k]);
                const float4 c = *reinterpret_cast<const float4*>(cs + 4 * k);  // c_i s_i c_i+1 s_i+1
                lo2[k] = from_f2(a.x * c.x - b.x * c.y, a.y * c.z - b.y * c.w);
                hi2[k] = from_f2(b.x * c.x + a.x * c.y, b.y * c.z + a.y * c.w);
            }
        }
        *reinterpret_cast<uint4*>(&sq[r * KS_PITCH + v * 8]) = lo;
        *reinterpret_cast<uint4*>(&sq[r * KS_PITCH + (v + D8 / 2) * 8]) = hi;
    }

    const int warp_first_pos = pos0 + warp * 16 * MT;
    const int warp_last_pos = warp_first_pos + 16 * MT - 1;
    float m[MT][2], l[MT][2];
    float o[MT][HEAD_DIM / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        m[mt][0] = m[mt][1] = NEG_INF;
        l[mt][0] = l[mt][1] = 0.0f;
#pragma unroll
        for (int nd = 0; nd < HEAD_DIM / 8; ++nd) o[mt][nd][0] = o[mt][nd][1] = o[mt][nd][2] = o[mt][nd][3] = 0.0f;
    }

    for (int ci = 0; ci < nchunks; ++ci) {
        if (ci + 1 < nchunks) {
            load_chunk(ci + 1, (ci + 1) & 1);
        } else {
            asm volatile("cp.async.commit_group;\n" ::);
        }
        asm volatile("cp.async.wait_group 1;\n" ::);
        __syncthreads();  // chunk ci (and, on the first pass, the Q tile) visible to all warps
        const int kc = ci * KEYS;
        if (kc <= warp_last_pos) {  // warp-uniform
            const T* ks = skv + (ci & 1) * 2 * stage_elems;
            if (kc + KEYS - 1 > warp_first_pos) {
                prefill_chunk_v4<true, KEYS, MT, LEAN>(sq, ks, ks + stage_elems, kc, pos0, scale_log2, o, m, l, warp,
                                                       lane);
            } else {
                prefill_chunk_v4<false, KEYS, MT, LEAN>(sq, ks, ks + stage_elems, kc, pos0, scale_log2, o, m, l, warp,
                                                        lane);
            }
        }
        __syncthreads();
    }
    const int g = lane >> 2, t4 = lane & 3;
    const int out_width = num_heads * HEAD_DIM;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        float l_lo = l[mt][0], l_hi = l[mt][1];
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {
            l_lo += __shfl_xor_sync(0xffffffffu, l_lo, off);
            l_hi += __shfl_xor_sync(0xffffffffu, l_hi, off);
        }
        const float inv_lo = l_lo > 0.0f ? 1.0f / l_lo : 0.0f;
        const float inv_hi = l_hi > 0.0f ? 1.0f / l_hi : 0.0f;
        const int r_lo = warp * 16 * MT + mt * 16 + g, r_hi = r_lo + 8;
#pragma unroll
        for (int nd = 0; nd < HEAD_DIM / 8; ++nd) {
            const int c = h * HEAD_DIM + nd * 8 + t4 * 2;
            if (r_lo < rows) {
                *reinterpret_cast<T2*>(out + (u64)(row0 + r_lo) * out_width + c) =
                    from_f2(o[mt][nd][0] * inv_lo, o[mt][nd][1] * inv_lo);
            }
            if (r_hi < rows) {
                *reinterpret_cast<T2*>(out + (u64)(row0 + r_hi) * out_width + c) =
                    from_f2(o[mt][nd][2] * inv_hi, o[mt][nd][3] * inv_hi);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(128) attn_prefill_v4(
        const T* qkv, const T* pool, const u32* block_tables, int table_stride, const int4* tiles, int num_tiles,
        T* out, int layer, float scale, int num_heads, int num_kv_heads, int num_layers, const float* rope) {
    attn_prefill_v4_impl<64, 2, false>(qkv, pool, block_tables, table_stride, tiles, num_tiles, out, layer, scale, num_heads,
                             num_kv_heads, num_layers, rope);
}

extern "C" __global__ void __launch_bounds__(128) attn_prefill_v4k32(
        const T* qkv, const T* pool, const u32* block_tables, int table_stride, const int4* tiles, int num_tiles,
        T* out, int layer, float scale, int num_heads, int num_kv_heads, int num_layers, const float* rope) {
    attn_prefill_v4_impl<32, 2, false>(qkv, pool, block_tables, table_stride, tiles, num_tiles, out, layer, scale, num_heads,
                                num_kv_heads, num_layers, rope);
}

// v5: the v4 tile (128 rows, 64-key chunks) on 8 warps of 16 rows: half the accumulators per thread
// (128 registers), two CTAs of 8 warps per SM (16 warps instead of 8); each K/V fragment feeds one
// mma; lean softmax (see prefill_chunk_v4).
extern "C" __global__ void __launch_bounds__(256, 2) attn_prefill_v5(
        const T* qkv, const T* pool, const u32* block_tables, int table_stride, const int4* tiles, int num_tiles,
        T* out, int layer, float scale, int num_heads, int num_kv_heads, int num_layers, const float* rope) {
    attn_prefill_v4_impl<64, 1, true>(qkv, pool, block_tables, table_stride, tiles, num_tiles, out, layer, scale, num_heads,
                                num_kv_heads, num_layers, rope);
}

// v4 (4 warps of 32 rows) with v5's lean softmax (A/B: DJINN_CUDA_PREFILL_V4_LEAN=1).
extern "C" __global__ void __launch_bounds__(128) attn_prefill_v4lean(
        const T* qkv, const T* pool, const u32* block_tables, int table_stride, const int4* tiles, int num_tiles,
        T* out, int layer, float scale, int num_heads, int num_kv_heads, int num_layers, const float* rope) {
    attn_prefill_v4_impl<64, 2, true>(qkv, pool, block_tables, table_stride, tiles, num_tiles, out, layer, scale,
                                      num_heads, num_kv_heads, num_layers, rope);
}

// v5 with 32-key chunks (A/B: DJINN_CUDA_PREFILL_V5_KEYS32=1).
extern "C" __global__ void __launch_bounds__(256, 2) attn_prefill_v5k32(
        const T* qkv, const T* pool, const u32* block_tables, int table_stride, const int4* tiles, int num_tiles,
        T* out, int layer, float scale, int num_heads, int num_kv_heads, int num_layers, const float* rope) {
    attn_prefill_v4_impl<32, 1, true>(qkv, pool, block_tables, table_stride, tiles, num_tiles, out, layer, scale, num_heads,
                                num_kv_heads, num_layers, rope);
}

// ------------------------------------------------------------------------------------------------
// v6 prefill attention (sm_90a, HEAD_DIM 128): Hopper warpgroup MMA (wgmma). The v4 tile (128 query
// rows) on two warpgroups of 64 rows. K/V chunks of 64 keys are double-buffered with cp.async into
// 128-byte-swizzled shared memory, the layout wgmma reads through matrix descriptors: each operand
// is two 64-dim panels of [row][64 dims] with 128-byte rows whose 16-byte pieces are XOR-permuted
// by (row & 7). S = Q K^T reads Q and K from shared memory (K-major); O += P V takes P from
// registers (the S accumulator layout of a warp is the A-fragment layout, as with mma.sync) and V
// N-major (transposed B). Softmax as v4 (exp2, scale folded into the exponent's FMA).
// grid (num_heads, num_tiles), 256 threads.
#define WG_KEYS 64
#define WG_PANEL_Q (PF4_ROWS * 128)   // bytes of one 64-dim panel of the Q tile
#define WG_PANEL_KV (WG_KEYS * 128)   // bytes of one 64-dim panel of a K or V chunk

__device__ __forceinline__ u32 swz128(int row, int piece) {  // byte offset of a 16-byte piece
    return (u32)(row * 128 + ((piece ^ (row & 7)) << 4));
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && HEAD_DIM == 128
// Shared-memory matrix descriptor: start address, leading / stride byte offsets (16-byte units),
// 128-byte swizzle (mode 1, bits 62-63).
__device__ __forceinline__ u64 wg_desc(u32 saddr, u32 lbo, u32 sbo) {
    return (u64)((saddr & 0x3FFFF) >> 4) | ((u64)((lbo >> 4) & 0x3FFF) << 16) | ((u64)((sbo >> 4) & 0x3FFF) << 32) |
           (1ull << 62);
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit_wait() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
// Keeps the compiler from touching accumulators across the asynchronous MMA.
__device__ __forceinline__ void reg_fence(float& x) { asm volatile("" : "+f"(x)::"memory"); }

__device__ __forceinline__ void wg_qk(float (&s)[32], u64 da, u64 db, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." MMA_TYPE "." MMA_TYPE " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
                 : "+f"(s[0]), "+f"(s[1]), "+f"(s[2]), "+f"(s[3]), "+f"(s[4]), "+f"(s[5]), "+f"(s[6]), "+f"(s[7]), "+f"(s[8]), "+f"(s[9]), "+f"(s[10]), "+f"(s[11]), "+f"(s[12]), "+f"(s[13]), "+f"(s[14]), "+f"(s[15]), "+f"(s[16]), "+f"(s[17]), "+f"(s[18]), "+f"(s[19]), "+f"(s[20]), "+f"(s[21]), "+f"(s[22]), "+f"(s[23]), "+f"(s[24]), "+f"(s[25]), "+f"(s[26]), "+f"(s[27]), "+f"(s[28]), "+f"(s[29]), "+f"(s[30]), "+f"(s[31])
                 : "l"(da), "l"(db), "r"(accumulate));
}
__device__ __forceinline__ void wg_pv(float (&o)[64], const u32 (&a)[4], u64 db, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." MMA_TYPE "." MMA_TYPE " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
                 : "+f"(o[0]), "+f"(o[1]), "+f"(o[2]), "+f"(o[3]), "+f"(o[4]), "+f"(o[5]), "+f"(o[6]), "+f"(o[7]), "+f"(o[8]), "+f"(o[9]), "+f"(o[10]), "+f"(o[11]), "+f"(o[12]), "+f"(o[13]), "+f"(o[14]), "+f"(o[15]), "+f"(o[16]), "+f"(o[17]), "+f"(o[18]), "+f"(o[19]), "+f"(o[20]), "+f"(o[21]), "+f"(o[22]), "+f"(o[23]), "+f"(o[24]), "+f"(o[25]), "+f"(o[26]), "+f"(o[27]), "+f"(o[28]), "+f"(o[29]), "+f"(o[30]), "+f"(o[31]), "+f"(o[32]), "+f"(o[33]), "+f"(o[34]), "+f"(o[35]), "+f"(o[36]), "+f"(o[37]), "+f"(o[38]), "+f"(o[39]), "+f"(o[40]), "+f"(o[41]), "+f"(o[42]), "+f"(o[43]), "+f"(o[44]), "+f"(o[45]), "+f"(o[46]), "+f"(o[47]), "+f"(o[48]), "+f"(o[49]), "+f"(o[50]), "+f"(o[51]), "+f"(o[52]), "+f"(o[53]), "+f"(o[54]), "+f"(o[55]), "+f"(o[56]), "+f"(o[57]), "+f"(o[58]), "+f"(o[59]), "+f"(o[60]), "+f"(o[61]), "+f"(o[62]), "+f"(o[63])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate));
}
#endif

extern "C" __global__ void __launch_bounds__(256, 2) attn_prefill_v6(
        const T* qkv, const T* pool, const u32* block_tables, int table_stride, const int4* tiles, int num_tiles,
        T* out, int layer, float scale, int num_heads, int num_kv_heads, int num_layers, const float* rope) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && HEAD_DIM == 128
    extern __shared__ __align__(16) unsigned char smem_raw[];
    pdl_trigger();
    pdl_wait();
    // 1024-byte aligned base: the swizzle pattern follows address bits 4-9.
    const u32 raw_addr = (u32)__cvta_generic_to_shared(smem_raw);
    unsigned char* base = smem_raw + (((raw_addr + 1023u) & ~1023u) - raw_addr);
    unsigned char* sq = base;                         // 2 panels x 128 rows
    unsigned char* skv = base + 2 * WG_PANEL_Q;       // stages of (K: 2 panels, V: 2 panels)
    constexpr int STAGE = 4 * WG_PANEL_KV;
    const int4 tile = tiles[num_tiles - 1 - blockIdx.y];
    const int seq = tile.x, row0 = tile.y, rows = tile.z, pos0 = tile.w;
    const int h = blockIdx.x;
    const int kvh = h / (num_heads / num_kv_heads);
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int qkv_width = (num_heads + 2 * num_kv_heads) * HEAD_DIM;
    const u32* table = block_tables + (u64)seq * table_stride;
    const int kv_len = pos0 + rows;
    const int nchunks = (kv_len + WG_KEYS - 1) / WG_KEYS;
    const u64 v_offset = (u64)num_kv_heads * BLOCK_SIZE * HEAD_DIM;
    const float scale_log2 = scale * LOG2E;

    // Thread: 16-byte piece `pc` (dims 8 pc .. +7) of keys tok0, tok0 + 16, ... of each chunk.
    const int pc = threadIdx.x & 15, tok0 = threadIdx.x >> 4;
    const T* kbase = pool + kv_piece(0, layer, 0, kvh, num_layers, num_kv_heads) + pc * 8;
    const u64 block_stride = (u64)num_layers * 2 * num_kv_heads * BLOCK_SIZE * HEAD_DIM;
    auto load_chunk = [&](int chunk, int stage) {
        unsigned char* ks = skv + stage * STAGE;
        unsigned char* vs = ks + 2 * WG_PANEL_KV;
        const int kc = chunk * WG_KEYS;
        const u32 panel = (u32)(pc >> 3) * WG_PANEL_KV;
#pragma unroll
        for (int tok = tok0; tok < WG_KEYS; tok += 16) {
            const int kpos = kc + tok;
            const bool valid = kpos < kv_len;
            const T* kp = valid ? kbase + table[kpos / BLOCK_SIZE] * block_stride + (kpos % BLOCK_SIZE) * HEAD_DIM : pool;
            const u32 off = panel + swz128(tok, pc & 7);
            cp_async16(ks + off, kp, valid);
            cp_async16(vs + off, valid ? kp + v_offset : pool, valid);
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };
    load_chunk(0, 0);

    // Q tile with RoPE (pairs (i, i + 64): piece v of panel 0 and piece v of panel 1).
    for (int idx = threadIdx.x; idx < PF4_ROWS * 8; idx += blockDim.x) {
        const int r = idx >> 3, v = idx & 7;
        uint4 lo = make_uint4(0, 0, 0, 0), hi = make_uint4(0, 0, 0, 0);
        if (r < rows) {
            const T* qrow = qkv + (u64)(row0 + r) * qkv_width + h * HEAD_DIM;
            const uint4 lraw = *reinterpret_cast<const uint4*>(qrow + v * 8);
            const uint4 hraw = *reinterpret_cast<const uint4*>(qrow + 64 + v * 8);
            const T2* l2 = reinterpret_cast<const T2*>(&lraw);
            const T2* h2 = reinterpret_cast<const T2*>(&hraw);
            T2* lo2 = reinterpret_cast<T2*>(&lo);
            T2* hi2 = reinterpret_cast<T2*>(&hi);
            const float* cs = rope + (u64)(pos0 + r) * HEAD_DIM + 2 * (v * 8);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float2 a = to_f2(l2[k]), b = to_f2(h2[k]);
                const float4 c = *reinterpret_cast<const float4*>(cs + 4 * k);  // c_i s_i c_i+1 s_i+1
                lo2[k] = from_f2(a.x * c.x - b.x * c.y, a.y * c.z - b.y * c.w);
                hi2[k] = from_f2(b.x * c.x + a.x * c.y, b.y * c.z + a.y * c.w);
            }
        }
        *reinterpret_cast<uint4*>(sq + swz128(r, v)) = lo;
        *reinterpret_cast<uint4*>(sq + WG_PANEL_Q + swz128(r, v)) = hi;
    }

    const int wg_first_pos = pos0 + wg * 64;
    const int wg_last_pos = wg_first_pos + 63;
    const int qlo = wg_first_pos + warp * 16 + g, qhi = qlo + 8;
    float m_lo = NEG_INF, m_hi = NEG_INF, l_lo = 0.0f, l_hi = 0.0f;
    float o[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.0f;
    const u32 sq_addr = (u32)__cvta_generic_to_shared(sq) + wg * 64 * 128;

    for (int ci = 0; ci < nchunks; ++ci) {
        if (ci + 1 < nchunks) {
            load_chunk(ci + 1, (ci + 1) & 1);
        } else {
            asm volatile("cp.async.commit_group;\n" ::);
        }
        asm volatile("cp.async.wait_group 1;\n" ::);
        // Generic-proxy writes (cp.async, st.shared) -> visible to wgmma's async proxy.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        const int kc = ci * WG_KEYS;
        if (kc <= wg_last_pos) {  // warpgroup-uniform
            const u32 ks_addr = (u32)__cvta_generic_to_shared(skv + (ci & 1) * STAGE);
            const u32 vs_addr = ks_addr + 2 * WG_PANEL_KV;
            float s[32];
#pragma unroll
            for (int i = 0; i < 32; ++i) s[i] = 0.0f;
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
                const u32 koff = (u32)(kk & 3) * 32u;  // 16 dims = 32 bytes inside the swizzled row
                const u64 da = wg_desc(sq_addr + (u32)(kk >> 2) * WG_PANEL_Q + koff, 16, 1024);
                const u64 db = wg_desc(ks_addr + (u32)(kk >> 2) * WG_PANEL_KV + koff, 16, 1024);
                wg_qk(s, da, db, kk > 0);
            }
            wg_commit_wait();
#pragma unroll
            for (int i = 0; i < 32; ++i) reg_fence(s[i]);
            const bool mask = kc + WG_KEYS - 1 > wg_first_pos;
            float mx_lo = NEG_INF, mx_hi = NEG_INF;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                float* x = &s[4 * j];
                if (mask) {
                    const int kpos = kc + j * 8 + t4 * 2;
                    x[0] = (kpos <= qlo) ? x[0] : NEG_INF;
                    x[1] = (kpos + 1 <= qlo) ? x[1] : NEG_INF;
                    x[2] = (kpos <= qhi) ? x[2] : NEG_INF;
                    x[3] = (kpos + 1 <= qhi) ? x[3] : NEG_INF;
                }
                mx_lo = fmaxf(mx_lo, fmaxf(x[0], x[1]));
                mx_hi = fmaxf(mx_hi, fmaxf(x[2], x[3]));
            }
#pragma unroll
            for (int off = 1; off <= 2; off <<= 1) {
                mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, off));
                mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, off));
            }
            // Key 0 is visible to every row, so m is finite from the first chunk on.
            const float nm_lo = fmaxf(m_lo, mx_lo * scale_log2), nm_hi = fmaxf(m_hi, mx_hi * scale_log2);
            const float a_lo = exp2f(m_lo - nm_lo), a_hi = exp2f(m_hi - nm_hi);
            m_lo = nm_lo;
            m_hi = nm_hi;
            float sum_lo = 0.0f, sum_hi = 0.0f;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                float* x = &s[4 * j];
                x[0] = exp2f(fmaf(x[0], scale_log2, -nm_lo));
                x[1] = exp2f(fmaf(x[1], scale_log2, -nm_lo));
                x[2] = exp2f(fmaf(x[2], scale_log2, -nm_hi));
                x[3] = exp2f(fmaf(x[3], scale_log2, -nm_hi));
                sum_lo += x[0] + x[1];
                sum_hi += x[2] + x[3];
            }
            l_lo = l_lo * a_lo + sum_lo;
            l_hi = l_hi * a_hi + sum_hi;
#pragma unroll
            for (int j = 0; j < 16; ++j) {
                o[4 * j] *= a_lo;
                o[4 * j + 1] *= a_lo;
                o[4 * j + 2] *= a_hi;
                o[4 * j + 3] *= a_hi;
            }
            u32 pa[4][4];
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                pa[kk][0] = pack2(s[8 * kk], s[8 * kk + 1]);
                pa[kk][1] = pack2(s[8 * kk + 2], s[8 * kk + 3]);
                pa[kk][2] = pack2(s[8 * kk + 4], s[8 * kk + 5]);
                pa[kk][3] = pack2(s[8 * kk + 6], s[8 * kk + 7]);
            }
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                // Keys 16 kk .. +15 (two 8-row groups, SBO 1024 B) x dims 0..127 (two 64-dim
                // panels, LBO = panel size), V N-major.
                const u64 db = wg_desc(vs_addr + (u32)kk * 16u * 128u, WG_PANEL_KV, 1024);
                wg_pv(o, pa[kk], db, 1);
            }
            wg_commit_wait();
#pragma unroll
            for (int i = 0; i < 64; ++i) reg_fence(o[i]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
        l_lo += __shfl_xor_sync(0xffffffffu, l_lo, off);
        l_hi += __shfl_xor_sync(0xffffffffu, l_hi, off);
    }
    const float inv_lo = l_lo > 0.0f ? 1.0f / l_lo : 0.0f;
    const float inv_hi = l_hi > 0.0f ? 1.0f / l_hi : 0.0f;
    const int r_lo = wg * 64 + warp * 16 + g, r_hi = r_lo + 8;
    const int out_width = num_heads * HEAD_DIM;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        const int c = h * HEAD_DIM + j * 8 + t4 * 2;
        if (r_lo < rows) {
            *reinterpret_cast<T2*>(out + (u64)(row0 + r_lo) * out_width + c) =
                from_f2(o[4 * j] * inv_lo, o[4 * j + 1] * inv_lo);
        }
        if (r_hi < rows) {
            *reinterpret_cast<T2*>(out + (u64)(row0 + r_hi) * out_width + c) =
                from_f2(o[4 * j + 2] * inv_hi, o[4 * j + 3] * inv_hi);
        }
    }
#else
    __trap();  // only selected for sm_90a and head_dim 128
#endif
}

// ------------------------------------------------------------------------------------------------
// v7 prefill attention (sm_90a, HEAD_DIM 128), FA3-style (facts from Shah et al. 2024; own code):
// - warp specialisation: warpgroup 0 is the producer (one thread streams K/V chunks of 128 keys
//   with the tensor-memory accelerator, TMA, into a ring of V7_STAGES shared-memory stages; it
//   completes "full" mbarriers by transaction bytes and waits on "empty" mbarriers that the
//   consumers arrive on); it gives up registers (setmaxnreg.dec) to warpgroups 1 and 2, the
//   consumers (64 query rows each of the 128-row tile), which never issue loads but Q's.
// - paged KV through one 5-D tensor map over the pool ([block][layer*2 + K|V][kv head][token]
//   [dim], innermost last): one box = one 16-token block's 64-dim panel (2 KiB), written by the
//   TMA with the 128-byte swizzle that the wgmma descriptors read (same layout as v6). Blocks past
//   the sequence's end are requested at block index `num_blocks` (outside the tensor), which the
//   TMA fills with zeros. Slots past the end inside the last block hold finite values (the pool
//   is zeroed at creation and only ever written with finite K/V), and P is exactly 0 there.
// - intra-warpgroup overlap: S_j = Q K_j^T and O += P_{j-1} V_{j-1} are issued back to back; the
//   softmax of S_j runs while the P V wgmma is in flight (O is rescaled after its wait, P_j is
//   packed only then, so the in-flight wgmma's registers are never touched).
// - optional ping-pong (PINGPONG): named barriers make the two consumer warpgroups take turns
//   issuing their GEMMs, so one's softmax runs under the other's GEMMs.
// grid (num_heads, num_tiles), 384 threads, 1 CTA per SM.
#define V7_KEYS 128
#define V7_PANEL_KV (V7_KEYS * 128)   // bytes of one 64-dim panel of a K or V chunk (16 KiB)
#define V7_Q_BYTES (2 * PF4_ROWS * 128)
#define V7_STAGE_BYTES (4 * V7_PANEL_KV)

// A CUtensorMap (128 bytes, 64-byte aligned), passed by value as a __grid_constant__ parameter.
struct __align__(64) TmaMap {
    unsigned long long words[16];
};

// v7 needs whole 8-row swizzle atoms per block and whole blocks per 128-key chunk.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && HEAD_DIM == 128 && BLOCK_SIZE % 8 == 0 && 128 % BLOCK_SIZE == 0
#define V7_SUPPORTED 1
#else
#define V7_SUPPORTED 0
#endif

#if V7_SUPPORTED
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    u32 done;
    do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done)
                     : "r"(bar), "r"(parity)
                     : "memory");
    } while (!done);
}
__device__ __forceinline__ void tma_load_5d(u32 dst, const TmaMap* map, u32 bar, int c0, int c1, int c2, int c3,
                                            int c4) {
    asm volatile(
        "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6, "
        "%7}], [%2];\n" ::"r"(dst),
        "l"((u64)map), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4)
        : "memory");
}
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void named_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// S (64 x 128 keys) accumulator: 64 floats per thread.
__device__ __forceinline__ void wg_qk128(float (&s)[64], u64 da, u64 db, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." MMA_TYPE "." MMA_TYPE " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : "+f"(s[0]), "+f"(s[1]), "+f"(s[2]), "+f"(s[3]), "+f"(s[4]), "+f"(s[5]), "+f"(s[6]), "+f"(s[7]), "+f"(s[8]), "+f"(s[9]), "+f"(s[10]), "+f"(s[11]), "+f"(s[12]), "+f"(s[13]), "+f"(s[14]), "+f"(s[15]), "+f"(s[16]), "+f"(s[17]), "+f"(s[18]), "+f"(s[19]), "+f"(s[20]), "+f"(s[21]), "+f"(s[22]), "+f"(s[23]), "+f"(s[24]), "+f"(s[25]), "+f"(s[26]), "+f"(s[27]), "+f"(s[28]), "+f"(s[29]), "+f"(s[30]), "+f"(s[31]), "+f"(s[32]), "+f"(s[33]), "+f"(s[34]), "+f"(s[35]), "+f"(s[36]), "+f"(s[37]), "+f"(s[38]), "+f"(s[39]), "+f"(s[40]), "+f"(s[41]), "+f"(s[42]), "+f"(s[43]), "+f"(s[44]), "+f"(s[45]), "+f"(s[46]), "+f"(s[47]), "+f"(s[48]), "+f"(s[49]), "+f"(s[50]), "+f"(s[51]), "+f"(s[52]), "+f"(s[53]), "+f"(s[54]), "+f"(s[55]), "+f"(s[56]), "+f"(s[57]), "+f"(s[58]), "+f"(s[59]), "+f"(s[60]), "+f"(s[61]), "+f"(s[62]), "+f"(s[63])
                 : "l"(da), "l"(db), "r"(accumulate));
}

template <int STAGES, bool PINGPONG>
__device__ __forceinline__ void attn_prefill_v7_impl(const TmaMap* kv_map, const T* qkv, const u32* block_tables,
                                                     int table_stride, const int4* tiles, int num_tiles, T* out,
                                                     int layer, float scale, int num_heads, int num_kv_heads,
                                                     const float* rope, int num_blocks) {
    extern __shared__ __align__(16) unsigned char v7_smem[];
    pdl_trigger();
    // 1024-byte aligned base: the 128-byte swizzle pattern follows address bits 4-9.
    const u32 raw_addr = (u32)__cvta_generic_to_shared(v7_smem);
    const u32 pad = ((raw_addr + 1023u) & ~1023u) - raw_addr;
    unsigned char* sq = v7_smem + pad;
    const u32 sq_base = raw_addr + pad;
    const u32 kv_base = sq_base + V7_Q_BYTES;
    const u32 bar_base = kv_base + STAGES * V7_STAGE_BYTES;
    // full_k[s], full_v[s], empty[s]: 8 bytes each.
    auto full_k = [&](int s) { return bar_base + 8u * (u32)s; };
    auto full_v = [&](int s) { return bar_base + 8u * (u32)(STAGES + s); };
    auto empty = [&](int s) { return bar_base + 8u * (u32)(2 * STAGES + s); };

    if (threadIdx.x == 0) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(full_k(s), 1);
            mbar_init(full_v(s), 1);
            mbar_init(empty(s), 8);  // one arrival per consumer warp
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    pdl_wait();
    const int4 tile = tiles[num_tiles - 1 - blockIdx.y];
    const int seq = tile.x, row0 = tile.y, rows = tile.z, pos0 = tile.w;
    const int h = blockIdx.x;
    const int kv_len = pos0 + rows;
    const int nchunks = (kv_len + V7_KEYS - 1) / V7_KEYS;
    const int wg = threadIdx.x >> 7;

    if (wg == 0) {
        // ---- producer
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        if (threadIdx.x == 0) {
            const int kvh = h / (num_heads / num_kv_heads);
            const u32* table = block_tables + (u64)seq * table_stride;
            constexpr int BLOCKS = V7_KEYS / BLOCK_SIZE;
            constexpr u32 BOX_BYTES = BLOCK_SIZE * 128;
            for (int c = 0; c < nchunks; ++c) {
                const int s = c % STAGES;
                if (c >= STAGES) mbar_wait(empty(s), (u32)((c / STAGES - 1) & 1));
                int phys[BLOCKS];
#pragma unroll
                for (int b = 0; b < BLOCKS; ++b) {
                    const int blk = c * BLOCKS + b;
                    phys[b] = blk * BLOCK_SIZE < kv_len ? (int)table[blk] : num_blocks;  // past the end: zeros
                }
                const u32 ks = kv_base + (u32)s * V7_STAGE_BYTES, vs = ks + 2 * V7_PANEL_KV;
                mbar_expect_tx(full_k(s), 2 * V7_PANEL_KV);
#pragma unroll
                for (int b = 0; b < BLOCKS; ++b) {
                    tma_load_5d(ks + b * BOX_BYTES, kv_map, full_k(s), 0, 0, kvh, 2 * layer, phys[b]);
                    tma_load_5d(ks + V7_PANEL_KV + b * BOX_BYTES, kv_map, full_k(s), 64, 0, kvh, 2 * layer, phys[b]);
                }
                mbar_expect_tx(full_v(s), 2 * V7_PANEL_KV);
#pragma unroll
                for (int b = 0; b < BLOCKS; ++b) {
                    tma_load_5d(vs + b * BOX_BYTES, kv_map, full_v(s), 0, 0, kvh, 2 * layer + 1, phys[b]);
                    tma_load_5d(vs + V7_PANEL_KV + b * BOX_BYTES, kv_map, full_v(s), 64, 0, kvh, 2 * layer + 1,
                                phys[b]);
                }
            }
        }
        return;
    }

    // ---- consumers: warpgroup cw = 0, 1 owns tile rows 64 cw .. 64 cw + 63
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
    const int cw = wg - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int qkv_width = (num_heads + 2 * num_kv_heads) * HEAD_DIM;
    const float scale_log2 = scale * LOG2E;

    // Q rows with RoPE (pairs (i, i + 64): piece v of panel 0 and piece v of panel 1), as v6.
    for (int idx = threadIdx.x & 127; idx < 64 * 8; idx += 128) {
        const int r = 64 * cw + (idx >> 3), v = idx & 7;
        uint4 lo = make_uint4(0, 0, 0, 0), hi = make_uint4(0, 0, 0, 0);
        if (r < rows) {
            const T* qrow = qkv + (u64)(row0 + r) * qkv_width + h * HEAD_DIM;
            const uint4 lraw = *reinterpret_cast<const uint4*>(qrow + v * 8);
            const uint4 hraw = *reinterpret_cast<const uint4*>(qrow + 64 + v * 8);
            const T2* l2 = reinterpret_cast<const T2*>(&lraw);
            const T2* h2 = reinterpret_cast<const T2*>(&hraw);
            T2* lo2 = reinterpret_cast<T2*>(&lo);
            T2* hi2 = reinterpret_cast<T2*>(&hi);
            const float* cs = rope + (u64)(pos0 + r) * HEAD_DIM + 2 * (v * 8);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float2 a = to_f2(l2[k]), b = to_f2(h2[k]);
                const float4 c = *reinterpret_cast<const float4*>(cs + 4 * k);  // c_i s_i c_i+1 s_i+1
                lo2[k] = from_f2(a.x * c.x - b.x * c.y, a.y * c.z - b.y * c.w);
                hi2[k] = from_f2(b.x * c.x + a.x * c.y, b.y * c.z + a.y * c.w);
            }
        }
        *reinterpret_cast<uint4*>(sq + swz128(r, v)) = lo;
        *reinterpret_cast<uint4*>(sq + WG_PANEL_Q + swz128(r, v)) = hi;
    }
    // Generic-proxy stores -> visible to wgmma (async proxy); only this warpgroup reads its rows.
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    named_sync(1 + cw, 128);

    const int wg_first_pos = pos0 + cw * 64;
    const int wg_last_pos = min(wg_first_pos + 63, kv_len - 1);
    const int my_chunks = wg_last_pos / V7_KEYS + 1;  // the other warpgroup may need one more
    const int qlo = wg_first_pos + warp * 16 + g, qhi = qlo + 8;
    const u32 sq_addr = sq_base + (u32)cw * 64u * 128u;

    float m_lo = NEG_INF, m_hi = NEG_INF, l_lo = 0.0f, l_hi = 0.0f;
    float o[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.0f;
    float s[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) s[i] = 0.0f;
    u32 pa[8][4];

    auto issue_qk = [&](int c) {
        const u32 ks = kv_base + (u32)(c % STAGES) * V7_STAGE_BYTES;
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
            const u32 koff = (u32)(kk & 3) * 32u;  // 16 dims = 32 bytes inside the swizzled row
            const u64 da = wg_desc(sq_addr + (u32)(kk >> 2) * WG_PANEL_Q + koff, 16, 1024);
            const u64 db = wg_desc(ks + (u32)(kk >> 2) * V7_PANEL_KV + koff, 16, 1024);
            wg_qk128(s, da, db, kk > 0);
        }
    };
    auto issue_pv = [&](int c) {
        const u32 vs = kv_base + (u32)(c % STAGES) * V7_STAGE_BYTES + 2 * V7_PANEL_KV;
#pragma unroll
        for (int kk = 0; kk < V7_KEYS / 16; ++kk) {
            // Keys 16 kk .. +15 (two 8-row groups, SBO 1024 B) x dims 0..127 (two 64-dim panels,
            // LBO = panel size), V N-major.
            const u64 db = wg_desc(vs + (u32)kk * 16u * 128u, V7_PANEL_KV, 1024);
            wg_pv(o, pa[kk], db, 1);
        }
    };
    // Softmax of chunk c on s, in place (fp32 probabilities); returns the O rescale factors.
    auto softmax = [&](int c, float& a_lo, float& a_hi) {
        const int kc = c * V7_KEYS;
        const bool mask = kc + V7_KEYS - 1 > wg_first_pos;  // warpgroup-uniform
        float mx_lo = NEG_INF, mx_hi = NEG_INF;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            float* x = &s[4 * j];
            if (mask) {
                const int kpos = kc + j * 8 + t4 * 2;
                x[0] = (kpos <= qlo) ? x[0] : NEG_INF;
                x[1] = (kpos + 1 <= qlo) ? x[1] : NEG_INF;
                x[2] = (kpos <= qhi) ? x[2] : NEG_INF;
                x[3] = (kpos + 1 <= qhi) ? x[3] : NEG_INF;
            }
            mx_lo = fmaxf(mx_lo, fmaxf(x[0], x[1]));
            mx_hi = fmaxf(mx_hi, fmaxf(x[2], x[3]));
        }
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {
            mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, off));
            mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, off));
        }
        // Key 0 is visible to every row, so m is finite from the first chunk on.
        const float nm_lo = fmaxf(m_lo, mx_lo * scale_log2), nm_hi = fmaxf(m_hi, mx_hi * scale_log2);
        a_lo = exp2f(m_lo - nm_lo);
        a_hi = exp2f(m_hi - nm_hi);
        m_lo = nm_lo;
        m_hi = nm_hi;
        float sum_lo = 0.0f, sum_hi = 0.0f;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            float* x = &s[4 * j];
            x[0] = exp2f(fmaf(x[0], scale_log2, -nm_lo));
            x[1] = exp2f(fmaf(x[1], scale_log2, -nm_lo));
            x[2] = exp2f(fmaf(x[2], scale_log2, -nm_hi));
            x[3] = exp2f(fmaf(x[3], scale_log2, -nm_hi));
            sum_lo += x[0] + x[1];
            sum_hi += x[2] + x[3];
        }
        l_lo = l_lo * a_lo + sum_lo;
        l_hi = l_hi * a_hi + sum_hi;
    };
    auto pack_p = [&]() {
#pragma unroll
        for (int kk = 0; kk < 8; ++kk) {
            pa[kk][0] = pack2(s[8 * kk], s[8 * kk + 1]);
            pa[kk][1] = pack2(s[8 * kk + 2], s[8 * kk + 3]);
            pa[kk][2] = pack2(s[8 * kk + 4], s[8 * kk + 5]);
            pa[kk][3] = pack2(s[8 * kk + 6], s[8 * kk + 7]);
        }
    };
    auto fence_s = [&]() {
#pragma unroll
        for (int i = 0; i < 64; ++i) reg_fence(s[i]);
    };
    auto fence_o = [&]() {
#pragma unroll
        for (int i = 0; i < 64; ++i) reg_fence(o[i]);
    };
    // Ping-pong: warpgroup cw issues its GEMMs after the other one has issued its own (named
    // barriers 3 and 4, 256 threads: 128 sync + 128 arrive). Both warpgroups pass the same number
    // of turns (max of their chunk counts + 1), so every arrive has its sync.
    const int turns = nchunks + 1;
    auto gemm_turn_begin = [&]() {
        if (PINGPONG) named_sync(3 + cw, 256);
    };
    auto gemm_turn_end = [&]() {
        if (PINGPONG) named_arrive(3 + (1 - cw), 256);
    };
    if (PINGPONG && cw == 1) named_arrive(3, 256);  // warpgroup 0 goes first

    // Chunk 0: S, softmax, P.
    mbar_wait(full_k(0), 0);
    gemm_turn_begin();
    fence_s();
    wg_fence();
    issue_qk(0);
    wg_commit();
    gemm_turn_end();
    wg_wait<0>();
    fence_s();
    {
        float a_lo, a_hi;
        softmax(0, a_lo, a_hi);  // o is still zero: no rescale
    }
    pack_p();
    for (int c = 1; c < my_chunks; ++c) {
        mbar_wait(full_k(c % STAGES), (u32)((c / STAGES) & 1));
        gemm_turn_begin();
        fence_s();
        fence_o();
        wg_fence();
        issue_qk(c);
        wg_commit();
        mbar_wait(full_v((c - 1) % STAGES), (u32)(((c - 1) / STAGES) & 1));
        issue_pv(c - 1);
        wg_commit();
        gemm_turn_end();
        wg_wait<1>();  // S_c is ready; P_{c-1} V_{c-1} may still run
        fence_s();
        float a_lo, a_hi;
        softmax(c, a_lo, a_hi);
        fence_s();
        reg_fence(a_lo);
        reg_fence(a_hi);
        // An mbarrier wait (a spin loop, so a basic-block boundary) sits between the softmax and
        // the wgmma wait on purpose: ptxas hoists WARPGROUP.DEPBAR to the top of its basic block,
        // so in one block with the softmax the exp2s ran after P V had completed (no overlap;
        // seen in the SASS). With 3+ stages it is the next chunk's K. With 2 stages that K goes
        // into the stage that chunk c - 1 still holds until the release below, so waiting on it
        // here deadlocked (H100, A7 call 1); chunk c's V (loaded with its K, needed next) is safe
        // for any stage count.
        if constexpr (STAGES >= 3) {
            if (c + 1 < my_chunks) mbar_wait(full_k((c + 1) % STAGES), (u32)(((c + 1) / STAGES) & 1));
        } else {
            mbar_wait(full_v(c % STAGES), (u32)((c / STAGES) & 1));
        }
        wg_wait<0>();
        fence_o();
        if (lane == 0) mbar_arrive(empty((c - 1) % STAGES));
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            o[4 * j] *= a_lo;
            o[4 * j + 1] *= a_lo;
            o[4 * j + 2] *= a_hi;
            o[4 * j + 3] *= a_hi;
        }
        pack_p();
    }
    {
        const int c = my_chunks - 1;
        mbar_wait(full_v(c % STAGES), (u32)((c / STAGES) & 1));
        gemm_turn_begin();
        fence_o();
        wg_fence();
        issue_pv(c);
        wg_commit();
        gemm_turn_end();
        wg_wait<0>();
        fence_o();
    }
    if (PINGPONG) {
        // A warpgroup that needed one chunk fewer than the other passes its missing turn empty;
        // warpgroup 0 then takes warpgroup 1's last arrive (warpgroup 1 arrived once up front).
        for (int t = my_chunks + 1; t < turns; ++t) {
            named_sync(3 + cw, 256);
            named_arrive(3 + (1 - cw), 256);
        }
        if (cw == 0) named_sync(3, 256);
    }
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
        l_lo += __shfl_xor_sync(0xffffffffu, l_lo, off);
        l_hi += __shfl_xor_sync(0xffffffffu, l_hi, off);
    }
    const float inv_lo = l_lo > 0.0f ? 1.0f / l_lo : 0.0f;
    const float inv_hi = l_hi > 0.0f ? 1.0f / l_hi : 0.0f;
    const int r_lo = cw * 64 + warp * 16 + g, r_hi = r_lo + 8;
    const int out_width = num_heads * HEAD_DIM;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        const int col = h * HEAD_DIM + j * 8 + t4 * 2;
        if (r_lo < rows) {
            *reinterpret_cast<T2*>(out + (u64)(row0 + r_lo) * out_width + col) =
                from_f2(o[4 * j] * inv_lo, o[4 * j + 1] * inv_lo);
        }
        if (r_hi < rows) {
            *reinterpret_cast<T2*>(out + (u64)(row0 + r_hi) * out_width + col) =
                from_f2(o[4 * j + 2] * inv_hi, o[4 * j + 3] * inv_hi);
        }
    }
}
#endif

#define V7_KERNEL(NAME, STAGES, PINGPONG)                                                                           \
    extern "C" __global__ void __launch_bounds__(384, 1)                                                          \
        NAME(const __grid_constant__ TmaMap kv_map, const T* qkv, const u32* block_tables, int table_stride,       \
             const int4* tiles, int num_tiles, T* out, int layer, float scale, int num_heads, int num_kv_heads,    \
             const float* rope, int num_blocks) {                                                                 \
        V7_BODY(STAGES, PINGPONG)                                                                                 \
    }
#if V7_SUPPORTED
#define V7_BODY(STAGES, PINGPONG)                                                                                 \
    attn_prefill_v7_impl<STAGES, PINGPONG>(&kv_map, qkv, block_tables, table_stride, tiles, num_tiles, out, layer, \
                                           scale, num_heads, num_kv_heads, rope, num_blocks);
#else
#define V7_BODY(STAGES, PINGPONG) __trap();  // only selected for sm_90a and head_dim 128
#endif
V7_KERNEL(attn_prefill_v7, 2, false)
V7_KERNEL(attn_prefill_v7s3, 3, false)
V7_KERNEL(attn_prefill_v7pp, 2, true)
V7_KERNEL(attn_prefill_v7s3pp, 3, true)

#if V7_SUPPORTED
// ---- v7 persistent (session 5): one CTA per SM walks a list of (tile, head) work items.
// Items are numbered longest first (the host sorts the tiles by KV length, ascending, so rank r is
// tile num_tiles - 1 - r; heads of one tile are adjacent, so GQA heads sharing a KV head run side
// by side); CTA b takes item b of round 0, G - 1 - b of round 1, and so on (a snake over the
// rounds, which balances the causal triangle as well as the hardware's dynamic order did in a
// simulation of 2048 / 4096 tokens). What persistence buys: the producer streams K/V chunks across
// items without a break (the next item's first chunks land under the current item's last ones),
// each consumer warpgroup loads the next item's Q rows (with RoPE) while its last P V runs, and
// the CTA start-up (barrier init, register reallocation) is paid once per SM, not once per item.
struct V7Item {
    int seq, row0, rows, pos0, h, nchunks;
};
__device__ __forceinline__ int v7p_item_index(int k, int num_items) {
    const int G = (int)gridDim.x, b = (int)blockIdx.x;
    const int j = k * G + ((k & 1) ? G - 1 - b : b);  // increasing in k for every b
    return j < num_items ? j : -1;
}
__device__ __forceinline__ V7Item v7p_item(int j, const int4* tiles, int num_tiles, int num_heads) {
    const int4 t = tiles[num_tiles - 1 - j / num_heads];
    V7Item it;
    it.seq = t.x;
    it.row0 = t.y;
    it.rows = t.z;
    it.pos0 = t.w;
    it.h = j % num_heads;
    it.nchunks = (t.w + t.z + V7_KEYS - 1) / V7_KEYS;
    return it;
}

// One consumer warpgroup's 64 Q rows of an item (rows 64 cw .. 64 cw + 63 of its tile), RoPE
// applied, into the swizzled Q buffer, as v6/v7. Generic-proxy stores: the caller fences them for
// wgmma and syncs the warpgroup.
__device__ __forceinline__ void v7p_load_q(unsigned char* sq, const T* qkv, const float* rope, const V7Item& it,
                                           int cw, int qkv_width) {
#pragma unroll 2
    for (int idx = threadIdx.x & 127; idx < 64 * 8; idx += 128) {
        const int r = 64 * cw + (idx >> 3), v = idx & 7;
        uint4 lo = make_uint4(0, 0, 0, 0), hi = make_uint4(0, 0, 0, 0);
        if (r < it.rows) {
            const T* qrow = qkv + (u64)(it.row0 + r) * qkv_width + it.h * HEAD_DIM;
            const uint4 lraw = *reinterpret_cast<const uint4*>(qrow + v * 8);
            const uint4 hraw = *reinterpret_cast<const uint4*>(qrow + 64 + v * 8);
            const T2* l2 = reinterpret_cast<const T2*>(&lraw);
            const T2* h2 = reinterpret_cast<const T2*>(&hraw);
            T2* lo2 = reinterpret_cast<T2*>(&lo);
            T2* hi2 = reinterpret_cast<T2*>(&hi);
            const float* cs = rope + (u64)(it.pos0 + r) * HEAD_DIM + 2 * (v * 8);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float2 a = to_f2(l2[k]), b = to_f2(h2[k]);
                const float4 c = *reinterpret_cast<const float4*>(cs + 4 * k);  // c_i s_i c_i+1 s_i+1
                lo2[k] = from_f2(a.x * c.x - b.x * c.y, a.y * c.z - b.y * c.w);
                hi2[k] = from_f2(b.x * c.x + a.x * c.y, b.y * c.z + a.y * c.w);
            }
        }
        *reinterpret_cast<uint4*>(sq + swz128(r, v)) = lo;
        *reinterpret_cast<uint4*>(sq + WG_PANEL_Q + swz128(r, v)) = hi;
    }
}

#ifndef V7_TRACE
#define V7_TRACE 0
#endif
#ifndef V7_DIAG
#define V7_DIAG 0
#endif
#if V7_TRACE
// DJINN_CUDA_ATTN_TRACE=1 (a diagnostic build): every consumer warpgroup of attn_prefill_v7p sums
// SM clock cycles per phase over its items into v7_trace_buf (layer 0); attn_v7_trace_dump prints
// them (a printf in the wgmma kernel itself would make ptxas serialise its wgmma, C7510).
#define V7_TRACE_SLOTS 1024
#define V7_TRACE_FIELDS 9
__device__ long long v7_trace_buf[V7_TRACE_SLOTS * V7_TRACE_FIELDS];
__device__ __forceinline__ u64 v7_gtime() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
#endif

// LEAN: the softmax with the row max / row sum over 4 independent partials each (dependency chains
// of 4-8 instead of 32); otherwise the softmax of attn_prefill_v7_impl. (One mask branch around the
// whole chunk instead of one per 8 keys made ptxas serialise the wgmma, C7519.)
template <int STAGES, bool LEAN>
__device__ __forceinline__ void attn_prefill_v7p_impl(const TmaMap* kv_map, const T* qkv, const u32* block_tables,
                                                      int table_stride, const int4* tiles, int num_tiles, T* out,
                                                      int layer, float scale, int num_heads, int num_kv_heads,
                                                      const float* rope, int num_blocks) {
    extern __shared__ __align__(16) unsigned char v7_smem[];
#if V7_TRACE
    const u64 tr_gstart = v7_gtime();
    const long long tr_cstart = clock64();
#endif
    pdl_trigger();
    const u32 raw_addr = (u32)__cvta_generic_to_shared(v7_smem);
    const u32 pad = ((raw_addr + 1023u) & ~1023u) - raw_addr;
    unsigned char* sq = v7_smem + pad;
    const u32 sq_base = raw_addr + pad;
    const u32 kv_base = sq_base + V7_Q_BYTES;
    const u32 bar_base = kv_base + STAGES * V7_STAGE_BYTES;
    auto full_k = [&](int s) { return bar_base + 8u * (u32)s; };
    auto full_v = [&](int s) { return bar_base + 8u * (u32)(STAGES + s); };
    auto empty = [&](int s) { return bar_base + 8u * (u32)(2 * STAGES + s); };

    if (threadIdx.x == 0) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(full_k(s), 1);
            mbar_init(full_v(s), 1);
            mbar_init(empty(s), 8);  // one arrival per consumer warp
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    pdl_wait();
#if V7_TRACE
    const long long tr_cready = clock64();
    long long tr_wait_k0 = 0, tr_loop = 0, tr_tail = 0;
    int tr_items = 0, tr_chunks = 0;
#endif
    const int num_items = num_tiles * num_heads;
    const int wg = threadIdx.x >> 7;
    // Chunks are numbered across this CTA's items (g): stage g % STAGES, phase (g / STAGES) & 1.

    if (wg == 0) {
        // ---- producer
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        if (threadIdx.x == 0) {
            constexpr int BLOCKS = V7_KEYS / BLOCK_SIZE;
            constexpr u32 BOX_BYTES = BLOCK_SIZE * 128;
            int g = 0;
            for (int k = 0;; ++k) {
                const int j = v7p_item_index(k, num_items);
                if (j < 0) break;
                const V7Item it = v7p_item(j, tiles, num_tiles, num_heads);
                const int kvh = it.h / (num_heads / num_kv_heads);
                const int kv_len = it.pos0 + it.rows;
                const u32* table = block_tables + (u64)it.seq * table_stride;
                for (int c = 0; c < it.nchunks; ++c, ++g) {
                    const int s = g % STAGES;
                    // Block-table reads first: their latency overlaps the wait for a free stage.
                    int phys[BLOCKS];
#pragma unroll
                    for (int b = 0; b < BLOCKS; ++b) {
                        const int blk = c * BLOCKS + b;
                        phys[b] = blk * BLOCK_SIZE < kv_len ? (int)table[blk] : num_blocks;  // past the end: zeros
                    }
                    if (g >= STAGES) mbar_wait(empty(s), (u32)((g / STAGES - 1) & 1));
                    const u32 ks = kv_base + (u32)s * V7_STAGE_BYTES, vs = ks + 2 * V7_PANEL_KV;
                    mbar_expect_tx(full_k(s), 2 * V7_PANEL_KV);
#pragma unroll
                    for (int b = 0; b < BLOCKS; ++b) {
                        tma_load_5d(ks + b * BOX_BYTES, kv_map, full_k(s), 0, 0, kvh, 2 * layer, phys[b]);
                        tma_load_5d(ks + V7_PANEL_KV + b * BOX_BYTES, kv_map, full_k(s), 64, 0, kvh, 2 * layer,
                                    phys[b]);
                    }
                    mbar_expect_tx(full_v(s), 2 * V7_PANEL_KV);
#pragma unroll
                    for (int b = 0; b < BLOCKS; ++b) {
                        tma_load_5d(vs + b * BOX_BYTES, kv_map, full_v(s), 0, 0, kvh, 2 * layer + 1, phys[b]);
                        tma_load_5d(vs + V7_PANEL_KV + b * BOX_BYTES, kv_map, full_v(s), 64, 0, kvh, 2 * layer + 1,
                                    phys[b]);
                    }
                }
            }
        }
        return;
    }

    // ---- consumers: warpgroup cw = 0, 1 owns rows 64 cw .. 64 cw + 63 of every item's tile
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
    const int cw = wg - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int g4 = lane >> 2, t4 = lane & 3;
    const int qkv_width = (num_heads + 2 * num_kv_heads) * HEAD_DIM;
    const int out_width = num_heads * HEAD_DIM;
    const float scale_log2 = scale * LOG2E;
    const u32 sq_addr = sq_base + (u32)cw * 64u * 128u;

    int j = v7p_item_index(0, num_items);
    if (j < 0) return;
    V7Item it = v7p_item(j, tiles, num_tiles, num_heads);
    v7p_load_q(sq, qkv, rope, it, cw, qkv_width);
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    named_sync(1 + cw, 128);

    float o[64];
    float s[64];
    u32 pa[8][4];
    int g0 = 0;  // global number of the item's chunk 0
    for (int k = 0;; ++k) {
        const int kv_len = it.pos0 + it.rows;
        const int wg_first_pos = it.pos0 + cw * 64;
        const int wg_last_pos = min(wg_first_pos + 63, kv_len - 1);
        const int my_chunks = wg_last_pos / V7_KEYS + 1;  // the other warpgroup may need one more
        const int qlo = wg_first_pos + warp * 16 + g4, qhi = qlo + 8;
        float m_lo = NEG_INF, m_hi = NEG_INF, l_lo = 0.0f, l_hi = 0.0f;
#pragma unroll
        for (int i = 0; i < 64; ++i) o[i] = 0.0f;
#pragma unroll
        for (int i = 0; i < 64; ++i) s[i] = 0.0f;

        auto stage_of = [&](int c) { return (g0 + c) % STAGES; };
        auto phase_of = [&](int c) { return (u32)(((g0 + c) / STAGES) & 1); };
        auto issue_qk = [&](int c) {
            const u32 ks = kv_base + (u32)stage_of(c) * V7_STAGE_BYTES;
#pragma unroll
            for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
                const u32 koff = (u32)(kk & 3) * 32u;
                const u64 da = wg_desc(sq_addr + (u32)(kk >> 2) * WG_PANEL_Q + koff, 16, 1024);
                const u64 db = wg_desc(ks + (u32)(kk >> 2) * V7_PANEL_KV + koff, 16, 1024);
                wg_qk128(s, da, db, kk > 0);
            }
        };
        auto issue_pv = [&](int c) {
            const u32 vs = kv_base + (u32)stage_of(c) * V7_STAGE_BYTES + 2 * V7_PANEL_KV;
#pragma unroll
            for (int kk = 0; kk < V7_KEYS / 16; ++kk) {
                const u64 db = wg_desc(vs + (u32)kk * 16u * 128u, V7_PANEL_KV, 1024);
                wg_pv(o, pa[kk], db, 1);
            }
        };
        auto softmax_lean = [&](int c, float& a_lo, float& a_hi) {
            const int kc = c * V7_KEYS;
            const bool mask = kc + V7_KEYS - 1 > wg_first_pos;  // warpgroup-uniform: the diagonal chunk
            float pm_lo[4] = {NEG_INF, NEG_INF, NEG_INF, NEG_INF}, pm_hi[4] = {NEG_INF, NEG_INF, NEG_INF, NEG_INF};
#pragma unroll
            for (int jj = 0; jj < 16; ++jj) {
                float* x = &s[4 * jj];
                if (mask) {
                    const int kpos = kc + jj * 8 + t4 * 2;
                    x[0] = (kpos <= qlo) ? x[0] : NEG_INF;
                    x[1] = (kpos + 1 <= qlo) ? x[1] : NEG_INF;
                    x[2] = (kpos <= qhi) ? x[2] : NEG_INF;
                    x[3] = (kpos + 1 <= qhi) ? x[3] : NEG_INF;
                }
                pm_lo[jj & 3] = fmaxf(pm_lo[jj & 3], fmaxf(x[0], x[1]));
                pm_hi[jj & 3] = fmaxf(pm_hi[jj & 3], fmaxf(x[2], x[3]));
            }
            float mx_lo = fmaxf(fmaxf(pm_lo[0], pm_lo[1]), fmaxf(pm_lo[2], pm_lo[3]));
            float mx_hi = fmaxf(fmaxf(pm_hi[0], pm_hi[1]), fmaxf(pm_hi[2], pm_hi[3]));
#pragma unroll
            for (int off = 1; off <= 2; off <<= 1) {
                mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, off));
                mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, off));
            }
            const float nm_lo = fmaxf(m_lo, mx_lo * scale_log2), nm_hi = fmaxf(m_hi, mx_hi * scale_log2);
            a_lo = exp2f(m_lo - nm_lo);
            a_hi = exp2f(m_hi - nm_hi);
            m_lo = nm_lo;
            m_hi = nm_hi;
            float ps_lo[4] = {0.0f, 0.0f, 0.0f, 0.0f}, ps_hi[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int jj = 0; jj < 16; ++jj) {
                float* x = &s[4 * jj];
                x[0] = exp2f(fmaf(x[0], scale_log2, -nm_lo));
                x[1] = exp2f(fmaf(x[1], scale_log2, -nm_lo));
                x[2] = exp2f(fmaf(x[2], scale_log2, -nm_hi));
                x[3] = exp2f(fmaf(x[3], scale_log2, -nm_hi));
                ps_lo[jj & 3] += x[0] + x[1];
                ps_hi[jj & 3] += x[2] + x[3];
            }
            l_lo = l_lo * a_lo + ((ps_lo[0] + ps_lo[1]) + (ps_lo[2] + ps_lo[3]));
            l_hi = l_hi * a_hi + ((ps_hi[0] + ps_hi[1]) + (ps_hi[2] + ps_hi[3]));
        };
        auto softmax_plain = [&](int c, float& a_lo, float& a_hi) {
            const int kc = c * V7_KEYS;
            const bool mask = kc + V7_KEYS - 1 > wg_first_pos;  // warpgroup-uniform
            float mx_lo = NEG_INF, mx_hi = NEG_INF;
#pragma unroll
            for (int jj = 0; jj < 16; ++jj) {
                float* x = &s[4 * jj];
                if (mask) {
                    const int kpos = kc + jj * 8 + t4 * 2;
                    x[0] = (kpos <= qlo) ? x[0] : NEG_INF;
                    x[1] = (kpos + 1 <= qlo) ? x[1] : NEG_INF;
                    x[2] = (kpos <= qhi) ? x[2] : NEG_INF;
                    x[3] = (kpos + 1 <= qhi) ? x[3] : NEG_INF;
                }
                mx_lo = fmaxf(mx_lo, fmaxf(x[0], x[1]));
                mx_hi = fmaxf(mx_hi, fmaxf(x[2], x[3]));
            }
#pragma unroll
            for (int off = 1; off <= 2; off <<= 1) {
                mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, off));
                mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, off));
            }
            const float nm_lo = fmaxf(m_lo, mx_lo * scale_log2), nm_hi = fmaxf(m_hi, mx_hi * scale_log2);
            a_lo = exp2f(m_lo - nm_lo);
            a_hi = exp2f(m_hi - nm_hi);
            m_lo = nm_lo;
            m_hi = nm_hi;
            float sum_lo = 0.0f, sum_hi = 0.0f;
#pragma unroll
            for (int jj = 0; jj < 16; ++jj) {
                float* x = &s[4 * jj];
                x[0] = exp2f(fmaf(x[0], scale_log2, -nm_lo));
                x[1] = exp2f(fmaf(x[1], scale_log2, -nm_lo));
                x[2] = exp2f(fmaf(x[2], scale_log2, -nm_hi));
                x[3] = exp2f(fmaf(x[3], scale_log2, -nm_hi));
                sum_lo += x[0] + x[1];
                sum_hi += x[2] + x[3];
            }
            l_lo = l_lo * a_lo + sum_lo;
            l_hi = l_hi * a_hi + sum_hi;
        };
        auto softmax = [&](int c, float& a_lo, float& a_hi) {
#if V7_DIAG
            // Diagnostic (DJINN_CUDA_ATTN_DIAG=1, wrong results by design): no softmax, P = 0, so
            // the trace shows the loop rate of the GEMMs and the synchronisation alone.
            a_lo = 1.0f;
            a_hi = 1.0f;
            l_lo = 1.0f;
            l_hi = 1.0f;
#pragma unroll
            for (int i = 0; i < 64; ++i) s[i] = 0.0f;
            return;
#endif
            if constexpr (LEAN) {
                softmax_lean(c, a_lo, a_hi);
            } else {
                softmax_plain(c, a_lo, a_hi);
            }
        };
        auto pack_p = [&]() {
#pragma unroll
            for (int kk = 0; kk < 8; ++kk) {
                pa[kk][0] = pack2(s[8 * kk], s[8 * kk + 1]);
                pa[kk][1] = pack2(s[8 * kk + 2], s[8 * kk + 3]);
                pa[kk][2] = pack2(s[8 * kk + 4], s[8 * kk + 5]);
                pa[kk][3] = pack2(s[8 * kk + 6], s[8 * kk + 7]);
            }
        };
        auto fence_s = [&]() {
#pragma unroll
            for (int i = 0; i < 64; ++i) reg_fence(s[i]);
        };
        auto fence_o = [&]() {
#pragma unroll
            for (int i = 0; i < 64; ++i) reg_fence(o[i]);
        };

        // Chunk 0: S, softmax, P.
#if V7_TRACE
        const long long tr_c0 = clock64();
#endif
        mbar_wait(full_k(stage_of(0)), phase_of(0));
#if V7_TRACE
        const long long tr_c1 = clock64();
        tr_wait_k0 += tr_c1 - tr_c0;
        tr_items += 1;
        tr_chunks += my_chunks;
#endif
        fence_s();
        wg_fence();
        issue_qk(0);
        wg_commit();
        wg_wait<0>();
        fence_s();
        {
            float a_lo, a_hi;
            softmax(0, a_lo, a_hi);  // o is still zero: no rescale
        }
        pack_p();
        for (int c = 1; c < my_chunks; ++c) {
            mbar_wait(full_k(stage_of(c)), phase_of(c));
            fence_s();
            fence_o();
            wg_fence();
            issue_qk(c);
            wg_commit();
            mbar_wait(full_v(stage_of(c - 1)), phase_of(c - 1));
            issue_pv(c - 1);
            wg_commit();
            wg_wait<1>();  // S_c is ready; P_{c-1} V_{c-1} may still run
            fence_s();
            float a_lo, a_hi;
            softmax(c, a_lo, a_hi);
            fence_s();
            reg_fence(a_lo);
            reg_fence(a_hi);
            // A block boundary between the softmax and the wgmma wait (see attn_prefill_v7_impl):
            // chunk c's V, needed next and loaded with its K, so it depends on no later release.
            mbar_wait(full_v(stage_of(c)), phase_of(c));
            wg_wait<0>();
            fence_o();
            if (lane == 0) mbar_arrive(empty(stage_of(c - 1)));
#pragma unroll
            for (int jj = 0; jj < 16; ++jj) {
                o[4 * jj] *= a_lo;
                o[4 * jj + 1] *= a_lo;
                o[4 * jj + 2] *= a_hi;
                o[4 * jj + 3] *= a_hi;
            }
            pack_p();
        }
        const int last = my_chunks - 1;
        mbar_wait(full_v(stage_of(last)), phase_of(last));
        fence_o();
        wg_fence();
        issue_pv(last);
        wg_commit();
        // Every Q K^T of this item has completed: the warpgroup's Q rows are free, so the next
        // item's rows load (global -> RoPE -> shared) while the last P V runs on the tensor cores.
        const int jn = v7p_item_index(k + 1, num_items);
        V7Item next = it;
        if (jn >= 0) {
            next = v7p_item(jn, tiles, num_tiles, num_heads);
            v7p_load_q(sq, qkv, rope, next, cw, qkv_width);
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        }
        wg_wait<0>();
        fence_o();
#if V7_TRACE
        const long long tr_c2 = clock64();
        tr_loop += tr_c2 - tr_c1;
#endif
        if (lane == 0) {
            mbar_arrive(empty(stage_of(last)));
            // A chunk this warpgroup does not need (its rows end before it) is released too, but
            // only once it has landed: that proves the producer saw the stage's previous use
            // released by both warpgroups, so this arrival counts toward the right phase.
            for (int c = my_chunks; c < it.nchunks; ++c) {
                mbar_wait(full_k(stage_of(c)), phase_of(c));
                mbar_arrive(empty(stage_of(c)));
            }
        }
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {
            l_lo += __shfl_xor_sync(0xffffffffu, l_lo, off);
            l_hi += __shfl_xor_sync(0xffffffffu, l_hi, off);
        }
        const float inv_lo = l_lo > 0.0f ? 1.0f / l_lo : 0.0f;
        const float inv_hi = l_hi > 0.0f ? 1.0f / l_hi : 0.0f;
        const int r_lo = cw * 64 + warp * 16 + g4, r_hi = r_lo + 8;
#pragma unroll
        for (int jj = 0; jj < 16; ++jj) {
            const int col = it.h * HEAD_DIM + jj * 8 + t4 * 2;
            if (r_lo < it.rows) {
                *reinterpret_cast<T2*>(out + (u64)(it.row0 + r_lo) * out_width + col) =
                    from_f2(o[4 * jj] * inv_lo, o[4 * jj + 1] * inv_lo);
            }
            if (r_hi < it.rows) {
                *reinterpret_cast<T2*>(out + (u64)(it.row0 + r_hi) * out_width + col) =
                    from_f2(o[4 * jj + 2] * inv_hi, o[4 * jj + 3] * inv_hi);
            }
        }
#if V7_TRACE
        tr_tail += clock64() - tr_c2;
#endif
        if (jn < 0) break;
        named_sync(1 + cw, 128);  // the next item's Q rows, written by every thread of the warpgroup
        g0 += it.nchunks;
        it = next;
    }
#if V7_TRACE
    const int tr_slot = 2 * (int)blockIdx.x + cw;
    if (layer == 0 && (threadIdx.x & 127) == 0 && tr_slot < V7_TRACE_SLOTS) {
        long long* e = v7_trace_buf + tr_slot * V7_TRACE_FIELDS;
        e[0] = tr_items;
        e[1] = tr_chunks;
        e[2] = (long long)tr_gstart;
        e[3] = (long long)(v7_gtime() - tr_gstart);
        e[4] = clock64() - tr_cstart;
        e[5] = tr_cready - tr_cstart;
        e[6] = tr_wait_k0;
        e[7] = tr_loop;
        e[8] = tr_tail;
    }
#endif
}
#endif
#if V7_SUPPORTED
#define V7P_BODY(STAGES, LEAN)                                                                                     \
    attn_prefill_v7p_impl<STAGES, LEAN>(&kv_map, qkv, block_tables, table_stride, tiles, num_tiles, out, layer,     \
                                        scale, num_heads, num_kv_heads, rope, num_blocks);
#else
#define V7P_BODY(STAGES, LEAN) __trap();  // only selected for sm_90a and head_dim 128
#endif
#if V7_TRACE
// Prints the trace of the last layer-0 launch of attn_prefill_v7p: one line per consumer warpgroup
// (cycles: SM clocks; setup: to the end of barrier init and the PDL wait; wait_k0: waiting for each
// item's first K chunk; loop: first QK^T to the last P V; tail: release, output stores).
extern "C" __global__ void attn_v7_trace_dump(int ctas) {
    pdl_wait();
    for (int slot = 0; slot < 2 * ctas && slot < V7_TRACE_SLOTS; ++slot) {
        const long long* e = v7_trace_buf + slot * V7_TRACE_FIELDS;
        printf("v7trace cta %d wg %d items %lld chunks %lld start_ns %lld dur_ns %lld cycles %lld setup %lld "
               "wait_k0 %lld loop %lld tail %lld\n",
               slot / 2, slot % 2, e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7], e[8]);
    }
}
#else
extern "C" __global__ void attn_v7_trace_dump(int ctas) {}
#endif
// Grid: min(multiprocessors, tiles x heads) CTAs of 384 threads.
extern "C" __global__ void __launch_bounds__(384, 1)
    attn_prefill_v7p(const __grid_constant__ TmaMap kv_map, const T* qkv, const u32* block_tables, int table_stride,
                     const int4* tiles, int num_tiles, T* out, int layer, float scale, int num_heads,
                     int num_kv_heads, const float* rope, int num_blocks) {
    V7P_BODY(3, false)
}
// The same with the row max / row sum over 4 partials each (measured no faster, H100, A8 call 2).
extern "C" __global__ void __launch_bounds__(384, 1)
    attn_prefill_v7pl(const __grid_constant__ TmaMap kv_map, const T* qkv, const u32* block_tables, int table_stride,
                      const int4* tiles, int num_tiles, T* out, int layer, float scale, int num_heads,
                      int num_kv_heads, const float* rope, int num_blocks) {
    V7P_BODY(3, true)
}

// Single-buffered variant (static shared memory); kept as a fallback (DJINN_CUDA_PREFILL_V1=1).
extern "C" __global__ void __launch_bounds__(128) attn_prefill_v1(
        const T* qkv, const T* pool, const u32* block_tables, int table_stride, const int4* tiles, int num_tiles,
        T* out, int layer, float scale, int num_heads, int num_kv_heads, int num_layers) {
    __shared__ __align__(16) T ks[PF_KEYS * KS_PITCH];
    __shared__ __align__(16) T vs[PF_KEYS * KS_PITCH];
    const int4 tile = tiles[num_tiles - 1 - blockIdx.x];
    const int seq = tile.x, row0 = tile.y, rows = tile.z, pos0 = tile.w;
    const int h = blockIdx.y;
    const int kvh = h / (num_heads / num_kv_heads);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int qkv_width = (num_heads + 2 * num_kv_heads) * HEAD_DIM;
    const u32* table = block_tables + (u64)seq * table_stride;
    u32 qa[HEAD_DIM / 16][4];
    prefill_load_q(qkv, row0, rows, h, qkv_width, warp, lane, qa);
    const int g = lane >> 2;
    const int qpos_lo = pos0 + warp * 16 + g, qpos_hi = qpos_lo + 8;
    const int warp_last_pos = pos0 + warp * 16 + 15;
    const int kv_len = pos0 + rows;
    float m_lo = NEG_INF, m_hi = NEG_INF, l_lo = 0.0f, l_hi = 0.0f;
    float o[HEAD_DIM / 8][4];
#pragma unroll
    for (int nd = 0; nd < HEAD_DIM / 8; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.0f;
    for (int kc = 0; kc < kv_len; kc += PF_KEYS) {
        __syncthreads();
        for (int c = threadIdx.x; c < PF_KEYS * (HEAD_DIM / 8); c += blockDim.x) {
            const int tok = c / (HEAD_DIM / 8), d8 = c % (HEAD_DIM / 8);
            const int kpos = kc + tok;
            uint4 kraw = make_uint4(0, 0, 0, 0), vraw = make_uint4(0, 0, 0, 0);
            if (kpos < kv_len) {
                const u32 phys = table[kpos / BLOCK_SIZE];
                const T* kp = pool + kv_piece(phys, layer, 0, kvh, num_layers, num_kv_heads) +
                              (kpos % BLOCK_SIZE) * HEAD_DIM + d8 * 8;
                kraw = *reinterpret_cast<const uint4*>(kp);
                vraw = *reinterpret_cast<const uint4*>(kp + (u64)num_kv_heads * BLOCK_SIZE * HEAD_DIM);
            }
            *reinterpret_cast<uint4*>(&ks[tok * KS_PITCH + d8 * 8]) = kraw;
            *reinterpret_cast<uint4*>(&vs[tok * KS_PITCH + d8 * 8]) = vraw;
        }
        __syncthreads();
        if (kc <= warp_last_pos) {  // warp-uniform (see attn_prefill)
            prefill_chunk(ks, vs, kc, qpos_lo, qpos_hi, scale, qa, o, m_lo, m_hi, l_lo, l_hi, lane);
        }
    }
    prefill_store(out, row0, rows, h, num_heads, warp, lane, o, l_lo, l_hi);
}

// ------------------------------------------------------------------------------------------------
// GEMV for one input row (decode at batch 1, memory-bound): y[n] = W[n, :] . x, W [N, K] row-major,
// K a multiple of 8. Each warp computes GEMV_R = 2 rows. The weight stream is double-buffered in
// registers: while stage s (GEMV_U 16-byte loads per row per lane) is multiplied, stage s + 1 is in
// flight, so every lane keeps 2 x GEMV_R x GEMV_U x 16 = 256 bytes outstanding. Weight loads bypass
// L1 and ask L2 for 256-byte fetches (read-once data). The first stage is loaded before pdl_wait():
// weights do not depend on the previous kernel, so under programmatic dependent launch the weight
// stream starts while the previous kernel (RMSNorm, attention) still runs.
#define GEMV_R 2
#define GEMV_U 4
#define GEMV_THREADS 128

__device__ __forceinline__ uint4 ld_stream16(const uint4* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

__device__ __forceinline__ void gemv_fma(const uint4& w, const uint4& xv, float& acc) {
    const T2* wp = reinterpret_cast<const T2*>(&w);
    const T2* xp = reinterpret_cast<const T2*>(&xv);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const float2 a = to_f2(wp[k]), b = to_f2(xp[k]);
        acc = fmaf(a.x, b.x, acc);
        acc = fmaf(a.y, b.y, acc);
    }
}

__device__ __forceinline__ void gemv_load_stage(const uint4* const (&wrow)[GEMV_R], int c0, uint4 (&w)[GEMV_R][GEMV_U]) {
#pragma unroll
    for (int u = 0; u < GEMV_U; ++u)
#pragma unroll
        for (int r = 0; r < GEMV_R; ++r) w[r][u] = ld_stream16(wrow[r] + c0 + 32 * u);
}

__device__ __forceinline__ void gemv_use_stage(const uint4* xv, int c0, const uint4 (&w)[GEMV_R][GEMV_U],
                                               float (&acc)[GEMV_R]) {
#pragma unroll
    for (int u = 0; u < GEMV_U; ++u) {
        const uint4 xu = __ldg(xv + c0 + 32 * u);
#pragma unroll
        for (int r = 0; r < GEMV_R; ++r) gemv_fma(w[r][u], xu, acc[r]);
    }
}

// Dot products of GEMV_R weight rows with x (summed over the warp: every lane gets the totals).
// Calls pdl_wait() (after the first weight stage is in flight) before reading x.
__device__ __forceinline__ void gemv_rows(const T* W, const T* x, const int (&rows)[GEMV_R], int K,
                                          float (&acc)[GEMV_R]) {
    const int lane = threadIdx.x & 31;
    const int chunks = K / 8;
    const int stride = 32 * GEMV_U;
    const int full = chunks / stride;  // whole stages; the rest is a plain strided tail
    const uint4* wrow[GEMV_R];
#pragma unroll
    for (int r = 0; r < GEMV_R; ++r) {
        wrow[r] = reinterpret_cast<const uint4*>(W + (u64)rows[r] * K) + lane;
        acc[r] = 0.0f;
    }
    const uint4* xv = reinterpret_cast<const uint4*>(x) + lane;
    uint4 a[GEMV_R][GEMV_U], b[GEMV_R][GEMV_U];
    if (full > 0) gemv_load_stage(wrow, 0, a);
    pdl_trigger();
    pdl_wait();
    int s = 0;
    for (; s + 1 < full; s += 2) {
        gemv_load_stage(wrow, (s + 1) * stride, b);
        gemv_use_stage(xv, s * stride, a, acc);
        if (s + 2 < full) gemv_load_stage(wrow, (s + 2) * stride, a);
        gemv_use_stage(xv, (s + 1) * stride, b, acc);
    }
    if (s < full) gemv_use_stage(xv, s * stride, a, acc);
    for (int c = full * stride; c + lane < chunks; c += 32) {
        const uint4 xu = __ldg(xv + c);
#pragma unroll
        for (int r = 0; r < GEMV_R; ++r) gemv_fma(ld_stream16(wrow[r] + c), xu, acc[r]);
    }
#pragma unroll
    for (int r = 0; r < GEMV_R; ++r) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
    }
}

// Plain GEMV: warp w computes rows 2w, 2w + 1. out_f32: 0: y is T; 1: y is float (LM head);
// 2: y is float and the result is added to it (o_proj / down_proj into the f32 residual stream);
// 3: y is T and the result is added to it in f32, rounded once (the T residual stream).
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv(const T* W, const T* x, void* y, int N, int K,
                                                                int out_f32) {
    const int warp = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    const int lane = threadIdx.x & 31;
    const int row0 = warp * GEMV_R;
    if (row0 >= N) {
        pdl_trigger();
        return;
    }
    int rows[GEMV_R];
#pragma unroll
    for (int r = 0; r < GEMV_R; ++r) rows[r] = min(row0 + r, N - 1);
    float acc[GEMV_R];
    gemv_rows(W, x, rows, K, acc);
    if (lane < GEMV_R && row0 + lane < N) {
        const float v = lane == 0 ? acc[0] : acc[1];
        T* yt = reinterpret_cast<T*>(y) + row0 + lane;
        if (out_f32 == 3) *yt = from_f(to_f(*yt) + v);
        else if (out_f32 == 2) reinterpret_cast<float*>(y)[row0 + lane] += v;
        else if (out_f32) reinterpret_cast<float*>(y)[row0 + lane] = v;
        else reinterpret_cast<T*>(y)[row0 + lane] = from_f(v);
    }
}

// Gate/up GEMV with the SiLU-gated activation fused: W holds gate rows [0, inter) then up rows
// [inter, 2 inter); warp w computes rows w and inter + w and writes act[w] = silu(gate) * up.
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_silu(const T* W, const T* x, T* act, int inter, int K) {
    const int warp = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    if (warp >= inter) {
        pdl_trigger();
        return;
    }
    const int rows[GEMV_R] = {warp, inter + warp};
    float acc[GEMV_R];
    gemv_rows(W, x, rows, K, acc);
    if ((threadIdx.x & 31) == 0) {
        // Rounded to T first, as the unfused path (GEMM output in T, then silu_mul) does.
        const float g = to_f(from_f(acc[0])), u = to_f(from_f(acc[1]));
        act[warp] = from_f(g / (1.0f + __expf(-g)) * u);
    }
}

// q/k/v GEMV with RoPE and the KV write fused (the batch-1 form of rope_kv_write): warp w computes
// the rotation pair (j, j + HEAD_DIM/2) of head w / (HEAD_DIM/2), rotates q and k heads by the
// position of row 0, writes them (and v) into the fused qkv row, and k and v into the pool at
// slots[0] (< 0: padding, nothing written).
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_rope(
        const T* W, const T* x, T* qkv, int K, const int* positions, const long long* slots, const float* rope,
        T* pool, int layer, int num_heads, int num_kv_heads, int num_layers) {
    const int half = HEAD_DIM / 2;
    const int warp = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    const int total_heads = num_heads + 2 * num_kv_heads;
    if (warp >= total_heads * half) {
        pdl_trigger();
        return;
    }
    const int head = warp / half, j = warp % half;
    const int rows[GEMV_R] = {head * HEAD_DIM + j, head * HEAD_DIM + j + half};
    float acc[GEMV_R];
    gemv_rows(W, x, rows, K, acc);
    if ((threadIdx.x & 31) != 0) return;
    // Rounded to T first, as the unfused path (GEMM output in T, then rope_kv_write) does.
    float a = to_f(from_f(acc[0])), b = to_f(from_f(acc[1]));
    if (head < num_heads + num_kv_heads) {
        const int pos = positions[0];
        const float c = rope[(u64)pos * HEAD_DIM + 2 * j], sn = rope[(u64)pos * HEAD_DIM + 2 * j + 1];
        const float ra = a * c - b * sn, rb = b * c + a * sn;
        a = ra;
        b = rb;
    }
    qkv[head * HEAD_DIM + j] = from_f(a);
    qkv[head * HEAD_DIM + j + half] = from_f(b);
    const long long slot = slots[0];
    if (head >= num_heads && slot >= 0) {
        const int kv = head < num_heads + num_kv_heads ? 0 : 1;
        const int kvh = kv == 0 ? head - num_heads : head - num_heads - num_kv_heads;
        T* dst = pool + kv_piece((u32)(slot / BLOCK_SIZE), layer, kv, kvh, num_layers, num_kv_heads) +
                 (int)(slot % BLOCK_SIZE) * HEAD_DIM;
        dst[j] = from_f(a);
        dst[j + half] = from_f(b);
    }
}

// First GEMV (kept for A/B: DJINN_CUDA_GEMV_V1=1). GEMV for one input row (decode at batch 1, memory-bound): y[n] = W[n, :] . x for W [N, K]
// row-major. Each warp streams GEMV_ROWS rows with 16-byte loads, GEMV_ROWS x GEMV_UNROLL loads in
// flight per lane. K must be a multiple of 8. out_f32 as in `gemv`.
#define GEMV_ROWS 2
#define GEMV_UNROLL 4
extern "C" __global__ void __launch_bounds__(256) gemv_v1(const T* W, const T* x, void* y, int N, int K, int out_f32) {
    pdl_trigger();
    pdl_wait();
    const int warp = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    const int lane = threadIdx.x & 31;
    const int row0 = warp * GEMV_ROWS;
    if (row0 >= N) return;
    const int chunks = K / 8;
    float acc[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) acc[r] = 0.0f;
    for (int c0 = lane; c0 < chunks; c0 += 32 * GEMV_UNROLL) {
        uint4 w[GEMV_ROWS][GEMV_UNROLL], xv[GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            const int c = c0 + u * 32;
            const bool in = c < chunks;
            xv[u] = in ? __ldg(reinterpret_cast<const uint4*>(x) + c) : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; ++r) {
                w[r][u] = (in && row0 + r < N) ? __ldcs(reinterpret_cast<const uint4*>(W + (u64)(row0 + r) * K) + c)
                                               : make_uint4(0, 0, 0, 0);
            }
        }
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            const T2* xp = reinterpret_cast<const T2*>(&xv[u]);
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; ++r) {
                const T2* wp = reinterpret_cast<const T2*>(&w[r][u]);
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const float2 a = to_f2(wp[k]), b = to_f2(xp[k]);
                    acc[r] += a.x * b.x + a.y * b.y;
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
    }
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; ++r) {
            if (row0 + r < N) {
                T* yt = reinterpret_cast<T*>(y) + row0 + r;
                if (out_f32 == 3) *yt = from_f(to_f(*yt) + acc[r]);
                else if (out_f32 == 2) reinterpret_cast<float*>(y)[row0 + r] += acc[r];
                else if (out_f32) reinterpret_cast<float*>(y)[row0 + r] = acc[r];
                else reinterpret_cast<T*>(y)[row0 + r] = from_f(acc[r]);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Greedy sampling: out[b] = argmax_v logits[b, v] (ties to the lowest id; NaN never wins).
extern "C" __global__ void argmax_rows(const float* logits, int vocab, u32* out) {
    pdl_trigger();
    pdl_wait();
    const int b = blockIdx.x;
    const float* row = logits + (u64)b * vocab;
    float best = NEG_INF;
    int best_i = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = row[i];
        if (v > best) {  // strided scan in increasing i keeps the lowest index on ties
            best = v;
            best_i = i;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
        if (ov > best || (ov == best && oi < best_i)) {
            best = ov;
            best_i = oi;
        }
    }
    __shared__ float sv[32];
    __shared__ int si[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) {
        sv[warp] = best;
        si[warp] = best_i;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        const int warps = (blockDim.x + 31) >> 5;
        for (int w = 0; w < warps; ++w) {
            if (sv[w] > best || (sv[w] == best && si[w] < best_i)) {
                best = sv[w];
                best_i = si[w];
            }
        }
        out[b] = best_i == 0x7fffffff ? 0u : (u32)best_i;
    }
}

// Plain word copy on the compute stream. Used between device memory and mapped pinned host
// memory, so a step's small inputs and outputs never wait in the copy engines' queues behind KV
// swaps.
extern "C" __global__ void copy_words(u32* dst, const u32* src, int n_words) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n_words; i += gridDim.x * blockDim.x) {
        dst[i] = src[i];
    }
}

// ------------------------------------------------------------------------------------------------
// Own GEMM for prefill-sized steps (sm_90a; facts from public Hopper GEMM write-ups, own code):
// out = A[M, K] B[rows, K]^T, both operands K-major (activations row-major, weights [out, in] as
// stored), f32 accumulation in registers.
// - Tile 128 x 256 x 64: two consumer warpgroups of 64 x 256 (`wgmma.mma_async m64n256k16`, both
//   operands from 128-byte-swizzled shared memory), one producer warpgroup (setmaxnreg.dec) whose
//   first thread streams A and B k-tiles with the TMA into a GM_STAGES-deep mbarrier ring.
// - Persistent grid (one CTA per SM); tile t covers rows (t % tiles_m) and column block
//   (t / tiles_m), so the CTAs in flight share a few weight panels (read from DRAM once, then L2)
//   and the whole activation (16 MiB at 2048 x 4096 fp16: stays in L2).
// - The B tile is two TMA boxes of 128 rows. Plain mode: rows n0 .. n0 + 255 of B, out[M, N]
//   row-major with ld = N. SILU mode (gate_up fused with the SiLU-gated activation): B is the
//   [2 inter, K] gate_up weight (gate rows first); the boxes are gate rows n0 .. n0 + 127 and up
//   rows inter + n0 .., so gate column c and up column c sit in the same thread's accumulators
//   (fragments j and j + 16 of the m64n256 layout) and the epilogue writes
//   act[m, n0 + c] = silu(g) * u, computed in f32 and rounded once, with ld = inter (= N here).
// Rows past M (TMA zero fill) are computed but never stored; K's tail is zero-filled by the TMA.
// grid (min(tiles, SMs)), 384 threads, dynamic shared memory GM_SMEM_BYTES.
#define GM_BM 128
#define GM_BN 256
#define GM_BK 64
#define GM_STAGES 4
#define GM_A_BYTES (GM_BM * GM_BK * 2)   // 16 KiB
#define GM_B_BYTES (GM_BN * GM_BK * 2)   // 32 KiB: two boxes of 128 rows
#define GM_STAGE_BYTES (GM_A_BYTES + GM_B_BYTES)
// SILU mode: each consumer warpgroup stages its 64 x 128 output in shared memory (two 128-byte-
// swizzled boxes of 64 rows x 64 columns) and writes it with a TMA store, so the next tile's
// MMAs start while the store drains.
#define GM_OUT_BYTES (64 * 128 * 2)

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GM_SUPPORTED 1
#else
#define GM_SUPPORTED 0
#endif

#if GM_SUPPORTED
__device__ __forceinline__ void gm_mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void gm_mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void gm_mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void gm_mbar_wait(u32 bar, u32 parity) {
    u32 done;
    do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done)
                     : "r"(bar), "r"(parity)
                     : "memory");
    } while (!done);
}
__device__ __forceinline__ void gm_tma_2d(u32 dst, const TmaMap* map, u32 bar, int c0, int c1) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], "
        "[%2];\n" ::"r"(dst),
        "l"((u64)map), "r"(bar), "r"(c0), "r"(c1)
        : "memory");
}
// K-major operand in 128-byte-swizzled rows (8-row atoms of 1024 bytes): SBO 1024, mode 1.
__device__ __forceinline__ void gm_tma_store_2d(const TmaMap* map, u32 src, int c0, int c1) {
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"((u64)map),
                 "r"(src), "r"(c0), "r"(c1)
                 : "memory");
}
// Cluster variant: the B box that this CTA loads lands in both CTAs of the pair (ctaMask 0b11),
// completing each one's mbarrier at the same shared-memory offset.
__device__ __forceinline__ void gm_tma_2d_mc(u32 dst, const TmaMap* map, u32 bar, int c0, int c1, unsigned short mask) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, "
        "{%3, %4}], [%2], %5;\n" ::"r"(dst),
        "l"((u64)map), "r"(bar), "r"(c0), "r"(c1), "h"(mask)
        : "memory");
}
// Arrive on the mbarrier at the same offset in the peer CTA of the cluster. Default semantics
// (release at CTA scope), as CUTLASS's cluster pipelines release a stage to the peer's producer:
// the stage's wgmma reads are complete (wait_group) before the arrive, and the peer's TMA write is
// ordered after its acquire of the barrier. GM_PEER_ARRIVE_CLUSTER=1 compiles the session-5 form
// (.release.cluster), a cluster-scope fence on every consumer warp's arrive (A/B).
__device__ __forceinline__ void gm_mbar_arrive_peer(u32 bar, u32 peer) {
#if GM_PEER_ARRIVE_CLUSTER
    asm volatile("{\n.reg .b32 ra;\nmapa.shared::cluster.u32 ra, %0, %1;\nmbarrier.arrive.release.cluster.shared::cluster.b64 _, [ra];\n}\n" ::"r"(bar),
                 "r"(peer)
                 : "memory");
#else
    asm volatile("{\n.reg .b32 ra;\nmapa.shared::cluster.u32 ra, %0, %1;\nmbarrier.arrive.shared::cluster.b64 _, [ra];\n}\n" ::"r"(bar),
                 "r"(peer)
                 : "memory");
#endif
}
__device__ __forceinline__ void gm_cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void gm_named_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ u64 gm_desc(u32 saddr) {
    return (u64)((saddr & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | (1ull << 62);
}
__device__ __forceinline__ void gm_mma256(float (&d)[128], u64 da, u64 db, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32." MMA_TYPE "." MMA_TYPE " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, 0, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
                 : "l"(da), "l"(db), "r"(accumulate));
}

// CL = 2: clusters of two CTAs on row tiles 2i and 2i + 1 of the same column block; each CTA
// loads its A tile and one of the two B boxes, multicast to both (half the B traffic from L2).
// A stage of either CTA is then written by both producers, so its "empty" mbarrier collects the
// releases of both CTAs' consumer warps (16), and the pair runs the same number of k-tiles.
// QKV mode (prefill, HEAD_DIM 128): B is the [(nh + 2 nkv) 128, K] qkv weight, a tile's 256
// columns are heads 2 nt and 2 nt + 1. The epilogue replaces rope_kv_write (rotate_q = 0): q heads
// go to out[m, N] as the plain GEMM writes them, by TMA stores as in SILU mode (the attention
// rotates q on load), k heads are
// rotated (pair d, d + 64 = fragments j, j + 8 of one thread; rounded to T first and rotated in
// f32 with the same expression as rope_kv_write, so the pool bytes match it) and k / v heads go
// to the paged pool at slots[m] (slot < 0: not written). Each head of a warpgroup's 64 rows is
// staged in shared memory (rows of 256 bytes, 16-byte chunks XOR-swizzled by row % 8: conflict-
// free 4-byte writes from the accumulator layout) and copied out with 16-byte stores, a row's
// 256 bytes by 16 consecutive threads (one pool row is 256 contiguous bytes).
struct QkvEpilogue {
    const int* positions;
    const long long* slots;
    const float* rope;
    T* pool;
    int layer, num_heads, num_kv_heads, num_layers;
};

template <bool SILU, int CL, bool QKV = false>
__device__ __forceinline__ void gemm_ws_impl(const TmaMap* a_map, const TmaMap* b_map, const TmaMap* o_map, T* out,
                                             int M, int N, int K, const QkvEpilogue* qe = nullptr) {
    extern __shared__ __align__(16) unsigned char gm_smem[];
    pdl_trigger();
    // 1024-byte aligned base: the 128-byte swizzle pattern follows address bits 4-9.
    const u32 raw_addr = (u32)__cvta_generic_to_shared(gm_smem);
    const u32 base = (raw_addr + 1023u) & ~1023u;
    const u32 out_base = base + GM_STAGES * GM_STAGE_BYTES;  // SILU: 2 x GM_OUT_BYTES
    const u32 bar_base = out_base + 2 * GM_OUT_BYTES;
    auto full = [&](int s) { return bar_base + 8u * (u32)s; };
    auto empty = [&](int s) { return bar_base + 8u * (u32)(GM_STAGES + s); };
    auto a_tile = [&](int s) { return base + (u32)s * GM_STAGE_BYTES; };
    if (threadIdx.x == 0) {
#pragma unroll
        for (int s = 0; s < GM_STAGES; ++s) {
            gm_mbar_init(full(s), 1);
            gm_mbar_init(empty(s), 8 * CL);  // one arrival per consumer warp (of both CTAs)
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    u32 rank = 0;
    if (CL == 2) {
        asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
        gm_cluster_sync();  // the peer's barriers are initialised before any multicast
    } else {
        __syncthreads();
    }
    pdl_wait();
    const int tiles_m = (M + GM_BM - 1) / GM_BM;
    const int tiles_n = SILU ? N / 128 : (N + GM_BN - 1) / GM_BN;
    // Work item w: one tile (CL 1) or a pair of row tiles (CL 2) of column block w / tiles_mc.
    const int tiles_mc = (tiles_m + CL - 1) / CL;
    const int num_tiles = tiles_mc * tiles_n;
    const int w0 = blockIdx.x / CL, wstep = gridDim.x / CL;
    const int nk = (K + GM_BK - 1) / GM_BK;
    const int wg = threadIdx.x >> 7;

    if (wg == 0) {
        // ---- producer: one thread issues every TMA load
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        if (threadIdx.x == 0) {
            int it = 0;
            for (int tile = w0; tile < num_tiles; tile += wstep) {
                const int m0 = (CL * (tile % tiles_mc) + (int)rank) * GM_BM;
                const int nt = tile / tiles_mc;
                const int nb0 = SILU ? nt * 128 : nt * GM_BN;
                const int nb1 = SILU ? N + nt * 128 : nt * GM_BN + 128;
                for (int kb = 0; kb < nk; ++kb, ++it) {
                    const int s = it % GM_STAGES;
                    if (it >= GM_STAGES) gm_mbar_wait(empty(s), (u32)((it / GM_STAGES - 1) & 1));
                    const u32 a = a_tile(s), b = a + GM_A_BYTES;
                    gm_mbar_expect_tx(full(s), GM_STAGE_BYTES);
                    gm_tma_2d(a, a_map, full(s), kb * GM_BK, m0);
                    if (CL == 2) {
                        gm_tma_2d_mc(b + rank * (GM_B_BYTES / 2), b_map, full(s), kb * GM_BK, rank ? nb1 : nb0, 3);
                    } else {
                        gm_tma_2d(b, b_map, full(s), kb * GM_BK, nb0);
                        gm_tma_2d(b + GM_B_BYTES / 2, b_map, full(s), kb * GM_BK, nb1);
                    }
                }
            }
        }
        // The peer may still arrive on this CTA's barriers until both are done.
        if (CL == 2) gm_cluster_sync();
        return;
    }

    // ---- consumers: warpgroup cw = 0, 1 owns tile rows 64 cw .. 64 cw + 63
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    const int cw = wg - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const bool wg_leader = (threadIdx.x & 127) == 0;
    const u32 ob = out_base + (u32)cw * GM_OUT_BYTES;
    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
    int it = 0;
    for (int tile = w0; tile < num_tiles; tile += wstep) {
        const int m0 = (CL * (tile % tiles_mc) + (int)rank) * GM_BM;
        const int nt = tile / tiles_mc;
        for (int kb = 0; kb < nk; ++kb, ++it) {
            const int s = it % GM_STAGES;
            gm_mbar_wait(full(s), (u32)((it / GM_STAGES) & 1));
            const u32 a = a_tile(s) + (u32)cw * (64 * 128), b = a_tile(s) + GM_A_BYTES;
            asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
            for (int kk = 0; kk < GM_BK / 16; ++kk) {
                // 16 k-elements = 32 bytes further along the swizzled 128-byte rows.
                gm_mma256(acc, gm_desc(a + kk * 32), gm_desc(b + kk * 32), (kb | kk) != 0);
            }
            asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
            // Keep one k-tile's MMAs in flight; the previous one is done: release its stage.
            asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
            if (kb > 0 && lane == 0) {
                gm_mbar_arrive(empty((it - 1) % GM_STAGES));
                if (CL == 2) gm_mbar_arrive_peer(empty((it - 1) % GM_STAGES), rank ^ 1u);
            }
        }
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
        if (lane == 0) {
            gm_mbar_arrive(empty((it - 1) % GM_STAGES));
            if (CL == 2) gm_mbar_arrive_peer(empty((it - 1) % GM_STAGES), rank ^ 1u);
        }
#pragma unroll
        for (int i = 0; i < 128; ++i) asm volatile("" : "+f"(acc[i])::"memory");

        // ---- epilogue: accumulator d[4 j + 2 h + e] is row 16 warp + g + 8 h, column 8 j + 2 t4 + e
        if (SILU) {
            // The previous tile's TMA store has finished reading the staging buffer.
            if (wg_leader) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
            gm_named_sync(1 + cw, 128);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = 16 * warp + g + 8 * h;
#pragma unroll
                for (int j = 0; j < 16; ++j) {
                    const float g0 = acc[4 * j + 2 * h], g1 = acc[4 * j + 2 * h + 1];
                    const float u0 = acc[4 * (j + 16) + 2 * h], u1 = acc[4 * (j + 16) + 2 * h + 1];
                    const float a0 = g0 / (1.0f + __expf(-g0)) * u0, a1 = g1 / (1.0f + __expf(-g1)) * u1;
                    // Box j / 8 (64 columns), 16-byte piece j % 8 of row r, XOR-swizzled by r % 8.
                    const u32 addr = ob + (u32)(j >> 3) * (GM_OUT_BYTES / 2) + (u32)r * 128u +
                                     ((u32)((j & 7) ^ (r & 7)) << 4) + 4u * (u32)t4;
                    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(pack2(a0, a1)) : "memory");
                }
            }
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
            gm_named_sync(1 + cw, 128);
            if (wg_leader) {
                // Rows past M land in rows of the activation buffer that the step does not read.
                gm_tma_store_2d(o_map, ob, nt * 128, m0 + 64 * cw);
                gm_tma_store_2d(o_map, ob + GM_OUT_BYTES / 2, nt * 128 + 64, m0 + 64 * cw);
                asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
            }
        } else if (QKV) {
            const int nheads = N / 128;
            const int tid = threadIdx.x & 127;
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int head = 2 * nt + hh;  // uniform over the CTA
                if (head >= nheads) break;
                const bool is_k = head >= qe->num_heads && head < qe->num_heads + qe->num_kv_heads;
                if (head < qe->num_heads) {
                    // q head: staged as two 128-byte-swizzled boxes of 64 x 64 (the SILU layout)
                    // and written to qkv[M, N] by TMA stores that drain under the next MMAs.
                    if (wg_leader) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
                    gm_named_sync(1 + cw, 128);
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int r = 16 * warp + g + 8 * h;
#pragma unroll
                        for (int j = 0; j < 16; ++j) {
                            const int f = 16 * hh + j;
                            const u32 addr = ob + (u32)(j >> 3) * (GM_OUT_BYTES / 2) + (u32)r * 128u +
                                             ((u32)((j & 7) ^ (r & 7)) << 4) + 4u * (u32)t4;
                            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr),
                                         "r"(pack2(acc[4 * f + 2 * h], acc[4 * f + 2 * h + 1]))
                                         : "memory");
                        }
                    }
                    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
                    gm_named_sync(1 + cw, 128);
                    if (wg_leader) {
                        // Rows past M land in rows of the qkv buffer that the step does not read.
                        gm_tma_store_2d(o_map, ob, head * 128, m0 + 64 * cw);
                        gm_tma_store_2d(o_map, ob + GM_OUT_BYTES / 2, head * 128 + 64, m0 + 64 * cw);
                        asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
                    }
                    continue;
                }
                // The previous head's copy-out (or TMA store) has read the staging buffer.
                if (wg_leader) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
                gm_named_sync(1 + cw, 128);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int r = 16 * warp + g + 8 * h;
                    const int row = min(m0 + 64 * cw + r, M - 1);
                    const float* rope_row = qe->rope + (u64)(is_k ? qe->positions[row] : 0) * 128;
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        const int f = 16 * hh + j;
                        u32 lo = pack2(acc[4 * f + 2 * h], acc[4 * f + 2 * h + 1]);
                        u32 hi = pack2(acc[4 * (f + 8) + 2 * h], acc[4 * (f + 8) + 2 * h + 1]);
                        if (is_k) {
                            // Column d = 8 j + 2 t4 (+1) and d + 64: c_d s_d c_d+1 s_d+1.
                            const float4 cs = *reinterpret_cast<const float4*>(rope_row + 2 * (8 * j + 2 * t4));
                            const float2 a = to_f2(*reinterpret_cast<T2*>(&lo)), b = to_f2(*reinterpret_cast<T2*>(&hi));
                            const float2 ra = make_float2(a.x * cs.x - b.x * cs.y, a.y * cs.z - b.y * cs.w);
                            const float2 rb = make_float2(b.x * cs.x + a.x * cs.y, b.y * cs.z + a.y * cs.w);
                            lo = pack2(ra.x, ra.y);
                            hi = pack2(rb.x, rb.y);
                        }
                        const u32 rbase = ob + (u32)r * 256u + 4u * (u32)t4;
                        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(rbase + ((u32)(j ^ (r & 7)) << 4)), "r"(lo) : "memory");
                        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(rbase + ((u32)((j + 8) ^ (r & 7)) << 4)), "r"(hi) : "memory");
                    }
                }
                gm_named_sync(1 + cw, 128);
                const int c = tid & 15;
#pragma unroll
                for (int k = 0; k < 8; ++k) {
                    const int r = (tid >> 4) + 8 * k;
                    const int row = m0 + 64 * cw + r;
                    if (row >= M) continue;
                    uint4 v;
                    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                                 : "r"(ob + (u32)r * 256u + ((u32)(c ^ (r & 7)) << 4))
                                 : "memory");
                    const long long slot = qe->slots[row];
                    if (slot < 0) continue;
                    const int kv = is_k ? 0 : 1;
                    const int kvh = head - qe->num_heads - kv * qe->num_kv_heads;
                    T* dst = qe->pool +
                             kv_piece((u32)(slot / BLOCK_SIZE), qe->layer, kv, kvh, qe->num_layers, qe->num_kv_heads) +
                             (slot % BLOCK_SIZE) * 128 + 8 * c;
                    *reinterpret_cast<uint4*>(dst) = v;
                }
            }
        } else {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = m0 + 64 * cw + 16 * warp + g + 8 * h;
                if (row >= M) continue;
                const int c0 = nt * GM_BN + 2 * t4;
                T* orow = out + (u64)row * N + c0;
#pragma unroll
                for (int j = 0; j < 32; ++j) {
                    if (c0 + 8 * j < N) {
                        *reinterpret_cast<u32*>(orow + 8 * j) = pack2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
                    }
                }
            }
        }
    }
    // Shared memory must outlive the last TMA store's reads.
    if ((SILU || QKV) && wg_leader) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
    if (CL == 2) gm_cluster_sync();
}
#endif

#define GM_KERNEL(NAME, SILU, CL, ATTR)                                                                        \
    extern "C" __global__ void __launch_bounds__(384, 1) ATTR                                                 \
        NAME(const __grid_constant__ TmaMap a_map, const __grid_constant__ TmaMap b_map,                      \
             const __grid_constant__ TmaMap o_map, T* out, int M, int N, int K) {                              \
        GM_BODY(SILU, CL)                                                                                      \
    }
#if GM_SUPPORTED
#define GM_BODY(SILU, CL) gemm_ws_impl<SILU, CL>(&a_map, &b_map, &o_map, out, M, N, K);
#else
#define GM_BODY(SILU, CL) __trap();  // only selected on sm_90a
#endif
#define GM_NO_CLUSTER
#if __CUDA_ARCH__ >= 900
#define GM_CLUSTER2 __cluster_dims__(2, 1, 1)
#else
#define GM_CLUSTER2
#endif
// out[M, N] = A B^T (B: N rows).
GM_KERNEL(gemm_ws, false, 1, GM_NO_CLUSTER)
// act[M, inter] = silu(A Bg^T) * (A Bu^T), B = [gate; up] of 2 inter rows; N = inter (multiple of 128);
// act is written through o_map ([rows >= M, inter], boxes of 64 x 64, 128-byte swizzle); out unused.
GM_KERNEL(gemm_ws_silu, true, 1, GM_NO_CLUSTER)
// The same in clusters of two CTAs with the B boxes multicast (grid a multiple of 2).
GM_KERNEL(gemm_ws_silu_c2, true, 2, GM_CLUSTER2)
// qkv GEMM with RoPE (k) and the paged KV write in the epilogue (see QkvEpilogue): q heads to
// qkv[M, N] (N = (num_heads + 2 num_kv_heads) 128) through o_map (boxes of 64 x 64, 128-byte
// swizzle), k / v heads to the pool at slots[m].
extern "C" __global__ void __launch_bounds__(384, 1)
    gemm_ws_qkv(const __grid_constant__ TmaMap a_map, const __grid_constant__ TmaMap b_map,
                const __grid_constant__ TmaMap o_map, T* qkv, int M, int N, int K, const int* positions, const long long* slots, const float* rope, T* pool, int layer,
                int num_heads, int num_kv_heads, int num_layers) {
#if GM_SUPPORTED && HEAD_DIM == 128
    const QkvEpilogue qe{positions, slots, rope, pool, layer, num_heads, num_kv_heads, num_layers};
    gemm_ws_impl<false, 1, true>(&a_map, &b_map, &o_map, qkv, M, N, K, &qe);
#else
    __trap();  // only selected on sm_90a with head_dim 128
#endif
}
