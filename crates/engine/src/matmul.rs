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
    let parallel = threads > 1 && m * n * k >= PARALLEL_MIN_MACS;
    if parallel && m <= FEW_ROWS && n >= 64 * threads {
        return split_columns(c, m, n, k, a, a_strides, b, b_strides, accumulate, threads);
    }
    let parallelism = if parallel {
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

/// Products with at most this many rows split their output's columns across threads.
const FEW_ROWS: usize = 256;

/// A product with few rows and many columns (1×1 convolutions on 7×7 and 14×14 maps at batch
/// 1): `gemm` splits such outputs poorly (49 × 256 × 1536 ran 1.1× faster on 2 threads than on
/// 1), so each thread computes a block of whole columns on its own.
#[allow(clippy::too_many_arguments)]
fn split_columns(
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    (a_rs, a_cs): (isize, isize),
    b: &[f32],
    (b_rs, b_cs): (isize, isize),
    accumulate: bool,
    threads: usize,
) {
    use rayon::prelude::*;
    assert_in_bounds(c, m, n, k, a, (a_rs, a_cs), b, (b_rs, b_cs));
    // Blocks of a multiple of 16 columns (the kernels' width), one per thread.
    let per = n.div_ceil(threads).div_ceil(16) * 16;
    let c_addr = c.as_mut_ptr() as usize;
    (0..n.div_ceil(per)).into_par_iter().for_each(|j| {
        let (j0, j1) = (j * per, ((j + 1) * per).min(n));
        // SAFETY: block j reads columns j0..j1 of b and writes columns j0..j1 of c (row stride
        // n): inside the slices by the asserts above, and disjoint from every other block's
        // columns, so no two threads write the same element; `c` is borrowed mutably for the
        // whole call, so nothing else reads or writes it meanwhile, and it aliases no input.
        unsafe {
            gemm_at(
                (c_addr as *mut f32).add(j0),
                n,
                (m, j1 - j0, k),
                a.as_ptr(),
                (a_rs, a_cs),
                b.as_ptr().offset(j0 as isize * b_cs),
                (b_rs, b_cs),
                accumulate,
                Parallelism::None,
            )
        }
    });
}

/// `c[m×n] = a[m×k] · b[k×n]` on the calling thread alone (for callers that already split
/// their work over the pool).
pub fn matmul_serial(
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    b_layout: Layout,
) {
    raw(
        c,
        m,
        n,
        k,
        a,
        Layout::Normal.strides(m, k),
        b,
        b_layout.strides(k, n),
        false,
        Parallelism::None,
    );
}

/// Outputs up to this size stay in the cores' caches between the product and its epilogue.
const SMALL_OUTPUT_BYTES: usize = 1 << 20;

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
    let small = m * n * std::mem::size_of::<f32>() <= SMALL_OUTPUT_BYTES;
    if small || m.div_ceil(rows) < 2 * threads {
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

/// Partials of [`split_k`], kept between calls: a weight gradient per layer and step would
/// otherwise allocate (and page-fault in) fresh zeroed memory each time.
static SPLIT_K_PARTIALS: std::sync::Mutex<Vec<f32>> = std::sync::Mutex::new(Vec::new());

/// `aᵀ·b` with a long reduction and a small output (weight gradients: Σ over every pixel):
/// the reduction is split across threads. The first slice goes straight into `c`, the others
/// into partials (overwritten, so never zeroed) that are then added to it. `gemm` itself
/// splits only the output, which leaves one thread working on such shapes.
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
    let len = m * n;
    // Rows k0..k1 of both operands into `out`: aᵀ is stored [k, m] and b [k, n].
    let slice = |t: usize, out: &mut [f32], accumulate: bool| {
        let (k0, k1) = (t * per, ((t + 1) * per).min(k));
        if k1 <= k0 {
            if !accumulate {
                out.fill(0.0);
            }
            return;
        }
        let kp = k1 - k0;
        raw(
            out,
            m,
            n,
            kp,
            &a[k0 * m..k1 * m],
            Layout::Transposed.strides(m, kp),
            &b[k0 * n..k1 * n],
            Layout::Normal.strides(kp, n),
            accumulate,
            Parallelism::None,
        );
    };
    // Another split_k running at once (never in the network's passes) gets its own buffer.
    let mut shared = SPLIT_K_PARTIALS.try_lock();
    let mut own = Vec::new();
    let partials: &mut Vec<f32> = match shared.as_deref_mut() {
        Ok(v) => v,
        Err(_) => &mut own,
    };
    if partials.len() < (threads - 1) * len {
        partials.resize((threads - 1) * len, 0.0);
    }
    let out = &mut c[..len];
    rayon::join(
        || slice(0, out, accumulate),
        || {
            partials[..(threads - 1) * len]
                .par_chunks_mut(len)
                .enumerate()
                .for_each(|(t, part)| slice(t + 1, part, false));
        },
    );
    let partials = &partials[..(threads - 1) * len];
    const CHUNK: usize = 1 << 14;
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, o)| {
        for part in partials.chunks_exact(len) {
            let p = &part[i * CHUNK..i * CHUNK + o.len()];
            for (o, p) in o.iter_mut().zip(p) {
                *o += p;
            }
        }
    });
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
    assert_in_bounds(c, m, n, k, a, (a_rs, a_cs), b, (b_rs, b_cs));
    // SAFETY: the asserts above guarantee that every element addressed by (m, n, k) and the
    // strides lies inside the three slices; `c` is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm_at(
            c.as_mut_ptr(),
            n,
            (m, n, k),
            a.as_ptr(),
            (a_rs, a_cs),
            b.as_ptr(),
            (b_rs, b_cs),
            accumulate,
            parallelism,
        )
    }
}

