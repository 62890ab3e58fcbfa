//! Convolutions on cuDNN: dense k×k and depthwise, NHWC f32 (or bf16 or f16 with f32 compute
//! for mixed precision), forward, backward data and backward filter, with TF "SAME" padding.
//!
//! cuDNN pads the same amount on both sides; SAME pads `total/2` before and the rest after, one
//! more after when the total is odd (stride 2 on an even size). Such layers copy the input into
//! a zero-bordered buffer first and convolve it unpadded ([`SamePad::Explicit`]); their input
//! gradient is cropped back out of the padded one.

use cudarc::cudnn::result as dnn;
use cudarc::cudnn::sys;
use effnet_engine::Nhwc;

use crate::device::{Gpu, Math, Result};

/// How a SAME convolution's padding is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamePad {
    /// Equal on both sides: cuDNN's own padding (top/bottom, left/right).
    Symmetric { h: usize, w: usize },
    /// More after than before: a padded copy of `[n, hp, wp, c]`, the image at (top, left).
    Explicit {
        top: usize,
        left: usize,
        hp: usize,
        wp: usize,
    },
}

/// Output size and padding of a SAME convolution of an `h × w` input.
pub fn same_pad(h: usize, w: usize, kernel: usize, stride: usize) -> (usize, usize, SamePad) {
    let axis = |len: usize| {
        let out = len.div_ceil(stride);
        let total = ((out - 1) * stride + kernel).saturating_sub(len);
        (out, total / 2, total - total / 2)
    };
    let ((oh, top, bottom), (ow, left, right)) = (axis(h), axis(w));
    let pad = if top == bottom && left == right {
        SamePad::Symmetric { h: top, w: left }
    } else {
        SamePad::Explicit {
            top,
            left,
            hp: h + top + bottom,
            wp: w + left + right,
        }
    };
    (oh, ow, pad)
}

/// One convolution layer's cuDNN descriptors and algorithms for one input shape.
pub struct Conv {
    pub input: Nhwc,
    pub output: Nhwc,
    pub kernel: usize,
    pub depthwise: bool,
    pub pad: SamePad,
    x: sys::cudnnTensorDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
    /// Each pass's usable algorithms in cuDNN's order of preference, with the math type each
    /// was rated for; a pass starts with the first and moves on when one fails to run.
    fwd: Candidates<sys::cudnnConvolutionFwdAlgo_t>,
    bwd_data: Candidates<sys::cudnnConvolutionBwdDataAlgo_t>,
    bwd_filter: Candidates<sys::cudnnConvolutionBwdFilterAlgo_t>,
    /// Scratch bytes any candidate needs (the largest).
    pub workspace_bytes: usize,
}

/// Usable algorithms of one pass, and which of them is in use.
struct Candidates<A> {
    list: Vec<(A, sys::cudnnMathType_t)>,
    current: std::cell::Cell<usize>,
}

impl<A: Copy + std::fmt::Debug> Candidates<A> {
    fn new(list: Vec<(A, sys::cudnnMathType_t)>) -> Self {
        Candidates {
            list,
            current: std::cell::Cell::new(0),
        }
    }

    /// Runs `call` with the algorithm in use (its math type set on `conv` first); on failure,
    /// with the next ones, keeping the first that runs. The error lists every failure.
    fn run(
        &self,
        conv: sys::cudnnConvolutionDescriptor_t,
        what: &str,
        call: impl Fn(A) -> std::result::Result<(), dnn::CudnnError>,
    ) -> Result<()> {
        let mut failures = Vec::new();
        for i in self.current.get()..self.list.len() {
            let (algo, math) = self.list[i];
            // SAFETY: `conv` is the plan's live descriptor.
            let set = unsafe { dnn::set_convolution_math_type(conv, math) };
            match set.and_then(|()| call(algo)) {
                Ok(()) => {
                    self.current.set(i);
                    return Ok(());
                }
                Err(e) => failures.push(format!("{algo:?} ({math:?}): {e:?}")),
            }
        }
        Err(format!(
            "cuDNN {what}: no algorithm ran: {}",
            failures.join("; ")
        ))
    }
}

/// What cuDNN's heuristics say of one algorithm, for any of the three passes.
trait AlgoPerf: Copy {
    type Algo: Copy + std::fmt::Debug;
    fn rated(&self) -> (sys::cudnnStatus_t, sys::cudnnMathType_t, usize, Self::Algo);
}

