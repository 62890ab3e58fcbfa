// Softmax cross-entropy against probability targets (label smoothing, mixup, cutmix), matching
// crates/engine/src/loss.rs: logits and targets [n, classes]. The CPU engine works in f64 per
// row; so do these kernels (one row per block: `classes` is at most a few thousand, and the
// batch's loss is a small share of a step).
//
// One block per row, grid-stride over rows; any 1D block of up to 1024 threads works (256 suits
// 1000 classes). The host adds row_loss in f64 and divides by n for the batch's mean loss.

// Every block walks whole rows; the bound is uniform, so the __syncthreads inside are safe.
#define ROWS(row, n) for (long long row = blockIdx.x; row < (n); row += gridDim.x)
#define CLASSES(k, classes) for (int k = threadIdx.x; k < (classes); k += blockDim.x)

// Tree reductions over a block of any size: start at half the next power of two and skip
// partners past the end. `sh` holds blockDim.x doubles; every thread gets the result.
__device__ unsigned half_pow2(unsigned n) {
    unsigned p = 1;
    while (p < n) p <<= 1;
    return p >> 1;
}

__device__ double block_sum(double* sh, double v) {
    unsigned t = threadIdx.x;
    sh[t] = v;
    __syncthreads();
    for (unsigned s = half_pow2(blockDim.x); s > 0; s >>= 1) {
        if (t < s && t + s < blockDim.x) sh[t] += sh[t + s];
        __syncthreads();
    }
    double r = sh[0];
    __syncthreads();  // `sh` is written again by the next call
    return r;
}

// fmax skips NaN, like f32::max in the CPU engine's fold.
__device__ double block_max(double* sh, double v) {
    unsigned t = threadIdx.x;
    sh[t] = v;
    __syncthreads();
    for (unsigned s = half_pow2(blockDim.x); s > 0; s >>= 1) {
        if (t < s && t + s < blockDim.x) sh[t] = fmax(sh[t], sh[t + s]);
        __syncthreads();
    }
    double r = sh[0];
    __syncthreads();
    return r;
}

// log Σ_k e^(z_k): the max is taken out first so no exponential overflows.
__device__ double log_norm(double* sh, const float* __restrict__ z, int classes) {
    double m = __longlong_as_double(0xfff0000000000000ULL);  // −inf (NVRTC has no INFINITY)
    CLASSES(k, classes) m = fmax(m, (double)z[k]);
    m = block_max(sh, m);
    double s = 0.0;
    CLASSES(k, classes) s += exp((double)z[k] - m);
    return m + log(block_sum(sh, s));
}

// row_loss[row] = −Σ_k t_k · log softmax(z)_k (f64: the host sums it over the batch).
extern "C" __global__ void softmax_xent_forward(const float* __restrict__ logits,
                                                const float* __restrict__ targets, long long n,
                                                int classes, double* __restrict__ row_loss) {
    __shared__ double sh[1024];
    ROWS(row, n) {
        const float* z = logits + row * classes;
        const float* t = targets + row * classes;
        double ln = log_norm(sh, z, classes);
        double acc = 0.0;
        CLASSES(k, classes) acc -= (double)t[k] * ((double)z[k] - ln);
        acc = block_sum(sh, acc);
        if (threadIdx.x == 0) row_loss[row] = acc;
    }
}

// d loss/d z = (p·Σt − t)/n, the gradient of the batch mean; it is (softmax − t)/n when the
// targets sum to one, and stays exact when they do not quite (rounding in mixup).
extern "C" __global__ void softmax_xent_backward(const float* __restrict__ logits,
                                                 const float* __restrict__ targets, long long n,
                                                 int classes, float* __restrict__ dlogits) {
    __shared__ double sh[1024];
    ROWS(row, n) {
        const float* z = logits + row * classes;
        const float* t = targets + row * classes;
        float* d = dlogits + row * classes;
        double ln = log_norm(sh, z, classes);
        double t_sum = 0.0;
        CLASSES(k, classes) t_sum += (double)t[k];
        t_sum = block_sum(sh, t_sum);
        CLASSES(k, classes) {
            double p = exp((double)z[k] - ln);
            d[k] = (float)((p * t_sum - (double)t[k]) / (double)n);
        }
    }
}
