// prefill_attention_ws.cu: Warp-specialised persistent prefill attention: TMA producer, two wgmma consumer warpgroups (sm_90a, head_dim 128, KV blocks of 8-128 tokens dividing 128).
// Part of the kernel source compiled by NVRTC (see model/kernels.rs for the order).

// ------------------------------------------------------------------------------------------------
// attn_prefill_wgmma_ws (sm_90a, HEAD_DIM 128), FA3-style (facts from Shah et al. 2024; own code):
// - warp specialisation: warpgroup 0 is the producer (one thread streams K/V chunks of 128 keys
//   with the tensor-memory accelerator, TMA, into a ring of 3 shared-memory stages; it
//   completes "full" mbarriers by transaction bytes and waits on "empty" mbarriers that the
//   consumers arrive on); it gives up registers (setmaxnreg.dec) to warpgroups 1 and 2, the
//   consumers (64 query rows each of the 128-row tile), which never issue loads but Q's.
// - paged KV through one 5-D tensor map over the pool ([block][layer*2 + K|V][kv head][token]
//   [dim], innermost last): one box = one 16-token block's 64-dim panel (2 KiB), written by the
//   TMA with the 128-byte swizzle that the wgmma descriptors read (the layout of
//   attn_prefill_wgmma). Blocks past the sequence's end are requested at block index `num_blocks`
//   (outside the tensor), which the TMA fills with zeros. Slots past the end inside the last block hold finite values (the pool
//   is zeroed at creation and only ever written with finite K/V), and P is exactly 0 there.
// - intra-warpgroup overlap: S_j = Q K_j^T and O += P_{j-1} V_{j-1} are issued back to back; the
//   softmax of S_j runs while the P V wgmma is in flight (O is rescaled after its wait, P_j is
//   packed only then, so the in-flight wgmma's registers are never touched).
// grid: min(multiprocessors, tiles x heads) CTAs of 384 threads, 1 CTA per SM (persistent, below).
#define WS_KEYS 128
#define WS_PANEL_KV (WS_KEYS * 128)   // bytes of one 64-dim panel of a K or V chunk (16 KiB)
#define WS_Q_BYTES (2 * PF_TILE_ROWS * 128)
#define WS_STAGE_BYTES (4 * WS_PANEL_KV)

// A CUtensorMap (128 bytes, 64-byte aligned), passed by value as a __grid_constant__ parameter.
struct __align__(64) TmaMap {
    unsigned long long words[16];
};

// The kernel needs whole 8-row swizzle atoms per block and whole blocks per 128-key chunk.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && HEAD_DIM == 128 && BLOCK_SIZE % 8 == 0 && 128 % BLOCK_SIZE == 0
#define WS_SUPPORTED 1
#else
#define WS_SUPPORTED 0
#endif

#if WS_SUPPORTED
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

#endif


#if WS_SUPPORTED
// ---- Persistent grid: one CTA per SM walks a list of (tile, head) work items.
// Items are numbered longest first (the host sorts the tiles by KV length, ascending, so rank r is
// tile num_tiles - 1 - r; heads of one tile are adjacent, so GQA heads sharing a KV head run side
// by side); CTA b takes item b of round 0, G - 1 - b of round 1, and so on (a snake over the
// rounds, which balances the causal triangle as well as the hardware's dynamic order did in a
// simulation of 2048 / 4096 tokens). What persistence buys: the producer streams K/V chunks across
// items without a break (the next item's first chunks land under the current item's last ones),
// each consumer warpgroup loads the next item's Q rows (with RoPE) while its last P V runs, and
// the CTA start-up (barrier init, register reallocation) is paid once per SM, not once per item.
struct WsItem {
    int seq, row0, rows, pos0, h, nchunks;
};
__device__ __forceinline__ int ws_item_index(int k, int num_items) {
    const int G = (int)gridDim.x, b = (int)blockIdx.x;
    const int j = k * G + ((k & 1) ? G - 1 - b : b);  // increasing in k for every b
    return j < num_items ? j : -1;
}
__device__ __forceinline__ WsItem ws_item(int j, const int4* tiles, int num_tiles, int num_heads) {
    const int4 t = tiles[num_tiles - 1 - j / num_heads];
    WsItem it;
    it.seq = t.x;
    it.row0 = t.y;
    it.rows = t.z;
    it.pos0 = t.w;
    it.h = j % num_heads;
    it.nchunks = (t.w + t.z + WS_KEYS - 1) / WS_KEYS;
    return it;
}

