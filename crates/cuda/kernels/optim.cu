// Optimizer updates over the flat parameter buffer, matching crates/train/src/optim.rs (Keras'
// update rules), and the EMA of crates/train/src/ema.rs. w, g, the slots and the decay mask
// all have n elements; the slots start at zero.
//
// Weight decay as Keras' l2(wd): its gradient 2·wd·w joins g where mask = 1 (convolution
// kernels except depthwise ones, the SE convolutions' biases, the classifier), never batch
// norm; AdamW instead decays the same tensors directly by lr·wd·w. The mask is the 0/1 buffer
// of optim::decay_mask; passing wd rather than 2·wd keeps the factor 2 in one place (here).

// The gradient with Keras' L2 term, written as the CPU writes it (l2 = 0 still adds 0·w).
__device__ __forceinline__ float with_l2(float g, float l2, float m, float w) {
    return g + l2 * m * w;
}

// ms ← ρ·ms + (1−ρ)·g², mom ← μ·mom + lr·g/√(ms + ε), w ← w − mom: ε inside the square
// root (TF's ApplyRMSProp), slots from zero (Keras; TF1 started ms at one).
extern "C" __global__ void rmsprop_update(float* __restrict__ w, const float* __restrict__ g,
                                          const float* __restrict__ mask,
                                          float* __restrict__ ms, float* __restrict__ mom,
                                          long long n, float lr, float rho, float momentum,
                                          float epsilon, float weight_decay) {
    float l2 = 2.0f * weight_decay;
    GRID_STRIDE(i, n) {
        float wi = w[i];
        float gi = with_l2(g[i], l2, mask[i], wi);
        float s = rho * ms[i] + (1.0f - rho) * gi * gi;
        float v = momentum * mom[i] + lr * gi / sqrtf(s + epsilon);
        ms[i] = s;
        mom[i] = v;
        w[i] = wi - v;
    }
}

// Keras SGD: v ← μ·v − lr·g, w ← w + v; Nesterov (nesterov ≠ 0) steps by μ·v − lr·g instead,
// with the updated v.
extern "C" __global__ void sgd_update(float* __restrict__ w, const float* __restrict__ g,
                                      const float* __restrict__ mask,
                                      float* __restrict__ velocity, long long n, float lr,
                                      float momentum, int nesterov, float weight_decay) {
    float l2 = 2.0f * weight_decay;
    GRID_STRIDE(i, n) {
        float wi = w[i];
        float gi = with_l2(g[i], l2, mask[i], wi);
        float v = momentum * velocity[i] - lr * gi;
        velocity[i] = v;
        w[i] = wi + (nesterov ? momentum * v - lr * gi : v);
    }
}

// Keras Adam, ε outside the square root, the bias correction folded into the step size:
// lr_t = lr·√(1 − β2^t)/(1 − β1^t) at step t (counting from 1). The host computes lr_t in f32
// with the CPU's expression, so both backends take the same step. `decoupled` is lr·wd for
// AdamW, 0 for Adam; the decay uses the weight before this step's update.
__device__ __forceinline__ void adam_step(float* __restrict__ w, float g, float decay_mask,
                                          float* __restrict__ m, float* __restrict__ v,
                                          long long i, float lr_t, float beta1, float beta2,
                                          float epsilon, float decoupled) {
    float wi = w[i];
    float mi = beta1 * m[i] + (1.0f - beta1) * g;
    float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    w[i] = wi - (decoupled * decay_mask * wi + lr_t * mi / (sqrtf(vi) + epsilon));
}

// Adam with Keras' L2 term in the gradient.
extern "C" __global__ void adam_update(float* __restrict__ w, const float* __restrict__ g,
                                       const float* __restrict__ mask, float* __restrict__ m,
                                       float* __restrict__ v, long long n, float lr_t,
                                       float beta1, float beta2, float epsilon,
                                       float weight_decay) {
    float l2 = 2.0f * weight_decay;
    GRID_STRIDE(i, n) {
        float gi = with_l2(g[i], l2, mask[i], w[i]);
        adam_step(w, gi, mask[i], m, v, i, lr_t, beta1, beta2, epsilon, 0.0f);
    }
}

// AdamW: no L2 term in the gradient; the masked tensors decay by lr·wd·w directly. lr is the
// undecayed learning rate (the decay ignores the bias correction), lr_t as for adam_update.
extern "C" __global__ void adamw_update(float* __restrict__ w, const float* __restrict__ g,
                                        const float* __restrict__ mask, float* __restrict__ m,
                                        float* __restrict__ v, long long n, float lr, float lr_t,
                                        float beta1, float beta2, float epsilon,
                                        float weight_decay) {
    float decoupled = lr * weight_decay;
    GRID_STRIDE(i, n) {
        float gi = with_l2(g[i], 0.0f, mask[i], w[i]);
        adam_step(w, gi, mask[i], m, v, i, lr_t, beta1, beta2, epsilon, decoupled);
    }
}

// shadow ← d·shadow + (1 − d)·w. The host computes d = min(decay, (1 + t)/(10 + t)) in f64 and
// rounds it to f32, as the CPU does; params and buffers are two launches (or one, if adjacent).
extern "C" __global__ void ema_update(float* __restrict__ shadow, const float* __restrict__ w,
                                      long long n, float decay) {
    GRID_STRIDE(i, n) { shadow[i] = decay * shadow[i] + (1.0f - decay) * w[i]; }
}

// x ← k·x: the gradients' 1/K over K accumulated micro-batches, or their clipping factor.
extern "C" __global__ void scale_in_place(float* __restrict__ x, long long n, float k) {
    GRID_STRIDE(i, n) { x[i] *= k; }
}

// The global norm's sum of squares, in f64 as the CPU sums it: each block adds its share of
// the grid-stride loop and writes partial[blockIdx.x]; the host adds the partials in order.
// Launched with 256 threads per block.
extern "C" __global__ void sum_squares_partials(const float* __restrict__ x, long long n,
                                                double* __restrict__ partial) {
    __shared__ double red[256];
    double s = 0.0;
    GRID_STRIDE(i, n) { s += (double)x[i] * (double)x[i]; }
    red[threadIdx.x] = s;
    __syncthreads();
    for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) red[threadIdx.x] += red[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = red[0];
}

// Gradients exchanged as f16 (Horovod's fp16 compression): rounded to nearest even on the
// way out, widened and scaled by 1/replicas on the way back. PTX conversions, so that no
// header is needed (NVRTC has no include path here); f16 values travel as 16-bit words.
extern "C" __global__ void f32_to_f16(const float* __restrict__ x, unsigned short* __restrict__ h,
                                      long long n) {
    GRID_STRIDE(i, n) {
        unsigned short v;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(x[i]));
        h[i] = v;
    }
}

extern "C" __global__ void f16_to_f32_scaled(const unsigned short* __restrict__ h,
                                             float* __restrict__ x, long long n, float k) {
    GRID_STRIDE(i, n) {
        float v;
        asm("cvt.f32.f16 %0, %1;" : "=f"(v) : "h"(h[i]));
        x[i] = v * k;
    }
}
