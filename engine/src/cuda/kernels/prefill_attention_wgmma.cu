// prefill_attention_wgmma.cu: Paged causal prefill attention with Hopper wgmma, cp.async loads (sm_90a, head_dim 128).
// Part of the kernel source compiled by NVRTC (see model/kernels.rs for the order).

// ------------------------------------------------------------------------------------------------
// attn_prefill_wgmma (sm_90a, HEAD_DIM 128): Hopper warpgroup MMA (wgmma). attn_prefill_mma's
// tile (128 query rows) on two warpgroups of 64 rows. K/V chunks of 64 keys are double-buffered with cp.async into
// 128-byte-swizzled shared memory, the layout wgmma reads through matrix descriptors: each operand
// is two 64-dim panels of [row][64 dims] with 128-byte rows whose 16-byte pieces are XOR-permuted
// by (row & 7). S = Q K^T reads Q and K from shared memory (K-major); O += P V takes P from
// registers (the S accumulator layout of a warp is the A-fragment layout, as with mma.sync) and V
// N-major (transposed B). Softmax in the log2 domain (exp2, the scale folded into the exponent's
// FMA).
// grid (num_heads, num_tiles), 256 threads.
#define WG_KEYS 64
#define WG_PANEL_Q (PF_TILE_ROWS * 128)   // bytes of one 64-dim panel of the Q tile
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

extern "C" __global__ void __launch_bounds__(256, 2) attn_prefill_wgmma(
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
    for (int idx = threadIdx.x; idx < PF_TILE_ROWS * 8; idx += blockDim.x) {
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
