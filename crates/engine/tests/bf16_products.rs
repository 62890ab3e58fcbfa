//! The general matrix product in bf16 mode (`matmul::set_bf16`, training's mixed precision)
//! against an f64 product of the operands rounded to bf16, on every path of the product, and
//! the direct convolution kernel on bf16 weights (inference's `--precision bf16`). In a binary
//! of its own: the mode is the whole process's.

use effnet_engine::matmul::{self, Layout};
use effnet_engine::pointwise;
use effnet_engine::rng::Rng;

fn round(v: f32) -> f64 {
    f32::from_bits((pointwise::to_bf16(v) as u32) << 16) as f64
}

#[test]
fn bf16_products_equal_the_rounded_operands_product() {
    if matmul::set_bf16(true).is_err() {
        eprintln!("skipped: no AVX512_BF16 on this CPU");
        return;
    }
    let mut rng = Rng::new(5);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    // (m, n, k): serial with several reduction blocks, rows split, columns split, the
    // reduction split, swapped, odd sizes; each in every layout of both operands.
    for &(m, n, k) in &[
        (5, 7, 3),
        (13, 33, 4100),
        (700, 40, 300),
        (40, 900, 200),
        (30, 20, 9000),
        (300, 24, 2000),
    ] {
        for a_layout in [Layout::Normal, Layout::Transposed] {
            for b_layout in [Layout::Normal, Layout::Transposed] {
                let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
                let b: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
                let at = |i: usize, p: usize| match a_layout {
                    Layout::Normal => a[i * k + p],
                    Layout::Transposed => a[p * m + i],
                };
                let bt = |p: usize, j: usize| match b_layout {
                    Layout::Normal => b[p * n + j],
                    Layout::Transposed => b[j * k + p],
                };
                let (mut rounded, mut exact) = (vec![0f64; m * n], vec![0f64; m * n]);
                for i in 0..m {
                    for j in 0..n {
                        for p in 0..k {
                            rounded[i * n + j] += round(at(i, p)) * round(bt(p, j));
                            exact[i * n + j] += at(i, p) as f64 * bt(p, j) as f64;
                        }
                    }
                }
                let mut c = vec![1f32; m * n];
                pool.install(|| matmul::matmul(&mut c, m, n, k, &a, a_layout, &b, b_layout, true));
                let scale = exact.iter().fold(1e-9f64, |s, v| s.max(v.abs()));
                let worst = |want: &[f64]| {
                    c.iter()
                        .zip(want)
                        .map(|(&c, w)| (c as f64 - 1.0 - w).abs())
                        .fold(0.0, f64::max)
                        / scale
                };
                let case = (m, n, k, a_layout, b_layout);
                assert!(worst(&rounded) < 1e-5, "{case:?}: {}", worst(&rounded));
                // Rounding shows against the f32 product, within bf16's precision.
                let off = worst(&exact);
                assert!(off > 1e-6 && off < 2e-2, "{case:?}: {off}");
            }
        }
    }
    // Training's k×k convolutions in this mode: plain weights take the direct kernel's bf16
    // panels where it has them, the same values as inference's prepared ones.
    for &(h, cin, cout, stride) in &[(9, 6, 5, 1), (12, 24, 40, 2)] {
        use effnet_engine::conv::{self, ConvGeom, Weight};
        let g = ConvGeom::new(effnet_engine::Nhwc::new(2, h, h, cin), 3, stride, cout);
        let x: Vec<f32> = (0..g.input.len()).map(|_| rng.normal() as f32).collect();
        let torch: Vec<f32> = (0..g.weight_len()).map(|_| rng.normal() as f32).collect();
        let mut plain = vec![0f32; g.weight_len()];
        conv::pack_weight(&g, &torch, &mut plain);
        let mut col = vec![0f32; g.col_len()];
        let (mut y, mut want) = (
            vec![f32::NAN; g.output().len()],
            vec![0f32; g.output().len()],
        );
        conv::forward(&g, &x, Weight::Plain(&plain), &mut y, &mut col, None, None);
        let panels = conv::prepare_bf16(&g, &torch);
        conv::forward(
            &g,
            &x,
            Weight::Bf16(&panels),
            &mut want,
            &mut [],
            None,
            None,
        );
        assert_eq!(y, want, "{g:?}: plain weights in bf16 mode");
    }
    matmul::set_bf16(false).unwrap();
}

