// gemm_ws.cu: Own warp-specialised TMA + wgmma GEMM (sm_90a): plain, and gate_up with SiLU-mul in the epilogue.
// Part of the kernel source compiled by NVRTC (see model/kernels.rs for the order).

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
__device__ __forceinline__ void gm_tma_store_2d(const TmaMap* map, u32 src, int c0, int c1) {
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"((u64)map),
                 "r"(src), "r"(c0), "r"(c1)
                 : "memory");
}
__device__ __forceinline__ void gm_named_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// K-major operand in 128-byte-swizzled rows (8-row atoms of 1024 bytes): SBO 1024, mode 1.
__device__ __forceinline__ u64 gm_desc(u32 saddr) {
    return (u64)((saddr & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | (1ull << 62);
}
__device__ __forceinline__ void gm_mma256(float (&d)[128], u64 da, u64 db, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32." MMA_TYPE "." MMA_TYPE " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, 0, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
                 : "l"(da), "l"(db), "r"(accumulate));
}

template <bool SILU>
__device__ __forceinline__ void gemm_ws_impl(const TmaMap* a_map, const TmaMap* b_map, const TmaMap* o_map, T* out,
                                             int M, int N, int K) {
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
            gm_mbar_init(empty(s), 8);  // one arrival per consumer warp
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    pdl_wait();
    const int tiles_m = (M + GM_BM - 1) / GM_BM;
    const int tiles_n = SILU ? N / 128 : (N + GM_BN - 1) / GM_BN;
    const int num_tiles = tiles_m * tiles_n;
    const int w0 = blockIdx.x, wstep = gridDim.x;
    const int nk = (K + GM_BK - 1) / GM_BK;
    const int wg = threadIdx.x >> 7;

    if (wg == 0) {
        // ---- producer: one thread issues every TMA load
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        if (threadIdx.x == 0) {
            int it = 0;
            for (int tile = w0; tile < num_tiles; tile += wstep) {
                const int m0 = (tile % tiles_m) * GM_BM;
                const int nt = tile / tiles_m;
                const int nb0 = SILU ? nt * 128 : nt * GM_BN;
                const int nb1 = SILU ? N + nt * 128 : nt * GM_BN + 128;
                for (int kb = 0; kb < nk; ++kb, ++it) {
                    const int s = it % GM_STAGES;
                    if (it >= GM_STAGES) gm_mbar_wait(empty(s), (u32)((it / GM_STAGES - 1) & 1));
                    const u32 a = a_tile(s), b = a + GM_A_BYTES;
                    gm_mbar_expect_tx(full(s), GM_STAGE_BYTES);
                    gm_tma_2d(a, a_map, full(s), kb * GM_BK, m0);
                    gm_tma_2d(b, b_map, full(s), kb * GM_BK, nb0);
                    gm_tma_2d(b + GM_B_BYTES / 2, b_map, full(s), kb * GM_BK, nb1);
                }
            }
        }
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
        const int m0 = (tile % tiles_m) * GM_BM;
        const int nt = tile / tiles_m;
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
            }
        }
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
        if (lane == 0) {
            gm_mbar_arrive(empty((it - 1) % GM_STAGES));
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
    if (SILU && wg_leader) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
}
#endif

#define GM_KERNEL(NAME, SILU)                                                                                  \
    extern "C" __global__ void __launch_bounds__(384, 1)                                                       \
        NAME(const __grid_constant__ TmaMap a_map, const __grid_constant__ TmaMap b_map,                      \
             const __grid_constant__ TmaMap o_map, T* out, int M, int N, int K) {                              \
        GM_BODY(SILU)                                                                                          \
    }
#if GM_SUPPORTED
#define GM_BODY(SILU) gemm_ws_impl<SILU>(&a_map, &b_map, &o_map, out, M, N, K);
#else
#define GM_BODY(SILU) __trap();  // only selected on sm_90a
#endif
// out[M, N] = A B^T (B: N rows).
GM_KERNEL(gemm_ws, false)
// act[M, inter] = silu(A Bg^T) * (A Bu^T), B = [gate; up] of 2 inter rows; N = inter (multiple of 128);
// act is written through o_map ([rows >= M, inter], boxes of 64 x 64, 128-byte swizzle); out unused.
GM_KERNEL(gemm_ws_silu, true)
