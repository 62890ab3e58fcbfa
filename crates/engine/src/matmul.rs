//! Matrix products through the `gemm` crate (pure Rust, runtime-selected AVX2/AVX-512 kernels).

use gemm::Parallelism;

/// How a matrix operand is stored: `Normal` is row-major `[rows, cols]`; `Transposed` means the
/// slice holds the row-major transpose (`[cols, rows]`), read with swapped strides, no copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Normal,
    Transposed,
}

impl Layout {
    /// (row stride, column stride) of a `rows × cols` operand stored this way.
    fn strides(self, rows: usize, cols: usize) -> (isize, isize) {
        match self {
            Layout::Normal => (cols as isize, 1),
            Layout::Transposed => (1, rows as isize),
        }
    }
}

/// Below this many multiply-adds a product runs on the calling thread: splitting costs more.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// `c[m×n] = (accumulate ? c : 0) + a[m×k] · b[k×n]`, all row-major unless marked transposed.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_layout: Layout,
    b: &[f32],
    b_layout: Layout,
    accumulate: bool,
) {
    assert!(
        c.len() >= m * n,
        "matmul: output holds {} < {m}×{n}",
        c.len()
    );
    assert!(a.len() >= m * k, "matmul: lhs holds {} < {m}×{k}", a.len());
    assert!(b.len() >= k * n, "matmul: rhs holds {} < {k}×{n}", b.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    let (a_strides, b_strides) = (a_layout.strides(m, k), b_layout.strides(k, n));
    let threads = rayon::current_num_threads();
    let long_reduction = k >= 2048 && k >= 4 * m.max(n);
    if threads > 1 && a_layout == Layout::Transposed && b_layout == Layout::Normal && long_reduction
    {
        return split_k(c, m, n, k, a, b, accumulate, threads);
    }
    let parallelism = if threads > 1 && m * n * k >= PARALLEL_MIN_MACS {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    raw(
        c,
        m,
        n,
        k,
        a,
        a_strides,
        b,
        b_strides,
        accumulate,
        parallelism,
    );
}

/// `c = a·b` (`a` row-major) in blocks of rows spread over the thread pool, each block handed
/// to `epilogue` right after it is computed, while it is still in cache.
#[allow(clippy::too_many_arguments)]
pub fn matmul_then(
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    b_layout: Layout,
    epilogue: &(dyn Fn(&mut [f32]) + Sync),
) {
    use rayon::prelude::*;
    assert!(
        c.len() >= m * n && a.len() >= m * k && b.len() >= k * n,
        "matmul_then: operands too small"
    );
    // Output blocks of about 128 KiB (at least 96 rows, so repacking `b` per block stays cheap).
    let rows = (32768 / n.max(1)).clamp(96, 512);
    let threads = rayon::current_num_threads();
    if m.div_ceil(rows) < 2 * threads {
        // Too few row blocks to keep every thread busy (small images, batch 1): one product
        // split by `gemm` itself, then the epilogue over row blocks (the output is small).
        matmul(c, m, n, k, a, Layout::Normal, b, b_layout, false);
        let per = m.div_ceil(threads).max(1) * n;
        c[..m * n].par_chunks_mut(per).for_each(epilogue);
        return;
    }
    let b_strides = b_layout.strides(k, n);
    c[..m * n]
        .par_chunks_mut(rows * n)
        .zip(a[..m * k].par_chunks(rows * k))
        .for_each(|(cb, ab)| {
            let r = cb.len() / n;
            raw(
                cb,
                r,
                n,
                k,
                ab,
                Layout::Normal.strides(r, k),
                b,
                b_strides,
                false,
                Parallelism::None,
            );
            epilogue(cb);
        });
}

/// `aᵀ·b` with a long reduction and a small output (weight gradients: Σ over every pixel):
/// the reduction is split across threads, each into its own partial, then summed. `gemm`
/// itself splits only the output, which leaves one thread working on such shapes.
#[allow(clippy::too_many_arguments)]
fn split_k(
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    accumulate: bool,
    threads: usize,
) {
    use rayon::prelude::*;
    let per = k.div_ceil(threads);
    let partials: Vec<Vec<f32>> = (0..threads)
        .into_par_iter()
        .map(|t| {
            let (k0, k1) = (t * per, ((t + 1) * per).min(k));
            let mut part = vec![0f32; m * n];
            if k1 > k0 {
                // Rows k0..k1 of both operands: aᵀ is stored [k, m] and b [k, n].
                let (a_part, b_part) = (&a[k0 * m..k1 * m], &b[k0 * n..k1 * n]);
                let kp = k1 - k0;
                let (a_strides, b_strides) = (
                    Layout::Transposed.strides(m, kp),
                    Layout::Normal.strides(kp, n),
                );
                raw(
                    &mut part,
                    m,
                    n,
                    kp,
                    a_part,
                    a_strides,
                    b_part,
                    b_strides,
                    false,
                    Parallelism::None,
                );
            }
            part
        })
        .collect();
    let out = &mut c[..m * n];
    if !accumulate {
        out.fill(0.0);
    }
    for part in &partials {
        for (o, p) in out.iter_mut().zip(part) {
            *o += p;
        }
    }
}

/// The `gemm` call with explicit (row, column) strides for each operand.
#[allow(clippy::too_many_arguments)]
fn raw(
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    (a_rs, a_cs): (isize, isize),
    b: &[f32],
    (b_rs, b_cs): (isize, isize),
    accumulate: bool,
    parallelism: Parallelism,
) {
    // Every element addressed must lie inside the slices (strides are non-negative here).
    let last = |rows: usize, cols: usize, rs: isize, cs: isize| {
        (rows - 1) as isize * rs + (cols - 1) as isize * cs
    };
    assert!(last(m, k, a_rs, a_cs) < a.len() as isize && last(k, n, b_rs, b_cs) < b.len() as isize);
    assert!(c.len() >= m * n);
    // SAFETY: the asserts above guarantee that every element addressed by (m, n, k) and the
    // strides lies inside the three slices; `c` is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}
