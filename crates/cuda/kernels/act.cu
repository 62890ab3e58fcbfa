// Activations over flat f32 buffers, matching crates/engine/src/act.rs. The activation is
// elementwise, so the layout does not matter here. Backward kernels take the activation's
// input x, not its output: training keeps x, and act'(x) is cheap to recompute.
//
// Counts are long long: the activation of a large batch passes 2^31 elements.

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
