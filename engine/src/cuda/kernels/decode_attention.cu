// decode_attention.cu: Paged split-KV decode attention (per query head, and per KV head for
// grouped-query attention) and the merge of its splits.
// Part of the kernel source compiled by NVRTC (see model/kernels.rs for the order).

// ------------------------------------------------------------------------------------------------
// Paged decode attention, one new token per sequence, split-KV (flash-decoding), in two launch
// shapes over one body: per query head (attn_decode) and per KV head (attn_decode_gqa).
#define DEC_WARPS 4
#define LANES_PER_TOKEN (HEAD_DIM / 8)
#define TOKENS_PER_LOAD (32 / LANES_PER_TOKEN)
#define LOADS_PER_BLOCK ((BLOCK_SIZE + TOKENS_PER_LOAD - 1) / TOKENS_PER_LOAD)

// The CTA body of both kernels: G query heads h0 .. h0 + G - 1, all reading KV head kvh, of
// sequence b over its split. Each warp loads a KV block into registers once and runs the online
// softmax of every one of the G heads over it; the warps are then merged per head.
template <int G>
__device__ __forceinline__ void decode_attention_heads(
        const T* qkv, const T* pool, const u32* block_tables, int table_stride, const int* seq_lens,
        float* part_out, float* part_lse, T* out, int layer, int num_splits, float scale,
        int num_heads, int num_kv_heads, int num_layers, int h0, int kvh, int b, int split) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int sub = lane % LANES_PER_TOKEN, tok_in = lane / LANES_PER_TOKEN;
    const int len = seq_lens[b];
    const int nblocks = (len + BLOCK_SIZE - 1) / BLOCK_SIZE;
    const int per_split = (nblocks + num_splits - 1) / num_splits;
    const int blk_begin = split * per_split;
    const int blk_end = min(nblocks, blk_begin + per_split);
    const int qkv_width = (num_heads + 2 * num_kv_heads) * HEAD_DIM;

    float q[G][8];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        const uint4 raw =
            *reinterpret_cast<const uint4*>(qkv + (u64)b * qkv_width + (h0 + g) * HEAD_DIM + sub * 8);
        const T2* p = reinterpret_cast<const T2*>(&raw);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            float2 f = to_f2(p[k]);
            q[g][2 * k] = f.x * scale;
            q[g][2 * k + 1] = f.y * scale;
        }
    }
    float m[G], l[G], acc[G][8];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        m[g] = NEG_INF;
        l[g] = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; ++k) acc[g][k] = 0.0f;
    }

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
#pragma unroll
        for (int g = 0; g < G; ++g) {
            float s[LOADS_PER_BLOCK];
            float bmax = NEG_INF;
#pragma unroll
            for (int j = 0; j < LOADS_PER_BLOCK; ++j) {
                const T2* kp = reinterpret_cast<const T2*>(&kr[j]);
                float dot = 0.0f;
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    float2 f = to_f2(kp[k]);
                    dot += q[g][2 * k] * f.x + q[g][2 * k + 1] * f.y;
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
            const float new_m = fmaxf(m[g], bmax);  // finite: the block's first token is in range
            const float alpha = (m[g] == NEG_INF) ? 0.0f : __expf(m[g] - new_m);
            l[g] *= alpha;
#pragma unroll
            for (int k = 0; k < 8; ++k) acc[g][k] *= alpha;
#pragma unroll
            for (int j = 0; j < LOADS_PER_BLOCK; ++j) {
                const float p = (s[j] == NEG_INF) ? 0.0f : __expf(s[j] - new_m);
                l[g] += p;
                const T2* vp = reinterpret_cast<const T2*>(&vr[j]);
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    float2 f = to_f2(vp[k]);
                    acc[g][2 * k] += p * f.x;
                    acc[g][2 * k + 1] += p * f.y;
                }
            }
            m[g] = new_m;
        }
    }
    // Sum the token groups of the warp (lanes with equal `sub`); each m[g] is warp-uniform.
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
        for (int o = 16; o >= LANES_PER_TOKEN; o >>= 1) {
            l[g] += __shfl_xor_sync(0xffffffffu, l[g], o);
#pragma unroll
            for (int k = 0; k < 8; ++k) acc[g][k] += __shfl_xor_sync(0xffffffffu, acc[g][k], o);
        }
    }
    __shared__ float sm_m[DEC_WARPS][G], sm_l[DEC_WARPS][G];
    __shared__ float sm_acc[DEC_WARPS][G][HEAD_DIM];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        if (lane == 0) {
            sm_m[warp][g] = m[g];
            sm_l[warp][g] = l[g];
        }
        if (tok_in == 0) {
#pragma unroll
            for (int k = 0; k < 8; ++k) sm_acc[warp][g][sub * 8 + k] = acc[g][k];
        }
    }
    __syncthreads();
    // Merge the warps: thread i takes (head g, dim d) pairs i, i + 128, ...
    for (int i = threadIdx.x; i < G * HEAD_DIM; i += blockDim.x) {
        const int g = i / HEAD_DIM, d = i % HEAD_DIM;
        float big_m = NEG_INF;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) big_m = fmaxf(big_m, sm_m[w][g]);
        float total_l = 0.0f, v = 0.0f;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) {
            const float weight = (sm_m[w][g] == NEG_INF) ? 0.0f : __expf(sm_m[w][g] - big_m);
            total_l += sm_l[w][g] * weight;
            v += sm_acc[w][g][d] * weight;
        }
        v *= total_l > 0.0f ? 1.0f / total_l : 0.0f;
        const int h = h0 + g;
        if (num_splits == 1) {
            out[((u64)b * num_heads + h) * HEAD_DIM + d] = from_f(v);
        } else {
            part_out[(((u64)b * num_heads + h) * num_splits + split) * HEAD_DIM + d] = v;
            if (d == 0) {
                part_lse[((u64)b * num_heads + h) * num_splits + split] =
                    total_l > 0.0f ? big_m + __logf(total_l) : NEG_INF;
            }
        }
    }
}

