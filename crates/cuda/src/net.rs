//! A [`Network`] on the GPU: its parameters, running statistics and gradients in device memory,
//! and the forward and backward passes of the CPU engine (crates/model/src/network.rs), op for
//! op, so that the self-test can compare every layer's output and every gradient with it.
//!
//! Convolutions run on cuDNN ([`crate::conv`]), 1×1 convolutions, squeeze-excitation and the
//! classifier on cuBLAS ([`crate::gemm`]), everything else on our kernels. Activations and their
//! gradients are stored as the device's [`Math`] says (f32, or bf16 for mixed precision: the
//! buffers are bytes, [`ActBuf`]); parameters, their gradients, BN statistics and the small SE
//! and head tensors are f32 either way. Random masks
//! (dropout, drop-path) are drawn on the host from the same generator and in the same order as
//! on the CPU, so a stochastic pass is the same function on both devices.

use std::rc::Rc;

use cudarc::driver::CudaSlice;
use effnet_engine::rng::Rng;
use effnet_engine::{regularize, Act, Nhwc};
use effnet_model::network::{ConvKind, Layer, Mode, Network, Weights};

use crate::conv::{Conv, SamePad};
use crate::device::{addr, bn_parts, columns, linear, Gpu, Math, Result};
use crate::gemm::{gemm, sgemm, Elem, RowMajor};
use crate::nccl::Nccl;

fn act_code(a: Act) -> i32 {
    match a {
        Act::None => 0,
        Act::Silu => 1,
        Act::Relu6 => 2,
    }
}

/// Activations (or their gradients) in the device's storage type: f32, bf16 or f16, as bytes.
pub type ActBuf = CudaSlice<u8>;

/// A buffer of `len` activations.
fn act_zeros(gpu: &Gpu, len: usize) -> Result<ActBuf> {
    gpu.zeros(len * gpu.math.act_bytes())
}

/// How activations are stored, for cuBLAS.
fn act_elem(gpu: &Gpu) -> Elem {
    match gpu.math {
        Math::Bf16 => Elem::Bf16,
        Math::F16 => Elem::F16,
        Math::F32 | Math::Tf32 => Elem::F32,
    }
}

/// The first `len` activations of `buf`, widened to f32 on the host.
fn read_acts(gpu: &Gpu, buf: &ActBuf, len: usize) -> Result<Vec<f32>> {
    let bytes = gpu.read(buf, len * gpu.math.act_bytes())?;
    Ok(decode_acts(&bytes, gpu.math))
}

/// Activations stored as `math` says (little-endian f32, bf16: an f32's upper half, or IEEE
/// f16), as f32.
fn decode_acts(bytes: &[u8], math: Math) -> Vec<f32> {
    let halves = bytes
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]));
    match math {
        Math::Bf16 => halves.map(|h| f32::from_bits((h as u32) << 16)).collect(),
        Math::F16 => halves.map(f16_to_f32).collect(),
        Math::F32 | Math::Tf32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    }
}

/// An IEEE binary16 value, exactly, as f32.
fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exponent = ((h >> 10) & 0x1f) as i32;
    let mantissa = (h & 0x3ff) as f32;
    sign * match exponent {
        0 => mantissa * 2f32.powi(-24), // subnormal
        31 if mantissa == 0.0 => f32::INFINITY,
        31 => f32::NAN,
        e => (1.0 + mantissa / 1024.0) * 2f32.powi(e - 15),
    }
}

/// Copies `len` activations from `src` to `dst` on the device, in stream order.
fn copy_acts(gpu: &Gpu, src: u64, dst: u64, len: usize) -> Result<()> {
    let bytes = len * gpu.math.act_bytes();
    // SAFETY: the callers' buffers hold at least `len` activations at these addresses.
    unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, gpu.stream.cu_stream()) }
        .map_err(|e| format!("copy on device: {e:?}"))
}

/// `y = x` from f32 into the activations' storage type (a copy in f32).
fn to_act(gpu: &Gpu, x: u64, y: u64, len: usize) -> Result<()> {
    gpu.launch("to_act", linear(len), &[&x, &y, &(len as i64)])
}

/// The network's state on the device. `tracked` (BN batch counters) stays on the host.
pub struct GpuNet {
    pub net: Network,
    pub params: CudaSlice<f32>,
    pub buffers: CudaSlice<f32>,
    pub tracked: Vec<i64>,
    pub grads: CudaSlice<f32>,
}

/// The SE layer's saved tensors: pooled [n, c], pre-activation and hidden [n, cr], gate [n, c].
struct SeBufs {
    pooled: CudaSlice<f32>,
    pre_act: CudaSlice<f32>,
    hidden: CudaSlice<f32>,
    gate: CudaSlice<f32>,
}

