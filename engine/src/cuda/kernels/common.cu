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