// One consumer warpgroup's 64 Q rows of an item (rows 64 cw .. 64 cw + 63 of its tile), RoPE
// applied, into the swizzled Q buffer (the layout of attn_prefill_wgmma). Generic-proxy stores: the caller fences them for
// wgmma and syncs the warpgroup.
__device__ __forceinline__ void ws_load_q(unsigned char* sq, const T* qkv, const float* rope, const WsItem& it,
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


// The softmax masks per 8 keys inside the diagonal chunk: one mask branch around the whole chunk
// made ptxas serialise the wgmma (warning C7519).
template <int STAGES>
__device__ __forceinline__ void attn_prefill_ws_impl(const TmaMap* kv_map, const T* qkv, const u32* block_tables,
                                                      int table_stride, const int4* tiles, int num_tiles, T* out,
                                                      int layer, float scale, int num_heads, int num_kv_heads,
                                                      const float* rope, int num_blocks) {
    extern __shared__ __align__(16) unsigned char ws_smem[];
    pdl_trigger();
    const u32 raw_addr = (u32)__cvta_generic_to_shared(ws_smem);
    const u32 pad = ((raw_addr + 1023u) & ~1023u) - raw_addr;
    unsigned char* sq = ws_smem + pad;
    const u32 sq_base = raw_addr + pad;
    const u32 kv_base = sq_base + WS_Q_BYTES;
    const u32 bar_base = kv_base + STAGES * WS_STAGE_BYTES;
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
    const int num_items = num_tiles * num_heads;
    const int wg = threadIdx.x >> 7;
    // Chunks are numbered across this CTA's items (g): stage g % STAGES, phase (g / STAGES) & 1.

    if (wg == 0) {
        // ---- producer
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        if (threadIdx.x == 0) {
            constexpr int BLOCKS = WS_KEYS / BLOCK_SIZE;
            constexpr u32 BOX_BYTES = BLOCK_SIZE * 128;
            int g = 0;
            for (int k = 0;; ++k) {
                const int j = ws_item_index(k, num_items);
                if (j < 0) break;
                const WsItem it = ws_item(j, tiles, num_tiles, num_heads);
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
                    const u32 ks = kv_base + (u32)s * WS_STAGE_BYTES, vs = ks + 2 * WS_PANEL_KV;
                    mbar_expect_tx(full_k(s), 2 * WS_PANEL_KV);
#pragma unroll
                    for (int b = 0; b < BLOCKS; ++b) {
                        tma_load_5d(ks + b * BOX_BYTES, kv_map, full_k(s), 0, 0, kvh, 2 * layer, phys[b]);
                        tma_load_5d(ks + WS_PANEL_KV + b * BOX_BYTES, kv_map, full_k(s), 64, 0, kvh, 2 * layer,
                                    phys[b]);
                    }
                    mbar_expect_tx(full_v(s), 2 * WS_PANEL_KV);
#pragma unroll
                    for (int b = 0; b < BLOCKS; ++b) {
                        tma_load_5d(vs + b * BOX_BYTES, kv_map, full_v(s), 0, 0, kvh, 2 * layer + 1, phys[b]);
                        tma_load_5d(vs + WS_PANEL_KV + b * BOX_BYTES, kv_map, full_v(s), 64, 0, kvh, 2 * layer + 1,
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

    int j = ws_item_index(0, num_items);
    if (j < 0) return;
    WsItem it = ws_item(j, tiles, num_tiles, num_heads);
    ws_load_q(sq, qkv, rope, it, cw, qkv_width);
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
        const int my_chunks = wg_last_pos / WS_KEYS + 1;  // the other warpgroup may need one more
        const int qlo = wg_first_pos + warp * 16 + g4, qhi = qlo + 8;
        float m_lo = NEG_INF, m_hi = NEG_INF, l_lo = 0.0f, l_hi = 0.0f;
#pragma unroll
        for (int i = 0; i < 64; ++i) o[i] = 0.0f;
#pragma unroll
        for (int i = 0; i < 64; ++i) s[i] = 0.0f;

        auto stage_of = [&](int c) { return (g0 + c) % STAGES; };
        auto phase_of = [&](int c) { return (u32)(((g0 + c) / STAGES) & 1); };
        auto issue_qk = [&](int c) {
            const u32 ks = kv_base + (u32)stage_of(c) * WS_STAGE_BYTES;
#pragma unroll
            for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
                const u32 koff = (u32)(kk & 3) * 32u;
                const u64 da = wg_desc(sq_addr + (u32)(kk >> 2) * WG_PANEL_Q + koff, 16, 1024);
                const u64 db = wg_desc(ks + (u32)(kk >> 2) * WS_PANEL_KV + koff, 16, 1024);
                wg_qk128(s, da, db, kk > 0);
            }
        };
        auto issue_pv = [&](int c) {
            const u32 vs = kv_base + (u32)stage_of(c) * WS_STAGE_BYTES + 2 * WS_PANEL_KV;
#pragma unroll
            for (int kk = 0; kk < WS_KEYS / 16; ++kk) {
                const u64 db = wg_desc(vs + (u32)kk * 16u * 128u, WS_PANEL_KV, 1024);
                wg_pv(o, pa[kk], db, 1);
            }
        };
        auto softmax = [&](int c, float& a_lo, float& a_hi) {
            const int kc = c * WS_KEYS;
            const bool mask = kc + WS_KEYS - 1 > wg_first_pos;  // warpgroup-uniform
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
        mbar_wait(full_k(stage_of(0)), phase_of(0));
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
            // An mbarrier wait (a spin loop, so a basic-block boundary) sits between the softmax and
            // the wgmma wait on purpose: ptxas hoists WARPGROUP.DEPBAR to the top of its basic
            // block, so in one block with the softmax the exp2s would run after P V had completed
            // (no overlap). The wait is on chunk c's V (loaded with its K, needed next), which
            // depends on no later release: waiting on a later chunk's K can deadlock when its stage
            // is the one chunk c - 1 still holds.
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
        const int jn = ws_item_index(k + 1, num_items);
        WsItem next = it;
        if (jn >= 0) {
            next = ws_item(jn, tiles, num_tiles, num_heads);
            ws_load_q(sq, qkv, rope, next, cw, qkv_width);
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        }
        wg_wait<0>();
        fence_o();
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
        if (jn < 0) break;
        named_sync(1 + cw, 128);  // the next item's Q rows, written by every thread of the warpgroup
        g0 += it.nchunks;
        it = next;
    }
}
#endif
#if WS_SUPPORTED
#define WS_BODY(STAGES)                                                                                          \
    attn_prefill_ws_impl<STAGES>(&kv_map, qkv, block_tables, table_stride, tiles, num_tiles, out, layer, scale, \
                                 num_heads, num_kv_heads, rope, num_blocks);
#else
#define WS_BODY(STAGES) __trap();  // only selected for sm_90a and head_dim 128
#endif
// Grid: min(multiprocessors, tiles x heads) CTAs of 384 threads.
extern "C" __global__ void __launch_bounds__(384, 1)
    attn_prefill_wgmma_ws(const __grid_constant__ TmaMap kv_map, const T* qkv, const u32* block_tables, int table_stride,
                     const int4* tiles, int num_tiles, T* out, int layer, float scale, int num_heads,
                     int num_kv_heads, const float* rope, int num_blocks) {
    WS_BODY(3)
}
