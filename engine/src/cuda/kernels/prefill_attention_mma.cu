// prefill_attention_mma.cu: Paged causal prefill attention on mma.sync tensor cores (any architecture): 128-row tiles for head_dim <= 128, 64-row tiles for head_dim 256.
// Part of the kernel source compiled by NVRTC (see model/kernels.rs for the order).

// ------------------------------------------------------------------------------------------------
// Prefill attention over paged KV with a causal mask, on tensor cores (mma.sync m16n8k16,
// FlashAttention-2 style online softmax). grid (num_tiles, num_heads), 128 threads; a tile is up to
// 64 query rows of one sequence, each warp 16 rows. tiles[i] = {seq, first qkv row, rows, position
// of the first row}; a query at position p attends to keys 0..=p of its sequence (the KV of the new
// tokens was written by rope_kv_write before this kernel).
#define PF_KEYS 64
#define KS_PITCH (HEAD_DIM + 8)

__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE "." MMA_TYPE
                 ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
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


// One 64-key chunk for the warp's 16 query rows: K fragments by ldmatrix (one x4 load feeds two
// mma instead of four 4-byte shared loads), scores scaled into the log2 domain once (exp2), and
// the causal compare only where MASK (the chunk reaches past the warp's first query row).
template <bool MASK>
__device__ __forceinline__ void prefill_chunk_mma64(const T* ks, const T* vs, int kc, int qpos_lo, int qpos_hi,
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

// attn_prefill_mma64 (head_dim 256, where the 128-row tile needs too many accumulators per
// thread): 64-row tiles of 4 warps, K/V chunks double-buffered with cp.async, and
// - grid (num_heads, num_tiles): the heads vary fastest, so every head's longest tile (listed
//   last) starts in the first wave and the short tiles fill the tail;
// - __launch_bounds__(128, 3): at most 168 registers, so 3 CTAs share an SM;
// - one multiply by the block stride per 16-byte K/V copy;
// - prefill_chunk_mma64 (ldmatrix K fragments, exp2 softmax, masks only on diagonal chunks).
extern "C" __global__ void __launch_bounds__(128, 3) attn_prefill_mma64(
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
        if (kc <= warp_last_pos) {  // warp-uniform: the warp's rows see none of a later chunk
            const T* ks = smem + (ci & 1) * 2 * stage_elems;
            if (kc + PF_KEYS - 1 > warp_first_pos) {
                prefill_chunk_mma64<true>(ks, ks + stage_elems, kc, qpos_lo, qpos_hi, scale_log2, qa, o, m_lo, m_hi,
                                       l_lo, l_hi, lane);
            } else {
                prefill_chunk_mma64<false>(ks, ks + stage_elems, kc, qpos_lo, qpos_hi, scale_log2, qa, o, m_lo, m_hi,
                                        l_lo, l_hi, lane);
            }
        }
        __syncthreads();
    }
    prefill_store(out, row0, rows, h, num_heads, warp, lane, o, l_lo, l_hi);
}

// ------------------------------------------------------------------------------------------------
// attn_prefill_mma (the mma.sync prefill attention for HEAD_DIM <= 128): FlashAttention-2's work
// split. A tile is up to 128 query rows, 4 warps of 32 rows (two m16 tiles each), so every K/V
// fragment read from shared memory feeds two mma (half the shared-memory traffic per mma of
// attn_prefill_mma64) and each warp has two independent accumulator chains. Q lives in shared
// memory (loaded once, with RoPE applied on the way: rope_kv_write then skips q), K/V chunks of 64
// keys are double-buffered with cp.async.
// grid (num_heads, num_tiles), 128 threads, dynamic shared memory (128 + 2 x 2 x 64) x KS_PITCH x 2 B.
#define PF_TILE_ROWS 128
// m16 tiles per warp of attn_prefill_mma (4 warps of 32 rows); its K/V chunks are PF_KEYS keys.
#define PF_WARP_TILES 2

