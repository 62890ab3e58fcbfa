//! Every kernel against a naive f64 reference, and every backward pass against finite
//! differences of that reference, on random shapes: odd and even sizes, stride 1 and 2.

use effnet_engine::rng::Rng;
use effnet_engine::se::{SeGeom, SeSaved};
use effnet_engine::{
    conv, depthwise, linear, loss, norm, pointwise, pool, regularize, same_padding, se, Act, Nhwc,
};

fn random(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// A batch of 2 random images and random weights for the convolution `(h, w, cin, cout, k,
/// stride)`: its input shape, geometry, input and weights (`pack_weight`'s layout).
fn random_conv(
    rng: &mut Rng,
    (h, w, cin, cout, k, stride): (usize, usize, usize, usize, usize, usize),
) -> (Nhwc, conv::ConvGeom, Vec<f32>, Vec<f32>) {
    let s = Nhwc::new(2, h, w, cin);
    let g = conv::ConvGeom::new(s, k, stride, cout);
    let x = random(rng, s.len());
    let wt = random(rng, g.weight_len());
    (s, g, x, wt)
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// max |a − b| relative to max |b|.
fn max_rel(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max)
        / scale
}

/// Central-difference gradient of `f` at `x`.
fn numeric_grad(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut p = x.to_vec();
    (0..x.len())
        .map(|i| {
            let h = 1e-5 * x[i].abs().max(1.0);
            p[i] = x[i] + h;
            let up = f(&p);
            p[i] = x[i] - h;
            let down = f(&p);
            p[i] = x[i];
            (up - down) / (2.0 * h)
        })
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Direct convolution, NHWC input, PyTorch weight layout, TF SAME padding; groups 1 or depthwise.
fn conv_ref(
    x: &[f64],
    s: Nhwc,
    w: &[f64],
    cout: usize,
    k: usize,
    stride: usize,
    depthwise: bool,
) -> Vec<f64> {
    let (oh, pt) = same_padding(s.h, k, stride);
    let (ow, pl) = same_padding(s.w, k, stride);
    let mut y = vec![0f64; s.n * oh * ow * cout];
    for b in 0..s.n {
        for i in 0..oh {
            for j in 0..ow {
                for o in 0..cout {
                    let mut acc = 0.0;
                    for kh in 0..k {
                        for kw in 0..k {
                            let ih = (i * stride + kh) as isize - pt as isize;
                            let iw = (j * stride + kw) as isize - pl as isize;
                            if ih < 0 || iw < 0 || ih >= s.h as isize || iw >= s.w as isize {
                                continue;
                            }
                            let px = ((b * s.h + ih as usize) * s.w + iw as usize) * s.c;
                            if depthwise {
                                acc += x[px + o] * w[(o * k + kh) * k + kw];
                            } else {
                                for c in 0..s.c {
                                    acc += x[px + c] * w[((o * s.c + c) * k + kh) * k + kw];
                                }
                            }
                        }
                    }
                    y[((b * oh + i) * ow + j) * cout + o] = acc;
                }
            }
        }
    }
    y
}

/// The weight in the layout `conv::forward` takes: PyTorch's for 1×1, packed otherwise.
fn forward_weight(g: &conv::ConvGeom, torch: &[f32]) -> Vec<f32> {
    if g.is_pointwise() {
        return torch.to_vec();
    }
    let mut packed = vec![0f32; g.weight_len()];
    conv::pack_weight(g, torch, &mut packed);
    packed
}

/// A folded batch norm + SiLU over `c` channels with distinct scales and shifts.
fn silu_fold(c: usize) -> norm::Folded {
    norm::Folded {
        scale: (0..c).map(|i| 0.5 + i as f32 * 0.1).collect(),
        shift: (0..c).map(|i| i as f32 * 0.2 - 0.5).collect(),
        act: Act::Silu,
    }
}

const CONV_CASES: &[(usize, usize, usize, usize, usize, usize)] = &[
    // (h, w, cin, cout, k, stride)
    (7, 7, 3, 4, 3, 2),
    (8, 6, 3, 5, 3, 2),
    (5, 6, 4, 3, 3, 1),
    // 3×3 stride 1 runs by Winograd's transform: odd sizes (partial tiles), a 1×1 image.
    (7, 5, 6, 9, 3, 1),
    (1, 1, 3, 4, 3, 1),
    (9, 10, 8, 12, 3, 1),
    // Its weight gradient too, on maps from 16 pixels whose output channels split into
    // 16-wide panels per thread (partial tiles on both sides).
    (16, 17, 3, 32, 3, 1),
    (6, 6, 5, 7, 1, 1),
    (9, 8, 2, 3, 5, 2),
    (4, 5, 3, 2, 1, 2),
];

/// Weights prepared for inference at channel counts the small cases above do not reach:
/// Winograd's panels from 32 input channels, the direct kernel below that (and for strides
/// other than 1), with partial tiles and panels and the fused batch norm + SiLU. The direct
/// kernel reads the image in place, leaving out the padding at its edges: images smaller than
/// the kernel (every pixel at an edge, padded before or only after), 5×5 and 7×7 kernels, and
/// even sizes at stride 2 (SAME padding only after the image).
#[test]
fn prepared_weights_at_wider_channels() {
    let mut rng = Rng::new(5);
    for &(h, w, cin, cout, k, stride) in &[
        (6, 7, 40, 20, 3, 1),
        (9, 11, 24, 40, 3, 2),
        (13, 8, 16, 18, 3, 1),
        (5, 9, 3, 24, 3, 2),
        (1, 1, 8, 24, 3, 1),
        (2, 3, 5, 20, 5, 1),
        (11, 9, 6, 17, 5, 2),
        (9, 12, 3, 40, 7, 2),
        (8, 10, 24, 24, 3, 2),
        (2, 2, 4, 20, 3, 2),
    ] {
        let (s, g, x, wt) = random_conv(&mut rng, (h, w, cin, cout, k, stride));
        let y_ref = conv_ref(&f64s(&x), s, &f64s(&wt), cout, k, stride, false);
        let prepared = conv::prepare(&g, &wt);
        let weight = conv::Weight::Prepared(&prepared);
        let mut col = vec![0f32; g.col_len()];
        let mut y = vec![f32::NAN; g.output().len()];
        conv::forward(&g, &x, weight, &mut y, &mut col, None, None);
        let case = (h, w, cin, cout, k, stride);
        assert!(max_rel(&y, &y_ref) < 1e-5, "{case:?}");
        let folded = silu_fold(cout);
        let mut fused = vec![f32::NAN; y.len()];
        conv::forward(&g, &x, weight, &mut fused, &mut col, Some(&folded), None);
        folded.apply(&mut y);
        assert!(
            max_rel(&fused, &f64s(&y)) < 1e-6,
            "with the epilogue {case:?}"
        );
    }
}

#[test]
fn dense_conv_forward_and_backward() {
    let mut rng = Rng::new(1);
    for &(h, w, cin, cout, k, stride) in CONV_CASES {
        let (s, g, x, wt) = random_conv(&mut rng, (h, w, cin, cout, k, stride));
        let wk = &forward_weight(&g, &wt);
        let mut col = vec![0f32; g.col_len()];
        let mut y = vec![0f32; g.output().len()];
        conv::forward(
            &g,
            &x,
            conv::Weight::Plain(wk),
            &mut y,
            &mut col,
            None,
            None,
        );
        let (xd, wd) = (f64s(&x), f64s(&wt));
        let y_ref = conv_ref(&xd, s, &wd, cout, k, stride, false);
        assert!(
            max_rel(&y, &y_ref) < 1e-5,
            "forward {:?}",
            (h, w, cin, cout, k, stride)
        );
        // Weights prepared once for inference: the same products, other layouts.
        let prepared = conv::prepare(&g, &wt);
        let mut y_prepared = vec![f32::NAN; y.len()];
        let weight = conv::Weight::Prepared(&prepared);
        conv::forward(&g, &x, weight, &mut y_prepared, &mut col, None, None);
        assert!(
            max_rel(&y_prepared, &y_ref) < 1e-5,
            "forward with prepared weights {:?}",
            (h, w, cin, cout, k, stride)
        );

        let r = f64s(&random(&mut rng, y.len()));
        let dy: Vec<f32> = r.iter().map(|&v| v as f32).collect();
        let mut dx = vec![0f32; x.len()];
        let mut dw = vec![0f32; g.weight_len()];
        let mut dcol = vec![0f32; g.col_len()];
        conv::backward(&g, &x, wk, &dy, Some(&mut dx), &mut dw, &mut col, &mut dcol);
        let dw_torch = if g.is_pointwise() {
            dw
        } else {
            let mut t = vec![0f32; dw.len()];
            conv::unpack_weight_add(&g, &dw, &mut t);
            t
        };
        let dx_num = numeric_grad(&xd, |xp| {
            dot(&conv_ref(xp, s, &wd, cout, k, stride, false), &r)
        });
        let dw_num = numeric_grad(&wd, |wp| {
            dot(&conv_ref(&xd, s, wp, cout, k, stride, false), &r)
        });
        assert!(max_rel(&dx, &dx_num) < 1e-4, "dx {:?}", (h, w, k, stride));
        assert!(
            max_rel(&dw_torch, &dw_num) < 1e-4,
            "dw {:?}",
            (h, w, k, stride)
        );
    }
}

/// The gradients where neither Winograd's transform nor a 1×1 product computes the weight's
/// (few channels), on enough pixels that each thread gathers several blocks of patches, with
/// and without the input's, and with more threads than images (image by image), against the
/// direct sums over the batch's pixels (too many values for finite differences).
#[test]
fn patch_gradients_over_many_pixels() {
    let mut rng = Rng::new(5);
    for case in [
        (64, 64, 4, 8, 3, 1),
        (130, 129, 3, 5, 3, 2),
        (66, 67, 4, 8, 3, 2),
    ] {
        let (s, g, x, wt) = random_conv(&mut rng, case);
        let (k, stride, cout) = (case.4, case.5, g.cout);
        let dy = random(&mut rng, g.output().len());
        let wk = forward_weight(&g, &wt);
        let ((oh, pt), (ow, pl)) = (same_padding(s.h, k, stride), same_padding(s.w, k, stride));
        // dw[o][c][kh][kw] = Σ dy·x and dx[pixel][c] = Σ dy·w over each tap of each output pixel.
        let mut want_dw = vec![0f64; wt.len()];
        let mut want_dx = vec![0f64; x.len()];
        for b in 0..s.n {
            for i in 0..oh {
                for j in 0..ow {
                    for (kh, kw) in (0..k).flat_map(|kh| (0..k).map(move |kw| (kh, kw))) {
                        let ih = (i * stride + kh).wrapping_sub(pt);
                        let iw = (j * stride + kw).wrapping_sub(pl);
                        if ih >= s.h || iw >= s.w {
                            continue;
                        }
                        let at = ((b * s.h + ih) * s.w + iw) * s.c;
                        let d = &dy[((b * oh + i) * ow + j) * cout..][..cout];
                        for (o, &dv) in d.iter().enumerate() {
                            for c in 0..s.c {
                                let tap = ((o * s.c + c) * k + kh) * k + kw;
                                want_dw[tap] += dv as f64 * x[at + c] as f64;
                                want_dx[at + c] += dv as f64 * wt[tap] as f64;
                            }
                        }
                    }
                }
            }
        }
        let (mut col, mut dcol) = (vec![0f32; g.col_len()], vec![0f32; g.col_len()]);
        let mut run = |with_dx: bool| {
            let mut dw = vec![0f32; g.weight_len()];
            let mut dx = vec![f32::NAN; x.len()];
            let dx_arg = with_dx.then_some(&mut dx[..]);
            conv::backward(&g, &x, &wk, &dy, dx_arg, &mut dw, &mut col, &mut dcol);
            let mut torch = vec![0f32; dw.len()];
            conv::unpack_weight_add(&g, &dw, &mut torch);
            (torch, dx)
        };
        let (dw, _) = run(false);
        assert!(max_rel(&dw, &want_dw) < 1e-5, "dw alone {case:?}");
        let (dw, dx) = run(true);
        assert!(max_rel(&dw, &want_dw) < 1e-5, "dw {case:?}");
        assert!(max_rel(&dx, &want_dx) < 1e-5, "dx {case:?}");
        let more_threads = rayon::ThreadPoolBuilder::new()
            .num_threads(s.n + 1)
            .build()
            .expect("a thread pool");
        let (dw, dx) = more_threads.install(|| run(true));
        assert!(max_rel(&dw, &want_dw) < 1e-5, "dw image by image {case:?}");
        assert!(max_rel(&dx, &want_dx) < 1e-5, "dx image by image {case:?}");
    }
}

#[test]
fn depthwise_conv_forward_and_backward() {
    let mut rng = Rng::new(2);
    for &(h, w, c, k, stride) in &[
        (7, 7, 5, 3, 2),
        (8, 8, 4, 3, 2),
        (6, 5, 3, 5, 1),
        (9, 10, 6, 5, 2),
        (5, 5, 17, 3, 1),
        // Whole 32-channel register blocks, and one with a tail.
        (4, 5, 64, 3, 1),
        (5, 4, 40, 5, 2),
        // AVX-512's 3×3 and 5×5 stride-1 gradients: 32-channel blocks and a 16-channel tail,
        // maps narrower than the window, one pixel wide or high.
        (6, 7, 16, 5, 1),
        (2, 3, 32, 5, 1),
        (1, 1, 16, 5, 1),
        (6, 7, 48, 3, 1),
        (1, 4, 32, 3, 1),
        (3, 1, 16, 3, 1),
        (1, 1, 48, 3, 1),
        (2, 2, 48, 3, 1),
        (2, 3, 16, 3, 1),
    ] {
        let s = Nhwc::new(2, h, w, c);
        let g = depthwise::DwGeom::new(s, k, stride);
        let x = random(&mut rng, s.len());
        let wt = random(&mut rng, g.weight_len());
        let mut packed = vec![0f32; g.weight_len()];
        depthwise::pack_weight(&g, &wt, &mut packed);
        let mut y = vec![0f32; g.output().len()];
        depthwise::forward(&g, &x, &packed, &mut y, None);
        let (xd, wd) = (f64s(&x), f64s(&wt));
        assert!(max_rel(&y, &conv_ref(&xd, s, &wd, c, k, stride, true)) < 1e-5);

        let r = f64s(&random(&mut rng, y.len()));
        let dy: Vec<f32> = r.iter().map(|&v| v as f32).collect();
        let mut dx = vec![0f32; x.len()];
        let mut dw = vec![0f32; g.weight_len()];
        let mut scratch = vec![0f32; s.n * g.weight_len()];
        depthwise::backward(&g, &x, &packed, &dy, &mut dx, &mut dw, &mut scratch);
        let mut dw_torch = vec![0f32; dw.len()];
        depthwise::unpack_weight_add(&g, &dw, &mut dw_torch);
        let dx_num = numeric_grad(&xd, |xp| dot(&conv_ref(xp, s, &wd, c, k, stride, true), &r));
        let dw_num = numeric_grad(&wd, |wp| dot(&conv_ref(&xd, s, wp, c, k, stride, true), &r));
        assert!(max_rel(&dx, &dx_num) < 1e-4, "dx {:?}", (h, w, k, stride));
        assert!(
            max_rel(&dw_torch, &dw_num) < 1e-4,
            "dw {:?}",
            (h, w, k, stride)
        );
    }
}

fn act_ref(act: Act, x: f64) -> f64 {
    match act {
        Act::None => x,
        Act::Silu => x / (1.0 + (-x).exp()),
        Act::Relu6 => x.clamp(0.0, 6.0),
    }
}

fn bn_ref(x: &[f64], c: usize, gamma: &[f64], beta: &[f64], eps: f64, act: Act) -> Vec<f64> {
    let rows = x.len() / c;
    let mut y = vec![0f64; x.len()];
    for ch in 0..c {
        let mean = (0..rows).map(|r| x[r * c + ch]).sum::<f64>() / rows as f64;
        let var = (0..rows)
            .map(|r| (x[r * c + ch] - mean).powi(2))
            .sum::<f64>()
            / rows as f64;
        for r in 0..rows {
            let z = gamma[ch] * (x[r * c + ch] - mean) / (var + eps).sqrt() + beta[ch];
            y[r * c + ch] = act_ref(act, z);
        }
    }
    y
}

#[test]
fn batch_norm_train_forward_backward_and_running_stats() {
    let mut rng = Rng::new(3);
    for (rows, c, act) in [
        (37, 5, Act::None),
        (1100, 3, Act::Silu),
        (50, 4, Act::Relu6),
    ] {
        // An offset mean exercises the two-pass variance.
        let x: Vec<f32> = random(&mut rng, rows * c)
            .iter()
            .map(|v| 3.0 + 2.0 * v)
            .collect();
        let gamma: Vec<f32> = (0..c).map(|_| rng.uniform_in(0.5, 1.5) as f32).collect();
        let beta = random(&mut rng, c);
        let eps = 1e-3;
        let (mut mean, mut var, mut invstd) = (vec![0f32; c], vec![0f32; c], vec![0f32; c]);
        let mut y = vec![0f32; x.len()];
        norm::train_forward(
            &x,
            c,
            &gamma,
            &beta,
            eps,
            act,
            &mut mean,
            &mut var,
            &mut invstd,
            &mut y,
            None,
        );
        let (xd, gd, bd) = (f64s(&x), f64s(&gamma), f64s(&beta));
        assert!(max_rel(&y, &bn_ref(&xd, c, &gd, &bd, eps as f64, act)) < 1e-5);

        let r = f64s(&random(&mut rng, y.len()));
        let dy: Vec<f32> = r.iter().map(|&v| v as f32).collect();
        let (mut dx, mut dg, mut db) = (vec![0f32; x.len()], vec![0f32; c], vec![0f32; c]);
        norm::train_backward(
            &x, c, &gamma, &beta, &mean, &invstd, act, &dy, &mut dx, &mut dg, &mut db, None,
        );
        if rows < 100 {
            let dx_num = numeric_grad(&xd, |xp| dot(&bn_ref(xp, c, &gd, &bd, eps as f64, act), &r));
            assert!(max_rel(&dx, &dx_num) < 1e-3, "dx rows={rows} {act:?}");
        }
        let dg_num = numeric_grad(&gd, |gp| dot(&bn_ref(&xd, c, gp, &bd, eps as f64, act), &r));
        let db_num = numeric_grad(&bd, |bp| dot(&bn_ref(&xd, c, &gd, bp, eps as f64, act), &r));
        assert!(
            max_rel(&dg, &dg_num) < 1e-4 && max_rel(&db, &db_num) < 1e-4,
            "dγ dβ {act:?}"
        );

        // Running statistics: PyTorch's rule with the unbiased variance.
        let (mut rm, mut rv) = (vec![0.5f32; c], vec![2.0f32; c]);
        norm::update_running_stats(&mut rm, &mut rv, &mean, &var, rows, 0.1);
        for ch in 0..c {
            let m = (0..rows).map(|r| xd[r * c + ch]).sum::<f64>() / rows as f64;
            let v =
                (0..rows).map(|r| (xd[r * c + ch] - m).powi(2)).sum::<f64>() / (rows - 1) as f64;
            assert!((rm[ch] as f64 - (0.9 * 0.5 + 0.1 * m)).abs() < 1e-5);
            assert!((rv[ch] as f64 - (0.9 * 2.0 + 0.1 * v)).abs() < 1e-4);
        }

        // Eval mode from running statistics.
        let mut ye = vec![0f32; x.len()];
        norm::eval_forward(&x, c, &gamma, &beta, &rm, &rv, eps, act, &mut ye);
        for (i, v) in ye.iter().enumerate() {
            let ch = i % c;
            let z = gd[ch] * (xd[i] - rm[ch] as f64) / (rv[ch] as f64 + eps as f64).sqrt() + bd[ch];
            assert!((*v as f64 - act_ref(act, z)).abs() < 1e-4);
        }
    }
}

/// Batch statistics in one pass sum deviations from each channel's first value; a channel whose
/// first value lies far from its mean (here 0 among values near 10⁴: the subtraction would
/// cost the variance ~3 % in f32's sums) is summed again from its mean. Both kinds of channel
/// side by side, against f64.
#[test]
fn batch_norm_statistics_survive_a_first_row_far_from_the_mean() {
    let mut rng = Rng::new(17);
    let (rows, c) = (1024, 2);
    let mut x: Vec<f32> = random(&mut rng, rows * c)
        .iter()
        .map(|v| 1.0e4 + v)
        .collect();
    x[0] = 0.0;
    let (gamma, beta) = (vec![1f32; c], vec![0f32; c]);
    let (mut mean, mut var, mut invstd) = (vec![0f32; c], vec![0f32; c], vec![0f32; c]);
    let mut y = vec![0f32; x.len()];
    norm::train_forward(
        &x,
        c,
        &gamma,
        &beta,
        1e-3,
        Act::None,
        &mut mean,
        &mut var,
        &mut invstd,
        &mut y,
        None,
    );
    let xd = f64s(&x);
    for ch in 0..c {
        let m = (0..rows).map(|r| xd[r * c + ch]).sum::<f64>() / rows as f64;
        let v = (0..rows).map(|r| (xd[r * c + ch] - m).powi(2)).sum::<f64>() / rows as f64;
        assert!(((mean[ch] as f64 - m) / m).abs() < 1e-6, "mean {ch}");
        assert!(
            ((var[ch] as f64 - v) / v).abs() < 1e-4,
            "var {ch}: {} vs {v}",
            var[ch]
        );
    }
    assert!(max_rel(&y, &bn_ref(&xd, c, &[1.0; 2], &[0.0; 2], 1e-3, Act::None)) < 1e-4);
}

/// Few rows of many channels (the small maps late in a network) split batch norm's per-channel
/// passes into channel blocks across threads: the results equal one thread's bit for bit.
#[test]
fn batch_norm_in_channel_blocks_equals_one_thread() {
    let mut rng = Rng::new(13);
    let (rows, c) = (60, 700);
    let x: Vec<f32> = random(&mut rng, rows * c).iter().map(|v| 1.0 + v).collect();
    let gamma: Vec<f32> = (0..c).map(|_| rng.uniform_in(0.5, 1.5) as f32).collect();
    let beta = random(&mut rng, c);
    let dy = random(&mut rng, rows * c);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a pool");
        pool.install(|| {
            let (mut mean, mut var, mut invstd) = (vec![0f32; c], vec![0f32; c], vec![0f32; c]);
            let mut y = vec![0f32; x.len()];
            norm::train_forward(
                &x,
                c,
                &gamma,
                &beta,
                1e-3,
                Act::Silu,
                &mut mean,
                &mut var,
                &mut invstd,
                &mut y,
                None,
            );
            let (mut dx, mut dg, mut db) = (vec![0f32; x.len()], vec![0f32; c], vec![0f32; c]);
            norm::train_backward(
                &x,
                c,
                &gamma,
                &beta,
                &mean,
                &invstd,
                Act::Silu,
                &dy,
                &mut dx,
                &mut dg,
                &mut db,
                None,
            );
            [y, mean, var, invstd, dx, dg, db]
        })
    };
    assert_eq!(run(1), run(3));
}

/// Two replicas in two threads: each one's sum waits for the other's values (a two-rank
/// all-reduce in memory).
struct Exchange {
    slots: std::sync::Mutex<[Vec<f64>; 2]>,
    barrier: std::sync::Barrier,
}

fn replica_sum(ex: std::sync::Arc<Exchange>, me: usize) -> impl Fn(&mut [f64]) + Send + Sync {
    move |v: &mut [f64]| {
        ex.slots.lock().unwrap()[me] = v.to_vec();
        ex.barrier.wait();
        let other = ex.slots.lock().unwrap()[1 - me].clone();
        v.iter_mut().zip(&other).for_each(|(a, b)| *a += b);
        ex.barrier.wait();
    }
}

#[test]
fn synchronized_batch_norm_over_two_replicas_equals_the_whole_batch() {
    let mut rng = Rng::new(9);
    let (rows, c, act) = (2 * 45, 6, Act::Silu);
    let x: Vec<f32> = random(&mut rng, rows * c).iter().map(|v| 1.0 + v).collect();
    let dy = random(&mut rng, rows * c);
    let gamma: Vec<f32> = (0..c).map(|_| rng.uniform_in(0.5, 1.5) as f32).collect();
    let beta = random(&mut rng, c);
    // What one process computes on all rows: (y, mean, var, dx, dγ, dβ, rows).
    type Out = (
        Vec<f32>,
        Vec<f32>,
        Vec<f32>,
        Vec<f32>,
        Vec<f32>,
        Vec<f32>,
        usize,
    );
    let run = |x: &[f32], dy: &[f32], sync: Option<&norm::ReplicaSum>| -> Out {
        let (mut mean, mut var, mut invstd) = (vec![0f32; c], vec![0f32; c], vec![0f32; c]);
        let mut y = vec![0f32; x.len()];
        let n = norm::train_forward(
            x,
            c,
            &gamma,
            &beta,
            1e-3,
            act,
            &mut mean,
            &mut var,
            &mut invstd,
            &mut y,
            sync,
        );
        let (mut dx, mut dg, mut db) = (vec![0f32; x.len()], vec![0f32; c], vec![0f32; c]);
        norm::train_backward(
            x, c, &gamma, &beta, &mean, &invstd, act, dy, &mut dx, &mut dg, &mut db, sync,
        );
        (y, mean, var, dx, dg, db, n)
    };
    let whole = run(&x, &dy, None);
    let ex = std::sync::Arc::new(Exchange {
        slots: std::sync::Mutex::new([vec![], vec![]]),
        barrier: std::sync::Barrier::new(2),
    });
    let half = rows / 2 * c;
    let parts: Vec<Out> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|r| {
                let sum = replica_sum(ex.clone(), r);
                let (x, dy, run) = (
                    &x[r * half..(r + 1) * half],
                    &dy[r * half..(r + 1) * half],
                    &run,
                );
                s.spawn(move || run(x, dy, Some(&sum)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, p) in parts.iter().enumerate() {
        assert_eq!(p.6, rows, "statistics span both replicas' rows");
        assert!(max_rel(&p.1, &f64s(&whole.1)) < 1e-5 && max_rel(&p.2, &f64s(&whole.2)) < 1e-5);
        let slice = r * half..(r + 1) * half;
        assert!(
            max_rel(&p.0, &f64s(&whole.0[slice.clone()])) < 1e-5,
            "y of replica {r}"
        );
        assert!(
            max_rel(&p.3, &f64s(&whole.3[slice])) < 1e-4,
            "dx of replica {r}"
        );
    }
    // Each replica's dγ, dβ is its rows' share: together they are the whole batch's.
    for ch in 0..c {
        let dg = parts[0].4[ch] + parts[1].4[ch];
        let db = parts[0].5[ch] + parts[1].5[ch];
        assert!(
            (dg - whole.4[ch]).abs() < 1e-4 * (1.0 + whole.4[ch].abs()),
            "dγ"
        );
        assert!(
            (db - whole.5[ch]).abs() < 1e-4 * (1.0 + whole.5[ch].abs()),
            "dβ"
        );
    }
}

fn se_ref(x: &[f64], g: &SeGeom, w1: &[f64], b1: &[f64], w2: &[f64], b2: &[f64]) -> Vec<f64> {
    let (hw, c, cr) = (g.hw, g.c, g.cr);
    let mut y = vec![0f64; x.len()];
    for b in 0..g.n {
        let img = &x[b * hw * c..][..hw * c];
        let pooled: Vec<f64> = (0..c)
            .map(|ch| (0..hw).map(|p| img[p * c + ch]).sum::<f64>() / hw as f64)
            .collect();
        let hidden: Vec<f64> = (0..cr)
            .map(|j| {
                act_ref(
                    g.act,
                    b1[j] + (0..c).map(|ch| w1[j * c + ch] * pooled[ch]).sum::<f64>(),
                )
            })
            .collect();
        for ch in 0..c {
            let z = b2[ch] + (0..cr).map(|j| w2[ch * cr + j] * hidden[j]).sum::<f64>();
            let gate = 1.0 / (1.0 + (-z).exp());
            for p in 0..hw {
                y[(b * hw + p) * c + ch] = img[p * c + ch] * gate;
            }
        }
    }
    y
}

#[test]
fn squeeze_excitation_forward_and_backward() {
    let mut rng = Rng::new(4);
    let g = SeGeom {
        n: 2,
        hw: 6,
        c: 8,
        cr: 3,
        act: Act::Silu,
    };
    let x = random(&mut rng, g.n * g.hw * g.c);
    let (w1, b1) = (random(&mut rng, g.cr * g.c), random(&mut rng, g.cr));
    let (w2, b2) = (random(&mut rng, g.c * g.cr), random(&mut rng, g.c));
    let mut saved = SeSaved::new(&g);
    let mut y = vec![0f32; x.len()];
    let plain = se::SeWeights::Plain { w1: &w1, w2: &w2 };
    se::forward(&g, &x, plain, &b1, &b2, &mut saved, &mut y);
    let d = |v: &[f32]| f64s(v);
    let (xd, w1d, b1d, w2d, b2d) = (d(&x), d(&w1), d(&b1), d(&w2), d(&b2));
    let want = se_ref(&xd, &g, &w1d, &b1d, &w2d, &b2d);
    assert!(max_rel(&y, &want) < 1e-5);
    // Weights packed for inference: the same function.
    if let Some((p1, p2)) = se::prepare(&g, &w1, &w2) {
        let mut prepared_saved = SeSaved::new(&g);
        let mut yp = vec![f32::NAN; x.len()];
        let prepared = se::SeWeights::Prepared { w1: &p1, w2: &p2 };
        se::forward(&g, &x, prepared, &b1, &b2, &mut prepared_saved, &mut yp);
        assert!(max_rel(&yp, &want) < 1e-5, "prepared weights");
    }
    // Pooled from row sums (as a depthwise layer before it writes them; rows of 3 pixels here,
    // and a longer buffer than they need): the same function.
    let rows = 2;
    let mut sums = vec![f32::NAN; g.n * rows * g.c + 5];
    for (r, sum) in sums.chunks_exact_mut(g.c).take(g.n * rows).enumerate() {
        sum.fill(0.0);
        for px in x[r * 3 * g.c..][..3 * g.c].chunks_exact(g.c) {
            sum.iter_mut().zip(px).for_each(|(s, v)| *s += v);
        }
    }
    let mut from_sums = SeSaved::new(&g);
    se::pool_row_sums(&g, &sums, rows, &mut from_sums);
    se::excite(&g, plain, &b1, &b2, &mut from_sums);
    let mut ys = vec![f32::NAN; x.len()];
    se::scale(&g, &x, from_sums.gate(), &mut ys);
    assert!(max_rel(&ys, &want) < 1e-5, "pooled from row sums");

    let r = f64s(&random(&mut rng, y.len()));
    let dy: Vec<f32> = r.iter().map(|&v| v as f32).collect();
    let mut dx = vec![0f32; x.len()];
    let (mut gw1, mut gb1, mut gw2, mut gb2) = (
        vec![0f32; w1.len()],
        vec![0f32; g.cr],
        vec![0f32; w2.len()],
        vec![0f32; g.c],
    );
    se::backward(
        &g, &x, &w1, &w2, &saved, &dy, &mut dx, &mut gw1, &mut gb1, &mut gw2, &mut gb2,
    );
    let f = |x: &[f64], w1: &[f64], b1: &[f64], w2: &[f64], b2: &[f64]| {
        dot(&se_ref(x, &g, w1, b1, w2, b2), &r)
    };
    assert!(max_rel(&dx, &numeric_grad(&xd, |p| f(p, &w1d, &b1d, &w2d, &b2d))) < 1e-4);
    assert!(max_rel(&gw1, &numeric_grad(&w1d, |p| f(&xd, p, &b1d, &w2d, &b2d))) < 1e-4);
    assert!(max_rel(&gb1, &numeric_grad(&b1d, |p| f(&xd, &w1d, p, &w2d, &b2d))) < 1e-4);
    assert!(max_rel(&gw2, &numeric_grad(&w2d, |p| f(&xd, &w1d, &b1d, p, &b2d))) < 1e-4);
    assert!(max_rel(&gb2, &numeric_grad(&b2d, |p| f(&xd, &w1d, &b1d, &w2d, p))) < 1e-4);
}

/// A single image's squeeze-excitation (its pooling and its scaling) split over the threads:
/// the same values, bit for bit, as on one thread, and the reference's.
#[test]
fn one_image_squeeze_excitation_split_over_threads_equals_one_thread() {
    let mut rng = Rng::new(14);
    let g = SeGeom {
        n: 1,
        hw: 49,
        c: 1000,
        cr: 40,
        act: Act::Silu,
    };
    let x = random(&mut rng, g.n * g.hw * g.c);
    let (w1, b1) = (random(&mut rng, g.cr * g.c), random(&mut rng, g.cr));
    let (w2, b2) = (random(&mut rng, g.c * g.cr), random(&mut rng, g.c));
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut saved = SeSaved::new(&g);
        let (mut y, mut pooled) = (vec![f32::NAN; x.len()], vec![f32::NAN; g.c]);
        let plain = se::SeWeights::Plain { w1: &w1, w2: &w2 };
        pool.install(|| {
            se::forward(&g, &x, plain, &b1, &b2, &mut saved, &mut y);
            pool::global_avg_forward(&x, 1, g.hw, g.c, &mut pooled);
        });
        (pooled, y)
    };
    let (pooled, y) = run(1);
    assert_eq!(run(3), (pooled, y.clone()));
    let d = |v: &[f32]| f64s(v);
    let want = se_ref(&d(&x), &g, &d(&w1), &d(&b1), &d(&w2), &d(&b2));
    assert!(max_rel(&y, &want) < 1e-5);
}

#[test]
fn pooling_linear_and_loss() {
    let mut rng = Rng::new(5);
    let (n, hw, c, k) = (3, 5, 4, 6);
    let x = random(&mut rng, n * hw * c);
    let mut pooled = vec![0f32; n * c];
    pool::global_avg_forward(&x, n, hw, c, &mut pooled);
    for b in 0..n {
        for ch in 0..c {
            let m: f32 = (0..hw).map(|p| x[(b * hw + p) * c + ch]).sum::<f32>() / hw as f32;
            assert!((pooled[b * c + ch] - m).abs() < 1e-6);
        }
    }
    let mut dx = vec![0f32; x.len()];
    pool::global_avg_backward(&pooled, n, hw, c, &mut dx);
    assert!((dx[c + 1] - pooled[1] / hw as f32).abs() < 1e-7);

    let (w, bias) = (random(&mut rng, k * c), random(&mut rng, k));
    let mut logits = vec![0f32; n * k];
    linear::forward(&pooled, n, c, k, &w, &bias, &mut logits);
    let lin = |x: &[f64], w: &[f64], b: &[f64]| -> Vec<f64> {
        (0..n * k)
            .map(|i| {
                b[i % k]
                    + (0..c)
                        .map(|j| x[(i / k) * c + j] * w[(i % k) * c + j])
                        .sum::<f64>()
            })
            .collect()
    };
    let (pd, wd, bd) = (f64s(&pooled), f64s(&w), f64s(&bias));
    assert!(max_rel(&logits, &lin(&pd, &wd, &bd)) < 1e-6);

    // Loss: hard labels with smoothing, then soft targets (a mixup of two rows).
    let labels = [2usize, 0, 5];
    let mut targets = vec![0f32; n * k];
    loss::smoothed_targets(&labels, k, 0.1, &mut targets);
    assert!((targets[2] - (0.9 + 0.1 / 6.0)).abs() < 1e-7 && (targets[1] - 0.1 / 6.0).abs() < 1e-7);
    let mixed: Vec<f32> = (0..n * k)
        .map(|i| 0.7 * targets[i] + 0.3 * targets[(n - 1 - i / k) * k + i % k])
        .collect();
    let ce = |z: &[f64], t: &[f32]| -> f64 {
        (0..n)
            .map(|b| {
                let row = &z[b * k..][..k];
                let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
                -(0..k)
                    .map(|j| t[b * k + j] as f64 * (row[j] - lse))
                    .sum::<f64>()
            })
            .sum::<f64>()
            / n as f64
    };
    let ld = f64s(&logits);
    for t in [&targets, &mixed] {
        let mut dlogits = vec![0f32; n * k];
        let value = loss::softmax_cross_entropy(&logits, k, t, &mut dlogits);
        assert!((value as f64 - ce(&ld, t)).abs() < 1e-5);
        assert!(max_rel(&dlogits, &numeric_grad(&ld, |z| ce(z, t))) < 1e-4);

        // Linear backward against the loss through it.
        let mut dpooled = vec![0f32; n * c];
        let (mut dw, mut db) = (vec![0f32; w.len()], vec![0f32; k]);
        linear::backward(
            &pooled,
            n,
            c,
            k,
            &w,
            &dlogits,
            &mut dpooled,
            &mut dw,
            &mut db,
        );
        let dl = f64s(&dlogits);
        assert!(
            max_rel(
                &dpooled,
                &numeric_grad(&pd, |p| dot(&lin(p, &wd, &bd), &dl))
            ) < 1e-4
        );
        assert!(max_rel(&dw, &numeric_grad(&wd, |p| dot(&lin(&pd, p, &bd), &dl))) < 1e-4);
        assert!(max_rel(&db, &numeric_grad(&bd, |p| dot(&lin(&pd, &wd, p), &dl))) < 1e-4);
    }
    let mut probs = vec![0f32; n * k];
    loss::softmax(&logits, k, &mut probs);
    assert!((probs[..k].iter().sum::<f32>() - 1.0).abs() < 1e-6);
}

#[test]
fn dropout_and_drop_path_keep_the_expectation() {
    let mut rng = Rng::new(6);
    let mut mask = vec![0f32; 200_000];
    regularize::dropout_mask(&mut rng, 0.2, &mut mask);
    let kept = mask.iter().filter(|&&m| m > 0.0).count() as f64 / mask.len() as f64;
    assert!((kept - 0.8).abs() < 0.005, "kept {kept}");
    assert!(mask.iter().all(|&m| m == 0.0 || (m - 1.25).abs() < 1e-6));
    let mean = mask.iter().map(|&m| m as f64).sum::<f64>() / mask.len() as f64;
    assert!((mean - 1.0).abs() < 0.01);

    // Drop-path: whole images kept or dropped, the shortcut added to every image.
    let (drop, shortcut) = ([0.0, 1.25, 1.0, 0.0], vec![0.5f32; 40]);
    let mut branch = vec![2f32; 4 * 10];
    regularize::drop_path_residual(&mut branch, &shortcut, &drop);
    assert_eq!(&branch[..10], &[0.5; 10]);
    assert!(branch[10..20].iter().all(|&v| v == 3.0));
    assert!(branch[20..30].iter().all(|&v| v == 2.5));
    assert_eq!(&branch[30..], &[0.5; 10]);
    let dy: Vec<f32> = (0..40).map(|i| i as f32).collect();
    let mut d_branch = vec![f32::NAN; 40];
    regularize::drop_path_backward(&dy, &drop, &mut d_branch);
    assert_eq!(&d_branch[..10], &[0.0; 10]);
    assert_eq!(d_branch[15], 15.0 * 1.25);
    assert_eq!(&d_branch[20..30], &dy[20..30]);
    assert_eq!(&d_branch[30..], &[0.0; 10]);
    let mut y = vec![0f32; 3];
    regularize::apply_mask(&[1.0, 2.0, 3.0], &[0.0, 1.25, 1.25], &mut y);
    assert_eq!(y, vec![0.0, 2.5, 3.75]);
}

/// The depthwise forward sums each pixel's taps in one fixed order (columns, then rows, as
/// separate multiplies and adds) whatever kernel runs it, so the AVX2 kernel and this scalar
/// loop agree to the bit, with and without the folded batch norm + SiLU; image borders, stride
/// 2, 5×5 kernels and maps narrower than the kernel included.
#[test]
fn depthwise_forward_sums_in_the_portable_order() {
    let mut rng = Rng::new(11);
    for &(h, w, c, k, stride) in &[
        (7, 7, 16, 3, 1),
        (14, 13, 24, 3, 2),
        (9, 10, 8, 5, 1),
        (11, 12, 32, 5, 2),
        (2, 3, 8, 5, 1),
        (1, 1, 8, 3, 1),
        // Blocks of 32 channels and a tail of 16 (AVX-512), inner and edge pixels; rows with
        // full 3×3 windows four pixels at a time and some left over, stride 1 and 2.
        (9, 8, 48, 3, 1),
        (10, 9, 80, 5, 2),
        (6, 15, 64, 3, 1),
        (7, 21, 48, 3, 2),
        // 3×3 and 5×5 stride 1 column by column (AVX-512): maps narrower than the window,
        // one pixel wide, high, or both.
        (1, 6, 48, 3, 1),
        (5, 1, 16, 3, 1),
        (1, 1, 32, 3, 1),
        (9, 10, 48, 5, 1),
        (3, 2, 16, 5, 1),
        (2, 6, 32, 5, 1),
        (1, 1, 16, 5, 1),
    ] {
        let s = Nhwc::new(2, h, w, c);
        let g = depthwise::DwGeom::new(s, k, stride);
        let x = random(&mut rng, s.len());
        let wp = random(&mut rng, g.weight_len());
        let (oh, ow) = (g.out_h, g.out_w);
        // SAME padding: total padding max((o − 1)·stride + k − i, 0), the smaller half first.
        let pad = |o: usize, i: usize| ((o - 1) * stride + k).saturating_sub(i) / 2;
        let (pt, pl) = (pad(oh, h) as isize, pad(ow, w) as isize);
        let mut want = vec![0f32; g.output().len()];
        for b in 0..2 {
            for y in 0..oh {
                for xo in 0..ow {
                    for ch in 0..c {
                        let mut acc = 0f32;
                        for j in 0..k as isize {
                            for i in 0..k as isize {
                                let (iy, ix) = (
                                    y as isize * stride as isize - pt + i,
                                    xo as isize * stride as isize - pl + j,
                                );
                                if (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix) {
                                    let xv = x[((b * h + iy as usize) * w + ix as usize) * c + ch];
                                    acc += xv * wp[(i as usize * k + j as usize) * c + ch];
                                }
                            }
                        }
                        want[((b * oh + y) * ow + xo) * c + ch] = acc;
                    }
                }
            }
        }
        let mut got = vec![0f32; want.len()];
        depthwise::forward(&g, &x, &wp, &mut got, None);
        assert_eq!(got, want, "{:?}", (h, w, c, k, stride));
        let folded = silu_fold(c);
        folded.apply(&mut want);
        depthwise::forward(&g, &x, &wp, &mut got, Some(&folded));
        assert_eq!(got, want, "with the epilogue {:?}", (h, w, c, k, stride));
        // With its rows summed for a squeeze-excitation: the same output, and each output
        // row's per-channel sum.
        let mut sums = vec![f32::NAN; 2 * oh * c];
        got.fill(f32::NAN);
        depthwise::forward_with_row_sums(&g, &x, &wp, &mut got, Some(&folded), &mut sums);
        assert_eq!(got, want, "with row sums {:?}", (h, w, c, k, stride));
        let mut want_sums = vec![0f64; sums.len()];
        for (r, row) in want.chunks_exact(ow * c).enumerate() {
            for (p, v) in row.iter().enumerate() {
                want_sums[r * c + p % c] += *v as f64;
            }
        }
        assert!(
            max_rel(&sums, &want_sums) < 1e-6,
            "row sums {:?}",
            (h, w, c, k, stride)
        );
    }
}

/// A k×k convolution run with its 1×1 projection piece by piece (its output never stored)
/// equals the two layers one after the other, bit for bit: by Winograd's transform (a few tiles
/// at a time: partial tiles at the edges, blocks of several chunks and a short last chunk) and
/// direct (row by row: stride 2, and a 3×3 on fewer than 32 channels), with and without the
/// epilogues and the residual.
#[test]
fn convolution_with_its_projection_equals_the_two_layers() {
    if !pointwise::available() {
        return;
    }
    let mut rng = Rng::new(14);
    // (n, h, w, cin, mid, cout, k, stride)
    for &(n, h, w, cin, mid, cout, k, stride) in &[
        (2, 9, 7, 32, 48, 20, 3, 1),
        (3, 16, 12, 40, 64, 24, 3, 1),
        (2, 13, 13, 32, 40, 16, 3, 1),
        (2, 9, 8, 24, 40, 20, 3, 2),
        (1, 7, 9, 16, 24, 16, 3, 1),
        (2, 6, 5, 3, 24, 8, 3, 2),
    ] {
        let g = conv::ConvGeom::new(Nhwc::new(n, h, w, cin), k, stride, mid);
        assert!(conv::projects(&g));
        let g2 = conv::ConvGeom::new(g.output(), 1, 1, cout);
        let x = random(&mut rng, g.input.len());
        let w1 = conv::prepare(&g, &random(&mut rng, g.weight_len()));
        let w2 = conv::prepare(&g2, &random(&mut rng, g2.weight_len()));
        let residual = random(&mut rng, g2.output().len());
        let (f1, f2) = (silu_fold(mid), silu_fold(cout));
        for (e1, e2, skip) in [
            (Some(&f1), Some(&f2), Some(&residual[..])),
            (None, None, None),
        ] {
            let mut col = vec![0f32; g.col_len()];
            let mut hidden = vec![f32::NAN; g.output().len()];
            conv::forward(
                &g,
                &x,
                conv::Weight::Prepared(&w1),
                &mut hidden,
                &mut col,
                e1,
                None,
            );
            let mut want = vec![f32::NAN; g2.output().len()];
            let w2p = conv::Weight::Prepared(&w2);
            conv::forward(&g2, &hidden, w2p, &mut want, &mut col, e2, skip);
            let mut got = vec![f32::NAN; want.len()];
            let p = pointwise::Projection {
                w: pointwise::Panels::F32(&w2),
                cout,
                epilogue: e2,
                skip,
            };
            conv::forward_projected(&g, &x, pointwise::Panels::F32(&w1), e1, &p, &mut got);
            let case = (n, h, w, cin, mid, cout, k, stride, skip.is_some());
            assert_eq!(got, want, "{case:?}");
        }
    }
}

#[test]
fn fused_epilogue_equals_a_separate_pass() {
    let mut rng = Rng::new(7);
    let c_out = 6;
    let folded = silu_fold(c_out);
    for &(h, w, cin, k, stride) in &[(9, 7, 5, 1, 1), (9, 8, 3, 3, 2), (40, 40, 4, 3, 1)] {
        let s = Nhwc::new(2, h, w, cin);
        let g = conv::ConvGeom::new(s, k, stride, c_out);
        let x = random(&mut rng, s.len());
        let wt = random(&mut rng, g.weight_len());
        let wk = &forward_weight(&g, &wt);
        let mut col = vec![0f32; g.col_len()];
        let (mut plain, mut fused) = (vec![0f32; g.output().len()], vec![0f32; g.output().len()]);
        let wk = conv::Weight::Plain(wk);
        conv::forward(&g, &x, wk, &mut plain, &mut col, None, None);
        folded.apply(&mut plain);
        conv::forward(&g, &x, wk, &mut fused, &mut col, Some(&folded), None);
        assert!(
            max_rel(&fused, &f64s(&plain)) < 1e-6,
            "conv {:?}",
            (h, w, k)
        );
    }
    let s = Nhwc::new(2, 9, 9, c_out);
    let g = depthwise::DwGeom::new(s, 3, 2);
    let x = random(&mut rng, s.len());
    let wp = random(&mut rng, g.weight_len());
    let (mut plain, mut fused) = (vec![0f32; g.output().len()], vec![0f32; g.output().len()]);
    depthwise::forward(&g, &x, &wp, &mut plain, None);
    folded.apply(&mut plain);
    depthwise::forward(&g, &x, &wp, &mut fused, Some(&folded));
    assert_eq!(plain, fused);
}

/// A residual given to the convolution (added in registers by the pointwise kernels, in a pass
/// of its own elsewhere) equals adding it after: bit for bit, 1×1 and k×k, prepared and plain
/// weights, with the folded batch norm + SiLU, partial tiles and panels.
#[test]
fn residual_in_the_convolution_equals_a_separate_add() {
    let mut rng = Rng::new(12);
    for &(h, w, cin, cout, k, stride) in &[
        (7, 5, 24, 20, 1, 1),
        (9, 9, 40, 33, 1, 1),
        (8, 7, 16, 24, 3, 1),
        (9, 11, 40, 40, 3, 1),
        (9, 8, 5, 7, 3, 2),
    ] {
        let (_, g, x, wt) = random_conv(&mut rng, (h, w, cin, cout, k, stride));
        let skip = random(&mut rng, g.output().len());
        let folded = silu_fold(cout);
        let prepared = conv::prepare(&g, &wt);
        let plain = forward_weight(&g, &wt);
        for weight in [
            conv::Weight::Prepared(&prepared),
            conv::Weight::Plain(&plain),
        ] {
            let mut col = vec![0f32; g.col_len()];
            let mut want = vec![f32::NAN; g.output().len()];
            conv::forward(&g, &x, weight, &mut want, &mut col, Some(&folded), None);
            for (o, v) in want.iter_mut().zip(&skip) {
                *o += v;
            }
            let mut got = vec![f32::NAN; want.len()];
            conv::forward(
                &g,
                &x,
                weight,
                &mut got,
                &mut col,
                Some(&folded),
                Some(&skip),
            );
            let prepared = matches!(weight, conv::Weight::Prepared(_));
            assert_eq!(got, want, "{:?}", (h, w, cin, cout, k, stride, prepared));
        }
    }
}

/// The serial product adding into its output (Winograd's weight gradient sums tiles so): `y +=
/// x · w` against f64, over several panel groups with a short last panel and a short last tile.
#[test]
fn pointwise_serial_product_adds_into_its_output() {
    if !pointwise::available() {
        eprintln!("skipped: no AVX2+FMA on this CPU");
        return;
    }
    let mut rng = Rng::new(12);
    let (m, k, n) = (13, 8, 597);
    let x = random(&mut rng, m * k);
    let w = random(&mut rng, k * n);
    let before = random(&mut rng, m * n);
    let expected: Vec<f64> = (0..m * n)
        .map(|i| {
            let (r, o) = (i / n, i % n);
            before[i] as f64
                + (0..k)
                    .map(|p| x[r * k + p] as f64 * w[p * n + o] as f64)
                    .sum::<f64>()
        })
        .collect();
    let mut y = before.clone();
    pointwise::product_serial(
        &x,
        m,
        k,
        n,
        &pointwise::pack_rows(k, n, &w),
        &mut y,
        pointwise::Then::Add,
    );
    assert!(max_rel(&y, &expected) < 1e-5);
    pointwise::product_serial(
        &x,
        m,
        k,
        n,
        &pointwise::pack_rows(k, n, &w),
        &mut y,
        pointwise::Then::Store,
    );
    let plain: Vec<f64> = expected
        .iter()
        .zip(&before)
        .map(|(e, b)| e - *b as f64)
        .collect();
    assert!(max_rel(&y, &plain) < 1e-4);
}

/// The packed 1×1 kernel against an f64 product: tiles short of 6 rows, panels short of 16
/// columns, panels in groups, products split over threads, with and without the folded batch
/// norm + SiLU.
#[test]
fn pointwise_kernel_matches_the_product_and_its_epilogue() {
    if !pointwise::available() {
        eprintln!("skipped: no AVX2+FMA on this CPU");
        return;
    }
    let mut rng = Rng::new(11);
    for &(m, k, n) in &[
        (0, 4, 8),
        (3, 0, 8),
        (1, 3, 5),
        (7, 16, 24),
        (13, 40, 33),
        (50, 70, 16),
        (600, 100, 48),
        // Split over the threads in tasks that end inside a row block and go on in the next
        // (7 row blocks × 16 panels), and few rows of a large weight in one block, split by
        // panels, in tiles of 7 rows.
        (100, 1536, 256),
        (49, 1536, 256),
        (30, 40, 2000),
        // Panels swept in groups (16 at this depth): two whole groups, then six panels, the
        // last one 5 columns wide.
        (20, 8, 597),
    ] {
        let x = random(&mut rng, m * k);
        let torch = random(&mut rng, n * k);
        let folded = norm::Folded {
            scale: (0..n).map(|i| 0.5 + i as f32 * 0.01).collect(),
            shift: (0..n).map(|i| i as f32 * 0.02 - 0.3).collect(),
            act: Act::Silu,
        };
        let (mut plain, mut fused) = (vec![0f64; m * n], vec![0f64; m * n]);
        for i in 0..m {
            for o in 0..n {
                let v: f64 = (0..k)
                    .map(|p| x[i * k + p] as f64 * torch[o * k + p] as f64)
                    .sum();
                plain[i * n + o] = v;
                let z = v * folded.scale[o] as f64 + folded.shift[o] as f64;
                fused[i * n + o] = z / (1.0 + (-z).exp());
            }
        }
        let w = pointwise::pack(k, n, &torch);
        let mut y = vec![f32::NAN; m * n];
        pointwise::forward(&x, m, k, n, &w, &mut y, None, None);
        assert!(max_rel(&y, &plain) < 1e-5, "product {:?}", (m, k, n));
        pointwise::forward(&x, m, k, n, &w, &mut y, Some(&folded), None);
        assert!(max_rel(&y, &fused) < 1e-5, "with epilogue {:?}", (m, k, n));
        if pointwise::bf16_available() {
            // bf16 products: exact products of the rounded operands, summed in f32.
            let round = |v: &[f32]| -> Vec<f64> {
                v.iter()
                    .map(|&a| f32::from_bits((pointwise::to_bf16(a) as u32) << 16) as f64)
                    .collect()
            };
            let (xr, tr) = (round(&x), round(&torch));
            let rounded: Vec<f64> = (0..m * n)
                .map(|i| (0..k).map(|p| xr[i / n * k + p] * tr[i % n * k + p]).sum())
                .collect();
            let w = pointwise::pack_bf16(k, n, &torch);
            let w = pointwise::Panels::Bf16(&w);
            y.fill(f32::NAN);
            pointwise::forward_panels(&x, m, k, n, w, &mut y, None, None);
            assert!(max_rel(&y, &rounded) < 1e-5, "bf16 product {:?}", (m, k, n));
            assert!(
                max_rel(&y, &plain) < 2e-2,
                "bf16 against f32 {:?}",
                (m, k, n)
            );
        }
    }
}

/// bf16 rounding: to nearest, ties to even, NaN kept.
#[test]
fn bf16_rounds_to_nearest_even() {
    let bf = |x: f32| pointwise::to_bf16(x);
    assert_eq!(bf(1.0), 0x3f80);
    // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: to the even one, 1.
    assert_eq!(bf(1.0 + 1.0 / 256.0), 0x3f80);
    // 1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ and 1 + 2⁻⁶: up, to the even one.
    assert_eq!(bf(1.0 + 3.0 / 256.0), 0x3f82);
    assert_eq!(bf(1.0 + 1.0 / 256.0 + 1.0 / 65536.0), 0x3f81);
    assert_eq!(bf(-2.0), 0xc000);
    assert!(f32::from_bits((bf(f32::NAN) as u32) << 16).is_nan());
    assert_eq!(bf(f32::INFINITY), 0x7f80);
}
