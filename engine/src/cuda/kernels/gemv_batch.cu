// gemv_batch.cu: Multi-row streaming GEMVs for decode batches of 2..=32 rows: plain, and with
// SiLU-mul fused (gate_up). Part of the kernel source compiled by NVRTC (see model/kernels.rs for
// the order); uses ld_stream16 from gemv.cu.
//
// y[m, n] = x[m, K] . W[n, K]^T with m <= 32: still memory-bound (every weight read once per step),
// but at m >= 2 fp32 FMAs on the CUDA cores would cost more than the weight stream (32 rows of an
// 8B model: 0.5 TFLOP per step), so the products run on the tensor cores (mma.sync m16n8k16, fp32
// accumulate) straight from registers: a CTA owns 16 weight rows (the A operand) and every x row
// (B operand: BG_TILES tiles of 8 rows). Each weight element is loaded once, whatever m is.
//
// The k order inside a 32-element group is permuted the same way for W and x (a dot product does
// not care), so each lane's fragments are whole 16-byte loads: lane (g = lane / 4, t = lane % 4)
// loads elements [8t, 8t + 8) of the group from weight rows g and g + 8 and from x row g; the first
// half of each load feeds the group's first k16 step, the second half the second one.
//
// The 4 warps of a CTA split K: stages of BG_U groups are dealt round-robin to the warps, so the CTA
// streams BG_WARPS x BG_U x 64 contiguous bytes of each of its rows at a time; partial sums are
// added in shared memory. As in the batch-1 kernels, each warp's first weight stage is loaded before
// pdl_wait() and the stream is double-buffered in registers (2 x 2 rows x BG_U x 16 = 256 bytes in
// flight per lane).
#define BG_WARPS 4
#define BG_THREADS (32 * BG_WARPS)
#define BG_U 4
#define BG_MAX_TILES 4

