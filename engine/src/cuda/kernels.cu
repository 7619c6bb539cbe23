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
// resid[t, :] = embed[tokens[t], :] (f32 residual stream).
extern "C" __global__ void embed(const u32* tokens, const T* table, float* resid, int hidden) {
    const int t = blockIdx.x;
    const u64 row = tokens[t];
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        resid[(u64)t * hidden + i] = to_f(table[row * hidden + i]);
    }
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
// With row_index it gathers the last token of each sequence for the LM head. 4 elements per step
// (hidden is a multiple of 8).
extern "C" __global__ void add_rmsnorm(float* resid, const T* delta, const T* weight, T* out, const int* row_index,
                                       int hidden, float eps) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    const u64 s = row_index ? (u64)row_index[r] : (u64)r;
    float4* x = reinterpret_cast<float4*>(resid + s * hidden);
    const int n4 = hidden / 4;
    float sq = 0.0f;
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
        float4 v = x[i];
        if (delta) {
            const T2* d = reinterpret_cast<const T2*>(delta + s * hidden) + 2 * i;
            const float2 a = to_f2(d[0]), b = to_f2(d[1]);
            v.x += a.x;
            v.y += a.y;
            v.z += b.x;
            v.w += b.y;
            x[i] = v;
        }
        sq += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    const float inv = rsqrtf(block_sum(sq, scratch) / (float)hidden + eps);
    T2* o = reinterpret_cast<T2*>(out + (u64)r * hidden);
    const T2* w = reinterpret_cast<const T2*>(weight);
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
        const float4 v = x[i];
        const float2 wa = to_f2(w[2 * i]), wb = to_f2(w[2 * i + 1]);
        o[2 * i] = from_f2(v.x * inv * wa.x, v.y * inv * wa.y);
        o[2 * i + 1] = from_f2(v.z * inv * wb.x, v.w * inv * wb.y);
    }
}

// ------------------------------------------------------------------------------------------------
// RoPE (HF rotate_half convention: pairs (i, i + HEAD_DIM/2)) on q and k of one layer, in place
// in the fused qkv rows [q heads | k heads | v heads], and the KV write of k and v into the pool
// at slot = block * BLOCK_SIZE + offset (slot < 0: padding row, nothing written).
// rope[pos * HEAD_DIM + 2 * i] = cos, [.. + 2 * i + 1] = sin of pos * theta^(-2i/HEAD_DIM).
extern "C" __global__ void rope_kv_write(T* qkv, const int* positions, const long long* slots, const float* rope,
                                         T* pool, int layer, int num_heads, int num_kv_heads, int num_layers) {
    const int t = blockIdx.x;
    const int half = HEAD_DIM / 2;
    const int qkv_width = (num_heads + 2 * num_kv_heads) * HEAD_DIM;
    T* row = qkv + (u64)t * qkv_width;
    const int pos = positions[t];
    const long long slot = slots[t];
    // Each item rotates two adjacent pairs (i, i + half) and (i + 1, i + 1 + half): 4-byte accesses.
    const int items = (num_heads + 2 * num_kv_heads) * (half / 2);
    for (int item = threadIdx.x; item < items; item += blockDim.x) {
        const int head = item / (half / 2);  // 0..nh-1 q, nh..nh+nkv-1 k, then v
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
            *reinterpret_cast<T2*>(h + i) = from_f2(a.x, a.y);
            *reinterpret_cast<T2*>(h + i + half) = from_f2(b.x, b.y);
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

// out[t, i] = silu(gu[t, i]) * gu[t, inter + i] (gate and up projections fused in one GEMM).
// 8 elements (16 bytes) per step; inter is a multiple of 8.
extern "C" __global__ void silu_mul(const T* gu, T* out, int inter, u64 total) {
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

// Double-buffered: the K/V chunk after the current one is copied with cp.async while the current
// one is computed. Dynamic shared memory: 2 stages x (K, V) x PF_KEYS x KS_PITCH elements.
extern "C" __global__ void __launch_bounds__(128) attn_prefill(
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
// GEMV for one input row (decode at batch 1, memory-bound): y[n] = W[n, :] . x for W [N, K]
// row-major. Each warp streams GEMV_ROWS rows with 16-byte loads, GEMV_ROWS x GEMV_UNROLL loads in
// flight per lane. K must be a multiple of 8. out_f32: y is float (LM head), else T.
#define GEMV_ROWS 2
#define GEMV_UNROLL 4
extern "C" __global__ void __launch_bounds__(256) gemv(const T* W, const T* x, void* y, int N, int K, int out_f32) {
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
                if (out_f32) reinterpret_cast<float*>(y)[row0 + r] = acc[r];
                else reinterpret_cast<T*>(y)[row0 + r] = from_f(acc[r]);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Greedy sampling: out[b] = argmax_v logits[b, v] (ties to the lowest id; NaN never wins).
extern "C" __global__ void argmax_rows(const float* logits, int vocab, u32* out) {
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
