//! Matrix products through the `gemm` crate (pure Rust, runtime-selected AVX2/AVX-512 kernels).

use gemm::Parallelism;

/// How a matrix operand is stored: `Normal` is row-major `[rows, cols]`; `Transposed` means the
/// slice holds the row-major transpose (`[cols, rows]`), read with swapped strides, no copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Normal,
    Transposed,
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
    // (row stride, column stride) of each operand.
    let (a_rs, a_cs) = match a_layout {
        Layout::Normal => (k as isize, 1),
        Layout::Transposed => (1, m as isize),
    };
    let (b_rs, b_cs) = match b_layout {
        Layout::Normal => (n as isize, 1),
        Layout::Transposed => (1, k as isize),
    };
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 && m * n * k >= PARALLEL_MIN_MACS {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
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