// One 64-key chunk for the warp's two m16 tiles: S = Q K^T from ldmatrix fragments, the online
// softmax (scores scaled into the log2 domain, exp2; the causal compare only where MASK: the
// chunk reaches past the warp's first query row), then O += P V.
template <bool MASK>
__device__ __forceinline__ void prefill_chunk_mma(const T* sq, const T* ks, const T* vs, int kc, int qpos0,
                                                  float scale_log2, float (&o)[PF_WARP_TILES][HEAD_DIM / 8][4],
                                                  float (&m)[PF_WARP_TILES][2], float (&l)[PF_WARP_TILES][2], int warp,
                                                  int lane) {
    const int g = lane >> 2, t4 = lane & 3;
    const int mat = lane >> 3, mrow = lane & 7;
    float s[PF_WARP_TILES][PF_KEYS / 8][4];
#pragma unroll
    for (int mt = 0; mt < PF_WARP_TILES; ++mt)
#pragma unroll
        for (int nt = 0; nt < PF_KEYS / 8; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.0f;
    // A fragments (16 x 16 of Q) by ldmatrix.x4: lane l addresses row (l & 7) + 8 ((l >> 3) & 1), column
    // 8 (l >> 4) of the m-tile.
    const T* qaddr = &sq[(warp * 16 * PF_WARP_TILES + mrow + (mat & 1) * 8) * KS_PITCH + (mat >> 1) * 8];
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
        u32 qa[PF_WARP_TILES][4];
#pragma unroll
        for (int mt = 0; mt < PF_WARP_TILES; ++mt) {
            const u32 saddr = (u32)__cvta_generic_to_shared(qaddr + mt * 16 * KS_PITCH + kk * 16);
            asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                         : "=r"(qa[mt][0]), "=r"(qa[mt][1]), "=r"(qa[mt][2]), "=r"(qa[mt][3])
                         : "r"(saddr));
        }
        // B fragments: keys nt*8 .. +7 (rows of K) x dims kk*16 .. +15 by ldmatrix.x2 (lanes 0-15).
#pragma unroll
        for (int nt = 0; nt < PF_KEYS / 8; ++nt) {
            const u32 saddr = (u32)__cvta_generic_to_shared(&ks[(nt * 8 + mrow) * KS_PITCH + kk * 16 + (mat & 1) * 8]);
            u32 b0, b1;
            asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(b0), "=r"(b1) : "r"(saddr));
#pragma unroll
            for (int mt = 0; mt < PF_WARP_TILES; ++mt) mma16816(s[mt][nt], qa[mt], b0, b1);
        }
    }
