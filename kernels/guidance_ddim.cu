// Guidance combination + sampler update (one output block of a step-table row) in one elementwise pass.
//
//   out = w_x * x_t + w_a * out_a + w_b * out_b + w_h1 * h1 + ... + w_hK * hK
//
// where out_a, out_b are the two UNet outputs of a guidance rule (model_output = coef_a * out_a +
// coef_b * out_b), h1..hK a multistep solver's history (K = 0 for DDIM, 1 for DPM-Solver++ 2M, 2 for
// UniPC) and (w_x, w_a, w_b, w_h1..w_hK) one output block of a row of the per-step weights table that
// `finextract.engine.ddim.StepTable.weights` computes in double precision from the scheduler's sigmas,
// the model's prediction type and the rule's coefficients. For DDIM and an epsilon model:
//   w_x = sqrt(a_prev / a_t),  w_a = c * coef_a,  w_b = c * coef_b,
//   c   = sqrt(1 - a_prev) - sqrt(a_prev * (1 - a_t) / a_t)            (DDIM, Song et al. Eq. 12)
// The row is read from 3 + K floats in device memory, so one captured CUDA graph replays every
// timestep: the loop copies the step's row into that buffer on the device (no host synchronisation).
// The torch reference `finextract.kernels.guidance_ddim.guided_update_reference` defines the result
// (the same terms, added in the same order).
//
// Storage types: fp32, fp16, bf16 (one type for all tensors); arithmetic in fp32.
// Memory: every element is read once and written once, 16 bytes per thread per access on the aligned
// body; a scalar head/tail covers unaligned starts and sizes that are not a multiple of the vector.
// No CUDA headers are included so that the same source compiles under NVRTC (CuPy) and nvcc.
//
// Entry points (extern "C", looked up by name from finextract/kernels/cuda_guidance.py):
//   guided_ddim_{f32,f16,bf16}       (out, x_t, out_a, out_b, n, head, n_vec, weights)
//   guided_ddim_{f32,f16,bf16}_a     (out, x_t, out_a,        n, head, n_vec, weights)
//                                     the one-term variant (w_b unused)
//   guided_ddim_{f32,f16,bf16}[_a]_h1 (out, x_t, out_a, [out_b,] h1,     n, head, n_vec, weights)
//   guided_ddim_{f32,f16,bf16}[_a]_h2 (out, x_t, out_a, [out_b,] h1, h2, n, head, n_vec, weights)
//                                     with one or two history inputs (weights has 3 + K floats)
// `head`: elements before the first 16-byte-aligned one (the same for every pointer, else n_vec = 0);
// `n_vec`: 16-byte vectors in the aligned body; elements [head + n_vec*VEC, n) form the tail.

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

struct __align__(16) Vec16 { u32 w[4]; };

// ---- scalar conversions (PTX for fp16; bf16 by bit arithmetic, round to nearest even) ----
__device__ __forceinline__ float u16_half_to_float(u16 h) {
    float f;
    asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 float_to_half_u16(float f) {
    u16 h;
    asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float u16_bf16_to_float(u16 b) { return __uint_as_float(((u32)b) << 16); }
__device__ __forceinline__ u16 float_to_bf16_u16(float f) {
    u32 bits = __float_as_uint(f);
    if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu)) return (u16)((bits >> 16) | 0x0040u);  // quiet NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (u16)(bits >> 16);
}

// ---- storage traits: scalar load/store and the 16-byte vector ----
struct F32 {
    typedef float T;
    static const int VEC = 4;
    __device__ static float load(const T* p, i64 i) { return p[i]; }
    __device__ static void store(T* p, i64 i, float v) { p[i] = v; }
    __device__ static float lane(const Vec16& v, int j) { return __uint_as_float(v.w[j]); }
    __device__ static void set_lane(Vec16& v, int j, float f) { v.w[j] = __float_as_uint(f); }
};
struct F16 {
    typedef u16 T;
    static const int VEC = 8;
    __device__ static float load(const T* p, i64 i) { return u16_half_to_float(p[i]); }
    __device__ static void store(T* p, i64 i, float v) { p[i] = float_to_half_u16(v); }
    __device__ static float lane(const Vec16& v, int j) { return u16_half_to_float((u16)(v.w[j >> 1] >> ((j & 1) * 16))); }
    __device__ static void set_lane(Vec16& v, int j, float f) {
        u32 h = float_to_half_u16(f), shift = (j & 1) * 16;
        v.w[j >> 1] = (v.w[j >> 1] & ~(0xffffu << shift)) | (h << shift);
    }
};
struct BF16 {
    typedef u16 T;
    static const int VEC = 8;
    __device__ static float load(const T* p, i64 i) { return u16_bf16_to_float(p[i]); }
    __device__ static void store(T* p, i64 i, float v) { p[i] = float_to_bf16_u16(v); }
    __device__ static float lane(const Vec16& v, int j) { return u16_bf16_to_float((u16)(v.w[j >> 1] >> ((j & 1) * 16))); }
    __device__ static void set_lane(Vec16& v, int j, float f) {
        u32 b = float_to_bf16_u16(f), shift = (j & 1) * 16;
        v.w[j >> 1] = (v.w[j >> 1] & ~(0xffffu << shift)) | (b << shift);
    }
};

