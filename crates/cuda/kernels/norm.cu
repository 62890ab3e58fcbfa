// Batch norm over [rows, c] tensors (NHWC, rows = n·h·w) fused with an activation, matching
// crates/engine/src/norm.rs. Training normalizes with the batch's mean and biased variance;
// the running statistics take the unbiased variance.
//
// Training forward, as the host sequences it:
//   bn_sum_partials      x -> partial[parts, c]         per-channel Σx of each row slice
//   bn_reduce_partials   partial -> sums[c] (f64), sums[c] = this replica's row count
//                        (synchronized BN all-reduces sums[0..=c] here: the count travels
//                        with the sums, as on the CPU, so replicas may hold different batches)
//   bn_mean              sums -> mean (over the row count sums[c])
//   bn_sqdev_partials    x, mean -> partial[parts, c]   Σ(x − mean)²: two passes, as the CPU,
//   bn_reduce_partials   -> sqsums (f64), count          so large means cost no accuracy
//   bn_var               sqsums -> var (biased), invstd
//   bn_fold              γ, β, mean, invstd -> scale, shift
//   bn_apply             y = act(x·scale + shift)
//   bn_update_running    (the running statistics, over the count in sqsums[c])
// Backward (scale and shift from bn_fold):
//   bn_backward_partials x, dy -> dz (into dx), partial[parts, 2c] = [Σdz | Σdz·x̂]
//   bn_reduce_partials   width 2c -> sums (f64), sums[2c] = row count
//   bn_backward_params   dβ += Σdz, dγ += Σdz·x̂   (this replica's sums: before any all-reduce)
//   bn_backward_dx       dx = scale·(dz − mean(dz) − x̂·mean(dz·x̂))   (global sums)
// Eval: bn_fold_running, then bn_apply.
//
// The *_partials kernels take a 2D launch: gridDim.y = parts slices the rows, blockIdx.x and
// threadIdx.x cover channels (neighbouring threads read neighbouring channels of a row:
// coalesced), threadIdx.y interleaves rows within a block. Any block of up to 1024 threads
// works. With (32, 8) threads and parts ≈ rows / 2048, each thread adds ~256 rows in f32, like
// the CPU engine's 512-row f32 partials, and the partials are added in f64.

// This thread's rows of the block's slice (channel tiles: CHANNEL_TILES in common.cuh).
#define SLICE_ROWS(r, rows)                                                          \
    for (long long r = (long long)blockIdx.y * blockDim.y + threadIdx.y; r < (rows); \
         r += (long long)gridDim.y * blockDim.y)

extern "C" __global__ void bn_sum_partials(const act_t* __restrict__ x, long long rows, int c,
                                           float* __restrict__ partial) {
    __shared__ float red[1024];
    CHANNEL_TILES(base, c) {
        int ch = base + threadIdx.x;
        float acc = 0.0f;
        if (ch < c) SLICE_ROWS(r, rows) acc += ld(x[r * c + ch]);
        acc = column_sum(red, acc);
        if (threadIdx.y == 0 && ch < c) partial[(long long)blockIdx.y * c + ch] = acc;
    }
}

extern "C" __global__ void bn_sqdev_partials(const act_t* __restrict__ x,
                                             const float* __restrict__ mean, long long rows,
                                             int c, float* __restrict__ partial) {
    __shared__ float red[1024];
    CHANNEL_TILES(base, c) {
        int ch = base + threadIdx.x;
        float acc = 0.0f;
        if (ch < c) {
            float m = mean[ch];
            SLICE_ROWS(r, rows) {
                float d = ld(x[r * c + ch]) - m;
                acc += d * d;
            }
        }
        acc = column_sum(red, acc);
        if (threadIdx.y == 0 && ch < c) partial[(long long)blockIdx.y * c + ch] = acc;
    }
}

// Adds the `parts` partials of each of `width` columns in f64 (1D launch over columns;
// neighbouring threads read neighbouring columns), and puts `rows` after them (sums has
// width + 1 entries). The f64 sums are what synchronized BN all-reduces, as the CPU engine's
// `ReplicaSum` does.
extern "C" __global__ void bn_reduce_partials(const float* __restrict__ partial, int parts,
                                              int width, double rows,
                                              double* __restrict__ sums) {
    if (blockIdx.x == 0 && threadIdx.x == 0) sums[width] = rows;
    GRID_STRIDE(j, width) {
        double s = 0.0;
        for (int p = 0; p < parts; p++) s += (double)partial[(long long)p * width + j];
        sums[j] = s;
    }
}

// sums[c] is the row count over every replica (f64, as the CPU engine carries it).
extern "C" __global__ void bn_mean(const double* __restrict__ sums, int c,
                                   float* __restrict__ mean) {
    double total = sums[c];
    GRID_STRIDE(ch, c) { mean[ch] = (float)(sums[ch] / total); }
}

extern "C" __global__ void bn_var(const double* __restrict__ sqsums, int c, float eps,
                                  float* __restrict__ var, float* __restrict__ invstd) {
    double total = sqsums[c];
    GRID_STRIDE(ch, c) {
        float v = (float)(sqsums[ch] / total);
        var[ch] = v;
        invstd[ch] = 1.0f / sqrtf(v + eps);
    }
}