#pragma unroll
    for (int mt = 0; mt < PF_WARP_TILES; ++mt) {
        const int qlo = qpos0 + warp * 16 * PF_WARP_TILES + mt * 16 + g, qhi = qlo + 8;
        float mx_lo = NEG_INF, mx_hi = NEG_INF;
#pragma unroll
        for (int nt = 0; nt < PF_KEYS / 8; ++nt) {
            float* x = s[mt][nt];
            if (MASK) {
                const int kpos = kc + nt * 8 + t4 * 2;
                x[0] = (kpos <= qlo) ? x[0] * scale_log2 : NEG_INF;
                x[1] = (kpos + 1 <= qlo) ? x[1] * scale_log2 : NEG_INF;
                x[2] = (kpos <= qhi) ? x[2] * scale_log2 : NEG_INF;
                x[3] = (kpos + 1 <= qhi) ? x[3] * scale_log2 : NEG_INF;
            } else {
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
        // m is finite after the first chunk (key 0 is visible to every row): see prefill_chunk_mma64.
        const float nm_lo = fmaxf(m[mt][0], mx_lo), nm_hi = fmaxf(m[mt][1], mx_hi);
        const float a_lo = exp2f(m[mt][0] - nm_lo), a_hi = exp2f(m[mt][1] - nm_hi);
        m[mt][0] = nm_lo;
        m[mt][1] = nm_hi;
        float sum_lo = 0.0f, sum_hi = 0.0f;
#pragma unroll
        for (int nt = 0; nt < PF_KEYS / 8; ++nt) {
            float* x = s[mt][nt];
            x[0] = exp2f(x[0] - nm_lo);
            x[1] = exp2f(x[1] - nm_lo);
            x[2] = exp2f(x[2] - nm_hi);
            x[3] = exp2f(x[3] - nm_hi);
            sum_lo += x[0] + x[1];
            sum_hi += x[2] + x[3];
        }
        l[mt][0] = l[mt][0] * a_lo + sum_lo;
        l[mt][1] = l[mt][1] * a_hi + sum_hi;
#pragma unroll
        for (int nd = 0; nd < HEAD_DIM / 8; ++nd) {
            o[mt][nd][0] *= a_lo;
            o[mt][nd][1] *= a_lo;
            o[mt][nd][2] *= a_hi;
            o[mt][nd][3] *= a_hi;
        }
    }
#pragma unroll
    for (int kk = 0; kk < PF_KEYS / 16; ++kk) {
        u32 pa[PF_WARP_TILES][4];
#pragma unroll
        for (int mt = 0; mt < PF_WARP_TILES; ++mt) {
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
            for (int mt = 0; mt < PF_WARP_TILES; ++mt) {
                mma16816(o[mt][nd], pa[mt], b0, b1);
                mma16816(o[mt][nd + 1], pa[mt], b2, b3);
            }
        }
    }
}

__device__ __forceinline__ void attn_prefill_mma_impl(
        const T* qkv, const T* pool, const u32* block_tables, int table_stride, const int4* tiles, int num_tiles,
        T* out, int layer, float scale, int num_heads, int num_kv_heads, int num_layers, const float* rope) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    pdl_trigger();
    pdl_wait();
    T* sq = reinterpret_cast<T*>(smem_raw);
    T* skv = sq + PF_TILE_ROWS * KS_PITCH;
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

    constexpr int D8 = HEAD_DIM / 8;
    constexpr int THREADS = 32 * PF_TILE_ROWS / (16 * PF_WARP_TILES);
    constexpr int STEP = THREADS / D8;
    const int tok0 = threadIdx.x / D8, d8 = threadIdx.x % D8;
    const T* kbase = pool + kv_piece(0, layer, 0, kvh, num_layers, num_kv_heads) + d8 * 8;
    const u64 block_stride = (u64)num_layers * 2 * num_kv_heads * BLOCK_SIZE * HEAD_DIM;
    auto load_chunk = [&](int chunk, int stage) {
        T* ks = skv + stage * 2 * stage_elems;
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

    // Q tile into shared memory with RoPE (pairs (i, i + HEAD_DIM/2): 8-element vectors v and
    // v + D8/2); rows past the tile are zeros.
    for (int idx = threadIdx.x; idx < PF_TILE_ROWS * (D8 / 2); idx += blockDim.x) {
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

    const int warp_first_pos = pos0 + warp * 16 * PF_WARP_TILES;
    const int warp_last_pos = warp_first_pos + 16 * PF_WARP_TILES - 1;
    float m[PF_WARP_TILES][2], l[PF_WARP_TILES][2];
    float o[PF_WARP_TILES][HEAD_DIM / 8][4];
#pragma unroll
    for (int mt = 0; mt < PF_WARP_TILES; ++mt) {
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
        const int kc = ci * PF_KEYS;
        if (kc <= warp_last_pos) {  // warp-uniform
            const T* ks = skv + (ci & 1) * 2 * stage_elems;
            if (kc + PF_KEYS - 1 > warp_first_pos) {
                prefill_chunk_mma<true>(sq, ks, ks + stage_elems, kc, pos0, scale_log2, o, m, l, warp, lane);
            } else {
                prefill_chunk_mma<false>(sq, ks, ks + stage_elems, kc, pos0, scale_log2, o, m, l, warp, lane);
            }
        }
        __syncthreads();
    }
    const int g = lane >> 2, t4 = lane & 3;
    const int out_width = num_heads * HEAD_DIM;
#pragma unroll
    for (int mt = 0; mt < PF_WARP_TILES; ++mt) {
        float l_lo = l[mt][0], l_hi = l[mt][1];
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {
            l_lo += __shfl_xor_sync(0xffffffffu, l_lo, off);
            l_hi += __shfl_xor_sync(0xffffffffu, l_hi, off);
        }
        const float inv_lo = l_lo > 0.0f ? 1.0f / l_lo : 0.0f;
        const float inv_hi = l_hi > 0.0f ? 1.0f / l_hi : 0.0f;
        const int r_lo = warp * 16 * PF_WARP_TILES + mt * 16 + g, r_hi = r_lo + 8;
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

extern "C" __global__ void __launch_bounds__(128) attn_prefill_mma(
        const T* qkv, const T* pool, const u32* block_tables, int table_stride, const int4* tiles, int num_tiles,
        T* out, int layer, float scale, int num_heads, int num_kv_heads, int num_layers, const float* rope) {
    attn_prefill_mma_impl(qkv, pool, block_tables, table_stride, tiles, num_tiles, out, layer, scale, num_heads,
                          num_kv_heads, num_layers, rope);
}
