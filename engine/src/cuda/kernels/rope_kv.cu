// rope_kv.cu: RoPE on q and k and the paged KV write of k and v.
// Part of the kernel source compiled by NVRTC (see model/kernels.rs for the order).

// ------------------------------------------------------------------------------------------------
// RoPE (HF rotate_half convention: pairs (i, i + HEAD_DIM/2)) on q and k of one layer, in place
// in the fused qkv rows [q heads | k heads | v heads], and the KV write of k and v into the pool
// at slot = block * BLOCK_SIZE + offset (slot < 0: padding row, nothing written).
// rope[pos * HEAD_DIM + 2 * i] = cos, [.. + 2 * i + 1] = sin of pos * theta^(-2i/HEAD_DIM).
// rotate_q = 0: q is left alone (every prefill attention kernel but attn_prefill_mma64 rotates it
// when it loads its Q tile) and the rotated k only goes to the pool: a third less traffic.
// qkv_bias (null: none) is the fused [q | k | v] bias vector of models with q/k/v biases (Qwen2):
// added to the GEMM output and rounded to T, as the biased projection's output would be, before
// RoPE; q then gets written back with its bias even when it is not rotated here.
// One CTA per token looping over the items, 4-byte accesses.
extern "C" __global__ void rope_kv_write(T* qkv, const T* qkv_bias, const int* positions, const long long* slots,
                                         const float* rope, T* pool, int layer, int num_heads, int num_kv_heads,
                                         int num_layers, int rotate_q) {
    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.x;
    const int half = HEAD_DIM / 2;
    const int qkv_width = (num_heads + 2 * num_kv_heads) * HEAD_DIM;
    T* row = qkv + (u64)t * qkv_width;
    const int pos = positions[t];
    const long long slot = slots[t];
    const bool has_bias = qkv_bias != nullptr;
    // Each item rotates two adjacent pairs (i, i + half) and (i + 1, i + 1 + half): 4-byte accesses.
    const int first_head = (rotate_q || has_bias) ? 0 : num_heads;
    const int items = (num_heads + 2 * num_kv_heads - first_head) * (half / 2);
    for (int item = threadIdx.x; item < items; item += blockDim.x) {
        const int head = first_head + item / (half / 2);  // 0..nh-1 q, nh..nh+nkv-1 k, then v
        const int i = 2 * (item % (half / 2));
        T* h = row + head * HEAD_DIM;
        float2 a = to_f2(*reinterpret_cast<const T2*>(h + i));
        float2 b = to_f2(*reinterpret_cast<const T2*>(h + i + half));
        if (has_bias) {
            const float2 ba = to_f2(*reinterpret_cast<const T2*>(qkv_bias + head * HEAD_DIM + i));
            const float2 bb = to_f2(*reinterpret_cast<const T2*>(qkv_bias + head * HEAD_DIM + i + half));
            a = to_f2(from_f2(a.x + ba.x, a.y + ba.y));
            b = to_f2(from_f2(b.x + bb.x, b.y + bb.y));
            if (head < num_heads && !rotate_q) {
                *reinterpret_cast<T2*>(h + i) = from_f2(a.x, a.y);
                *reinterpret_cast<T2*>(h + i + half) = from_f2(b.x, b.y);
            }
        }
        if (head < num_heads + num_kv_heads && (rotate_q || head >= num_heads)) {
            const float4 cs = *reinterpret_cast<const float4*>(rope + (u64)pos * HEAD_DIM + 2 * i);  // c_i s_i c_i+1 s_i+1
            const float2 ra = make_float2(a.x * cs.x - b.x * cs.y, a.y * cs.z - b.y * cs.w);
            const float2 rb = make_float2(b.x * cs.x + a.x * cs.y, b.y * cs.z + a.y * cs.w);
            a = ra;
            b = rb;
            if (rotate_q) {
                *reinterpret_cast<T2*>(h + i) = from_f2(a.x, a.y);
                *reinterpret_cast<T2*>(h + i + half) = from_f2(b.x, b.y);
            }
        }
        if (head >= num_heads && slot >= 0) {
            const int kv = head < num_heads + num_kv_heads ? 0 : 1;
            const int kvh = kv == 0 ? head - num_heads : head - num_heads - num_kv_heads;
            const u32 block = (u32)(slot / BLOCK_SIZE);
            const int off = (int)(slot % BLOCK_SIZE);
            T* dst = pool + kv_piece(block, layer, kv, kvh, num_layers, num_kv_heads) + off * HEAD_DIM;
            *reinterpret_cast<T2*>(dst + i) = from_f2(a.x, a.y);
            *reinterpret_cast<T2*>(dst + i + half) = from_f2(b.x, b.y);
        }
    }
}