/// Device buffers for passes over `[n, h, w, 3]` inputs.
pub struct GpuWorkspace {
    pub shapes: Vec<Nhwc>,
    training: bool,
    /// The input images as written from the host (f32); the forward pass stores them as acts[0].
    input: CudaSlice<f32>,
    /// acts[0] the input, acts[i + 1] the output of layer i (after the residual add).
    acts: Vec<ActBuf>,
    /// Raw convolution outputs of conv layers (training: the backward pass reads them).
    conv_out: Vec<Option<ActBuf>>,
    /// cuDNN plans of k×k and depthwise convolutions; None for 1×1 and SE layers.
    convs: Vec<Option<Conv>>,
    /// Per conv layer: [mean | var | invstd | scale | shift], c each.
    bn: Vec<Option<CudaSlice<f32>>>,
    se: Vec<Option<SeBufs>>,
    partial: CudaSlice<f32>,
    /// A BN layer's f64 sums (up to 2c) and, after them, the row count they span.
    sums: CudaSlice<f64>,
    /// Synchronized batch norm: the replicas' NCCL communicator, over which every training BN
    /// layer sums its statistics (in stream order: a captured graph replays the exchange).
    sync: Option<Rc<Nccl>>,
    /// A layer's filter in cuDNN's layout (or a 1×1 weight for bf16 products), and its gradient.
    packed: ActBuf,
    packed_grad: ActBuf,
    padded: ActBuf,
    dpadded: ActBuf,
    scratch: CudaSlice<u8>,
    /// Per block, the drop-path mask [n], and the host copy of what the device holds (a mask
    /// is uploaded only when it changes: never, in eval passes).
    drop_masks: Vec<CudaSlice<f32>>,
    host_masks: Vec<Vec<f32>>,
    host_dropout: Vec<f32>,
    mask_draw: Vec<f32>,
    pooled: CudaSlice<f32>,
    dropout_mask: CudaSlice<f32>,
    dropped: CudaSlice<f32>,
    pub logits: CudaSlice<f32>,
    dlogits: CudaSlice<f32>,
    targets: CudaSlice<f32>,
    row_loss: CudaSlice<f64>,
    d_head: CudaSlice<f32>,
    d_head2: CudaSlice<f32>,
    /// SE backward scratch: [n, c] each, c the widest SE layer's.
    d_se: CudaSlice<f32>,
    d_se2: CudaSlice<f32>,
    grad_a: ActBuf,
    grad_b: ActBuf,
    grad_skip: ActBuf,
    grad_conv: ActBuf,
    mode: Option<Mode>,
}

impl GpuWorkspace {
    /// Makes this training workspace's batch norm span every replica of `nccl`.
    pub fn synchronize_batch_norm(&mut self, nccl: Rc<Nccl>) -> Result<()> {
        if !self.training {
            return Err("synchronized batch norm needs a training workspace".into());
        }
        self.sync = Some(nccl);
        Ok(())
    }

    pub fn is_synchronized(&self) -> bool {
        self.sync.is_some()
    }

    /// Sums `len` f64 at `ptr` over the replicas when batch norm is synchronized.
    fn replica_sum(&self, gpu: &Gpu, ptr: u64, len: usize) -> Result<()> {
        match &self.sync {
            Some(nccl) => nccl.all_reduce_sum_f64(gpu, ptr, len),
            None => Ok(()),
        }
    }

    /// The output of layer `i` (after its block's residual add when it ends one), on the host.
    pub fn layer_output(&self, gpu: &Gpu, i: usize) -> Result<Vec<f32>> {
        read_acts(gpu, &self.acts[i + 1], self.shapes[i + 1].len())
    }

    pub fn batch(&self) -> usize {
        self.shapes[0].n
    }
}

impl GpuNet {
    pub fn new(gpu: &Gpu, net: &Network, w: &Weights) -> Result<GpuNet> {
        let mut g = GpuNet::for_inference(gpu, net, w)?;
        g.grads = gpu.zeros(w.params.len())?;
        Ok(g)
    }

    /// Without a gradient buffer: for evaluation passes only (backward and the optimizer
    /// refuse it).
    pub fn for_inference(gpu: &Gpu, net: &Network, w: &Weights) -> Result<GpuNet> {
        Ok(GpuNet {
            net: net.clone(),
            params: gpu.upload(&w.params)?,
            buffers: gpu.upload(&w.buffers)?,
            tracked: w.tracked.clone(),
            grads: gpu.zeros(1)?,
        })
    }

    /// Whether the gradient buffer spans the parameters (not [`GpuNet::for_inference`]).
    pub(crate) fn has_grads(&self) -> Result<()> {
        if self.grads.len() < self.net.layout.param_len {
            return Err("this network was set up for inference: no gradients".into());
        }
        Ok(())
    }

    /// Parameters, running statistics and counters, copied back to the host.
    pub fn weights(&self, gpu: &Gpu) -> Result<Weights> {
        Ok(Weights {
            params: gpu.read(&self.params, self.net.layout.param_len)?,
            buffers: gpu.read(&self.buffers, self.net.layout.buffer_len)?,
            tracked: self.tracked.clone(),
        })
    }

    pub fn grads(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        self.has_grads()?;
        gpu.read(&self.grads, self.net.layout.param_len)
    }

    pub fn zero_grads(&self, gpu: &Gpu) -> Result<()> {
        self.has_grads()?;
        gpu.memset_zero(self.p(gpu, 0).1, self.net.layout.param_len)
    }

    /// (params, grads) device addresses of element `offset`.
    fn p(&self, gpu: &Gpu, offset: usize) -> (u64, u64) {
        (
            addr(&self.params, &gpu.stream, offset),
            addr(&self.grads, &gpu.stream, offset),
        )
    }

