//! Fully connected layer with PyTorch's weight layout `[out, in]`: `y = x·Wᵀ + b`.

use crate::matmul::{matmul, Layout};

pub fn forward(
    x: &[f32],
    n: usize,
    d_in: usize,
    d_out: usize,
    w: &[f32],
    b: &[f32],
    y: &mut [f32],
) {
    matmul(
        y,
        n,
        d_out,
        d_in,
        x,
        Layout::Normal,
        w,
        Layout::Transposed,
        false,
    );
    for row in y[..n * d_out].chunks_exact_mut(d_out) {
        for (v, bias) in row.iter_mut().zip(b) {
            *v += bias;
        }
    }
}

/// `dx` is overwritten; `dw` and `db` are accumulated into.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    n: usize,
    d_in: usize,
    d_out: usize,
    w: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
) {
    matmul(
        dw,
        d_out,
        d_in,
        n,
        dy,
        Layout::Transposed,
        x,
        Layout::Normal,
        true,
    );
    for row in dy[..n * d_out].chunks_exact(d_out) {
        for (acc, g) in db.iter_mut().zip(row) {
            *acc += g;
        }
    }
    matmul(
        dx,
        n,
        d_in,
        d_out,
        dy,
        Layout::Normal,
        w,
        Layout::Normal,
        false,
    );
}
