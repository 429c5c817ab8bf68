// Split-KV decode (flash-decoding): few queries against a long KV. The keys a query sees are
// cut into `splits` ranges; block (query x head, split) attends one range and writes an f32
// partial output with its log-sum-exp, and `flash_decode_combine` merges the parts by LSE.
//
// In a block, 8 lanes share one key: each holds D/8 of the dims (16-byte loads), the dot is
// reduced across the 8 with three shuffles, and each 8-lane group keeps its own online
// softmax; 16 groups (4 per warp) walk the range 16 keys apart and are merged in shared
// memory at the end. Memory-bound: every K and V byte of the range is read once.

#define NCH (HEAD_DIM / 8)          // 16-byte pieces per row
#define CPL ((NCH + 7) / 8)         // pieces per lane
#define GROUPS 16

__device__ __forceinline__ void unpack8(const uint4 w, float* f) {
    f[0] = lo_f32(w.x); f[1] = hi_f32(w.x);
    f[2] = lo_f32(w.y); f[3] = hi_f32(w.y);
    f[4] = lo_f32(w.z); f[5] = hi_f32(w.z);
    f[6] = lo_f32(w.w); f[7] = hi_f32(w.w);
}

// 4 blocks an SM: up to 128 registers a thread (a tighter bound made ptxas spill at D=128).
extern "C" __global__ void __launch_bounds__(128, 4)
flash_decode(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
             float* __restrict__ part_o, float* __restrict__ part_lse, int n_q, int n_kv, int h_q,
             int h_kv, float scale_log2, int mask, i64 chunk, i64 q_pos, i64 k_pos,
             const int* __restrict__ table, int bt, int splits) {
    constexpr int D = HEAD_DIM;
    __shared__ float m_s[GROUPS], l_s[GROUPS];
    __shared__ float o_s[GROUPS][D];

    const int qh = blockIdx.x, split = blockIdx.y;
    const int qi = qh / h_q, h = qh % h_q, hk = h / (h_q / h_kv);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int li = lane & 7, slot = lane >> 3, grp = warp * 4 + slot;

    int klo, khi;
    key_range(mask, chunk, q_pos + qi, k_pos, n_kv, klo, khi);
    const int per = (khi - klo + splits - 1) / splits;
    const int s_lo = klo + split * per;
    const int s_hi = min(s_lo + per, khi);

    float qv[CPL][8];
    const u16* qrow = q + ((size_t)qi * h_q + h) * D;
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
        const int piece = li + 8 * c;
        if (piece < NCH) {
            unpack8(*(const uint4*)(qrow + piece * 8), qv[c]);
#pragma unroll
            for (int e = 0; e < 8; ++e) qv[c][e] *= scale_log2;
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) qv[c][e] = 0.f;
        }
    }

    float m = NEG_INF, l = 0.f, acc[CPL][8];
#pragma unroll
    for (int c = 0; c < CPL; ++c)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[c][e] = 0.f;

    // The trip count is the same for every lane of a warp, so the shuffles stay converged.
    for (int base = s_lo + warp * 4; base < s_hi; base += GROUPS) {
        const int key = base + slot;
        const bool ok = key < s_hi;
        float dot = 0.f;
        uint4 vw[CPL];
        if (ok) {
            const u16* kr = kv_row(k, key, hk, h_kv, table, bt);
            const u16* vr = kv_row(v, key, hk, h_kv, table, bt);
#pragma unroll
            for (int c = 0; c < CPL; ++c) {
                const int piece = li + 8 * c;
                if (piece < NCH) {
                    float kf[8];
                    unpack8(*(const uint4*)(kr + piece * 8), kf);
                    vw[c] = *(const uint4*)(vr + piece * 8);  // in flight during the reduction
#pragma unroll
                    for (int e = 0; e < 8; ++e) dot += qv[c][e] * kf[e];
                }
            }
        }
        dot += __shfl_xor_sync(0xffffffffu, dot, 1);
        dot += __shfl_xor_sync(0xffffffffu, dot, 2);
        dot += __shfl_xor_sync(0xffffffffu, dot, 4);
        if (ok) {
            const float m_new = fmaxf(m, dot);
            const float alpha = exp2f(m - m_new);
            const float p = exp2f(dot - m_new);
            l = l * alpha + p;
            m = m_new;
#pragma unroll
            for (int c = 0; c < CPL; ++c) {
                if (li + 8 * c < NCH) {
                    float vf[8];
                    unpack8(vw[c], vf);
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[c][e] = acc[c][e] * alpha + p * vf[e];
                }
            }
        }
    }

    if (li == 0) {
        m_s[grp] = m;
        l_s[grp] = l;
    }
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
        const int piece = li + 8 * c;
        if (piece < NCH) {
#pragma unroll
            for (int e = 0; e < 8; ++e) o_s[grp][piece * 8 + e] = acc[c][e];
        }
    }
    __syncthreads();

    float mx = NEG_INF;
#pragma unroll
    for (int gi = 0; gi < GROUPS; ++gi) mx = fmaxf(mx, m_s[gi]);
    float total = 0.f;
    if (mx != NEG_INF) {
#pragma unroll
        for (int gi = 0; gi < GROUPS; ++gi) total += l_s[gi] * exp2f(m_s[gi] - mx);
    }
    const size_t at = ((size_t)split * n_q + qi) * h_q + h;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float sum = 0.f;
        if (total > 0.f) {
#pragma unroll
            for (int gi = 0; gi < GROUPS; ++gi) sum += o_s[gi][d] * exp2f(m_s[gi] - mx);
            sum /= total;
        }
        part_o[at * D + d] = sum;
    }
    if (threadIdx.x == 0) part_lse[at] = total > 0.f ? mx * LN2 + logf(total) : NEG_INF;
}

// Merges the `splits` partial results of every (query, head) by their LSE.
extern "C" __global__ void __launch_bounds__(128)
flash_decode_combine(const float* __restrict__ part_o, const float* __restrict__ part_lse,
                     u16* __restrict__ out, float* __restrict__ lse, int n_q, int h_q,
                     int splits) {
    constexpr int D = HEAD_DIM;
    const int qh = blockIdx.x;
    const size_t stride = (size_t)n_q * h_q;
    float mx = NEG_INF;
    for (int s = 0; s < splits; ++s) mx = fmaxf(mx, part_lse[s * stride + qh]);
    float total = 0.f;
    if (mx != NEG_INF) {
        for (int s = 0; s < splits; ++s) total += expf(part_lse[s * stride + qh] - mx);
    }
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float sum = 0.f;
        if (total > 0.f) {
            for (int s = 0; s < splits; ++s) {
                const float w = expf(part_lse[s * stride + qh] - mx);
                sum += w * part_o[(s * stride + qh) * D + d];
            }
            sum /= total;
        }
        out[(size_t)qh * D + d] = from_f32(sum);
    }
    if (threadIdx.x == 0) lse[qh] = total > 0.f ? mx + logf(total) : NEG_INF;
}