    /// Plans the buffers for `[n, h, w, 3]` inputs; `training` adds what the training forward
    /// and the backward pass need.
    pub fn workspace(
        &self,
        gpu: &Gpu,
        n: usize,
        h: usize,
        w: usize,
        training: bool,
    ) -> Result<GpuWorkspace> {
        let net = &self.net;
        let shapes = net.shapes(n, h, w);
        let mut acts = vec![act_zeros(gpu, shapes[0].len())?];
        let (mut conv_out, mut convs, mut bn, mut se) = (vec![], vec![], vec![], vec![]);
        let (mut max_act, mut max_c, mut max_parts) = (shapes[0].len(), 1, 1);
        let (mut packed, mut padded, mut scratch, mut se_c) = (1, 1, 1, 1);
        for (i, layer) in net.layers.iter().enumerate() {
            let (x, y) = (shapes[i], shapes[i + 1]);
            acts.push(act_zeros(gpu, y.len())?);
            max_act = max_act.max(y.len());
            match layer {
                Layer::Conv(u) => {
                    conv_out.push(if training {
                        Some(act_zeros(gpu, y.len())?)
                    } else {
                        None
                    });
                    bn.push(Some(gpu.zeros(5 * u.cout)?));
                    se.push(None);
                    max_c = max_c.max(u.cout);
                    max_parts = max_parts.max(bn_parts(y.rows()));
                    let pointwise = u.conv == ConvKind::Dense && u.kernel == 1 && u.stride == 1;
                    if pointwise {
                        if gpu.math.twin_tag().is_some() {
                            packed = packed.max(u.cout * u.cin); // the weight in 16 bits
                        }
                        convs.push(None);
                        continue;
                    }
                    let depthwise = u.conv == ConvKind::Depthwise;
                    let c = Conv::new(gpu, x, u.kernel, u.stride, u.cout, depthwise, training)?;
                    let per_group_in = if depthwise { 1 } else { u.cin };
                    packed = packed.max(u.cout * per_group_in * u.kernel * u.kernel);
                    if let SamePad::Explicit { hp, wp, .. } = c.pad {
                        padded = padded.max(x.n * hp * wp * x.c);
                    }
                    scratch = scratch.max(c.workspace_bytes);
                    convs.push(Some(c));
                }
                Layer::Se(s) => {
                    conv_out.push(None);
                    bn.push(None);
                    convs.push(None);
                    se_c = se_c.max(s.c);
                    se.push(Some(SeBufs {
                        pooled: gpu.zeros(n * s.c)?,
                        pre_act: gpu.zeros(n * s.cr)?,
                        hidden: gpu.zeros(n * s.cr)?,
                        gate: gpu.zeros(n * s.c)?,
                    }));
                }
            }
        }
        let (f, k) = (net.features, net.classes);
        let train_len = |len: usize| if training { len } else { 1 };
        Ok(GpuWorkspace {
            training,
            input: gpu.zeros(shapes[0].len())?,
            acts,
            conv_out,
            convs,
            bn,
            se,
            partial: gpu.zeros(max_parts * 2 * max_c)?,
            sums: gpu.zeros(2 * max_c + 1)?,
            sync: None,
            packed: act_zeros(gpu, packed)?,
            packed_grad: act_zeros(gpu, train_len(packed))?,
            padded: act_zeros(gpu, padded)?,
            dpadded: act_zeros(gpu, train_len(padded))?,
            scratch: gpu.zeros(scratch)?,
            drop_masks: (0..net.blocks.len())
                .map(|_| gpu.upload(&vec![1f32; n]))
                .collect::<Result<_>>()?,
            host_masks: vec![vec![1f32; n]; net.blocks.len()],
            host_dropout: vec![1f32; n * f],
            mask_draw: vec![1f32; n * f],
            pooled: gpu.zeros(n * f)?,
            dropout_mask: gpu.upload(&vec![1f32; n * f])?,
            dropped: gpu.zeros(n * f)?,
            logits: gpu.zeros(n * k)?,
            dlogits: gpu.zeros(n * k)?,
            targets: gpu.zeros(n * k)?,
            row_loss: gpu.zeros(n)?,
            d_head: gpu.zeros(n * f)?,
            d_head2: gpu.zeros(n * f)?,
            d_se: gpu.zeros(train_len(n * se_c))?,
            d_se2: gpu.zeros(train_len(n * se_c))?,
            grad_a: act_zeros(gpu, train_len(max_act))?,
            grad_b: act_zeros(gpu, train_len(max_act))?,
            grad_skip: act_zeros(gpu, train_len(max_act))?,
            grad_conv: act_zeros(gpu, train_len(max_act))?,
            mode: None,
            shapes,
        })
    }

    /// Copies host input `[n, h, w, 3]` (the workspace's shape) to the device, where
    /// [`GpuNet::forward`] reads it; it stays there for any number of passes.
    pub fn write_input(&self, gpu: &Gpu, ws: &mut GpuWorkspace, input: &[f32]) -> Result<()> {
        if input.len() != ws.shapes[0].len() {
            return Err(format!(
                "input of {} values for a workspace of {:?}",
                input.len(),
                ws.shapes[0]
            ));
        }
        gpu.write(input, &mut ws.input)
    }

    /// The forward pass over the input on the device ([`GpuNet::write_input`]); the logits stay
    /// in `ws.logits` ([`GpuNet::logits`] reads them). Training mode updates the running
    /// statistics.
    pub fn forward(
        &mut self,
        gpu: &Gpu,
        ws: &mut GpuWorkspace,
        mode: Mode,
        rng: &mut Rng,
    ) -> Result<()> {
        self.draw_masks(gpu, ws, mode, rng)?;
        self.forward_launches(gpu, ws, mode)?;
        self.count_batches(mode);
        Ok(())
    }

    /// Draws the pass's drop-path and dropout masks on the host, as the CPU engine does (same
    /// generator calls in the same order), and uploads those that changed. Separate from the
    /// launches so that a captured graph can replay them with fresh masks.
    pub fn draw_masks(
        &self,
        gpu: &Gpu,
        ws: &mut GpuWorkspace,
        mode: Mode,
        rng: &mut Rng,
    ) -> Result<()> {
        if !ws.training && mode != Mode::Eval {
            return Err("a training-mode pass needs a training workspace".into());
        }
        let stochastic = matches!(
            mode,
            Mode::Train {
                stochastic: true,
                ..
            }
        );
        let head = *ws.shapes.last().expect("has layers");
        for (b, block) in self.net.blocks.iter().enumerate() {
            if !block.skip {
                continue;
            }
            let mask = &mut ws.mask_draw[..head.n];
            if stochastic && block.drop_path > 0.0 {
                regularize::drop_path_mask(rng, block.drop_path, mask);
            } else {
                mask.fill(1.0);
            }
            if ws.host_masks[b] != *mask {
                ws.host_masks[b].copy_from_slice(mask);
                gpu.write(mask, &mut ws.drop_masks[b])?;
            }
        }
        let mask = &mut ws.mask_draw[..head.n * head.c];
        let rate = self.net.config.dropout;
        if stochastic && rate > 0.0 {
            regularize::dropout_mask(rng, rate, mask);
        } else {
            mask.fill(1.0);
        }
        if ws.host_dropout != *mask {
            ws.host_dropout.copy_from_slice(mask);
            gpu.write(mask, &mut ws.dropout_mask)?;
        }
        Ok(())
    }

