// Prepended by the host to every kernel source, after the variant's #defines (DTYPE_BF16,
// HEAD_DIM, PAGED). NVRTC compiles it with no include directive at all: the runtime needs libnvrtc and
// the driver, never a CUDA toolkit's headers. Storage types are raw 16-bit words; conversions
// and tensor-core instructions are written in PTX (sm_80 and newer).

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define NEG_INF (-__int_as_float(0x7f800000))
#define LN2 0.6931471805599453f

#if DTYPE_BF16
#define MMA_T "bf16"
__device__ __forceinline__ float to_f32(u16 x) { return __int_as_float(((u32)x) << 16); }
// Two floats to one word, `lo` in the low half (the element at the lower index).
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ u16 from_f32(float x) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}
#else
#define MMA_T "f16"
__device__ __forceinline__ float to_f32(u16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
}
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ u16 from_f32(float x) {
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}
#endif

__device__ __forceinline__ float lo_f32(u32 w) { return to_f32((u16)(w & 0xffff)); }
__device__ __forceinline__ float hi_f32(u32 w) { return to_f32((u16)(w >> 16)); }

__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 bytes global -> shared, asynchronously; `valid == false` writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"(smem_u32(dst)), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }

// Four 8x8 b16 matrices from shared memory; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldsm_x4(u32& r0, u32& r1, u32& r2, u32& r3, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(smem_u32(p)) : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(u32& r0, u32& r1, u32& r2, u32& r3, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(smem_u32(p)) : "memory");
}

// D = A(16x16, row) * B(16x8, col) + D, f32 accumulators.
__device__ __forceinline__ void mma16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." MMA_T "." MMA_T ".f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Masks, as in the CPU kernel: 0 none, 1 causal, 2 chunked-local (`chunk`). A query at
// absolute position p sees keys at absolute positions [lo, hi); key index j is at k_pos + j.
// The result is clamped to key indices [0, n_kv), with khi >= klo.
__device__ __forceinline__ void key_range(int mask, i64 chunk, i64 p, i64 k_pos, int n_kv,
                                          int& klo, int& khi) {
    i64 lo = 0, hi = k_pos + n_kv;
    if (mask == 1) {
        hi = p + 1;
    } else if (mask == 2) {
        lo = p / chunk * chunk;
        hi = p + 1;
    }
    lo -= k_pos;
    hi -= k_pos;
    lo = lo < 0 ? 0 : (lo > n_kv ? n_kv : lo);
    hi = hi < 0 ? 0 : (hi > n_kv ? n_kv : hi);
    klo = (int)lo;
    khi = (int)(hi < lo ? lo : hi);
}

// The row of key `key`, KV head `hk`: contiguous `[n_kv, h_kv, D]`, or paged through the KV
// store's block table (a block holds K `[bt, h_kv, D]` then V of the same shape, so K and V
// share this formula with V's base `bt * h_kv * D` elements further on).
#ifdef HEAD_DIM
__device__ __forceinline__ const u16* kv_row(const u16* base, int key, int hk, int h_kv,
                                             const int* table, int bt) {
#if PAGED
    const int blk = table[key / bt];
    return base + ((size_t)blk * 2 * bt + key % bt) * h_kv * HEAD_DIM + (size_t)hk * HEAD_DIM;
#else
    return base + ((size_t)key * h_kv + hk) * HEAD_DIM;
#endif
}
#endif
