// Global average pooling over the pixels of each image, matching crates/engine/src/pool.rs:
// x [n, hw, c] -> out [n, c].
//
// The forward takes a 2D launch: blockIdx.y walks the images (grid-stride), blockIdx.x and
// threadIdx.x cover channels (neighbouring threads read neighbouring channels: coalesced),
// threadIdx.y interleaves pixels. Any block of up to 1024 threads works, e.g. (32, 8).

// The sum times 1/hw (not divided by hw), as the CPU engine computes it.
extern "C" __global__ void global_avg_pool_forward(const act_t* __restrict__ x, long long n,
                                                   long long hw, int c,
                                                   float* __restrict__ out) {
    __shared__ float red[1024];
    float inv_hw = 1.0f / (float)hw;
    IMAGES(b, n) CHANNEL_TILES(base, c) {
        int ch = base + threadIdx.x;
        const act_t* xb = x + b * hw * c;
        float acc = 0.0f;
        if (ch < c) PIXELS(p, hw) acc += ld(xb[p * c + ch]);
        acc = column_sum(red, acc);
        if (threadIdx.y == 0 && ch < c) out[b * c + ch] = acc * inv_hw;
    }
}

// dx[b, p, ch] = dy[b, ch]/hw: every pixel contributed equally to the mean. Overwrites dx.
extern "C" __global__ void global_avg_pool_backward(const float* __restrict__ dy, long long n,
                                                    long long hw, int c,
                                                    act_t* __restrict__ dx) {
    float inv_hw = 1.0f / (float)hw;
    long long per_image = hw * c;
    GRID_STRIDE(i, n * per_image) { dx[i] = st(dy[(i / per_image) * c + i % c] * inv_hw); }
}