    /// A training pass's batch counters (on the host: one per batch-norm layer).
    pub fn count_batches(&mut self, mode: Mode) {
        if mode == Mode::Eval {
            return;
        }
        for layer in &self.net.layers {
            if let Layer::Conv(u) = layer {
                self.tracked[u.bn.tracked] += 1;
            }
        }
    }

    /// The forward pass's device work only (kernels, cuDNN, cuBLAS; nothing from the host), on
    /// the masks [`GpuNet::draw_masks`] left: what a CUDA graph captures.
    pub fn forward_launches(&self, gpu: &Gpu, ws: &mut GpuWorkspace, mode: Mode) -> Result<()> {
        if !ws.training && mode != Mode::Eval {
            return Err("a training-mode pass needs a training workspace".into());
        }
        ws.mode = Some(mode);
        let s = &gpu.stream;
        let images = ws.shapes[0].len();
        to_act(gpu, addr(&ws.input, s, 0), addr(&ws.acts[0], s, 0), images)?;
        for i in 0..self.net.layers.len() {
            self.layer_forward(gpu, i, ws, mode)?;
            let ends = self.net.blocks.iter().position(|b| b.layers.end == i + 1);
            if let Some(b) = ends {
                let block = &self.net.blocks[b];
                if !block.skip {
                    continue;
                }
                let y = ws.shapes[i + 1];
                let n = y.n;
                gpu.launch(
                    "residual_add",
                    linear(y.len()),
                    &[
                        &addr(&ws.acts[i + 1], s, 0),
                        &addr(&ws.acts[block.layers.start], s, 0),
                        &addr(&ws.drop_masks[b], s, 0),
                        &(n as i64),
                        &((y.len() / n) as i64),
                    ],
                )?;
            }
        }
        // Head: pool, dropout, classifier.
        let head = *ws.shapes.last().expect("has layers");
        let (n, hw, f, k) = (head.n, head.h * head.w, head.c, self.net.classes);
        let last = self.net.layers.len();
        let pooled = addr(&ws.pooled, s, 0);
        gpu.launch(
            "global_avg_pool_forward",
            columns(f, n),
            &[
                &addr(&ws.acts[last], s, 0),
                &(n as i64),
                &(hw as i64),
                &(f as i32),
                &pooled,
            ],
        )?;
        let dropped = addr(&ws.dropped, s, 0);
        gpu.launch(
            "dropout_apply",
            linear(n * f),
            &[
                &pooled,
                &addr(&ws.dropout_mask, s, 0),
                &((n * f) as i64),
                &dropped,
            ],
        )?;
        let (w, _) = self.p(gpu, self.net.fc_weight.start);
        let (b, _) = self.p(gpu, self.net.fc_bias.start);
        let logits = addr(&ws.logits, s, 0);
        let fc = RowMajor {
            m: n,
            n: k,
            k: f,
            a_t: false,
            b_t: true,
        };
        sgemm(gpu, fc, dropped, w, logits, 1.0, 0.0)?;
        gpu.launch(
            "add_bias_rows",
            linear(n * k),
            &[&logits, &b, &(n as i64), &(k as i32)],
        )
    }

    pub fn logits(&self, gpu: &Gpu, ws: &GpuWorkspace) -> Result<Vec<f32>> {
        gpu.read(&ws.logits, ws.batch() * self.net.classes)
    }

