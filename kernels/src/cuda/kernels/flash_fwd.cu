// Flash-attention forward (FlashAttention-2's schedule) on tensor cores: mma.sync m16n8k16,
// f32 accumulation, online softmax in exp2, output and log-sum-exp.
//
// One block of 4 warps owns 64 query rows of one query head (16 rows a warp, kept in
// registers as mma A fragments) and walks the key tiles its rows can see, 64 keys a tile.
// K and V tiles come through shared memory with cp.async: V's copy overlaps S = Q K^T, the
// next K's copy overlaps O += P V. Rows are padded by 16 bytes so ldmatrix's eight row
// addresses fall in distinct banks. P goes from the S accumulators straight into A fragments
// (the m16n8 accumulator layout is the m16k16 operand layout), never through shared memory.
//
// Layouts as the CPU kernel: q, out [n_q, h_q, D]; k, v [n_kv, h_kv, D] (or paged, see
// kv_row); lse [n_q, h_q] in natural log, -inf with a zero row for a query that sees no key.

#define BM 64
#define BN 64
#define LDS (HEAD_DIM + 8)

__device__ __forceinline__ void load_tile(u16* dst, const u16* base, int n0, int n_kv, int hk,
                                          int h_kv, const int* table, int bt) {
    constexpr int CPR = HEAD_DIM / 8;  // 16-byte pieces per row
#pragma unroll
    for (int c = threadIdx.x; c < BN * CPR; c += 128) {
        const int row = c / CPR, col = (c % CPR) * 8;
        const int key = n0 + row;
        const bool ok = key < n_kv;
        const u16* src = ok ? kv_row(base, key, hk, h_kv, table, bt) + col : base;
        cp_async16(dst + row * LDS + col, src, ok);
    }
}

extern "C" __global__ void __launch_bounds__(128, 2)
flash_fwd(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
          u16* __restrict__ out, float* __restrict__ lse, int n_q, int n_kv, int h_q, int h_kv,
          float scale_log2, int mask, i64 chunk, i64 q_pos, i64 k_pos,
          const int* __restrict__ table, int bt) {
    constexpr int D = HEAD_DIM;
    __shared__ __align__(16) u16 ks[BN * LDS];
    __shared__ __align__(16) u16 vs[BN * LDS];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    // Heaviest query blocks (last, under a causal mask) first.
    const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;
    const int h = blockIdx.y, hk = h / (h_q / h_kv);
    const int m_last = min(m0 + BM, n_q) - 1;

    // The keys any row of the block sees: the masks' bounds grow with the position.
    int blo, bhi, unused;
    key_range(mask, chunk, q_pos + m0, k_pos, n_kv, blo, unused);
    key_range(mask, chunk, q_pos + m_last, k_pos, n_kv, unused, bhi);

    int row[2], klo[2], khi[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        row[i] = m0 + warp * 16 + g + 8 * i;
        if (row[i] < n_q) {
            key_range(mask, chunk, q_pos + row[i], k_pos, n_kv, klo[i], khi[i]);
        } else {
            klo[i] = 0;
            khi[i] = 0;
        }
    }

    // Q as A fragments: a0 (row g, cols 2t..), a1 (row g+8), a2 (row g, cols 8+2t..), a3.
    u32 qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = row[i & 1], col = kk * 16 + (i >> 1) * 8 + 2 * t;
            qf[kk][i] = r < n_q ? *(const u32*)(q + ((size_t)r * h_q + h) * D + col) : 0u;
        }
    }

    float o[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.f, 0.f};

    const int n_start = blo / BN * BN;
    if (n_start < bhi) {
        load_tile(ks, k, n_start, n_kv, hk, h_kv, table, bt);
        cp_async_commit();
    }
    for (int n0 = n_start; n0 < bhi; n0 += BN) {
        cp_async_wait_all();
        __syncthreads();  // K tile in; every warp is done with the previous V tile
        load_tile(vs, v, n0, n_kv, hk, h_kv, table, bt);
        cp_async_commit();

        float s[BN / 8][4];
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                u32 b0, b1, b2, b3;
                const u16* p = ks + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDS + kk * 16 +
                               ((lane >> 3) & 1) * 8;
                ldsm_x4(b0, b1, b2, b3, p);
                mma16816(s[2 * np], qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3], b0, b1);
                mma16816(s[2 * np + 1], qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3], b2, b3);
            }
        }

        // Mask, then the online softmax of this thread's two rows (4 lanes share a row).
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const bool whole = n0 >= klo[i] && n0 + BN <= khi[i];
            float mx = NEG_INF;
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float x = s[j][2 * i + e] * scale_log2;
                    if (!whole) {
                        const int key = n0 + j * 8 + 2 * t + e;
                        if (key < klo[i] || key >= khi[i]) x = NEG_INF;
                    }
                    s[j][2 * i + e] = x;
                    mx = fmaxf(mx, x);
                }
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m_run[i], mx);
            const float m_use = m_new == NEG_INF ? 0.f : m_new;  // no (-inf) - (-inf)
            const float alpha = exp2f(m_run[i] - m_use);
            m_run[i] = m_new;
            float sum = 0.f;
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float pr = exp2f(s[j][2 * i + e] - m_use);
                    s[j][2 * i + e] = pr;
                    sum += pr;
                }
            }
            l_run[i] = l_run[i] * alpha + sum;  // this lane's part; reduced at the end
#pragma unroll
            for (int j = 0; j < D / 8; ++j) {
                o[j][2 * i] *= alpha;
                o[j][2 * i + 1] *= alpha;
            }
        }

        cp_async_wait_all();
        __syncthreads();  // V tile in; every warp is done with this K tile
        if (n0 + BN < bhi) {
            load_tile(ks, k, n0 + BN, n_kv, hk, h_kv, table, bt);
            cp_async_commit();
        }

#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            const u32 a0 = pack2(s[2 * kk][0], s[2 * kk][1]);
            const u32 a1 = pack2(s[2 * kk][2], s[2 * kk][3]);
            const u32 a2 = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            const u32 a3 = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                u32 b0, b1, b2, b3;
                const u16* p = vs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS +
                               dp * 16 + (lane >> 4) * 8;
                ldsm_x4_t(b0, b1, b2, b3, p);
                mma16816(o[2 * dp], a0, a1, a2, a3, b0, b1);
                mma16816(o[2 * dp + 1], a0, a1, a2, a3, b2, b3);
            }
        }
    }

#pragma unroll
    for (int i = 0; i < 2; ++i) {
        float l = l_run[i];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        if (row[i] >= n_q) continue;
        const float inv = l > 0.f ? 1.f / l : 0.f;
        u16* orow = out + ((size_t)row[i] * h_q + h) * D;
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            *(u32*)(orow + j * 8 + 2 * t) = pack2(o[j][2 * i] * inv, o[j][2 * i + 1] * inv);
        }
        if (t == 0) lse[(size_t)row[i] * h_q + h] = l > 0.f ? m_run[i] * LN2 + logf(l) : NEG_INF;
    }
}
