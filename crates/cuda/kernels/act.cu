// Activations over flat f32 buffers, matching crates/engine/src/act.rs. The activation is
// elementwise, so the layout does not matter here. Backward kernels take the activation's
// input x, not its output: training keeps x, and act'(x) is cheap to recompute.
//
// Counts are long long: the activation of a large batch passes 2^31 elements.

// Grid-stride loop: any grid covers any n, so launches can size the grid to the device.
#define GRID_STRIDE(i, n)                                                            \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)blockDim.x * gridDim.x)

// BEGIN activations (identical in act.cu, norm.cu and se.cu: NVRTC sees one file at a time;
// a test checks that the copies agree). Codes follow the engine's `Act`: 0 none, 1 SiLU, 2 ReLU6.
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
// END activations

// The activation is a compile-time constant in each kernel below, so the branches fold away.

extern "C" __global__ void silu_forward(const float* __restrict__ x, float* __restrict__ y,
                                        long long n) {
    GRID_STRIDE(i, n) { y[i] = act_apply(ACT_SILU, x[i]); }
}

extern "C" __global__ void silu_backward(const float* __restrict__ x,
                                         const float* __restrict__ dy,
                                         float* __restrict__ dx, long long n) {
    GRID_STRIDE(i, n) { dx[i] = dy[i] * act_derivative(ACT_SILU, x[i]); }
}

extern "C" __global__ void relu6_forward(const float* __restrict__ x, float* __restrict__ y,
                                         long long n) {
    GRID_STRIDE(i, n) { y[i] = act_apply(ACT_RELU6, x[i]); }
}

// dy·0 rather than a plain 0 outside (0, 6): a NaN or inf gradient stays visible, as on the CPU.
extern "C" __global__ void relu6_backward(const float* __restrict__ x,
                                          const float* __restrict__ dy,
                                          float* __restrict__ dx, long long n) {
    GRID_STRIDE(i, n) { dx[i] = dy[i] * act_derivative(ACT_RELU6, x[i]); }
}
