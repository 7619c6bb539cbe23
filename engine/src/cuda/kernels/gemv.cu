// gemv.cu: Batch-1 GEMVs: plain, with SiLU-mul fused (gate_up), with RoPE + KV write fused (qkv).
// Part of the kernel source compiled by NVRTC (see model/kernels.rs for the order).

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
// slots[0] (< 0: padding, nothing written). q/k/v biases (null: none) are added as rope_kv_write adds them.
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_rope(
        const T* W, const T* x, T* qkv, const T* qkv_bias, int K, const int* positions, const long long* slots,
        const float* rope, T* pool, int layer, int num_heads, int num_kv_heads, int num_layers) {
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
    if (qkv_bias != nullptr) {  // as rope_kv_write adds it: to the rounded output, rounded again
        a = to_f(from_f(a + to_f(qkv_bias[rows[0]])));
        b = to_f(from_f(b + to_f(qkv_bias[rows[1]])));
    }
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
