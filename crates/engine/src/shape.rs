//! Tensor shapes and TensorFlow's "SAME" padding rule.

/// The shape of an NHWC activation tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nhwc {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl Nhwc {
    pub fn new(n: usize, h: usize, w: usize, c: usize) -> Self {
        Nhwc { n, h, w, c }
    }

    pub fn len(&self) -> usize {
        self.n * self.h * self.w * self.c
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pixels over the whole batch: the row count when the tensor is seen as a matrix `[N·H·W, C]`.
    pub fn rows(&self) -> usize {
        self.n * self.h * self.w
    }

    pub fn with_c(&self, c: usize) -> Self {
        Nhwc { c, ..*self }
    }
}

/// Output size and padding before the first element for TF "SAME" padding along one axis.
///
/// The output is `ceil(input / stride)`; the total padding is split with the smaller half first, so
/// stride 2 on an even size pads 0 before and 1 after (unlike PyTorch's symmetric padding).
pub fn same_padding(input: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = input.div_ceil(stride);
    let total = ((out - 1) * stride + kernel).saturating_sub(input);
    (out, total / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_padding_matches_tensorflow() {
        // TF: out = ceil(in/s); pad = max((out-1)*s + k - in, 0); before = pad // 2.
        assert_eq!(same_padding(224, 3, 2), (112, 0));
        assert_eq!(same_padding(15, 3, 2), (8, 1));
        assert_eq!(same_padding(30, 5, 2), (15, 1));
        assert_eq!(same_padding(7, 3, 1), (7, 1));
        assert_eq!(same_padding(7, 5, 1), (7, 2));
        assert_eq!(same_padding(8, 1, 1), (8, 0));
        assert_eq!(same_padding(1, 3, 2), (1, 1));
    }
}
