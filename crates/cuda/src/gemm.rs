//! Row-major matrix products on cuBLAS, which is column-major.
//!
//! A row-major `[r, c]` matrix is the column-major `[c, r]` matrix with leading dimension `c`,
//! its transpose. So row-major `C = op(A)·op(B)` is column-major `Cᵀ = op(B)ᵀ·op(A)ᵀ`: cuBLAS
//! gets B first, A second, and the output's dimensions swapped. [`ColMajor::of`] does that
//! bookkeeping once; a CPU model of BLAS's column-major product tests it.

use cudarc::cublas::sys::cublasOperation_t as Op;

/// A row-major product `C[m, n] = α·op(A)·op(B) + β·C` where `op(A)` is `[m, k]` and `op(B)`
/// is `[k, n]`; `a_t` means A is stored as `[k, m]` (so op(A) = Aᵀ), `b_t` that B is stored as
/// `[n, k]`. All three are dense: leading dimensions are the stored row lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowMajor {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a_t: bool,
    pub b_t: bool,
}

/// The same product as cuBLAS's column-major arguments; the first operand is B, the second A.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColMajor {
    pub transa: bool,
    pub transb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

impl ColMajor {
    pub fn of(p: RowMajor) -> ColMajor {
        ColMajor {
            transa: p.b_t,
            transb: p.a_t,
            m: p.n,
            n: p.m,
            k: p.k,
            lda: if p.b_t { p.k } else { p.n },
            ldb: if p.a_t { p.m } else { p.k },
            ldc: p.n,
        }
    }
}

fn op(t: bool) -> Op {
    if t {
        Op::CUBLAS_OP_T
    } else {
        Op::CUBLAS_OP_N
    }
}

/// Runs the row-major product `c = α·op(a)·op(b) + β·c` on the device (addresses of f32 data).
pub fn sgemm(
    gpu: &crate::device::Gpu,
    p: RowMajor,
    a: u64,
    b: u64,
    c: u64,
    alpha: f32,
    beta: f32,
) -> crate::device::Result<()> {
    let g = ColMajor::of(p);
    let i = |v: usize| v as std::ffi::c_int;
    // SAFETY: the caller's addresses hold op(A) [m, k], op(B) [k, n] and C [m, n] as dense
    // row-major f32 matrices; alpha and beta are host scalars (cuBLAS's default pointer mode).
    unsafe {
        cudarc::cublas::result::sgemm(
            gpu.blas,
            op(g.transa),
            op(g.transb),
            i(g.m),
            i(g.n),
            i(g.k),
            &alpha,
            b as *const f32,
            i(g.lda),
            a as *const f32,
            i(g.ldb),
            &beta,
            c as *mut f32,
            i(g.ldc),
        )
    }
    .map_err(|e| format!("cublasSgemm ({p:?}): {e:?}"))
}

/// How a product's operands are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    F32,
    Bf16,
    F16,
}

impl Elem {
    fn cuda(self) -> cudarc::cublas::sys::cudaDataType {
        match self {
            Elem::F32 => cudarc::cublas::sys::cudaDataType::CUDA_R_32F,
            Elem::Bf16 => cudarc::cublas::sys::cudaDataType::CUDA_R_16BF,
            Elem::F16 => cudarc::cublas::sys::cudaDataType::CUDA_R_16F,
        }
    }
}

/// The row-major product `c = α·op(a)·op(b) + β·c` with `a` and `b` stored as `ab`, `c` as
/// `c_type`, accumulated in f32 (cublasGemmEx; all f32 is [`sgemm`]): mixed precision's 1×1
/// convolutions, 16-bit × 16-bit into 16-bit activations or into f32 weight gradients.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    gpu: &crate::device::Gpu,
    p: RowMajor,
    a: u64,
    b: u64,
    c: u64,
    alpha: f32,
    beta: f32,
    ab: Elem,
    c_type: Elem,
) -> crate::device::Result<()> {
    if (ab, c_type) == (Elem::F32, Elem::F32) {
        return sgemm(gpu, p, a, b, c, alpha, beta);
    }
    use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t};
    let g = ColMajor::of(p);
    let i = |v: usize| v as std::ffi::c_int;
    // SAFETY: as in `sgemm`, with the elements of the stated types; alpha and beta are f32 host
    // scalars, as the f32 compute type wants.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            gpu.blas,
            op(g.transa),
            op(g.transb),
            i(g.m),
            i(g.n),
            i(g.k),
            &alpha as *const f32 as *const _,
            b as *const _,
            ab.cuda(),
            i(g.lda),
            a as *const _,
            ab.cuda(),
            i(g.ldb),
            &beta as *const f32 as *const _,
            c as *mut _,
            c_type.cuda(),
            i(g.ldc),
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| format!("cublasGemmEx ({p:?}, {ab:?} → {c_type:?}): {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BLAS's column-major sgemm on the host: C = α·op(A)·op(B) + β·C.
    #[allow(clippy::too_many_arguments)]
    fn blas_sgemm(g: ColMajor, alpha: f32, a: &[f32], b: &[f32], beta: f32, c: &mut [f32]) {
        let at = |i: usize, l: usize| {
            if g.transa {
                a[l + i * g.lda]
            } else {
                a[i + l * g.lda]
            }
        };
        let bt = |l: usize, j: usize| {
            if g.transb {
                b[j + l * g.ldb]
            } else {
                b[l + j * g.ldb]
            }
        };
        for j in 0..g.n {
            for i in 0..g.m {
                let s: f32 = (0..g.k).map(|l| at(i, l) * bt(l, j)).sum();
                c[i + j * g.ldc] = alpha * s + beta * c[i + j * g.ldc];
            }
        }
    }

    #[test]
    fn the_column_major_call_computes_the_row_major_product() {
        let (m, n, k) = (5, 3, 4);
        // op(A)[i, l] = i·10 + l, op(B)[l, j] = l − 2j, C[i, j] starts at i + j.
        let opa = |i: usize, l: usize| (i * 10 + l) as f32;
        let opb = |l: usize, j: usize| l as f32 - 2.0 * j as f32;
        for (a_t, b_t) in [(false, false), (false, true), (true, false), (true, true)] {
            let a: Vec<f32> = if a_t {
                (0..k * m).map(|e| opa(e % m, e / m)).collect()
            } else {
                (0..m * k).map(|e| opa(e / k, e % k)).collect()
            };
            let b: Vec<f32> = if b_t {
                (0..n * k).map(|e| opb(e % k, e / k)).collect()
            } else {
                (0..k * n).map(|e| opb(e / n, e % n)).collect()
            };
            let mut c: Vec<f32> = (0..m * n).map(|e| (e / n + e % n) as f32).collect();
            let g = ColMajor::of(RowMajor { m, n, k, a_t, b_t });
            // The device call passes B first and A second.
            blas_sgemm(g, 2.0, &b, &a, 1.0, &mut c);
            for i in 0..m {
                for j in 0..n {
                    let want =
                        2.0 * (0..k).map(|l| opa(i, l) * opb(l, j)).sum::<f32>() + (i + j) as f32;
                    assert_eq!(c[i * n + j], want, "a_t {a_t} b_t {b_t} at ({i}, {j})");
                }
            }
        }
    }
}
