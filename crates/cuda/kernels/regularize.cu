// Dropout (per element) and drop-path / stochastic depth (per sample), matching
// crates/engine/src/regularize.rs. Both are "inverted": a mask value is 0 (dropped) or
// 1/(1 − rate) (kept). The masks are drawn on the host with the engine's RNG, so a run draws the
// same masks on either backend; these kernels only apply them.

// y = x·mask elementwise: dropout's forward, and its backward with dy for x.
extern "C" __global__ void dropout_apply(const float* __restrict__ x,
                                         const float* __restrict__ mask, long long n,
                                         float* __restrict__ y) {
    GRID_STRIDE(i, n) { y[i] = x[i] * mask[i]; }
}

// out += x·mask[image] over [images, per_image]: the residual add of a block whose branch x is
// dropped per sample. Fused so the branch output is read once.
extern "C" __global__ void drop_path_add(const act_t* __restrict__ x,
                                         const float* __restrict__ mask, long long images,
                                         long long per_image, act_t* __restrict__ out) {
    GRID_STRIDE(i, images * per_image) { out[i] = st(ld(out[i]) + ld(x[i]) * mask[i / per_image]); }
}

// y = x·mask[image]: the gradient that reaches the dropped branch (dy for x), or a drop-path
// without the residual add.
extern "C" __global__ void drop_path_scale(const act_t* __restrict__ x,
                                           const float* __restrict__ mask, long long images,
                                           long long per_image, act_t* __restrict__ y) {
    GRID_STRIDE(i, images * per_image) { y[i] = st(ld(x[i]) * mask[i / per_image]); }
}
