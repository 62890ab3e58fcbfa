// Shared by every kernel source: the host compiles each source with this file in front
// (NVRTC sees one file at a time and no include path), see crates/cuda/src/lib.rs.

// Activation storage (`act_t`): f32, or bf16 in the "_bf16" twin of a source, which the host
// compiles with ACT_BF16 defined to 1, or IEEE f16 in the "_f16" twin (ACT_F16) (AMP:
// activations and their gradients stored in 16 bits, every sum and product in f32). ld widens,
// st rounds to nearest even (f16 overflows to ±inf, which the loss scaling detects); in f32
// both are the identity. Pointers typed act_t are activation buffers; parameters, gradients of
// parameters, statistics and the head's small tensors stay f32 in all.
#ifndef ACT_BF16
#define ACT_BF16 0
#endif
#ifndef ACT_F16
#define ACT_F16 0
#endif
#if ACT_BF16
typedef unsigned short act_t;
__device__ __forceinline__ float ld(act_t v) { return __uint_as_float(((unsigned)v) << 16); }
__device__ __forceinline__ act_t st(float f) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#elif ACT_F16
typedef unsigned short act_t;
__device__ __forceinline__ float ld(act_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}
__device__ __forceinline__ act_t st(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#else
typedef float act_t;
__device__ __forceinline__ float ld(float v) { return v; }
__device__ __forceinline__ float st(float f) { return f; }
#endif

// Grid-stride loop over a flat index: any grid covers any n.
#define GRID_STRIDE(i, n)                                                            \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)blockDim.x * gridDim.x)

// 2D launches (reductions over rows or pixels): blockIdx.y walks the images, blockIdx.x and
// threadIdx.x the channels, threadIdx.y the pixels. Bounds are uniform across a block, so a
// __syncthreads inside the body is safe.
#define IMAGES(b, n) for (long long b = blockIdx.y; b < (n); b += gridDim.y)
#define CHANNEL_TILES(base, c) \
    for (int base = blockIdx.x * blockDim.x; base < (c); base += gridDim.x * blockDim.x)
#define PIXELS(p, hw) for (long long p = threadIdx.y; p < (hw); p += blockDim.y)

// Activation codes follow the engine's `Act`: 0 none, 1 SiLU, 2 ReLU6.
#define ACT_NONE 0
#define ACT_SILU 1
#define ACT_RELU6 2

// 1/(1 + e^-x) as the CPU engine writes it; e^-x overflowing to inf gives 0, as wanted.
__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float act_apply(int act, float z) {
    if (act == ACT_SILU) return z * sigmoidf(z);
    // Comparisons rather than fminf/fmaxf so that NaN passes through, as f32::clamp does.
    if (act == ACT_RELU6) return z < 0.0f ? 0.0f : (z > 6.0f ? 6.0f : z);
    return z;
}

// SiLU': s·(1 + z·(1 − s)), one exp. ReLU6': 0 at both corners (PyTorch's convention).
__device__ __forceinline__ float act_derivative(int act, float z) {
    if (act == ACT_SILU) {
        float s = sigmoidf(z);
        return s * (1.0f + z * (1.0f - s));
    }
    if (act == ACT_RELU6) return (z > 0.0f && z < 6.0f) ? 1.0f : 0.0f;
    return 1.0f;
}

// Sums v over threadIdx.y, the rows (or pixels) a block's threads interleave; the result is
// valid where threadIdx.y == 0. `red` holds blockDim.x·blockDim.y floats. Serial over y:
// blockDim.y is small, and any block shape works.
__device__ float column_sum(float* red, float v) {
    red[threadIdx.y * blockDim.x + threadIdx.x] = v;
    __syncthreads();
    float s = 0.0f;
    if (threadIdx.y == 0)
        for (unsigned k = 0; k < blockDim.y; k++) s += red[k * blockDim.x + threadIdx.x];
    __syncthreads();  // `red` is written again by the next call
    return s;
}
