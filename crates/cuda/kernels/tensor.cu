// Layout and element-wise helpers of the device network (crates/cuda/src/net.rs): explicit
// padding for TF "SAME" convolutions that pad more after than before (cuDNN pads symmetrically),
// weight layout changes between PyTorch's OIHW and cuDNN's NHWC filters (OHWI), bias rows and
// in-place sums. 1D launches over the output elements.

// y[b, i, j, ch] = x[b, i − top, j − left, ch] inside the image, 0 in the border.
extern "C" __global__ void pad_nhwc(const act_t* __restrict__ x, long long n, int h, int w, int c,
                                    int top, int left, int hp, int wp, act_t* __restrict__ y) {
    GRID_STRIDE(o, n * hp * wp * c) {
        int ch = (int)(o % c);
        long long pix = o / c;
        int j = (int)(pix % wp) - left;
        int i = (int)((pix / wp) % hp) - top;
        long long b = pix / ((long long)wp * hp);
        y[o] = (i >= 0 && i < h && j >= 0 && j < w) ? x[((b * h + i) * w + j) * c + ch] : st(0.0f);
    }
}

// The adjoint of pad_nhwc: y[b, i, j, ch] = xp[b, i + top, j + left, ch] (the border's gradient
// belongs to no input pixel).
extern "C" __global__ void crop_nhwc(const act_t* __restrict__ xp, long long n, int hp, int wp,
                                     int c, int top, int left, int h, int w,
                                     act_t* __restrict__ y) {
    GRID_STRIDE(o, n * h * w * c) {
        int ch = (int)(o % c);
        long long pix = o / c;
        int j = (int)(pix % w);
        int i = (int)((pix / w) % h);
        long long b = pix / ((long long)w * h);
        y[o] = xp[((b * hp + i + top) * wp + j + left) * c + ch];
    }
}

// PyTorch's [o, i, kh, kw] to cuDNN's NHWC filter [o, kh, kw, i] (k = kh = kw), from the f32
// parameters to the convolution's storage type.
extern "C" __global__ void oihw_to_ohwi(const float* __restrict__ w, int o, int i, int k,
                                        act_t* __restrict__ out) {
    GRID_STRIDE(e, (long long)o * i * k * k) {
        int ci = (int)(e % i);
        long long rest = e / i;
        int kw = (int)(rest % k);
        int kh = (int)((rest / k) % k);
        long long co = rest / ((long long)k * k);
        out[e] = st(w[((co * i + ci) * k + kh) * k + kw]);
    }
}

// The way back, accumulating into the f32 gradients: g_torch[o, i, kh, kw] += g[o, kh, kw, i].
extern "C" __global__ void ohwi_to_oihw_add(const act_t* __restrict__ g, int o, int i, int k,
                                            float* __restrict__ g_torch) {
    GRID_STRIDE(e, (long long)o * i * k * k) {
        int kw = (int)(e % k);
        int kh = (int)((e / k) % k);
        int ci = (int)((e / ((long long)k * k)) % i);
        long long co = e / ((long long)k * k * i);
        g_torch[e] += ld(g[((co * k + kh) * k + kw) * i + ci]);
    }
}

// y[r, j] += bias[j] over [rows, width]: the classifier's bias.
extern "C" __global__ void add_bias_rows(float* __restrict__ y, const float* __restrict__ bias,
                                         long long rows, int width) {
    GRID_STRIDE(e, rows * width) { y[e] += bias[e % width]; }
}

// y += x: a shortcut's gradient joining the branch's.
extern "C" __global__ void add_into(act_t* __restrict__ y, const act_t* __restrict__ x,
                                    long long n) {
    GRID_STRIDE(e, n) { y[e] = st(ld(y[e]) + ld(x[e])); }
}

// g += x: a filter gradient in the convolution's storage type added into the f32 gradients.
extern "C" __global__ void add_grad_into(float* __restrict__ g, const act_t* __restrict__ x,
                                         long long n) {
    GRID_STRIDE(e, n) { g[e] += ld(x[e]); }
}

// y = x in the activations' storage type: the input images, depthwise filters and (with bf16
// activations) 1×1 convolutions' weights for their products.
extern "C" __global__ void to_act(const float* __restrict__ x, act_t* __restrict__ y,
                                  long long n) {
    GRID_STRIDE(e, n) { y[e] = st(x[e]); }
}

// y = y·mask[image] + shortcut, in place on the branch output y: the residual add of a block
// with drop-path, as the CPU engine writes it (mask 1 when nothing is dropped).
extern "C" __global__ void residual_add(act_t* __restrict__ y, const act_t* __restrict__ shortcut,
                                        const float* __restrict__ mask, long long images,
                                        long long per_image) {
    GRID_STRIDE(e, images * per_image) {
        y[e] = st(ld(y[e]) * mask[e / per_image] + ld(shortcut[e]));
    }
}