macro_rules! algo_perf {
    ($($perf:ty => $algo:ty),*) => {$(
        impl AlgoPerf for $perf {
            type Algo = $algo;
            fn rated(&self) -> (sys::cudnnStatus_t, sys::cudnnMathType_t, usize, $algo) {
                (self.status, self.mathType, self.memory, self.algo)
            }
        }
    )*};
}
algo_perf!(
    sys::cudnnConvolutionFwdAlgoPerf_t => sys::cudnnConvolutionFwdAlgo_t,
    sys::cudnnConvolutionBwdDataAlgoPerf_t => sys::cudnnConvolutionBwdDataAlgo_t,
    sys::cudnnConvolutionBwdFilterAlgoPerf_t => sys::cudnnConvolutionBwdFilterAlgo_t
);

/// The usable algorithms among cuDNN's ratings: ran without error, an accepted math type,
/// scratch within `max_scratch`; `scratch` grows to the largest kept.
fn usable<P: AlgoPerf>(
    rated: &[P],
    math: Math,
    max_scratch: usize,
    scratch: &mut usize,
) -> Vec<(P::Algo, sys::cudnnMathType_t)> {
    rated
        .iter()
        .map(AlgoPerf::rated)
        .filter(|&(status, m, bytes, _)| {
            status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
                && math_ok(math, m)
                && bytes <= max_scratch
        })
        .map(|(_, m, bytes, algo)| {
            *scratch = (*scratch).max(bytes);
            (algo, m)
        })
        .collect()
}

/// Math types a plan accepts: FMA only for exact f32; anything cuDNN rates otherwise (TF32
/// tensor cores for f32 data, bf16 or f16 tensor cores for 16-bit data).
fn math_ok(math: Math, m: sys::cudnnMathType_t) -> bool {
    match math {
        Math::F32 => m == sys::cudnnMathType_t::CUDNN_FMA_MATH,
        Math::Tf32 | Math::Bf16 | Math::F16 => true,
    }
}

/// The stored type of activations and packed filters: f32, or bf16 or f16 for mixed precision
/// (whose convolutions still accumulate in f32: the descriptor's compute type).
fn storage(math: Math) -> sys::cudnnDataType_t {
    match math {
        Math::Bf16 => sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        Math::F16 => sys::cudnnDataType_t::CUDNN_DATA_HALF,
        Math::F32 | Math::Tf32 => sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
    }
}

fn dnn_err(what: &'static str) -> impl FnOnce(dnn::CudnnError) -> String {
    move |e| format!("cuDNN {what}: {e:?}")
}

fn nhwc_desc(s: Nhwc, dtype: sys::cudnnDataType_t) -> Result<sys::cudnnTensorDescriptor_t> {
    let d = dnn::create_tensor_descriptor().map_err(dnn_err("tensor descriptor"))?;
    let i = |v: usize| v as std::ffi::c_int;
    // SAFETY: `d` was just created.
    unsafe {
        dnn::set_tensor4d_descriptor(
            d,
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
            dtype,
            [i(s.n), i(s.c), i(s.h), i(s.w)],
        )
    }
    .map_err(dnn_err("tensor shape"))?;
    Ok(d)
}