/// A k×k convolution on the direct kernel in bf16 (`conv::prepare_bf16`, inference's fused
/// blocks and stage 1): the convolution of the operands rounded to bf16, with f32 sums. Stride 1
/// and 2, odd sizes (windows reaching into the padding on every side), output channels that fill
/// no whole panel; and the same pass with its block's projection, which equals the convolution
/// followed by the projection to the bit.
#[test]
fn bf16_direct_convolutions_equal_the_rounded_operands_convolution() {
    use effnet_engine::conv::{self, ConvGeom, Weight};
    use effnet_engine::Nhwc;
    let g0 = ConvGeom::new(Nhwc::new(1, 5, 5, 2), 3, 1, 3);
    if !conv::runs_bf16(&g0) {
        eprintln!("skipped: no AVX512_BF16 on this CPU");
        return;
    }
    let mut rng = Rng::new(9);
    for &(n, h, w, cin, cout, k, stride) in &[
        (2, 9, 7, 6, 5, 3, 1),
        (1, 12, 11, 24, 40, 3, 2),
        (2, 8, 8, 16, 24, 3, 2),
        (1, 6, 9, 4, 17, 5, 1),
    ] {
        let g = ConvGeom::new(Nhwc::new(n, h, w, cin), k, stride, cout);
        assert!(conv::runs_bf16(&g), "{g:?}");
        let x: Vec<f32> = (0..g.input.len()).map(|_| rng.normal() as f32).collect();
        let torch: Vec<f32> = (0..g.weight_len()).map(|_| rng.normal() as f32).collect();
        let panels = conv::prepare_bf16(&g, &torch);
        let mut y = vec![f32::NAN; g.output().len()];
        conv::forward(&g, &x, Weight::Bf16(&panels), &mut y, &mut [], None, None);
        // The definition, on the rounded operands (torch's `[cout, cin, k, k]` weight).
        let pad = |out: usize, size: usize| ((out - 1) * stride + k).saturating_sub(size) / 2;
        let (oh, ow) = (g.out_h, g.out_w);
        let (pt, pl) = (pad(oh, h), pad(ow, w));
        let mut worst = 0f64;
        let mut scale = 1e-9f64;
        for b in 0..n {
            for (i, j, co) in
                (0..oh).flat_map(|i| (0..ow).flat_map(move |j| (0..cout).map(move |c| (i, j, c))))
            {
                let mut want = 0f64;
                for (kh, kw, ci) in
                    (0..k).flat_map(|a| (0..k).flat_map(move |b| (0..cin).map(move |c| (a, b, c))))
                {
                    let (ih, iw) = (
                        (i * stride + kh) as isize - pt as isize,
                        (j * stride + kw) as isize - pl as isize,
                    );
                    if ih < 0 || iw < 0 || ih >= h as isize || iw >= w as isize {
                        continue;
                    }
                    let xv = x[((b * h + ih as usize) * w + iw as usize) * cin + ci];
                    let wv = torch[((co * cin + ci) * k + kh) * k + kw];
                    want += round(xv) * round(wv);
                }
                let got = y[((b * oh + i) * ow + j) * cout + co] as f64;
                worst = worst.max((got - want).abs());
                scale = scale.max(want.abs());
            }
        }
        assert!(worst / scale < 1e-5, "{g:?}: {}", worst / scale);
        // With a projection (f32) and a residual: the pass equals its two steps.
        let proj_cout = 7;
        let pw: Vec<f32> = (0..proj_cout * cout).map(|_| rng.normal() as f32).collect();
        let packed = pointwise::pack(cout, proj_cout, &pw);
        let rows = g.output().rows();
        let skip: Vec<f32> = (0..rows * proj_cout).map(|_| rng.normal() as f32).collect();
        let mut two_steps = vec![0f32; rows * proj_cout];
        pointwise::forward(
            &y,
            rows,
            cout,
            proj_cout,
            &packed,
            &mut two_steps,
            None,
            Some(&skip),
        );
        let p = pointwise::Projection {
            w: pointwise::Panels::F32(&packed),
            cout: proj_cout,
            epilogue: None,
            skip: Some(&skip),
        };
        if conv::projects(&g) {
            let mut one = vec![f32::NAN; rows * proj_cout];
            conv::forward_projected(&g, &x, pointwise::Panels::Bf16(&panels), None, &p, &mut one);
            assert_eq!(one, two_steps, "{g:?} with its projection");
        }
    }
}
