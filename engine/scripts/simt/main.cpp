// The decode attention kernels on the CPU through the emulator in cuda_fp16.h (see
// engine/scripts/check_decode_attention_on_cpu.sh): both kernels and their split merge against a
// plain softmax(q K^T) V, for several head, group, block and context sizes.
#include <cstdio>
#include <random>
#include KERNELS
// Checks attn_decode and attn_decode_gqa (each with attn_decode_reduce) against a plain
// softmax(q K^T) V in float on random data.
int main(int argc, char** argv) {
    const int nh = NH, nkv = NKV, group = nh / nkv, B = 3, nl = 2, layer = 1;
    const int lens[B] = {LEN0, 1, 2 * BLOCK_SIZE + 1};
    const int max_blocks = (LEN0 + BLOCK_SIZE - 1) / BLOCK_SIZE + 2;
    const int pool_blocks = B * max_blocks + 5;
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0.f, 1.f);
    const int qkv_width = (nh + 2 * nkv) * HEAD_DIM;
    std::vector<T> qkv((size_t)B * qkv_width), pool((size_t)pool_blocks * nl * 2 * nkv * BLOCK_SIZE * HEAD_DIM);
    for (auto& x : qkv) x = from_f(nd(rng));
    for (auto& x : pool) x = from_f(nd(rng));
    std::vector<u32> tables((size_t)B * max_blocks);
    std::vector<u32> perm(pool_blocks); for (int i = 0; i < pool_blocks; ++i) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng);
    for (size_t i = 0; i < tables.size(); ++i) tables[i] = perm[i];
    std::vector<int> seq_lens(lens, lens + B);
    const float scale = 1.0f / std::sqrt((float)HEAD_DIM);
    // Reference.
    std::vector<float> ref((size_t)B * nh * HEAD_DIM);
    for (int b = 0; b < B; ++b) for (int h = 0; h < nh; ++h) {
        int kvh = h / group; std::vector<float> s(lens[b]); float mx = -1e30f;
        for (int p = 0; p < lens[b]; ++p) {
            u32 phys = tables[b * max_blocks + p / BLOCK_SIZE];
            const T* k = pool.data() + kv_piece(phys, layer, 0, kvh, nl, nkv) + (p % BLOCK_SIZE) * HEAD_DIM;
            float d = 0; for (int i = 0; i < HEAD_DIM; ++i) d += to_f(qkv[b * qkv_width + h * HEAD_DIM + i]) * scale * to_f(k[i]);
            s[p] = d; mx = std::max(mx, d);
        }
        float den = 0; for (auto& v : s) { v = std::exp(v - mx); den += v; }
        for (int p = 0; p < lens[b]; ++p) {
            u32 phys = tables[b * max_blocks + p / BLOCK_SIZE];
            const T* v = pool.data() + kv_piece(phys, layer, 1, kvh, nl, nkv) + (p % BLOCK_SIZE) * HEAD_DIM;
            for (int i = 0; i < HEAD_DIM; ++i) ref[((size_t)b * nh + h) * HEAD_DIM + i] += s[p] / den * to_f(v[i]);
        }
    }
    int bad = 0;
    for (int per_kv = 0; per_kv < 2; ++per_kv) for (int splits : {1, 3, 5}) {
        std::vector<float> part_out((size_t)B * nh * splits * HEAD_DIM, NAN), part_lse((size_t)B * nh * splits, NAN);
        std::vector<T> out((size_t)B * nh * HEAD_DIM, from_f(NAN));
        launch({(unsigned)(per_kv ? nkv : nh), B, (unsigned)splits}, 128, [&] {
            (per_kv ? attn_decode_gqa : attn_decode)(qkv.data(), pool.data(), tables.data(), max_blocks, seq_lens.data(),
                part_out.data(), part_lse.data(), out.data(), layer, splits, scale, nh, nkv, nl);
        });
        if (splits > 1) launch({(unsigned)nh, B, 1}, HEAD_DIM, [&] {
            attn_decode_reduce(part_out.data(), part_lse.data(), out.data(), splits, nh);
        });
        float worst = 0;
        for (size_t i = 0; i < ref.size(); ++i) worst = std::max(worst, std::fabs(to_f(out[i]) - ref[i]));
        if (!(worst < 0.02f)) bad = 1;
        printf("%s splits %d: max |diff| vs reference %.3g\n", per_kv ? "per KV head   " : "per query head", splits, worst);
    }
    return bad;
}