// γ·(x − mean)·invstd + β as x·scale + shift: one multiply-add per element in bn_apply.
extern "C" __global__ void bn_fold(const float* __restrict__ gamma,
                                   const float* __restrict__ beta,
                                   const float* __restrict__ mean,
                                   const float* __restrict__ invstd, int c,
                                   float* __restrict__ scale, float* __restrict__ shift) {
    GRID_STRIDE(ch, c) {
        float s = gamma[ch] * invstd[ch];
        scale[ch] = s;
        shift[ch] = beta[ch] - mean[ch] * s;
    }
}

// Eval mode: the same fold from the running statistics.
extern "C" __global__ void bn_fold_running(const float* __restrict__ gamma,
                                           const float* __restrict__ beta,
                                           const float* __restrict__ running_mean,
                                           const float* __restrict__ running_var, float eps,
                                           int c, float* __restrict__ scale,
                                           float* __restrict__ shift) {
    GRID_STRIDE(ch, c) {
        float s = gamma[ch] * (1.0f / sqrtf(running_var[ch] + eps));
        scale[ch] = s;
        shift[ch] = beta[ch] - running_mean[ch] * s;
    }
}

// y = act(x·scale + shift). x and y may be the same buffer (eval applies BN in place), hence
// no __restrict__ on them: each element is read once, then written by the same thread.
extern "C" __global__ void bn_apply(const act_t* x, const float* __restrict__ scale,
                                    const float* __restrict__ shift, long long rows, int c,
                                    int act, act_t* y) {
    GRID_STRIDE(i, rows * c) {
        int ch = (int)(i % c);
        y[i] = st(act_apply(act, ld(x[i]) * scale[ch] + shift[ch]));
    }
}

// r ← (1 − m)·r + m·batch, the variance made unbiased with rows/(rows − 1); rows = *count, the
// row count the statistics span (every replica's, with synchronized BN).
extern "C" __global__ void bn_update_running(float* __restrict__ running_mean,
                                             float* __restrict__ running_var,
                                             const float* __restrict__ mean,
                                             const float* __restrict__ var, int c,
                                             const double* __restrict__ count, float momentum) {
    long long rows = (long long)count[0];
    float bessel = rows > 1 ? (float)rows / (float)(rows - 1) : 1.0f;
    GRID_STRIDE(ch, c) {
        running_mean[ch] = (1.0f - momentum) * running_mean[ch] + momentum * mean[ch];
        running_var[ch] = (1.0f - momentum) * running_var[ch] + momentum * var[ch] * bessel;
    }
}

// Pass 1 of the backward: dz = dy·act'(x·scale + shift) is stored in dz (the dx buffer: the
// activation's derivative is the costly part, computed once), and each row slice's Σdz and
// Σdz·x̂ go to partial[p, 0..c] and partial[p, c..2c].
extern "C" __global__ void bn_backward_partials(
    const act_t* __restrict__ x, const act_t* __restrict__ dy, const float* __restrict__ scale,
    const float* __restrict__ shift, const float* __restrict__ mean,
    const float* __restrict__ invstd, long long rows, int c, int act, act_t* __restrict__ dz,
    float* __restrict__ partial) {
    __shared__ float red[1024];
    CHANNEL_TILES(base, c) {
        int ch = base + threadIdx.x;
        float sum_dz = 0.0f, sum_dzx = 0.0f;
        if (ch < c) {
            float s = scale[ch], b = shift[ch], m = mean[ch], is = invstd[ch];
            SLICE_ROWS(r, rows) {
                long long i = r * c + ch;
                float xv = ld(x[i]);
                float d = ld(dy[i]) * act_derivative(act, xv * s + b);
                dz[i] = st(d);
                sum_dz += d;
                sum_dzx += d * (xv - m) * is;
            }
        }
        sum_dz = column_sum(red, sum_dz);
        sum_dzx = column_sum(red, sum_dzx);
        if (threadIdx.y == 0 && ch < c) {
            long long p = (long long)blockIdx.y * 2 * c;
            partial[p + ch] = sum_dz;
            partial[p + c + ch] = sum_dzx;
        }
    }
}

// The parameter gradients are accumulated into (gradient accumulation over micro-batches), from
// this replica's sums: the gradient all-reduce combines replicas later.
extern "C" __global__ void bn_backward_params(const double* __restrict__ sums, int c,
                                              float* __restrict__ dgamma,
                                              float* __restrict__ dbeta) {
    GRID_STRIDE(ch, c) {
        dbeta[ch] += (float)sums[ch];
        dgamma[ch] += (float)sums[c + ch];
    }
}

// Pass 2, in place over dz: dx = scale·(dz − mean(dz) − x̂·mean(dz·x̂)). `sums` spans every
// replica's rows with synchronized BN, their count in sums[2c]; `rows` is this replica's.
extern "C" __global__ void bn_backward_dx(const act_t* __restrict__ x,
                                          const float* __restrict__ scale,
                                          const float* __restrict__ mean,
                                          const float* __restrict__ invstd,
                                          const double* __restrict__ sums, long long rows, int c,
                                          act_t* __restrict__ dx) {
    double inv_total = 1.0 / sums[2 * c];
    GRID_STRIDE(i, rows * c) {
        int ch = (int)(i % c);
        float mean_dz = (float)(sums[ch] * inv_total);
        float mean_dzx = (float)(sums[c + ch] * inv_total);
        dx[i] = st(scale[ch] *
                   (ld(dx[i]) - mean_dz - (ld(x[i]) - mean[ch]) * invstd[ch] * mean_dzx));
    }
}