// One pass over n elements. HAS_B and K are compile-time switches: each variant reads only its streams.
template <class S, bool HAS_B, int K>
__device__ __forceinline__ void guided_ddim_body(typename S::T* __restrict__ out,
                                                 const typename S::T* __restrict__ x_t,
                                                 const typename S::T* __restrict__ eps_a,
                                                 const typename S::T* __restrict__ eps_b,
                                                 const typename S::T* __restrict__ h1,
                                                 const typename S::T* __restrict__ h2,
                                                 i64 n, i64 head, i64 n_vec, const float* __restrict__ weights) {
    // every thread reads the same 3 + K floats (one cache line, served from L1/L2)
    const float w_x = weights[0];
    const float w_a = weights[1];
    const float w_b = HAS_B ? weights[2] : 0.0f;
    const float w_h1 = K >= 1 ? weights[3] : 0.0f;
    const float w_h2 = K >= 2 ? weights[4] : 0.0f;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    const i64 tid = (i64)blockIdx.x * blockDim.x + threadIdx.x;

    // 1. aligned body: 16-byte loads of all inputs issued before any arithmetic
    const Vec16* vx = reinterpret_cast<const Vec16*>(x_t + head);
    const Vec16* va = reinterpret_cast<const Vec16*>(eps_a + head);
    const Vec16* vb = reinterpret_cast<const Vec16*>(HAS_B ? eps_b + head : eps_a + head);
    const Vec16* v1 = reinterpret_cast<const Vec16*>(K >= 1 ? h1 + head : eps_a + head);
    const Vec16* v2 = reinterpret_cast<const Vec16*>(K >= 2 ? h2 + head : eps_a + head);
    Vec16* vo = reinterpret_cast<Vec16*>(out + head);
    for (i64 v = tid; v < n_vec; v += stride) {
        const Vec16 x = vx[v];
        const Vec16 a = va[v];
        Vec16 b, p, q;
        if (HAS_B) b = vb[v];
        if (K >= 1) p = v1[v];
        if (K >= 2) q = v2[v];
        Vec16 r;
#pragma unroll
        for (int j = 0; j < S::VEC; ++j) {
            float acc = w_x * S::lane(x, j);
            acc = fmaf(w_a, S::lane(a, j), acc);
            if (HAS_B) acc = fmaf(w_b, S::lane(b, j), acc);
            if (K >= 1) acc = fmaf(w_h1, S::lane(p, j), acc);
            if (K >= 2) acc = fmaf(w_h2, S::lane(q, j), acc);
            S::set_lane(r, j, acc);
        }
        vo[v] = r;
    }

    // 2. scalar head [0, head) and tail [head + n_vec*VEC, n): at most 2*(VEC-1) elements, or all of
    //    them when the pointers do not share one alignment (n_vec == 0, head == 0).
    const i64 tail_start = head + n_vec * S::VEC;
    const i64 n_scalar = head + (n - tail_start);
    for (i64 s = tid; s < n_scalar; s += stride) {
        const i64 i = s < head ? s : tail_start + (s - head);
        float acc = w_x * S::load(x_t, i);
        acc = fmaf(w_a, S::load(eps_a, i), acc);
        if (HAS_B) acc = fmaf(w_b, S::load(eps_b, i), acc);
        if (K >= 1) acc = fmaf(w_h1, S::load(h1, i), acc);
        if (K >= 2) acc = fmaf(w_h2, S::load(h2, i), acc);
        S::store(out, i, acc);
    }
}

#define P(S) const S::T* __restrict__
#define TAIL i64 n, i64 head, i64 n_vec, const float* __restrict__ weights
#define GUIDED_DDIM_ENTRY(NAME, S)                                                                         \
    extern "C" __global__ void __launch_bounds__(256) NAME(S::T* __restrict__ out, P(S) x_t, P(S) eps_a,  \
                                                           P(S) eps_b, TAIL) {                             \
        guided_ddim_body<S, true, 0>(out, x_t, eps_a, eps_b, 0, 0, n, head, n_vec, weights);               \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(256) NAME##_a(S::T* __restrict__ out, P(S) x_t,          \
                                                               P(S) eps_a, TAIL) {                         \
        guided_ddim_body<S, false, 0>(out, x_t, eps_a, 0, 0, 0, n, head, n_vec, weights);                  \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(256) NAME##_h1(S::T* __restrict__ out, P(S) x_t,         \
                                                                P(S) eps_a, P(S) eps_b, P(S) h1, TAIL) {   \
        guided_ddim_body<S, true, 1>(out, x_t, eps_a, eps_b, h1, 0, n, head, n_vec, weights);              \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(256) NAME##_a_h1(S::T* __restrict__ out, P(S) x_t,       \
                                                                  P(S) eps_a, P(S) h1, TAIL) {             \
        guided_ddim_body<S, false, 1>(out, x_t, eps_a, 0, h1, 0, n, head, n_vec, weights);                 \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(256) NAME##_h2(S::T* __restrict__ out, P(S) x_t,         \
                                                                P(S) eps_a, P(S) eps_b, P(S) h1,           \
                                                                P(S) h2, TAIL) {                           \
        guided_ddim_body<S, true, 2>(out, x_t, eps_a, eps_b, h1, h2, n, head, n_vec, weights);             \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(256) NAME##_a_h2(S::T* __restrict__ out, P(S) x_t,       \
                                                                  P(S) eps_a, P(S) h1, P(S) h2, TAIL) {    \
        guided_ddim_body<S, false, 2>(out, x_t, eps_a, 0, h1, h2, n, head, n_vec, weights);                \
    }

GUIDED_DDIM_ENTRY(guided_ddim_f32, F32)
GUIDED_DDIM_ENTRY(guided_ddim_f16, F16)
GUIDED_DDIM_ENTRY(guided_ddim_bf16, BF16)