    fn layer_forward(&self, gpu: &Gpu, i: usize, ws: &GpuWorkspace, mode: Mode) -> Result<()> {
        let s = &gpu.stream;
        let (xs, ys) = (ws.shapes[i], ws.shapes[i + 1]);
        let x = addr(&ws.acts[i], s, 0);
        let y = addr(&ws.acts[i + 1], s, 0);
        match &self.net.layers[i] {
            Layer::Conv(u) => {
                let target = match &ws.conv_out[i] {
                    Some(z) if mode != Mode::Eval => addr(z, s, 0),
                    _ => y,
                };
                let (w, _) = self.p(gpu, u.weight.start);
                self.conv_forward(gpu, ws, i, x, w, target)?;
                let bn = ws.bn[i].as_ref().expect("planned for conv layers");
                let c = u.cout;
                let (mean, var, invstd) = (addr(bn, s, 0), addr(bn, s, c), addr(bn, s, 2 * c));
                let (scale, shift) = (addr(bn, s, 3 * c), addr(bn, s, 4 * c));
                let (gamma, _) = self.p(gpu, u.bn.gamma.start);
                let (beta, _) = self.p(gpu, u.bn.beta.start);
                let rmean = addr(&self.buffers, s, u.bn.mean.start);
                let rvar = addr(&self.buffers, s, u.bn.var.start);
                let eps = self.net.config.bn_eps;
                let rows = ys.rows();
                let (ci, ri) = (c as i32, rows as i64);
                match mode {
                    Mode::Eval => {
                        gpu.launch(
                            "bn_fold_running",
                            linear(c),
                            &[&gamma, &beta, &rmean, &rvar, &eps, &ci, &scale, &shift],
                        )?;
                    }
                    Mode::Train { bn_momentum, .. } => {
                        let parts = bn_parts(rows);
                        let partial = addr(&ws.partial, s, 0);
                        let sums = addr(&ws.sums, s, 0);
                        // The channels' sums and the row count after them, over the replicas
                        // with synchronized BN.
                        let reduce = |width: usize| {
                            gpu.launch(
                                "bn_reduce_partials",
                                linear(width),
                                &[
                                    &partial,
                                    &(parts as i32),
                                    &(width as i32),
                                    &(rows as f64),
                                    &sums,
                                ],
                            )?;
                            ws.replica_sum(gpu, sums, width + 1)
                        };
                        gpu.launch(
                            "bn_sum_partials",
                            columns(c, parts),
                            &[&target, &ri, &ci, &partial],
                        )?;
                        reduce(c)?;
                        gpu.launch("bn_mean", linear(c), &[&sums, &ci, &mean])?;
                        gpu.launch(
                            "bn_sqdev_partials",
                            columns(c, parts),
                            &[&target, &mean, &ri, &ci, &partial],
                        )?;
                        reduce(c)?;
                        gpu.launch("bn_var", linear(c), &[&sums, &ci, &eps, &var, &invstd])?;
                        gpu.launch(
                            "bn_fold",
                            linear(c),
                            &[&gamma, &beta, &mean, &invstd, &ci, &scale, &shift],
                        )?;
                        let count = addr(&ws.sums, s, c);
                        gpu.launch(
                            "bn_update_running",
                            linear(c),
                            &[&rmean, &rvar, &mean, &var, &ci, &count, &bn_momentum],
                        )?;
                    }
                }
                gpu.launch(
                    "bn_apply",
                    linear(ys.len()),
                    &[&target, &scale, &shift, &ri, &ci, &act_code(u.act), &y],
                )
            }
            Layer::Se(l) => {
                let sb = ws.se[i].as_ref().expect("planned for SE layers");
                let (n, hw, c, cr) = (xs.n, xs.h * xs.w, l.c, l.cr);
                let pooled = addr(&sb.pooled, s, 0);
                let pre = addr(&sb.pre_act, s, 0);
                let hidden = addr(&sb.hidden, s, 0);
                let gate = addr(&sb.gate, s, 0);
                let (ni, hwi, ci) = (n as i64, hw as i64, c as i32);
                gpu.launch(
                    "global_avg_pool_forward",
                    columns(c, n),
                    &[&x, &ni, &hwi, &ci, &pooled],
                )?;
                let (w1, _) = self.p(gpu, l.w1.start);
                let (b1, _) = self.p(gpu, l.b1.start);
                let (w2, _) = self.p(gpu, l.w2.start);
                let (b2, _) = self.p(gpu, l.b2.start);
                let reduce = RowMajor {
                    m: n,
                    n: cr,
                    k: c,
                    a_t: false,
                    b_t: true,
                };
                sgemm(gpu, reduce, pooled, w1, pre, 1.0, 0.0)?;
                gpu.launch(
                    "se_bias_act",
                    linear(n * cr),
                    &[&pre, &b1, &ni, &(cr as i32), &act_code(l.act), &hidden],
                )?;
                let expand = RowMajor {
                    m: n,
                    n: c,
                    k: cr,
                    a_t: false,
                    b_t: true,
                };
                sgemm(gpu, expand, hidden, w2, gate, 1.0, 0.0)?;
                gpu.launch("se_bias_sigmoid", linear(n * c), &[&gate, &b2, &ni, &ci])?;
                gpu.launch(
                    "se_excite",
                    linear(xs.len()),
                    &[&x, &gate, &ni, &hwi, &ci, &y],
                )
            }
        }
    }

    /// out = conv(x) for conv layer `i` (weights at `w`, PyTorch's layout).
    fn conv_forward(
        &self,
        gpu: &Gpu,
        ws: &GpuWorkspace,
        i: usize,
        x: u64,
        w: u64,
        out: u64,
    ) -> Result<()> {
        let s = &gpu.stream;
        let Layer::Conv(u) = &self.net.layers[i] else {
            unreachable!("conv_forward on a conv layer")
        };
        let Some(conv) = &ws.convs[i] else {
            // 1×1: [rows, cin] · [cout, cin]ᵀ.
            let p = RowMajor {
                m: ws.shapes[i].rows(),
                n: u.cout,
                k: u.cin,
                a_t: false,
                b_t: true,
            };
            let w = self.product_weight(gpu, ws, w, u.cout * u.cin)?;
            let e = act_elem(gpu);
            return gemm(gpu, p, x, w, out, 1.0, 0.0, e, e);
        };
        let xin = self.padded_input(gpu, ws, conv, x)?;
        let scratch = addr(&ws.scratch, s, 0);
        let packed = self.pack_weight(gpu, ws, conv, u.cin, w)?;
        conv.forward(gpu, xin, packed, out, scratch)
    }

    /// The convolution's input: `x` itself, or its zero-bordered copy for uneven SAME padding.
    fn padded_input(&self, gpu: &Gpu, ws: &GpuWorkspace, conv: &Conv, x: u64) -> Result<u64> {
        let SamePad::Explicit { top, left, hp, wp } = conv.pad else {
            return Ok(x);
        };
        let xs = conv.input;
        let padded = addr(&ws.padded, &gpu.stream, 0);
        let i = |v: usize| v as i32;
        gpu.launch(
            "pad_nhwc",
            linear(xs.n * hp * wp * xs.c),
            &[
                &x,
                &(xs.n as i64),
                &i(xs.h),
                &i(xs.w),
                &i(xs.c),
                &i(top),
                &i(left),
                &i(hp),
                &i(wp),
                &padded,
            ],
        )?;
        Ok(padded)
    }