// One CTA per query head: grid (num_heads, batch, num_splits), 128 threads (4 warps). Sequence b
// attends to seq_lens[b] tokens (its new token included; its KV was written by rope_kv_write).
// The blocks of the sequence are split evenly over the splits; inside a split, each warp takes
// whole KV blocks. A lane holds 8 dims (16 bytes) of one token; HEAD_DIM/8 lanes cover a token.
// Output: with num_splits == 1 the normalised result in out[b, h, :]; otherwise the normalised
// partial result and its log-sum-exp per split, merged by attn_decode_reduce.
extern "C" __global__ void __launch_bounds__(128) attn_decode(
        const T* qkv, const T* pool, const u32* block_tables, int table_stride, const int* seq_lens,
        float* part_out, float* part_lse, T* out, int layer, int num_splits, float scale,
        int num_heads, int num_kv_heads, int num_layers) {
    pdl_trigger();
    pdl_wait();
    const int h = blockIdx.x;
    decode_attention_heads<1>(qkv, pool, block_tables, table_stride, seq_lens, part_out, part_lse, out,
                              layer, num_splits, scale, num_heads, num_kv_heads, num_layers, h,
                              h / (num_heads / num_kv_heads), blockIdx.y, blockIdx.z);
}

// One CTA per KV head: grid (num_kv_heads, batch, num_splits), 128 threads. With grouped-query
// attention GQA_GROUP query heads (a compile-time define: query heads per KV head) read the same K
// and V; attn_decode reads each KV block once per query head, this kernel once per KV head. Query
// head kvh * GQA_GROUP + g is the one attn_decode maps to KV head kvh, and the outputs use
// attn_decode's layout, so attn_decode_reduce merges either.
#ifndef GQA_GROUP
#define GQA_GROUP 1
#endif

extern "C" __global__ void __launch_bounds__(128) attn_decode_gqa(
        const T* qkv, const T* pool, const u32* block_tables, int table_stride, const int* seq_lens,
        float* part_out, float* part_lse, T* out, int layer, int num_splits, float scale,
        int num_heads, int num_kv_heads, int num_layers) {
    pdl_trigger();
    pdl_wait();
    const int kvh = blockIdx.x;
    decode_attention_heads<GQA_GROUP>(qkv, pool, block_tables, table_stride, seq_lens, part_out,
                                      part_lse, out, layer, num_splits, scale, num_heads, num_kv_heads,
                                      num_layers, kvh * GQA_GROUP, kvh, blockIdx.y, blockIdx.z);
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