/// Panics unless every element that `m × n × k` and the strides address lies inside the
/// three slices (strides are non-negative here).
#[allow(clippy::too_many_arguments)]
fn assert_in_bounds(
    c: &[f32],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    (a_rs, a_cs): (isize, isize),
    b: &[f32],
    (b_rs, b_cs): (isize, isize),
) {
    let last = |rows: usize, cols: usize, rs: isize, cs: isize| {
        (rows - 1) as isize * rs + (cols - 1) as isize * cs
    };
    assert!(last(m, k, a_rs, a_cs) < a.len() as isize && last(k, n, b_rs, b_cs) < b.len() as isize);
    assert!(c.len() >= m * n);
}

/// `gemm`'s call for a row-major output at `c` with row stride `c_rs`: c = a·b (+ c).
///
/// # Safety
/// Every element addressed by (m, n, k) and the strides must be valid: `c`'s for writes that no
/// other thread makes, `a`'s and `b`'s for reads.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_at(
    c: *mut f32,
    c_rs: usize,
    (m, n, k): (usize, usize, usize),
    a: *const f32,
    (a_rs, a_cs): (isize, isize),
    b: *const f32,
    (b_rs, b_cs): (isize, isize),
    accumulate: bool,
    parallelism: Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        c_rs as isize,
        accumulate,
        a,
        a_cs,
        a_rs,
        b,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The column-split path (few rows, many columns) against an f64 product, for both layouts
    /// of b, overwriting and accumulating, with a last block narrower than the others.
    #[test]
    fn column_split_equals_the_plain_product() {
        let (m, n, k) = (49, 1000, 300);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
            .collect();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("a pool");
        for layout in [Layout::Normal, Layout::Transposed] {
            let bt = |l: usize, j: usize| match layout {
                Layout::Normal => b[l * n + j],
                Layout::Transposed => b[j * k + l],
            };
            pool.install(|| {
                for accumulate in [false, true] {
                    let mut c = vec![1.0f32; m * n];
                    matmul(&mut c, m, n, k, &a, Layout::Normal, &b, layout, accumulate);
                    for (e, got) in c.iter().enumerate() {
                        let (i, j) = (e / n, e % n);
                        let want: f64 = (0..k)
                            .map(|l| a[i * k + l] as f64 * bt(l, j) as f64)
                            .sum::<f64>()
                            + if accumulate { 1.0 } else { 0.0 };
                        assert!(
                            (*got as f64 - want).abs() < 1e-3,
                            "{layout:?} {accumulate} ({i}, {j}): {got} vs {want}"
                        );
                    }
                }
            });
        }
    }

    /// The split-reduction path (weight gradients) against a plain f64 sum: overwrite and
    /// accumulate, slices of unequal length, and called twice so the reused partials hold
    /// stale values from the first call.
    #[test]
    fn split_reduction_equals_the_plain_product() {
        let (m, n, k) = (5, 7, 3001);
        let a_t: Vec<f32> = (0..k * m)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
            .collect();
        let want: Vec<f64> = (0..m * n)
            .map(|e| {
                let (i, j) = (e / n, e % n);
                (0..k)
                    .map(|l| a_t[l * m + i] as f64 * b[l * n + j] as f64)
                    .sum()
            })
            .collect();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("a pool");
        pool.install(|| {
            for accumulate in [false, true, false] {
                let mut c = vec![1.0f32; m * n];
                matmul(
                    &mut c,
                    m,
                    n,
                    k,
                    &a_t,
                    Layout::Transposed,
                    &b,
                    Layout::Normal,
                    accumulate,
                );
                for (e, (got, w)) in c.iter().zip(&want).enumerate() {
                    let w = w + if accumulate { 1.0 } else { 0.0 };
                    assert!(
                        (*got as f64 - w).abs() < 1e-3,
                        "{e}: {got} vs {w} ({accumulate})"
                    );
                }
            }
        });
    }
}