    /// The layer's weights in cuDNN's NHWC filter layout, in `ws.packed`: dense [o, i, k, k]
    /// transposed to [o, k, k, i]; depthwise [c, 1, k, k] (already that layout) copied, since a
    /// tensor inside the flat parameter buffer may start only 8-byte aligned.
    fn pack_weight(
        &self,
        gpu: &Gpu,
        ws: &GpuWorkspace,
        conv: &Conv,
        cin: usize,
        w: u64,
    ) -> Result<u64> {
        let packed = addr(&ws.packed, &gpu.stream, 0);
        let (o, k) = (conv.output.c, conv.kernel);
        if conv.depthwise {
            to_act(gpu, w, packed, o * k * k)?;
        } else {
            gpu.launch(
                "oihw_to_ohwi",
                linear(o * cin * k * k),
                &[&w, &(o as i32), &(cin as i32), &(k as i32), &packed],
            )?;
        }
        Ok(packed)
    }

    /// A 1×1 convolution's weight (`len` f32 at `w`) as its product reads it: itself in f32,
    /// its 16-bit copy in `ws.packed` for mixed precision (cuBLAS multiplies like types).
    fn product_weight(&self, gpu: &Gpu, ws: &GpuWorkspace, w: u64, len: usize) -> Result<u64> {
        if gpu.math.twin_tag().is_none() {
            return Ok(w);
        }
        let packed = addr(&ws.packed, &gpu.stream, 0);
        to_act(gpu, w, packed, len)?;
        Ok(packed)
    }

    /// The softmax cross-entropy of the logits against host `targets` [n, classes]: returns
    /// the batch mean and leaves d loss/d logits for [`GpuNet::backward`].
    pub fn loss(&self, gpu: &Gpu, ws: &mut GpuWorkspace, targets: &[f32]) -> Result<f32> {
        self.write_targets(gpu, ws, targets)?;
        self.loss_launches(gpu, ws)?;
        self.read_loss(gpu, ws)
    }

    pub fn write_targets(&self, gpu: &Gpu, ws: &mut GpuWorkspace, targets: &[f32]) -> Result<()> {
        let (n, k) = (ws.batch(), self.net.classes);
        if targets.len() != n * k {
            return Err(format!("{} targets for {n} × {k} logits", targets.len()));
        }
        gpu.write(targets, &mut ws.targets)
    }

    /// Sets d loss/d logits from the host (a loss computed there), for [`GpuNet::backward`].
    pub fn write_dlogits(&self, gpu: &Gpu, ws: &mut GpuWorkspace, dlogits: &[f32]) -> Result<()> {
        let (n, k) = (ws.batch(), self.net.classes);
        if dlogits.len() != n * k {
            return Err(format!(
                "{} logit gradients for {n} × {k} logits",
                dlogits.len()
            ));
        }
        gpu.write(dlogits, &mut ws.dlogits)
    }