impl Conv {
    /// Plans the convolution of `input` (NHWC) by a `kernel × kernel` filter at `stride`:
    /// `cout` output channels, or depthwise (cout = input channels, one filter per channel).
    /// `training` also plans the backward passes.
    pub fn new(
        gpu: &Gpu,
        input: Nhwc,
        kernel: usize,
        stride: usize,
        cout: usize,
        depthwise: bool,
        training: bool,
    ) -> Result<Conv> {
        let (oh, ow, pad) = same_pad(input.h, input.w, kernel, stride);
        let output = Nhwc::new(input.n, oh, ow, cout);
        let (conv_in, (ph, pw)) = match pad {
            SamePad::Symmetric { h, w } => (input, (h, w)),
            SamePad::Explicit { hp, wp, .. } => (Nhwc::new(input.n, hp, wp, input.c), (0, 0)),
        };
        let i = |v: usize| v as std::ffi::c_int;
        let dtype = storage(gpu.math);
        let x = nhwc_desc(conv_in, dtype)?;
        let y = nhwc_desc(output, dtype)?;
        let w = dnn::create_filter_descriptor().map_err(dnn_err("filter descriptor"))?;
        let conv = dnn::create_convolution_descriptor().map_err(dnn_err("conv descriptor"))?;
        let math = match gpu.math {
            Math::F32 => sys::cudnnMathType_t::CUDNN_FMA_MATH,
            Math::Tf32 => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
            Math::Bf16 | Math::F16 => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
        };
        // A depthwise filter is [c, 1, k, k]: PyTorch's layout is already cuDNN's NHWC one.
        let per_group_in = if depthwise { 1 } else { input.c };
        // SAFETY: the descriptors were just created; the handle is the device's.
        unsafe {
            dnn::set_filter4d_descriptor(
                w,
                dtype,
                sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
                [i(cout), i(per_group_in), i(kernel), i(kernel)],
            )
            .map_err(dnn_err("filter shape"))?;
            dnn::set_convolution2d_descriptor(
                conv,
                i(ph),
                i(pw),
                i(stride),
                i(stride),
                1,
                1,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
            .map_err(dnn_err("convolution"))?;
            dnn::set_convolution_math_type(conv, math).map_err(dnn_err("math type"))?;
            if depthwise {
                dnn::set_convolution_group_count(conv, i(input.c))
                    .map_err(dnn_err("group count"))?;
            }
        }
        let mut plan = Conv {
            input,
            output,
            kernel,
            depthwise,
            pad,
            x,
            y,
            w,
            conv,
            fwd: Candidates::new(Vec::new()),
            bwd_data: Candidates::new(Vec::new()),
            bwd_filter: Candidates::new(Vec::new()),
            workspace_bytes: 0,
        };
        plan.choose_algorithms(gpu, training)?;
        Ok(plan)
    }

    /// Each pass's usable algorithms by cuDNN's heuristics, those of an accepted math type,
    /// and the scratch the hungriest needs (candidates wanting over 1 GiB are left out).
    fn choose_algorithms(&mut self, gpu: &Gpu, training: bool) -> Result<()> {
        const MAX_SCRATCH: usize = 1 << 30;
        let (h, math) = (gpu.dnn, gpu.math);
        let shape = format!(
            "{:?} k{} {}",
            self.input,
            self.kernel,
            if self.depthwise { "depthwise" } else { "dense" }
        );
        let mut count = 0;
        let mut scratch = 0;
        let none =
            |pass: &str| format!("cuDNN offers no {pass} algorithm for {shape} with {math:?} math");
        // SAFETY: handle and descriptors are live; each result array holds 8 entries, as asked.
        unsafe {
            let mut fwd = [std::mem::zeroed::<sys::cudnnConvolutionFwdAlgoPerf_t>(); 8];
            dnn::get_convolution_forward_algorithm(
                h,
                self.x,
                self.w,
                self.conv,
                self.y,
                8,
                &mut count,
                fwd.as_mut_ptr(),
            )
            .map_err(dnn_err("forward algorithm"))?;
            let list = usable(&fwd[..count as usize], math, MAX_SCRATCH, &mut scratch);
            if list.is_empty() {
                return Err(none("forward"));
            }
            self.fwd = Candidates::new(list);
            if training {
                let mut bd = [std::mem::zeroed::<sys::cudnnConvolutionBwdDataAlgoPerf_t>(); 8];
                dnn::get_convolution_backward_data_algorithm(
                    h,
                    self.w,
                    self.y,
                    self.conv,
                    self.x,
                    8,
                    &mut count,
                    bd.as_mut_ptr(),
                )
                .map_err(dnn_err("backward data algorithm"))?;
                let list = usable(&bd[..count as usize], math, MAX_SCRATCH, &mut scratch);
                if list.is_empty() {
                    return Err(none("backward-data"));
                }
                self.bwd_data = Candidates::new(list);
                let mut bf = [std::mem::zeroed::<sys::cudnnConvolutionBwdFilterAlgoPerf_t>(); 8];
                dnn::get_convolution_backward_filter_algorithm(
                    h,
                    self.x,
                    self.y,
                    self.conv,
                    self.w,
                    8,
                    &mut count,
                    bf.as_mut_ptr(),
                )
                .map_err(dnn_err("backward filter algorithm"))?;
                let list = usable(&bf[..count as usize], math, MAX_SCRATCH, &mut scratch);
                if list.is_empty() {
                    return Err(none("backward-filter"));
                }
                self.bwd_filter = Candidates::new(list);
            }
        }
        self.workspace_bytes = scratch;
        Ok(())
    }

    /// y = conv(x, w). `x` is the padded copy for [`SamePad::Explicit`]; `w` is in cuDNN's
    /// NHWC filter layout ([o, kh, kw, i]); `scratch` holds [`Conv::workspace_bytes`].
    pub fn forward(&self, gpu: &Gpu, x: u64, w: u64, y: u64, scratch: u64) -> Result<()> {
        let (alpha, beta) = (1f32, 0f32);
        self.fwd.run(self.conv, "convolution forward", |algo| {
            // SAFETY: the addresses hold tensors of the descriptors' shapes (the network plans
            // them from this struct) and `scratch` at least `workspace_bytes`.
            unsafe {
                dnn::convolution_forward(
                    gpu.dnn,
                    ptr(&alpha),
                    self.x,
                    x as _,
                    self.w,
                    w as _,
                    self.conv,
                    algo,
                    scratch as _,
                    self.workspace_bytes,
                    ptr(&beta),
                    self.y,
                    y as _,
                )
            }
        })
    }

    /// dx = convᵀ(dy, w), overwriting dx (the padded shape for [`SamePad::Explicit`]).
    pub fn backward_data(&self, gpu: &Gpu, w: u64, dy: u64, dx: u64, scratch: u64) -> Result<()> {
        let (alpha, beta) = (1f32, 0f32);
        self.bwd_data
            .run(self.conv, "convolution backward data", |algo| {
                // SAFETY: as in `forward`.
                unsafe {
                    dnn::convolution_backward_data(
                        gpu.dnn,
                        ptr(&alpha),
                        self.w,
                        w as _,
                        self.y,
                        dy as _,
                        self.conv,
                        algo,
                        scratch as _,
                        self.workspace_bytes,
                        ptr(&beta),
                        self.x,
                        dx as _,
                    )
                }
            })
    }

    /// dw = beta·dw + ∂/∂w (cuDNN's filter layout).
    pub fn backward_filter(
        &self,
        gpu: &Gpu,
        x: u64,
        dy: u64,
        dw: u64,
        beta: f32,
        scratch: u64,
    ) -> Result<()> {
        let alpha = 1f32;
        self.bwd_filter
            .run(self.conv, "convolution backward filter", |algo| {
                // SAFETY: as in `forward`.
                unsafe {
                    dnn::convolution_backward_filter(
                        gpu.dnn,
                        ptr(&alpha),
                        self.x,
                        x as _,
                        self.y,
                        dy as _,
                        self.conv,
                        algo,
                        scratch as _,
                        self.workspace_bytes,
                        ptr(&beta),
                        self.w,
                        dw as _,
                    )
                }
            })
    }
}

fn ptr(v: &f32) -> *const std::ffi::c_void {
    v as *const f32 as *const std::ffi::c_void
}

impl Drop for Conv {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once here.
        unsafe {
            let _ = dnn::destroy_tensor_descriptor(self.x);
            let _ = dnn::destroy_tensor_descriptor(self.y);
            let _ = dnn::destroy_filter_descriptor(self.w);
            let _ = dnn::destroy_convolution_descriptor(self.conv);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use effnet_engine::same_padding;

    #[test]
    fn same_pad_agrees_with_the_cpu_engine() {
        for (len, k, s) in [
            (224, 3, 2),
            (15, 3, 2),
            (30, 5, 2),
            (7, 3, 1),
            (7, 5, 1),
            (8, 1, 1),
            (1, 3, 2),
            (28, 3, 2),
        ] {
            let (oh, ow, pad) = same_pad(len, len, k, s);
            let (out, before) = same_padding(len, k, s);
            assert_eq!((oh, ow), (out, out), "{len} {k} {s}");
            let (top, after) = match pad {
                SamePad::Symmetric { h, .. } => (h, h),
                SamePad::Explicit { top, hp, .. } => (top, hp - len - top),
            };
            assert_eq!(top, before, "{len} {k} {s}");
            // The padded input covers exactly the windows of every output.
            assert_eq!(len + top + after, (out - 1) * s + k.max(1), "{len} {k} {s}");
        }
        assert_eq!(
            same_pad(224, 224, 3, 2).2,
            SamePad::Explicit {
                top: 0,
                left: 0,
                hp: 225,
                wp: 225
            }
        );
        assert_eq!(same_pad(7, 7, 5, 1).2, SamePad::Symmetric { h: 2, w: 2 });
    }
}
