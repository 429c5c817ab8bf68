// The small element-wise and row-wise ops of a Llama forward pass. f32 arithmetic on 16-bit
// storage; one block per row for the reductions.

__device__ __forceinline__ float block_sum(float x, float* scratch) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    float total = 0.f;
    for (int w = 0; w < warps; ++w) total += scratch[w];
    return total;
}

// 1 / rms of the row `xr` of n, over the whole block (every thread gets it).
__device__ __forceinline__ float inv_rms(const u16* xr, int n, float eps, float* scratch) {
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float f = to_f32(xr[i]);
        ss += f * f;
    }
    return rsqrtf(block_sum(ss, scratch) / n + eps);
}

// y[r] = x[r] / rms(x[r]) * w (w == null: no weight, Llama 4's QK-norm). Grid: rows.
extern "C" __global__ void __launch_bounds__(256)
rms_norm(const u16* __restrict__ x, const u16* __restrict__ w, u16* __restrict__ y, int n,
         float eps) {
    __shared__ float scratch[32];
    const u16* xr = x + (size_t)blockIdx.x * n;
    u16* yr = y + (size_t)blockIdx.x * n;
    const float r = inv_rms(xr, n, eps, scratch);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float wf = w ? to_f32(w[i]) : 1.f;
        yr[i] = from_f32(to_f32(xr[i]) * r * wf);
    }
}

// Rotates x [tokens, heads, d] in place: token t at position pos[t], pair i by the angle
// pos * inv_freq[i] (formed in f64: positions reach 10M), scaled by `factor`. Pairs (2i, 2i+1) when
// `interleaved` (Llama 4), else (i, i + half) (Hugging Face Llama); dims past 2*half pass.
extern "C" __global__ void __launch_bounds__(256)
rope_apply(u16* __restrict__ x, const i64* __restrict__ pos, const double* __restrict__ inv_freq,
           int tokens, int heads, int d, int half, int interleaved, float factor) {
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (i64)tokens * heads * half) return;
    const int i = (int)(idx % half);
    const i64 th = idx / half;
    const int tok = (int)(th / heads);
    // Reduce the angle modulo 2*pi in f64 (exact enough at 1e7 radians), then a fast f32
    // sin/cos on [-pi, pi]: no slow-path argument reduction, so no local memory.
    const double ang = (double)pos[tok] * inv_freq[i];
    const float red = (float)(ang - 6.283185307179586 * rint(ang * 0.15915494309189535));
    float s, c;
    __sincosf(red, &s, &c);
    const float cf = c * factor, sf = s * factor;
    u16* r = x + th * d;
    const int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
    const float x0 = to_f32(r[a]), x1 = to_f32(r[b]);
    r[a] = from_f32(x0 * cf - x1 * sf);
    r[b] = from_f32(x0 * sf + x1 * cf);
}

// out[r, i] = silu(gate[r, i]) * up[r, i]; gate and up rows `ld` apart (2n for a fused
// gate|up projection, n for separate buffers).
extern "C" __global__ void __launch_bounds__(256)
silu_mul(const u16* __restrict__ gate, const u16* __restrict__ up, u16* __restrict__ out,
         int rows, int n, int ld) {
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (i64)rows * n) return;
    const i64 r = idx / n, i = idx % n;
    const float g = to_f32(gate[r * ld + i]);
    out[idx] = from_f32(g / (1.f + expf(-g)) * to_f32(up[r * ld + i]));
}

// y += x, element-wise (the residual stream).
extern "C" __global__ void __launch_bounds__(256)
add_inplace(u16* __restrict__ y, const u16* __restrict__ x, i64 n) {
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < n) y[idx] = from_f32(to_f32(y[idx]) + to_f32(x[idx]));
}

// MoE dispatch: out[j] = x[rows[j]] * (scale ? scale[j] : 1), rows of n. Llama 4's router
// scales the expert's input by its sigmoid score, so the scale rides along with the gather.
extern "C" __global__ void __launch_bounds__(256)
moe_gather(const u16* __restrict__ x, const int* __restrict__ rows,
           const float* __restrict__ scale, u16* __restrict__ out, int n) {
    const int j = blockIdx.x;
    const u16* src = x + (size_t)rows[j] * n;
    const float s = scale ? scale[j] : 1.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        out[(size_t)j * n + i] = from_f32(to_f32(src[i]) * s);
    }
}

// MoE combine, deterministic (no atomics): y[t] += sum_k w[t, k] * e[slot[t, k]] over the
// token's top-k expert rows (slot < 0: unused). Grid: tokens.
extern "C" __global__ void __launch_bounds__(256)
moe_combine(const u16* __restrict__ e, const int* __restrict__ slot, const float* __restrict__ w,
            u16* __restrict__ y, int top_k, int n) {
    const int t = blockIdx.x;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float acc = to_f32(y[(size_t)t * n + i]);
        for (int kk = 0; kk < top_k; ++kk) {
            const int s = slot[t * top_k + kk];
            if (s >= 0) acc += w[t * top_k + kk] * to_f32(e[(size_t)s * n + i]);
        }
        y[(size_t)t * n + i] = from_f32(acc);
    }
}

// x[r] = x[r] / rms(x[r]) in place (Llama 4's weightless QK-norm, per head). Grid: rows.
// Safe in place: every thread reads its elements before the block sum's barrier and writes
// only the elements it read.
extern "C" __global__ void __launch_bounds__(256)
rms_norm_inplace(u16* __restrict__ x, int n, float eps) {
    __shared__ float scratch[32];
    u16* xr = x + (size_t)blockIdx.x * n;
    const float r = inv_rms(xr, n, eps, scratch);
    for (int i = threadIdx.x; i < n; i += blockDim.x) xr[i] = from_f32(to_f32(xr[i]) * r);
}

// x[r] *= scale[r], rows of n (Llama 4's attention-temperature tuning). Grid: rows.
extern "C" __global__ void __launch_bounds__(256)
scale_rows(u16* __restrict__ x, const float* __restrict__ scale, int n) {
    u16* xr = x + (size_t)blockIdx.x * n;
    const float s = scale[blockIdx.x];
    for (int i = threadIdx.x; i < n; i += blockDim.x) xr[i] = from_f32(to_f32(xr[i]) * s);
}
