// Stand-in for the CUDA headers: a tiny SIMT emulator for checking kernels on the CPU: one std::thread per CUDA thread of a
// CTA, warp shuffles through per-warp barriers; CTAs run one after another.
#pragma once
#include <cmath>
#include <cstring>
#include <algorithm>
#include <barrier>
#include <thread>
#include <vector>
#include <functional>
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
#define __align__(x)
struct __half { unsigned short x; };
struct __half2 { __half a, b; };
struct float2 { float x, y; };
struct uint4 { unsigned x, y, z, w; };
struct dim3 { unsigned x, y, z; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a,b,c,d}; }
// "half" stored as the top 16 bits of a float (bf16-like): enough to compare two kernels.
inline float __half2float(__half h) { unsigned u = (unsigned)h.x << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __half __float2half_rn(float f) { unsigned u; std::memcpy(&u, &f, 4); u += 0x8000; return {(unsigned short)(u >> 16)}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.a), __half2float(h.b)}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline thread_local dim3 threadIdx;
inline dim3 blockIdx, blockDim, gridDim;
inline std::barrier<>* warp_bar[32];
inline std::barrier<>* block_bar;
inline float xchg[32][32];
inline float __shfl_xor_sync(unsigned, float v, int o) {
    int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    xchg[w][lane] = v; warp_bar[w]->arrive_and_wait();
    float r = xchg[w][lane ^ o]; warp_bar[w]->arrive_and_wait();
    return r;
}
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline void __syncthreads() { block_bar->arrive_and_wait(); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float fmaxf(float a, float b) { return std::fmax(a, b); }
using std::min; using std::max;
inline void launch(dim3 grid, int threads, const std::function<void()>& body) {
    blockDim = {(unsigned)threads, 1, 1}; gridDim = grid;
    for (unsigned z = 0; z < grid.z; ++z) for (unsigned y = 0; y < grid.y; ++y) for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = {x, y, z};
        std::barrier<> bb(threads); block_bar = &bb;
        std::vector<std::barrier<>*> wb;
        for (int w = 0; w < (threads + 31) / 32; ++w) { warp_bar[w] = new std::barrier<>(32); }
        std::vector<std::thread> ts;
        for (int t = 0; t < threads; ++t) ts.emplace_back([t, &body] { threadIdx = {(unsigned)t, 0, 0}; body(); });
        for (auto& t : ts) t.join();
        for (int w = 0; w < (threads + 31) / 32; ++w) delete warp_bar[w];
    }
}