    /// Per-row losses and d loss/d logits on the device (capturable).
    pub fn loss_launches(&self, gpu: &Gpu, ws: &GpuWorkspace) -> Result<()> {
        let (n, k) = (ws.batch(), self.net.classes);
        let s = &gpu.stream;
        let (z, t) = (addr(&ws.logits, s, 0), addr(&ws.targets, s, 0));
        let rows = cudarc::driver::LaunchConfig {
            grid_dim: (n.min(65_535) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ni, ki) = (n as i64, k as i32);
        gpu.launch(
            "softmax_xent_forward",
            rows,
            &[&z, &t, &ni, &ki, &addr(&ws.row_loss, s, 0)],
        )?;
        gpu.launch(
            "softmax_xent_backward",
            rows,
            &[&z, &t, &ni, &ki, &addr(&ws.dlogits, s, 0)],
        )
    }

    /// The batch mean of the per-row losses (waits for the stream).
    pub fn read_loss(&self, gpu: &Gpu, ws: &GpuWorkspace) -> Result<f32> {
        let n = ws.batch();
        let per_row = gpu.read(&ws.row_loss, n)?;
        Ok((per_row.iter().sum::<f64>() / n as f64) as f32)
    }

    /// The backward pass after a training-mode forward and [`GpuNet::loss`]: adds every
    /// parameter's gradient into `self.grads` (zero them first with [`GpuNet::zero_grads`]).
    pub fn backward(&self, gpu: &Gpu, ws: &mut GpuWorkspace) -> Result<()> {
        if !matches!(ws.mode, Some(Mode::Train { .. })) {
            return Err("backward needs a training-mode forward pass on this workspace".into());
        }
        self.has_grads()?;
        let s = &gpu.stream;
        let head = *ws.shapes.last().expect("has layers");
        let (n, hw, f, k) = (head.n, head.h * head.w, head.c, self.net.classes);
        let dlogits = addr(&ws.dlogits, s, 0);
        let (w, gw) = self.p(gpu, self.net.fc_weight.start);
        let (_, gb) = self.p(gpu, self.net.fc_bias.start);
        let d_dropped = addr(&ws.d_head, s, 0);
        let d_pooled = addr(&ws.d_head2, s, 0);
        // d_dropped = dlogits · W; dW += dlogitsᵀ · dropped; db += Σ dlogits.
        let dx = RowMajor {
            m: n,
            n: f,
            k,
            a_t: false,
            b_t: false,
        };
        sgemm(gpu, dx, dlogits, w, d_dropped, 1.0, 0.0)?;
        let dw = RowMajor {
            m: k,
            n: f,
            k: n,
            a_t: true,
            b_t: false,
        };
        sgemm(gpu, dw, dlogits, addr(&ws.dropped, s, 0), gw, 1.0, 1.0)?;
        gpu.launch(
            "se_bias_grad",
            linear(k),
            &[&dlogits, &(n as i64), &(k as i32), &gb],
        )?;
        gpu.launch(
            "dropout_apply",
            linear(n * f),
            &[
                &d_dropped,
                &addr(&ws.dropout_mask, s, 0),
                &((n * f) as i64),
                &d_pooled,
            ],
        )?;
        let (mut g, mut g_next) = (addr(&ws.grad_a, s, 0), addr(&ws.grad_b, s, 0));
        let g_skip = addr(&ws.grad_skip, s, 0);
        gpu.launch(
            "global_avg_pool_backward",
            linear(n * hw * f),
            &[&d_pooled, &(n as i64), &(hw as i64), &(f as i32), &g],
        )?;
        for i in (0..self.net.layers.len()).rev() {
            let (y_len, x_len) = (ws.shapes[i + 1].len(), ws.shapes[i].len());
            let ends = self
                .net
                .blocks
                .iter()
                .position(|b| b.skip && b.layers.end == i + 1);
            if let Some(b) = ends {
                // The shortcut's gradient waits in g_skip; the branch gets the drop-path scale
                // wherever a mask may drop (a fact of the network, not of this pass's draw: a
                // captured graph replays with later masks).
                copy_acts(gpu, g, g_skip, y_len)?;
                if self.net.blocks[b].drop_path > 0.0 {
                    gpu.launch(
                        "drop_path_scale",
                        linear(y_len),
                        &[
                            &g_skip,
                            &addr(&ws.drop_masks[b], s, 0),
                            &(n as i64),
                            &((y_len / n) as i64),
                            &g,
                        ],
                    )?;
                }
            }
            let dx = (i > 0).then_some(g_next);
            self.layer_backward(gpu, ws, i, g, dx)?;
            std::mem::swap(&mut g, &mut g_next);
            if self
                .net
                .blocks
                .iter()
                .any(|b| b.skip && b.layers.start == i)
            {
                gpu.launch("add_into", linear(x_len), &[&g, &g_skip, &(x_len as i64)])?;
            }
        }
        Ok(())
    }

    fn layer_backward(
        &self,
        gpu: &Gpu,
        ws: &GpuWorkspace,
        i: usize,
        dy: u64,
        dx: Option<u64>,
    ) -> Result<()> {
        let s = &gpu.stream;
        let (xs, ys) = (ws.shapes[i], ws.shapes[i + 1]);
        let x = addr(&ws.acts[i], s, 0);
        match &self.net.layers[i] {
            Layer::Conv(u) => {
                let z = addr(ws.conv_out[i].as_ref().expect("training workspace"), s, 0);
                let bn = ws.bn[i].as_ref().expect("planned for conv layers");
                let c = u.cout;
                let (mean, invstd) = (addr(bn, s, 0), addr(bn, s, 2 * c));
                let (scale, shift) = (addr(bn, s, 3 * c), addr(bn, s, 4 * c));
                let (_, dgamma) = self.p(gpu, u.bn.gamma.start);
                let (_, dbeta) = self.p(gpu, u.bn.beta.start);
                let rows = ys.rows();
                let parts = bn_parts(rows);
                let (ci, ri) = (c as i32, rows as i64);
                let partial = addr(&ws.partial, s, 0);
                let sums = addr(&ws.sums, s, 0);
                let d_conv = addr(&ws.grad_conv, s, 0);
                gpu.launch(
                    "bn_backward_partials",
                    columns(c, parts),
                    &[
                        &z,
                        &dy,
                        &scale,
                        &shift,
                        &mean,
                        &invstd,
                        &ri,
                        &ci,
                        &act_code(u.act),
                        &d_conv,
                        &partial,
                    ],
                )?;
                gpu.launch(
                    "bn_reduce_partials",
                    linear(2 * c),
                    &[&partial, &(parts as i32), &(2 * ci), &(rows as f64), &sums],
                )?;
                gpu.launch(
                    "bn_backward_params",
                    linear(c),
                    &[&sums, &ci, &dgamma, &dbeta],
                )?;
                // d(mean) and d(variance) over every replica's rows with synchronized BN.
                ws.replica_sum(gpu, sums, 2 * c + 1)?;
                gpu.launch(
                    "bn_backward_dx",
                    linear(ys.len()),
                    &[&z, &scale, &mean, &invstd, &sums, &ri, &ci, &d_conv],
                )?;
                let (w, gw) = self.p(gpu, u.weight.start);
                let Some(conv) = &ws.convs[i] else {
                    // 1×1: dx = d_conv · W; dW += d_convᵀ · x (into the f32 gradients).
                    let e = act_elem(gpu);
                    if let Some(dx) = dx {
                        let p = RowMajor {
                            m: xs.rows(),
                            n: u.cin,
                            k: c,
                            a_t: false,
                            b_t: false,
                        };
                        let w = self.product_weight(gpu, ws, w, c * u.cin)?;
                        gemm(gpu, p, d_conv, w, dx, 1.0, 0.0, e, e)?;
                    }
                    let p = RowMajor {
                        m: c,
                        n: u.cin,
                        k: xs.rows(),
                        a_t: true,
                        b_t: false,
                    };
                    return gemm(gpu, p, d_conv, x, gw, 1.0, 1.0, e, Elem::F32);
                };
                let scratch = addr(&ws.scratch, s, 0);
                let xin = self.padded_input(gpu, ws, conv, x)?;
                // The filter gradient in cuDNN's layout, then added into PyTorch's.
                let packed_grad = addr(&ws.packed_grad, s, 0);
                conv.backward_filter(gpu, xin, d_conv, packed_grad, 0.0, scratch)?;
                let k = u.kernel;
                if conv.depthwise {
                    gpu.launch(
                        "add_grad_into",
                        linear(c * k * k),
                        &[&gw, &packed_grad, &((c * k * k) as i64)],
                    )?;
                } else {
                    let (o, ci, ki) = (c as i32, u.cin as i32, k as i32);
                    gpu.launch(
                        "ohwi_to_oihw_add",
                        linear(c * u.cin * k * k),
                        &[&packed_grad, &o, &ci, &ki, &gw],
                    )?;
                }
                let w_dnn = self.pack_weight(gpu, ws, conv, u.cin, w)?;
                let Some(dx) = dx else { return Ok(()) };
                match conv.pad {
                    SamePad::Symmetric { .. } => {
                        conv.backward_data(gpu, w_dnn, d_conv, dx, scratch)
                    }
                    SamePad::Explicit { top, left, hp, wp } => {
                        let dpadded = addr(&ws.dpadded, s, 0);
                        conv.backward_data(gpu, w_dnn, d_conv, dpadded, scratch)?;
                        let i = |v: usize| v as i32;
                        gpu.launch(
                            "crop_nhwc",
                            linear(xs.len()),
                            &[
                                &dpadded,
                                &(xs.n as i64),
                                &i(hp),
                                &i(wp),
                                &i(xs.c),
                                &i(top),
                                &i(left),
                                &i(xs.h),
                                &i(xs.w),
                                &dx,
                            ],
                        )
                    }
                }
            }
            Layer::Se(l) => {
                let dx = dx.ok_or("an SE layer is never first")?;
                let sb = ws.se[i].as_ref().expect("planned for SE layers");
                let (n, hw, c, cr) = (xs.n, xs.h * xs.w, l.c, l.cr);
                let (ni, hwi, ci, cri) = (n as i64, hw as i64, c as i32, cr as i32);
                let gate = addr(&sb.gate, s, 0);
                let d_gate = addr(&ws.d_se, s, 0);
                let d_small = addr(&ws.d_se2, s, 0);
                let (w1, gw1) = self.p(gpu, l.w1.start);
                let (_, gb1) = self.p(gpu, l.b1.start);
                let (w2, gw2) = self.p(gpu, l.w2.start);
                let (_, gb2) = self.p(gpu, l.b2.start);
                gpu.launch(
                    "se_gate_grad",
                    columns(c, n),
                    &[&x, &dy, &gate, &ni, &hwi, &ci, &d_gate],
                )?;
                gpu.launch("se_bias_grad", linear(c), &[&d_gate, &ni, &ci, &gb2])?;
                // dW2 [c, cr] += d_gateᵀ · hidden; d_hidden [n, cr] = d_gate · W2.
                let p = RowMajor {
                    m: c,
                    n: cr,
                    k: n,
                    a_t: true,
                    b_t: false,
                };
                sgemm(gpu, p, d_gate, addr(&sb.hidden, s, 0), gw2, 1.0, 1.0)?;
                let p = RowMajor {
                    m: n,
                    n: cr,
                    k: c,
                    a_t: false,
                    b_t: false,
                };
                sgemm(gpu, p, d_gate, w2, d_small, 1.0, 0.0)?;
                gpu.launch(
                    "se_act_backward",
                    linear(n * cr),
                    &[
                        &d_small,
                        &addr(&sb.pre_act, s, 0),
                        &((n * cr) as i64),
                        &act_code(l.act),
                    ],
                )?;
                gpu.launch("se_bias_grad", linear(cr), &[&d_small, &ni, &cri, &gb1])?;
                // dW1 [cr, c] += d_preᵀ · pooled; d_pooled [n, c] = d_pre · W1 (into d_gate,
                // no longer needed).
                let p = RowMajor {
                    m: cr,
                    n: c,
                    k: n,
                    a_t: true,
                    b_t: false,
                };
                sgemm(gpu, p, d_small, addr(&sb.pooled, s, 0), gw1, 1.0, 1.0)?;
                let p = RowMajor {
                    m: n,
                    n: c,
                    k: cr,
                    a_t: false,
                    b_t: false,
                };
                sgemm(gpu, p, d_small, w1, d_gate, 1.0, 0.0)?;
                gpu.launch(
                    "se_excite_backward",
                    linear(xs.len()),
                    &[&dy, &gate, &d_gate, &ni, &hwi, &ci, &dx],
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_activations_decode_to_their_values() {
        let values = [1.0f32, -2.5, 0.0, 3.0e38, f32::INFINITY];
        let f32_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(decode_acts(&f32_bytes, Math::F32), values);
        assert_eq!(decode_acts(&f32_bytes, Math::Tf32), values);
        // bf16 is the upper 16 bits: exact for these values except 3.0e38, truncated here.
        let bf16_bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        let back = decode_acts(&bf16_bytes, Math::Bf16);
        assert_eq!(back.len(), values.len());
        assert_eq!(&back[..3], &values[..3]);
        assert!(
            (back[3] - 3.0e38).abs() / 3.0e38 < 1.0 / 128.0,
            "{}",
            back[3]
        );
        assert_eq!(back[4], f32::INFINITY);
        // f16: 1.0 = 0x3c00, −2.5 = 0xc100, 65504 (the largest) = 0x7bff, 2⁻²⁴ (the smallest
        // subnormal) = 0x0001, +inf = 0x7c00.
        let f16_bytes: Vec<u8> = [0x3c00u16, 0xc100, 0x0000, 0x7bff, 0x0001, 0x7c00]
            .iter()
            .flat_map(|h| h.to_le_bytes())
            .collect();
        let back = decode_acts(&f16_bytes, Math::F16);
        let want = [1.0, -2.5, 0.0, 65504.0, 2f32.powi(-24), f32::INFINITY];
        assert_eq!(back, want);
        assert!(decode_acts(&0x7e00u16.to_le_bytes(), Math::F16)[0].is_nan());
    }
}