__device__ __forceinline__ void bg_mma(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE "." MMA_TYPE
                 ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One lane's loads of one stage: BG_U groups of its two weight rows (lo = row g, hi = row g + 8).
struct BgStage {
    uint4 lo[BG_U], hi[BG_U];
};

// Multiplies one 32-element group: the lane's weight loads `wl`, `wh` against x rows 8j + g
// (`pred` false: x taken as zeros, past the end of K; the caller zeroes the weights too).
template <int TILES>
__device__ __forceinline__ void bg_group(const uint4& wl, const uint4& wh, const uint4* const (&xrow)[TILES],
                                         int chunk, bool pred, float (&acc)[TILES][4]) {
#pragma unroll
    for (int j = 0; j < TILES; ++j) {
        const uint4 xv = pred ? __ldg(xrow[j] + chunk) : make_uint4(0, 0, 0, 0);
        bg_mma(acc[j], wl.x, wh.x, wl.y, wh.y, xv.x, xv.y);
        bg_mma(acc[j], wl.z, wh.z, wl.w, wh.w, xv.z, xv.w);
    }
}

__device__ __forceinline__ void bg_load(const uint4* wlo, const uint4* whi, int c0, BgStage& s) {
#pragma unroll
    for (int u = 0; u < BG_U; ++u) {
        s.lo[u] = ld_stream16(wlo + c0 + 4 * u);
        s.hi[u] = ld_stream16(whi + c0 + 4 * u);
    }
}

template <int TILES>
__device__ __forceinline__ void bg_use(const BgStage& s, const uint4* const (&xrow)[TILES], int c0,
                                       float (&acc)[TILES][4]) {
#pragma unroll
    for (int u = 0; u < BG_U; ++u) bg_group<TILES>(s.lo[u], s.hi[u], xrow, c0 + 4 * u, true, acc);
}

// This warp's share of the 16 x (8 TILES) tile: weight rows `row_lo` (A rows 0-7) and `row_hi`
// (A rows 8-15) of this lane against x rows 8j + g (clamped to m - 1), summed over the CTA in
// shared memory. Returns with `red` holding [warp][tile * 4 + fragment element][lane] partials.
// Calls pdl_wait() (after the first weight stage is in flight) before reading x.
template <int TILES>
__device__ __forceinline__ void bg_tile(const T* W, const T* x, int row_lo, int row_hi, int m, int K,
                                        float (*red)[BG_MAX_TILES * 4][32]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int chunks = K / 8;            // 16-byte chunks per row
    const int groups = chunks / 4;       // whole 32-element groups
    const int full = groups / BG_U;      // whole stages (of the CTA, dealt round-robin to warps)
    const int stride = 4 * BG_U;         // chunks per stage
    const uint4* wlo = reinterpret_cast<const uint4*>(W + (u64)row_lo * K) + t;
    const uint4* whi = reinterpret_cast<const uint4*>(W + (u64)row_hi * K) + t;
    const uint4* xrow[TILES];
#pragma unroll
    for (int j = 0; j < TILES; ++j) xrow[j] = reinterpret_cast<const uint4*>(x + (u64)min(8 * j + g, m - 1) * K) + t;
    float acc[TILES][4];
#pragma unroll
    for (int j = 0; j < TILES; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    BgStage a, b;
    int s = warp;
    if (s < full) bg_load(wlo, whi, s * stride, a);
    pdl_trigger();
    pdl_wait();
    for (; s + BG_WARPS < full; s += 2 * BG_WARPS) {
        bg_load(wlo, whi, (s + BG_WARPS) * stride, b);
        bg_use<TILES>(a, xrow, s * stride, acc);
        if (s + 2 * BG_WARPS < full) bg_load(wlo, whi, (s + 2 * BG_WARPS) * stride, a);
        bg_use<TILES>(b, xrow, (s + BG_WARPS) * stride, acc);
    }
    if (s < full) bg_use<TILES>(a, xrow, s * stride, acc);
    // The rest: groups past the whole stages (the last one maybe partial), one per warp in turn.
    const int tail_groups = (chunks - full * stride + 3) / 4;
    for (int q = warp; q < tail_groups; q += BG_WARPS) {
        const int c = full * stride + 4 * q;
        const bool pred = c + t < chunks;
        const uint4 zero = make_uint4(0, 0, 0, 0);
        const uint4 wl = pred ? ld_stream16(wlo + c) : zero, wh = pred ? ld_stream16(whi + c) : zero;
        bg_group<TILES>(wl, wh, xrow, c, pred, acc);
    }
#pragma unroll
    for (int j = 0; j < TILES; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) red[warp][j * 4 + e][lane] = acc[j][e];
    __syncthreads();
}

// Sum over the warps of one partial (fragment element `f` of lane `l`).
__device__ __forceinline__ float bg_sum(float (*red)[BG_MAX_TILES * 4][32], int f, int l) {
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < BG_WARPS; ++w) v += red[w][f][l];
    return v;
}

// Plain multi-row GEMV: CTA c computes weight rows [16c, 16c + 16) for all m x rows. out_f32 as in
// gemv (0: y is T; 1: f32; 2: f32, added to; 3: T, added to in f32 and rounded once); y is [m, N].
template <int TILES>
__device__ __forceinline__ void gemv_batch_body(const T* W, const T* x, void* y, int m, int N, int K, int out_f32) {
    __shared__ float red[BG_WARPS][BG_MAX_TILES * 4][32];
    const int row0 = blockIdx.x * 16;
    const int g = (threadIdx.x & 31) >> 2;
    bg_tile<TILES>(W, x, min(row0 + g, N - 1), min(row0 + g + 8, N - 1), m, K, red);
    // Fragment element e of lane l: weight row g + 8 (e >> 1), x row 8j + 2t + (e & 1).
    for (int i = threadIdx.x; i < TILES * 4 * 32; i += BG_THREADS) {
        const int f = i >> 5, l = i & 31, j = f >> 2, e = f & 3;
        const int n = row0 + (l >> 2) + 8 * (e >> 1), r = 8 * j + 2 * (l & 3) + (e & 1);
        if (n >= N || r >= m) continue;
        const float v = bg_sum(red, f, l);
        const u64 o = (u64)r * N + n;
        if (out_f32 == 3) reinterpret_cast<T*>(y)[o] = from_f(to_f(reinterpret_cast<T*>(y)[o]) + v);
        else if (out_f32 == 2) reinterpret_cast<float*>(y)[o] += v;
        else if (out_f32) reinterpret_cast<float*>(y)[o] = v;
        else reinterpret_cast<T*>(y)[o] = from_f(v);
    }
}

// Gate/up multi-row GEMV with the SiLU-gated activation fused: W holds gate rows [0, inter) then up
// rows [inter, 2 inter); CTA c takes gate rows [8c, 8c + 8) as A rows 0-7 and the matching up rows
// as A rows 8-15, so a lane's fragment elements e and e + 2 are the gate and up of the same output,
// and writes act[r, 8c + g] = silu(gate) * up for every x row r (inter a multiple of 8).
template <int TILES>
__device__ __forceinline__ void gemv_batch_silu_body(const T* W, const T* x, T* act, int m, int inter, int K) {
    __shared__ float red[BG_WARPS][BG_MAX_TILES * 4][32];
    const int col0 = blockIdx.x * 8;
    const int g = (threadIdx.x & 31) >> 2;
    bg_tile<TILES>(W, x, col0 + g, inter + col0 + g, m, K, red);
    for (int i = threadIdx.x; i < TILES * 2 * 32; i += BG_THREADS) {
        const int p = i >> 5, l = i & 31, j = p >> 1, h = p & 1;
        const int r = 8 * j + 2 * (l & 3) + h;
        if (r >= m) continue;
        // Rounded to T first, as the unfused path (GEMM output in T, then silu_mul) does.
        const float gate = to_f(from_f(bg_sum(red, j * 4 + h, l)));
        const float up = to_f(from_f(bg_sum(red, j * 4 + 2 + h, l)));
        act[(u64)r * inter + col0 + (l >> 2)] = from_f(gate / (1.0f + __expf(-gate)) * up);
    }
}

// Entry points per x-row tile count (8 TILES rows at most): model/mlp.rs picks ceil(m / 8).
#define BG_ENTRY(TILES)                                                                                       \
    extern "C" __global__ void __launch_bounds__(BG_THREADS)                                                  \
        gemv_batch##TILES(const T* W, const T* x, void* y, int m, int N, int K, int out_f32) {                \
        gemv_batch_body<TILES>(W, x, y, m, N, K, out_f32);                                                    \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(BG_THREADS)                                                  \
        gemv_batch_silu##TILES(const T* W, const T* x, T* act, int m, int inter, int K) {                     \
        gemv_batch_silu_body<TILES>(W, x, act, m, inter, K);                                                  \
    }
BG_ENTRY(1)
BG_ENTRY(2)
BG_ENTRY(3)
BG_ENTRY(4)
