// Squeeze-and-excitation around its two small matrix products (those go to cuBLAS), matching
// crates/engine/src/se.rs. Shapes: x, y [n, hw, c]; pooled, gate [n, c]; pre_act, hidden
// [n, cr]. Forward, as the host sequences it:
//   (pool.cu)        pooled = global_avg_pool_forward(x): the squeeze is the global pool
//   (GEMM)           pre_act = pooled·w1ᵀ
//   se_bias_act      pre_act += b1; hidden = act(pre_act)
//   (GEMM)           gate = hidden·w2ᵀ
//   se_bias_sigmoid  gate = sigmoid(gate + b2)
//   se_excite        y = x·gate[n, c]
// Backward:
//   se_gate_grad        d_pre_gate = Σ_hw dy·x · gate·(1 − gate)
//   (GEMMs)             dw2 += d_pre_gateᵀ·hidden; d_pre_act = d_pre_gate·w2
//   se_act_backward     d_pre_act *= act'(pre_act)
//   se_bias_grad (×2)   db2 += Σ_n d_pre_gate; db1 += Σ_n d_pre_act
//   (GEMMs)             dw1 += d_pre_actᵀ·pooled; d_pooled = d_pre_act·w1
//   se_excite_backward  dx = dy·gate + d_pooled/hw
//
// The reduction over hw (se_gate_grad) takes a 2D launch: blockIdx.y walks the
// images (grid-stride), blockIdx.x and threadIdx.x cover channels (coalesced), threadIdx.y
// interleaves pixels; any block of up to 1024 threads works, e.g. (32, 8).

// In place on pre_act (the backward needs it, with its bias), then the activation into hidden.
extern "C" __global__ void se_bias_act(float* __restrict__ pre_act,
                                       const float* __restrict__ bias, long long n, int width,
                                       int act, float* __restrict__ hidden) {
    GRID_STRIDE(i, n * width) {
        float p = pre_act[i] + bias[i % width];
        pre_act[i] = p;
        hidden[i] = act_apply(act, p);
    }
}

// In place: the matrix product's output becomes the gate.
extern "C" __global__ void se_bias_sigmoid(float* __restrict__ gate,
                                           const float* __restrict__ bias, long long n, int c) {
    GRID_STRIDE(i, n * c) { gate[i] = sigmoidf(gate[i] + bias[i % c]); }
}

extern "C" __global__ void se_excite(const act_t* __restrict__ x, const float* __restrict__ gate,
                                     long long n, long long hw, int c, act_t* __restrict__ y) {
    long long per_image = hw * c;
    GRID_STRIDE(i, n * per_image) { y[i] = st(ld(x[i]) * gate[(i / per_image) * c + i % c]); }
}

// d(pre-sigmoid gate) = Σ_hw dy·x · gate·(1 − gate), one value per (image, channel).
extern "C" __global__ void se_gate_grad(const act_t* __restrict__ x,
                                        const act_t* __restrict__ dy,
                                        const float* __restrict__ gate, long long n,
                                        long long hw, int c, float* __restrict__ d_pre_gate) {
    __shared__ float red[1024];
    IMAGES(b, n) CHANNEL_TILES(base, c) {
        int ch = base + threadIdx.x;
        const act_t* xb = x + b * hw * c;
        const act_t* gb = dy + b * hw * c;
        float acc = 0.0f;
        if (ch < c) PIXELS(p, hw) acc += ld(xb[p * c + ch]) * ld(gb[p * c + ch]);
        acc = column_sum(red, acc);
        if (threadIdx.y == 0 && ch < c) {
            float s = gate[b * c + ch];
            d_pre_gate[b * c + ch] = acc * (s * (1.0f - s));
        }
    }
}

// In place: d_hidden (from the matrix product) becomes d_pre_act.
extern "C" __global__ void se_act_backward(float* __restrict__ d, const float* __restrict__ pre_act,
                                           long long count, int act) {
    GRID_STRIDE(i, count) { d[i] *= act_derivative(act, pre_act[i]); }
}

// db[j] += Σ over the n rows of d[:, j], rows in order as the CPU adds them. n is the batch
// size: a serial loop per column is enough.
extern "C" __global__ void se_bias_grad(const float* __restrict__ d, long long n, int width,
                                        float* __restrict__ db) {
    GRID_STRIDE(j, width) {
        float acc = db[j];
        for (long long b = 0; b < n; b++) acc += d[b * width + j];
        db[j] = acc;
    }
}

// dx = dy·gate + d_pooled/hw: the excitation's direct path plus the squeeze's (the mean spreads
// its gradient evenly over the pixels).
extern "C" __global__ void se_excite_backward(const act_t* __restrict__ dy,
                                              const float* __restrict__ gate,
                                              const float* __restrict__ d_pooled, long long n,
                                              long long hw, int c, act_t* __restrict__ dx) {
    float inv_hw = 1.0f / (float)hw;
    long long per_image = hw * c;
    GRID_STRIDE(i, n * per_image) {
        long long k = (i / per_image) * c + i % c;
        dx[i] = st(ld(dy[i]) * gate[k] + d_pooled[k] * inv_hw);
    }
}
