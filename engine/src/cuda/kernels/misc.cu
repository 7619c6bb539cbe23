// misc.cu: SiLU-gated activation, greedy argmax, word copies on the compute stream.
// Part of the kernel source compiled by NVRTC (see model/kernels.rs for the order).

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
