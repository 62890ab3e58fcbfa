//! A concrete network built from an [`ArchConfig`]: the sequence of layers, where their
//! parameters live, and the forward and backward passes over a planned [`Workspace`].

use std::ops::Range;
use std::time::Instant;

use effnet_engine::norm::CrossReplica;
use effnet_engine::rng::Rng;
use effnet_engine::se::{SeGeom, SeSaved};
use effnet_engine::{
    conv, depthwise, linear, norm, pointwise, pool, regularize, se, winograd, Act, Nhwc, Precision,
};

use crate::family::{ArchConfig, BlockKind};
use crate::layout::{BnRanges, Layout, ParamKind};

/// The convolution of a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvKind {
    /// groups = 1 (k×k, or 1×1 as a plain matrix product).
    Dense,
    Depthwise,
}

/// Convolution + batch norm + activation: the unit every block is made of.
#[derive(Debug, Clone)]
pub struct ConvUnit {
    pub conv: ConvKind,
    pub kernel: usize,
    pub stride: usize,
    pub cin: usize,
    pub cout: usize,
    pub weight: Range<usize>,
    pub bn: BnRanges,
    pub act: Act,
}

#[derive(Debug, Clone)]
pub struct SeUnit {
    pub c: usize,
    pub cr: usize,
    pub act: Act,
    pub w1: Range<usize>,
    pub b1: Range<usize>,
    pub w2: Range<usize>,
    pub b2: Range<usize>,
}

impl SeUnit {
    /// Its shapes over input `x`.
    pub fn geom(&self, x: Nhwc) -> SeGeom {
        SeGeom {
            n: x.n,
            hw: x.h * x.w,
            c: self.c,
            cr: self.cr,
            act: self.act,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Layer {
    Conv(ConvUnit),
    Se(SeUnit),
}

/// A residual block: a run of layers, with an identity shortcut when `skip`.
#[derive(Debug, Clone)]
pub struct Block {
    pub layers: Range<usize>,
    pub skip: bool,
    pub drop_path: f32,
}

/// Trainable parameters, running statistics and batch counters of one network.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    pub params: Vec<f32>,
    pub buffers: Vec<f32>,
    pub tracked: Vec<i64>,
}

/// How a forward pass runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Running statistics, no dropout: inference and evaluation.
    Eval,
    /// Batch statistics (running ones updated with `bn_momentum`, PyTorch's convention:
    /// `r ← (1 − m)·r + m·batch`, so Keras' 0.99 is 0.01 here); dropout and drop-path when
    /// `stochastic`.
    Train { bn_momentum: f32, stochastic: bool },
}

#[derive(Debug, Clone)]
pub struct Network {
    pub config: ArchConfig,
    pub layout: Layout,
    /// Stem first, then every block's layers, then the head convolution.
    pub layers: Vec<Layer>,
    pub blocks: Vec<Block>,
    pub features: usize,
    pub classes: usize,
    pub fc_weight: Range<usize>,
    pub fc_bias: Range<usize>,
}

fn conv_unit(
    layout: &mut Layout,
    prefix: &str,
    conv_name: &str,
    bn_name: &str,
    (conv, kernel, stride, cin, cout): (ConvKind, usize, usize, usize, usize),
    act: Act,
) -> Layer {
    let (shape, kind) = match conv {
        ConvKind::Dense => ([cout, cin, kernel, kernel], ParamKind::ConvWeight),
        ConvKind::Depthwise => ([cout, 1, kernel, kernel], ParamKind::DepthwiseWeight),
    };
    let weight = layout.param(format!("{prefix}{conv_name}.weight"), &shape, kind);
    let bn = layout.batch_norm(&format!("{prefix}{bn_name}"), cout);
    Layer::Conv(ConvUnit {
        conv,
        kernel,
        stride,
        cin,
        cout,
        weight,
        bn,
        act,
    })
}

fn se_unit(layout: &mut Layout, prefix: &str, c: usize, cr: usize, act: Act) -> Layer {
    let w1 = layout.param(
        format!("{prefix}se.conv_reduce.weight"),
        &[cr, c, 1, 1],
        ParamKind::ConvWeight,
    );
    let b1 = layout.param(
        format!("{prefix}se.conv_reduce.bias"),
        &[cr],
        ParamKind::ConvBias,
    );
    let w2 = layout.param(
        format!("{prefix}se.conv_expand.weight"),
        &[c, cr, 1, 1],
        ParamKind::ConvWeight,
    );
    let b2 = layout.param(
        format!("{prefix}se.conv_expand.bias"),
        &[c],
        ParamKind::ConvBias,
    );
    Layer::Se(SeUnit {
        c,
        cr,
        act,
        w1,
        b1,
        w2,
        b2,
    })
}

impl Network {
    pub fn new(config: ArchConfig) -> Network {
        use ConvKind::{Dense, Depthwise};
        let mut layout = Layout::default();
        let mut layers = Vec::new();
        let stem = config.stem_chs();
        layers.push(conv_unit(
            &mut layout,
            "",
            "conv_stem",
            "bn1",
            (Dense, 3, 2, 3, stem),
            config.act,
        ));
        let mut blocks = Vec::new();
        let mut last = stem;
        for (s, stage) in config.blocks().iter().enumerate() {
            for (i, b) in stage.iter().enumerate() {
                let p = format!("blocks.{s}.{i}.");
                let start = layers.len();
                let (k, st, cin, mid, cout, act) =
                    (b.kernel, b.stride, b.in_chs, b.mid_chs, b.out_chs, b.act);
                // Each kind's layers in timm's order: (conv, bn, kind, kernel, stride, in, out,
                // activation), with `None` where the squeeze-excitation goes.
                type Spec<'a> =
                    Option<(&'a str, &'a str, ConvKind, usize, usize, usize, usize, Act)>;
                let none = Act::None;
                let specs: Vec<Spec> = match b.kind {
                    BlockKind::ConvBnAct => {
                        vec![Some(("conv", "bn1", Dense, k, st, cin, cout, act))]
                    }
                    BlockKind::EdgeResidual => vec![
                        Some(("conv_exp", "bn1", Dense, k, st, cin, mid, act)),
                        None,
                        Some(("conv_pwl", "bn2", Dense, 1, 1, mid, cout, none)),
                    ],
                    BlockKind::DepthwiseSeparable => vec![
                        Some(("conv_dw", "bn1", Depthwise, k, st, cin, cin, act)),
                        None,
                        Some(("conv_pw", "bn2", Dense, 1, 1, cin, cout, none)),
                    ],
                    BlockKind::InvertedResidual => vec![
                        Some(("conv_pw", "bn1", Dense, 1, 1, cin, mid, act)),
                        Some(("conv_dw", "bn2", Depthwise, k, st, mid, mid, act)),
                        None,
                        Some(("conv_pwl", "bn3", Dense, 1, 1, mid, cout, none)),
                    ],
                };
                for spec in specs {
                    match spec {
                        Some((conv, bn, kind, k, s, i, o, a)) => {
                            layers.push(conv_unit(&mut layout, &p, conv, bn, (kind, k, s, i, o), a))
                        }
                        None => {
                            if let Some(cr) = b.se_chs {
                                layers.push(se_unit(&mut layout, &p, mid, cr, act));
                            }
                        }
                    }
                }
                blocks.push(Block {
                    layers: start..layers.len(),
                    skip: b.skip,
                    drop_path: b.drop_path,
                });
                last = cout;
            }
        }
        let features = config.head_chs();
        layers.push(conv_unit(
            &mut layout,
            "",
            "conv_head",
            "bn2",
            (Dense, 1, 1, last, features),
            config.act,
        ));
        let classes = config.num_classes;
        let fc_weight = layout.param(
            "classifier.weight".into(),
            &[classes, features],
            ParamKind::DenseWeight,
        );
        let fc_bias = layout.param("classifier.bias".into(), &[classes], ParamKind::DenseBias);
        Network {
            config,
            layout,
            layers,
            blocks,
            features,
            classes,
            fc_weight,
            fc_bias,
        }
    }

    /// Output shape of every layer for an input of `n` images of `h`×`w` (index 0: the input).
    pub fn shapes(&self, n: usize, h: usize, w: usize) -> Vec<Nhwc> {
        let mut shapes = vec![Nhwc::new(n, h, w, 3)];
        for layer in &self.layers {
            let x = *shapes.last().expect("starts non-empty");
            shapes.push(match layer {
                Layer::Conv(u) => match u.conv {
                    ConvKind::Dense => conv::ConvGeom::new(x, u.kernel, u.stride, u.cout).output(),
                    ConvKind::Depthwise => depthwise::DwGeom::new(x, u.kernel, u.stride).output(),
                },
                Layer::Se(_) => x,
            });
        }
        shapes
    }

    /// Multiply-adds of one forward pass for one image of `h`×`w`.
    pub fn macs(&self, h: usize, w: usize) -> usize {
        let shapes = self.shapes(1, h, w);
        let mut total = self.features * self.classes;
        for (layer, x) in self.layers.iter().zip(&shapes) {
            total += match layer {
                Layer::Conv(u) => match u.conv {
                    ConvKind::Dense => conv::ConvGeom::new(*x, u.kernel, u.stride, u.cout).macs(),
                    ConvKind::Depthwise => depthwise::DwGeom::new(*x, u.kernel, u.stride).macs(),
                },
                Layer::Se(s) => 2 * s.c * s.cr + x.len(),
            };
        }
        total
    }

    /// Plans every buffer a training step (forward and backward) at this size needs.
    pub fn workspace(&self, n: usize, h: usize, w: usize) -> Workspace {
        Workspace::new(self, n, h, w, true)
    }

    /// Plans the buffers of eval-mode forward passes only: about half a training workspace.
    pub fn inference_workspace(&self, n: usize, h: usize, w: usize) -> Workspace {
        Workspace::new(self, n, h, w, false)
    }

    /// Prepares `weights` for eval-mode passes on `ws`: every convolution's and squeeze-
    /// excitation's weights in the layout its kernel reads fastest and every batch norm folded,
    /// once instead of in each pass, and each worker of the current pool's Winograd scratch
    /// grown to what these passes need (they then allocate nothing). Later eval-mode passes on
    /// `ws` use them, so call it again after the weights change (a training-mode pass on `ws`
    /// drops them); passes with other weights are refused.
    pub fn freeze(&self, weights: &Weights, ws: &mut Workspace) {
        self.freeze_in(weights, ws, Precision::F32)
    }

    /// [`Network::freeze`] for passes in `precision`: with [`Precision::Bf16`], the blocks'
    /// expansions' weights packed for bf16 products (`runs_bf16`). Panics where the CPU lacks
    /// it ([`Precision::available`]).
    pub fn freeze_in(&self, weights: &Weights, ws: &mut Workspace, precision: Precision) {
        assert!(
            precision.available(),
            "{} inference needs a CPU with AVX512_BF16",
            precision.name()
        );
        // Each worker's scratch grown to what these passes need (they then allocate nothing).
        let (mut winograd_scratch, mut projected_row, mut bf16_rows) = (0, 0, 0);
        for (i, layer) in self.layers.iter().enumerate() {
            let Layer::Conv(u) = layer else { continue };
            if !matches!(u.conv, ConvKind::Dense) {
                continue;
            }
            let g = conv::ConvGeom::new(ws.shapes[i], u.kernel, u.stride, u.cout);
            let projected = self.projection_after(i).map(|p| p.cout);
            if winograd::applies(&g) {
                winograd_scratch = winograd_scratch.max(winograd::scratch_len(&g, projected));
            }
            if projected.is_some() {
                projected_row = projected_row.max(g.out_w * u.cout);
            }
            if self.runs_bf16(i, &g, precision) && g.is_pointwise() {
                bf16_rows = bf16_rows.max(pointwise::bf16_rows_len(g.input.c));
            }
        }
        rayon::broadcast(|_| {
            winograd::reserve(winograd_scratch);
            pointwise::reserve(projected_row, bf16_rows);
        });
        let p = &weights.params;
        let layers = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, layer)| {
                let u = match layer {
                    Layer::Conv(u) => u,
                    Layer::Se(s) => {
                        let g = s.geom(ws.shapes[i]);
                        let (w1, w2) = (&p[s.w1.clone()], &p[s.w2.clone()]);
                        return match se::prepare(&g, w1, w2) {
                            Some((w1, w2)) => FrozenLayer::Se { w1, w2 },
                            None => FrozenLayer::Plain,
                        };
                    }
                };
                let x_shape = ws.shapes[i];
                let torch = &p[u.weight.clone()];
                let g = conv::ConvGeom::new(x_shape, u.kernel, u.stride, u.cout);
                let weight = match u.conv {
                    ConvKind::Dense if self.runs_bf16(i, &g, precision) => {
                        Prepared::Bf16(conv::prepare_bf16(&g, torch))
                    }
                    ConvKind::Dense => Prepared::F32(conv::prepare(&g, torch)),
                    ConvKind::Depthwise => {
                        let g = depthwise::DwGeom::new(x_shape, u.kernel, u.stride);
                        let mut packed = vec![0f32; g.weight_len()];
                        depthwise::pack_weight(&g, torch, &mut packed);
                        Prepared::F32(packed)
                    }
                };
                let b = &weights.buffers;
                let folded = norm::Folded::from_running(
                    &p[u.bn.gamma.clone()],
                    &p[u.bn.beta.clone()],
                    &b[u.bn.mean.clone()],
                    &b[u.bn.var.clone()],
                    self.config.bn_eps,
                    u.act,
                );
                FrozenLayer::Conv { weight, folded }
            })
            .collect();
        // The classifier in the pointwise kernel's panels, its bias as the epilogue's shift.
        let classifier = pointwise::available().then(|| {
            let f = ws.shapes.last().expect("has layers").c;
            let bias = p[self.fc_bias.clone()].to_vec();
            let epilogue = norm::Folded {
                scale: vec![1.0; bias.len()],
                shift: bias,
                act: Act::None,
            };
            (
                pointwise::pack(f, self.classes, &p[self.fc_weight.clone()]),
                epilogue,
            )
        });
        ws.frozen = Some(std::sync::Arc::new(Frozen {
            params: p.as_ptr() as usize,
            layers,
            classifier,
        }));
    }

    /// Whether layer `i` (on `g`) runs in bf16 in `precision`: with [`Precision::Bf16`], the
    /// dense convolutions followed by an activation (blocks' expansions, and the 3×3 ones of
    /// fused blocks) where [`conv::runs_bf16`]. The projections (no activation, added to the
    /// residual stream) and the head stay f32: in bf16 too, the real Lite0 weights' logits on
    /// the test photos moved by up to 1.7 % of their largest (0.3 % without them), past the 1 %
    /// guard.
    fn runs_bf16(&self, i: usize, g: &conv::ConvGeom, precision: Precision) -> bool {
        let Layer::Conv(u) = &self.layers[i] else {
            return false;
        };
        precision == Precision::Bf16
            && matches!(u.conv, ConvKind::Dense)
            && u.act != Act::None
            && i + 1 != self.layers.len()
            && conv::runs_bf16(g)
    }

    /// Whether depthwise layer `i` sums its output rows for the squeeze-excitation after it
    /// (which then pools those sums instead of reading the whole map again): in eval mode, where
    /// the depthwise output is the excitation's input (batch norm and activation folded in), on
    /// inference workspaces.
    fn pools_in_depthwise(&self, i: usize, mode: Mode, ws: &Workspace) -> bool {
        let depthwise =
            matches!(&self.layers[i], Layer::Conv(u) if matches!(u.conv, ConvKind::Depthwise));
        let x = ws.shapes[i + 1];
        matches!(mode, Mode::Eval)
            && depthwise
            && matches!(self.layers.get(i + 1), Some(Layer::Se(_)))
            && ws.row_sums.len() >= x.n * x.h * x.c
    }

    /// "Precise BN": in each of `weight_sets`, every batch norm's running mean and variance
    /// replaced by the plain average of their values over `batches` (each `[n, h, w, 3]`, the
    /// workspace's size), computed in training mode without dropout or drop-path; the parameters
    /// are untouched. Each batch is read once and passed through every set. Running statistics
    /// that follow the last few batches are noisy where maps are small; this averages as many as
    /// the caller gives. Returns how many batches were used.
    pub fn recompute_bn_stats<B: AsRef<[f32]>>(
        &self,
        weight_sets: &mut [&mut Weights],
        ws: &mut Workspace,
        batches: impl IntoIterator<Item = B>,
    ) -> usize {
        let mut rng = Rng::new(0);
        let mut used = 0;
        for x in batches {
            // Momentum 1/(t + 1): the first batch replaces, each later one joins the average.
            let mode = Mode::Train {
                bn_momentum: 1.0 / (used + 1) as f32,
                stochastic: false,
            };
            for weights in weight_sets.iter_mut() {
                self.forward(weights, ws, x.as_ref(), mode, &mut rng);
            }
            used += 1;
        }
        used
    }

    /// The forward pass over NHWC input `[n, h, w, 3]` (the workspace's size); returns logits.
    /// In training mode, running statistics in `weights` are updated.
    pub fn forward<'w>(
        &self,
        weights: &mut Weights,
        ws: &'w mut Workspace,
        input: &[f32],
        mode: Mode,
        rng: &mut Rng,
    ) -> &'w [f32] {
        effnet_engine::on_pool_awake(move || self.forward_on_pool(weights, ws, input, mode, rng))
    }

    fn forward_on_pool<'w>(
        &self,
        weights: &mut Weights,
        ws: &'w mut Workspace,
        input: &[f32],
        mode: Mode,
        rng: &mut Rng,
    ) -> &'w [f32] {
        assert_eq!(
            input.len(),
            ws.shapes[0].len(),
            "input does not match the workspace's shape"
        );
        assert!(
            ws.training || mode == Mode::Eval,
            "a training-mode pass needs a workspace from Network::workspace, not inference_workspace"
        );
        match (mode, &ws.frozen) {
            (Mode::Train { .. }, Some(_)) => ws.frozen = None,
            (Mode::Eval, Some(f)) => assert_eq!(
                f.params,
                weights.params.as_ptr() as usize,
                "the workspace was frozen with other weights (Network::freeze)"
            ),
            _ => {}
        }
        let first = ws.slots[0].1;
        ws.acts[first][..input.len()].copy_from_slice(input);
        let stochastic = matches!(
            mode,
            Mode::Train {
                stochastic: true,
                ..
            }
        );
        ws.mode = Some(mode);
        let mut projected = None;
        for (i, layer) in self.layers.iter().enumerate() {
            // The projection ran with the 3×3 convolution before it (and added the shortcut).
            if projected.take() == Some(i) {
                continue;
            }
            if self.runs_projected(i, mode, ws) {
                self.projected_forward(i, ws);
                projected = Some(i + 1);
                continue;
            }
            let block_end = self.blocks.iter().position(|b| b.layers.end == i + 1);
            // In eval mode the shortcut of a block that ends in a dense convolution is added by
            // that convolution, after its epilogue; training adds it after batch norm, with the
            // drop-path mask.
            let fused_skip = match (block_end, layer) {
                (Some(b), Layer::Conv(u))
                    if mode == Mode::Eval
                        && self.blocks[b].skip
                        && matches!(u.conv, ConvKind::Dense) =>
                {
                    Some(ws.slots[self.blocks[b].layers.start].1)
                }
                _ => None,
            };
            self.layer_forward(i, layer, weights, ws, mode, fused_skip);
            if let (Some(b), None) = (block_end, fused_skip) {
                self.residual_forward(b, ws, stochastic, rng);
            }
        }
        // Head: pool, dropout, classifier.
        let head = *ws.shapes.last().expect("has layers");
        let (n, hw, f) = (head.n, head.h * head.w, head.c);
        let out = ws.slots[self.layers.len()].1;
        pool::global_avg_forward(&ws.acts[out], n, hw, f, &mut ws.pooled);
        let rate = self.config.dropout;
        if stochastic && rate > 0.0 {
            regularize::dropout_mask(rng, rate, &mut ws.dropout_mask);
        } else {
            ws.dropout_mask.fill(1.0);
        }
        regularize::apply_mask(&ws.pooled, &ws.dropout_mask, &mut ws.dropped);
        let p = &weights.params;
        let frozen = ws.frozen.as_ref().filter(|_| mode == Mode::Eval);
        match frozen.and_then(|f| f.classifier.as_ref()) {
            Some((w, bias)) => {
                let (x, y) = (&ws.dropped, &mut ws.logits);
                pointwise::forward(x, n, f, self.classes, w, y, Some(bias), None)
            }
            None => linear::forward(
                &ws.dropped,
                n,
                f,
                self.classes,
                &p[self.fc_weight.clone()],
                &p[self.fc_bias.clone()],
                &mut ws.logits,
            ),
        }
        // Every worker's kept buffers grown to the largest need any met, so that later passes
        // allocate nothing wherever their tasks land.
        effnet_engine::spread_worker_buffers();
        &ws.logits
    }

    /// The 1×1 convolution after layer `i` that [`conv::forward_projected`] can run with it:
    /// layer `i` a dense k×k convolution, the next a dense 1×1 one that ends the same block (a
    /// fused-MBConv block's expansion and projection).
    fn projection_after(&self, i: usize) -> Option<&ConvUnit> {
        let (Some(Layer::Conv(a)), Some(Layer::Conv(b))) =
            (self.layers.get(i), self.layers.get(i + 1))
        else {
            return None;
        };
        let dense = |u: &ConvUnit| matches!(u.conv, ConvKind::Dense);
        let pair = dense(a) && a.kernel > 1 && dense(b) && b.kernel == 1 && b.stride == 1;
        let ends = self
            .blocks
            .iter()
            .any(|blk| blk.layers.contains(&i) && blk.layers.end == i + 2);
        (pair && ends).then_some(b)
    }

    /// Whether this pass runs layers `i` and `i + 1` as one ([`Self::projected_forward`]): eval
    /// mode with frozen weights, where [`conv::projects`], and the pair's output is not its
    /// input's buffer (the k×k convolution reads its neighbours' pixels after a piece's output
    /// is written).
    fn runs_projected(&self, i: usize, mode: Mode, ws: &Workspace) -> bool {
        mode == Mode::Eval
            && self.projection_after(i).is_some()
            && matches!(
                ws.frozen.as_ref().map(|f| (&f.layers[i], &f.layers[i + 1])),
                Some((FrozenLayer::Conv { .. }, FrozenLayer::Conv { .. }))
            )
            && pointwise::available()
            && {
                let Layer::Conv(u) = &self.layers[i] else {
                    unreachable!("projection_after checked")
                };
                conv::projects(&conv::ConvGeom::new(
                    ws.shapes[i],
                    u.kernel,
                    u.stride,
                    u.cout,
                ))
            }
            && ws.slots[i + 2].1 != ws.slots[i].1
    }

    /// Layers `i` (k×k) and `i + 1` (1×1, the block's last) in one pass of
    /// [`conv::forward_projected`], with the block's shortcut; the k×k output is not stored.
    fn projected_forward(&self, i: usize, ws: &mut Workspace) {
        let (Layer::Conv(u), Some(p)) = (&self.layers[i], self.projection_after(i)) else {
            unreachable!("runs_projected checked")
        };
        let frozen = ws.frozen.clone().expect("runs_projected checked");
        let (
            FrozenLayer::Conv {
                weight: w1,
                folded: f1,
            },
            FrozenLayer::Conv {
                weight: w2,
                folded: f2,
            },
        ) = (&frozen.layers[i], &frozen.layers[i + 1])
        else {
            unreachable!("runs_projected checked")
        };
        let g = conv::ConvGeom::new(ws.shapes[i], u.kernel, u.stride, u.cout);
        let y_len = ws.shapes[i + 2].len();
        let out_slot = ws.slots[i + 2].1;
        let mut y = std::mem::take(&mut ws.acts[out_slot]);
        let block = self
            .blocks
            .iter()
            .find(|b| b.layers.end == i + 2)
            .expect("projection_after checked");
        let skip = block
            .skip
            .then(|| &ws.acts[ws.slots[block.layers.start].1][..y_len]);
        let x = &ws.acts[ws.slots[i].1][..g.input.len()];
        let projection = pointwise::Projection {
            w: w2.panels(),
            cout: p.cout,
            epilogue: Some(f2),
            skip,
        };
        let t = Instant::now();
        conv::forward_projected(&g, x, w1.panels(), Some(f1), &projection, &mut y[..y_len]);
        let projected = ws.shapes[i + 1].rows() * p.cout * u.cout;
        let (op, macs) = match conv::runs_winograd(&g) {
            true => ("conv 3x3 winograd + 1x1", winograd::product_macs(&g)),
            false => ("conv kxk + 1x1", g.macs()),
        };
        Profile::add(&mut ws.profile, op, t, macs + projected);
        ws.acts[out_slot] = y;
    }

    fn layer_forward(
        &self,
        i: usize,
        layer: &Layer,
        weights: &mut Weights,
        ws: &mut Workspace,
        mode: Mode,
        skip_slot: Option<usize>,
    ) {
        let (x_shape, y_len) = (ws.shapes[i], ws.shapes[i + 1].len());
        let (conv_slot, out_slot) = ws.slots[i + 1];
        // The layer's output buffers leave the workspace for the call (moves, no copies), so the
        // input and the residual can be read beside them wherever their slots are.
        let mut y_buf = std::mem::take(&mut ws.acts[out_slot]);
        let mut conv_buf = match conv_slot == out_slot {
            true => Vec::new(),
            false => std::mem::take(&mut ws.acts[conv_slot]),
        };
        let x = &ws.acts[ws.slots[i].1][..x_shape.len()];
        let y = &mut y_buf[..y_len];
        let p = &weights.params;
        match layer {
            Layer::Conv(u) => {
                let conv_out = &mut conv_buf[..];
                let (gamma, beta) = (&p[u.bn.gamma.clone()], &p[u.bn.beta.clone()]);
                let eps = self.config.bn_eps;
                // Eval mode folds batch norm and activation into the convolution's output
                // (written straight to the layer output); training keeps the raw convolution
                // output for the backward pass and normalizes with batch statistics after.
                // Weights prepared once by `Network::freeze` (eval mode only).
                let frozen = match (mode, ws.frozen.as_ref().map(|f| &f.layers[i])) {
                    (Mode::Eval, Some(FrozenLayer::Conv { weight, folded })) => {
                        Some((weight, folded))
                    }
                    _ => None,
                };
                let folded_now;
                let folded = match (mode, frozen) {
                    (Mode::Train { .. }, _) => None,
                    (Mode::Eval, Some((_, f))) => Some(f),
                    (Mode::Eval, None) => {
                        let b = &weights.buffers;
                        let (mean, var) = (&b[u.bn.mean.clone()], &b[u.bn.var.clone()]);
                        folded_now = norm::Folded::from_running(gamma, beta, mean, var, eps, u.act);
                        Some(&folded_now)
                    }
                };
                let target: &mut [f32] = match folded {
                    Some(_) => y,
                    None => conv_out,
                };
                let t = Instant::now();
                match u.conv {
                    ConvKind::Dense => {
                        let g = conv::ConvGeom::new(x_shape, u.kernel, u.stride, u.cout);
                        let w = match frozen {
                            Some((w, _)) => w.conv(),
                            None if g.is_pointwise() => conv::Weight::Plain(&p[u.weight.clone()]),
                            None => {
                                conv::pack_weight(&g, &p[u.weight.clone()], &mut ws.packed);
                                conv::Weight::Plain(&ws.packed[..g.weight_len()])
                            }
                        };
                        let skip = skip_slot.map(|s| &ws.acts[s][..y_len]);
                        conv::forward(&g, x, w, target, &mut ws.col, folded, skip);
                        // Winograd's layers count the products they run (a quarter of the
                        // direct sum's), so that their rate compares with the ceiling.
                        let (op, macs) = if g.is_pointwise() {
                            ("conv 1x1", g.macs())
                        } else if conv::runs_winograd(&g) {
                            ("conv 3x3 winograd", winograd::product_macs(&g))
                        } else {
                            ("conv kxk", g.macs())
                        };
                        Profile::add(&mut ws.profile, op, t, macs);
                    }
                    ConvKind::Depthwise => {
                        let g = depthwise::DwGeom::new(x_shape, u.kernel, u.stride);
                        let w = match frozen {
                            Some((Prepared::F32(w), _)) => &w[..],
                            Some((Prepared::Bf16(_), _)) => unreachable!("depthwise runs in f32"),
                            None => {
                                depthwise::pack_weight(&g, &p[u.weight.clone()], &mut ws.packed);
                                &ws.packed[..g.weight_len()]
                            }
                        };
                        if self.pools_in_depthwise(i, mode, ws) {
                            let sums = &mut ws.row_sums;
                            depthwise::forward_with_row_sums(&g, x, w, target, folded, sums);
                        } else {
                            depthwise::forward(&g, x, w, target, folded);
                        }
                        Profile::add(&mut ws.profile, "depthwise", t, g.macs());
                    }
                }
                if let Mode::Train { bn_momentum, .. } = mode {
                    let t = Instant::now();
                    let s = &mut ws.bn_saved[i];
                    let c = u.cout;
                    let (mean, rest) = s.split_at_mut(c);
                    let (var, invstd) = rest.split_at_mut(c);
                    let sync = ws.replica_sum.as_ref().map(|r| &*r.0);
                    let rows = norm::train_forward(
                        conv_out, c, gamma, beta, eps, u.act, mean, var, invstd, y, sync,
                    );
                    let (rm, rv) = (u.bn.mean.clone(), u.bn.var.clone());
                    let (bm, bv) = weights.buffers.split_at_mut(rv.start);
                    norm::update_running_stats(
                        &mut bm[rm],
                        &mut bv[..rv.len()],
                        mean,
                        var,
                        rows,
                        bn_momentum,
                    );
                    weights.tracked[u.bn.tracked] += 1;
                    Profile::add(&mut ws.profile, "bn+act", t, conv_out.len());
                }
            }
            Layer::Se(s) => {
                let g = s.geom(x_shape);
                let weights = match (mode, ws.frozen.as_ref().map(|f| &f.layers[i])) {
                    (Mode::Eval, Some(FrozenLayer::Se { w1, w2 })) => {
                        se::SeWeights::Prepared { w1, w2 }
                    }
                    _ => se::SeWeights::Plain {
                        w1: &p[s.w1.clone()],
                        w2: &p[s.w2.clone()],
                    },
                };
                let pooled_in_depthwise = i > 0 && self.pools_in_depthwise(i - 1, mode, ws);
                let saved = ws.se_saved[i].as_mut().expect("planned for SE layers");
                let t = Instant::now();
                match pooled_in_depthwise {
                    true => se::pool_row_sums(&g, &ws.row_sums, x_shape.h, saved),
                    false => se::pool(&g, x, saved),
                }
                se::excite(&g, weights, &p[s.b1.clone()], &p[s.b2.clone()], saved);
                se::scale(&g, x, saved.gate(), y);
                Profile::add(&mut ws.profile, "squeeze-excite", t, x.len());
            }
        }
        ws.acts[out_slot] = y_buf;
        if conv_slot != out_slot {
            ws.acts[conv_slot] = conv_buf;
        }
    }

    /// Adds a block's input to its output (the branch scaled by the drop-path mask).
    fn residual_forward(&self, b: usize, ws: &mut Workspace, stochastic: bool, rng: &mut Rng) {
        let block = &self.blocks[b];
        if !block.skip {
            return;
        }
        let mask = &mut ws.drop_masks[b];
        if stochastic && block.drop_path > 0.0 {
            regularize::drop_path_mask(rng, block.drop_path, mask);
        } else {
            mask.fill(1.0);
        }
        let in_slot = ws.slots[block.layers.start].1;
        let out_slot = ws.slots[block.layers.end].1;
        let len = ws.shapes[block.layers.end].len();
        let mut y_buf = std::mem::take(&mut ws.acts[out_slot]);
        let (x, y) = (&ws.acts[in_slot][..len], &mut y_buf[..len]);
        if mask.iter().all(|&m| m == 1.0) {
            conv::add_residual(y, x);
        } else {
            regularize::drop_path_residual(y, x, mask);
        }
        ws.acts[out_slot] = y_buf;
    }

    /// The backward pass after a training-mode [`Network::forward`] on the same workspace:
    /// adds every parameter's gradient of the loss into `grads` (the caller zeroes it).
    pub fn backward(
        &self,
        weights: &Weights,
        ws: &mut Workspace,
        dlogits: &[f32],
        grads: &mut [f32],
    ) {
        effnet_engine::on_pool_awake(|| {
            self.backward_on_pool(weights, ws, dlogits, grads);
            // As after the forward pass.
            effnet_engine::spread_worker_buffers();
        })
    }

    fn backward_on_pool(
        &self,
        weights: &Weights,
        ws: &mut Workspace,
        dlogits: &[f32],
        grads: &mut [f32],
    ) {
        assert!(
            matches!(ws.mode, Some(Mode::Train { .. })),
            "backward needs a training-mode forward pass on this workspace"
        );
        let p = &weights.params;
        let head = *ws.shapes.last().expect("has layers");
        let (n, hw, f) = (head.n, head.h * head.w, head.c);
        let mut g = std::mem::take(&mut ws.grad_a);
        let mut g_next = std::mem::take(&mut ws.grad_b);
        let mut g_skip = std::mem::take(&mut ws.grad_skip);
        {
            let (dw, rest) = grads.split_at_mut(self.fc_bias.start);
            // The head's two gradients sit in buffers the layers use only later (each holds
            // the largest activation, at least n·f).
            let d_dropped = &mut g_next[..n * f];
            linear::backward(
                &ws.dropped,
                n,
                f,
                self.classes,
                &p[self.fc_weight.clone()],
                dlogits,
                d_dropped,
                &mut dw[self.fc_weight.clone()],
                &mut rest[..self.classes],
            );
            let d_pooled = &mut g_skip[..n * f];
            regularize::apply_mask(d_dropped, &ws.dropout_mask, d_pooled);
            pool::global_avg_backward(d_pooled, n, hw, f, &mut g);
        }
        for i in (0..self.layers.len()).rev() {
            let y_len = ws.shapes[i + 1].len();
            let x_len = ws.shapes[i].len();
            let mut dy_in_skip = false;
            if let Some(b) = self
                .blocks
                .iter()
                .position(|b| b.skip && b.layers.end == i + 1)
            {
                // The block's output gradient moves to g_skip (a swap, not a copy), where the
                // shortcut takes it at the block's start; the branch reads it there too, or a
                // copy scaled by the drop-path mask where some image's scale is not 1.
                std::mem::swap(&mut g, &mut g_skip);
                let mask = &ws.drop_masks[b];
                if mask.iter().all(|&m| m == 1.0) {
                    dy_in_skip = true;
                } else {
                    regularize::drop_path_backward(&g_skip[..y_len], mask, &mut g[..y_len]);
                }
            }
            let want_dx = i > 0;
            let dy = match dy_in_skip {
                true => &g_skip[..y_len],
                false => &g[..y_len],
            };
            self.layer_backward(i, p, ws, dy, want_dx.then_some(&mut g_next[..x_len]), grads);
            std::mem::swap(&mut g, &mut g_next);
            if let Some(_b) = self
                .blocks
                .iter()
                .position(|b| b.skip && b.layers.start == i)
            {
                conv::add_residual(&mut g[..x_len], &g_skip[..x_len]);
            }
        }
        ws.grad_a = g;
        ws.grad_b = g_next;
        ws.grad_skip = g_skip;
    }

    fn layer_backward(
        &self,
        i: usize,
        p: &[f32],
        ws: &mut Workspace,
        dy: &[f32],
        dx: Option<&mut [f32]>,
        grads: &mut [f32],
    ) {
        let x_shape = ws.shapes[i];
        let x = &ws.acts[ws.slots[i].1];
        match &self.layers[i] {
            Layer::Conv(u) => {
                let conv_out = &ws.acts[ws.slots[i + 1].0];
                let s = &ws.bn_saved[i];
                let c = u.cout;
                // Through batch norm and activation: dy becomes d(conv output), in d_conv.
                let d_conv = &mut ws.grad_conv[..dy.len()];
                let t = Instant::now();
                {
                    let (gamma, beta) = (&p[u.bn.gamma.clone()], &p[u.bn.beta.clone()]);
                    let (dg, db) = grads.split_at_mut(u.bn.beta.start);
                    norm::train_backward(
                        conv_out,
                        c,
                        gamma,
                        beta,
                        &s[..c],
                        &s[2 * c..3 * c],
                        u.act,
                        dy,
                        d_conv,
                        &mut dg[u.bn.gamma.clone()],
                        &mut db[..c],
                        ws.replica_sum.as_ref().map(|r| &*r.0),
                    );
                }
                Profile::add(&mut ws.profile, "bn+act backward", t, dy.len());
                let t = Instant::now();
                let dw_torch = &mut grads[u.weight.clone()];
                match u.conv {
                    ConvKind::Dense => {
                        let g = conv::ConvGeom::new(x_shape, u.kernel, u.stride, u.cout);
                        if g.is_pointwise() {
                            conv::backward(
                                &g,
                                x,
                                &p[u.weight.clone()],
                                d_conv,
                                dx,
                                dw_torch,
                                &mut [],
                                &mut [],
                            );
                        } else {
                            let wl = g.weight_len();
                            conv::pack_weight(&g, &p[u.weight.clone()], &mut ws.packed);
                            let dw = &mut ws.packed_grad[..wl];
                            dw.fill(0.0);
                            conv::backward(
                                &g,
                                x,
                                &ws.packed[..wl],
                                d_conv,
                                dx,
                                dw,
                                &mut ws.col,
                                &mut ws.dcol,
                            );
                            conv::unpack_weight_add(&g, dw, dw_torch);
                        }
                        let op = if g.is_pointwise() {
                            "conv 1x1 backward"
                        } else {
                            "conv kxk backward"
                        };
                        Profile::add(&mut ws.profile, op, t, 2 * g.macs());
                    }
                    ConvKind::Depthwise => {
                        let g = depthwise::DwGeom::new(x_shape, u.kernel, u.stride);
                        let wl = g.weight_len();
                        depthwise::pack_weight(&g, &p[u.weight.clone()], &mut ws.packed);
                        let dw = &mut ws.packed_grad[..wl];
                        dw.fill(0.0);
                        let dx = dx.expect("a depthwise layer is never first");
                        depthwise::backward(&g, x, &ws.packed[..wl], d_conv, dx, dw, &mut ws.col);
                        depthwise::unpack_weight_add(&g, dw, dw_torch);
                        Profile::add(&mut ws.profile, "depthwise backward", t, 2 * g.macs());
                    }
                }
            }
            Layer::Se(s) => {
                let g = s.geom(x_shape);
                let saved = ws.se_saved[i].as_ref().expect("planned for SE layers");
                let dx = dx.expect("an SE layer is never first");
                // The four SE tensors are consecutive: w1, b1, w2, b2.
                let (g_w1, rest) = grads[s.w1.start..s.b2.end].split_at_mut(s.w1.len());
                let (g_b1, rest) = rest.split_at_mut(s.b1.len());
                let (g_w2, g_b2) = rest.split_at_mut(s.w2.len());
                let t = Instant::now();
                se::backward(
                    &g,
                    x,
                    &p[s.w1.clone()],
                    &p[s.w2.clone()],
                    saved,
                    dy,
                    dx,
                    g_w1,
                    g_b1,
                    g_w2,
                    g_b2,
                );
                Profile::add(&mut ws.profile, "squeeze-excite backward", t, x.len());
            }
        }
    }
}

/// Time spent per kind of operation, summed over passes (set `Workspace::profile` to collect).
#[derive(Debug, Clone, Default)]
pub struct Profile {
    /// (operation, seconds, multiply-adds or elements)
    pub entries: Vec<(&'static str, f64, u64)>,
}

impl Profile {
    fn add(profile: &mut Option<Profile>, op: &'static str, since: Instant, work: usize) {
        if let Some(p) = profile {
            let secs = since.elapsed().as_secs_f64();
            match p.entries.iter_mut().find(|e| e.0 == op) {
                Some(e) => {
                    e.1 += secs;
                    e.2 += work as u64;
                }
                None => p.entries.push((op, secs, work as u64)),
            }
        }
    }
}

/// Weights that [`Network::freeze`] prepared, per layer.
#[derive(Debug)]
struct Frozen {
    /// The address of the parameters they came from: a pass with others is refused.
    params: usize,
    layers: Vec<FrozenLayer>,
    /// The classifier's weight packed for `pointwise::forward`, and its bias as an epilogue
    /// (`v·1 + b`: the same sum as adding it), where that kernel runs.
    classifier: Option<(Vec<f32>, norm::Folded)>,
}

/// A convolution's prepared weight.
#[derive(Debug)]
enum Prepared {
    /// `conv::prepare`'s layout, or depthwise's packed one.
    F32(Vec<f32>),
    /// `conv::prepare_bf16`'s (inference in bf16).
    Bf16(Vec<u32>),
}

impl Prepared {
    /// A dense convolution's weight as `conv::forward` takes it.
    fn conv(&self) -> conv::Weight<'_> {
        match self {
            Prepared::F32(w) => conv::Weight::Prepared(w),
            Prepared::Bf16(w) => conv::Weight::Bf16(w),
        }
    }

    /// A dense convolution's weight as the pointwise kernels take it.
    fn panels(&self) -> pointwise::Panels<'_> {
        match self {
            Prepared::F32(w) => pointwise::Panels::F32(w),
            Prepared::Bf16(w) => pointwise::Panels::Bf16(w),
        }
    }
}

#[derive(Debug)]
enum FrozenLayer {
    Conv {
        weight: Prepared,
        folded: norm::Folded,
    },
    /// `se::prepare`'s packed weights.
    Se { w1: Vec<f32>, w2: Vec<f32> },
    /// Nothing to prepare on this CPU: the pass reads the live weights.
    Plain,
}

/// Every buffer one forward and backward pass needs, planned once per (batch, resolution).
#[derive(Debug)]
pub struct Workspace {
    /// Shape of the input (index 0) and of every layer's output.
    shapes: Vec<Nhwc>,
    /// Activation buffers; `slots[i]` = (conv output, layer output) of layer `i − 1`, and
    /// `slots[0].1` is the input.
    acts: Vec<Vec<f32>>,
    slots: Vec<(usize, usize)>,
    bn_saved: Vec<Vec<f32>>,
    se_saved: Vec<Option<SeSaved>>,
    /// A depthwise layer's output rows summed channel by channel, for the squeeze-excitation
    /// after it to pool (inference workspaces; empty in training ones, whose eval passes pool
    /// the usual way): see [`Network::pools_in_depthwise`].
    row_sums: Vec<f32>,
    drop_masks: Vec<Vec<f32>>,
    pooled: Vec<f32>,
    dropout_mask: Vec<f32>,
    dropped: Vec<f32>,
    logits: Vec<f32>,
    packed: Vec<f32>,
    packed_grad: Vec<f32>,
    col: Vec<f32>,
    dcol: Vec<f32>,
    grad_a: Vec<f32>,
    grad_b: Vec<f32>,
    grad_skip: Vec<f32>,
    grad_conv: Vec<f32>,
    mode: Option<Mode>,
    /// Eval-mode weights prepared by [`Network::freeze`] (shared between workspaces of other
    /// shapes: the layouts do not depend on batch or resolution).
    frozen: Option<std::sync::Arc<Frozen>>,
    /// Planned for training (forward in either mode, and backward) or for inference only.
    training: bool,
    pub profile: Option<Profile>,
    /// Set in a data-parallel run with synchronized batch norm: sums BN statistics over replicas.
    pub replica_sum: Option<CrossReplica>,
}

/// Activation buffers of an inference workspace, which keeps nothing for a backward pass: layer
/// outputs rotate through a few buffers of the largest layer's size, the most recently freed
/// first (still in cache) rather than a fresh buffer per layer, and a block's input stays put
/// until its residual is added — or, before a projection that may run with the layer before it
/// ([`Network::projection_after`]), until the block ends, so that pass never writes its input.
/// Returns the buffers and each layer's slots, as [`Workspace::slots`].
fn rotating_buffers(net: &Network, shapes: &[Nhwc]) -> (Vec<Vec<f32>>, Vec<(usize, usize)>) {
    let largest = shapes.iter().map(Nhwc::len).max().unwrap_or(0);
    let mut slots = vec![(0, 0)];
    let (mut count, mut free) = (1, Vec::<usize>::new());
    let mut kept = None;
    for i in 0..net.layers.len() {
        let input = slots[i].1;
        let out = free.pop().unwrap_or_else(|| {
            count += 1;
            count - 1
        });
        slots.push((out, out));
        let block = net.blocks.iter().find(|b| b.layers.contains(&i));
        let residual = block.filter(|b| b.skip).map(|b| slots[b.layers.start].1);
        let ends = block.is_some_and(|b| b.layers.end == i + 1);
        let mut release = |slot: usize| {
            if !free.contains(&slot) {
                free.push(slot);
            }
        };
        if let (true, Some(r)) = (ends, residual) {
            release(r);
        }
        if let (true, Some(k)) = (ends, kept) {
            release(k);
            kept = None;
        }
        if net.projection_after(i).is_some() && residual != Some(input) {
            kept = Some(input);
        } else if ends || residual != Some(input) {
            release(input);
        }
    }
    ((0..count).map(|_| vec![0f32; largest]).collect(), slots)
}

impl Workspace {
    fn new(net: &Network, n: usize, h: usize, w: usize, training: bool) -> Workspace {
        let shapes = net.shapes(n, h, w);
        // Buffers only the training forward and the backward pass use stay empty for inference:
        // the raw convolution outputs, batch statistics and gradient scratch.
        let train_len = |len: usize| if training { len } else { 0 };
        let mut acts = vec![vec![0f32; train_len(shapes[0].len())]];
        let mut slots = vec![(0, 0)];
        let (mut packed, mut col, mut max_act) = (0, 0, shapes[0].len());
        let mut bn_saved = Vec::new();
        let (mut se_saved, mut row_sums) = (Vec::new(), 0);
        for (i, layer) in net.layers.iter().enumerate() {
            let (x, y) = (shapes[i], shapes[i + 1]);
            max_act = max_act.max(y.len());
            match layer {
                Layer::Conv(u) => {
                    acts.push(vec![0f32; train_len(y.len())]);
                    acts.push(vec![0f32; train_len(y.len())]);
                    slots.push((acts.len() - 2, acts.len() - 1));
                    bn_saved.push(vec![0f32; train_len(3 * u.cout)]);
                    se_saved.push(None);
                    match u.conv {
                        ConvKind::Dense => {
                            let g = conv::ConvGeom::new(x, u.kernel, u.stride, u.cout);
                            packed = packed.max(g.weight_len());
                            col = col.max(g.col_len());
                        }
                        ConvKind::Depthwise => {
                            let g = depthwise::DwGeom::new(x, u.kernel, u.stride);
                            packed = packed.max(g.weight_len());
                            // The depthwise backward keeps one weight gradient per image in `col`.
                            col = col.max(train_len(n * g.weight_len()));
                        }
                    }
                }
                Layer::Se(s) => {
                    acts.push(vec![0f32; train_len(y.len())]);
                    slots.push((acts.len() - 1, acts.len() - 1));
                    bn_saved.push(Vec::new());
                    se_saved.push(Some(SeSaved::new(&s.geom(x))));
                    row_sums = row_sums.max(n * x.h * x.c);
                }
            }
        }
        let (acts, slots) = match training {
            true => (acts, slots),
            false => rotating_buffers(net, &shapes),
        };
        let f = net.features;
        Workspace {
            shapes,
            acts,
            slots,
            bn_saved,
            se_saved,
            row_sums: vec![0f32; if training { 0 } else { row_sums }],
            drop_masks: net.blocks.iter().map(|_| vec![1f32; n]).collect(),
            pooled: vec![0f32; n * f],
            dropout_mask: vec![1f32; n * f],
            dropped: vec![0f32; n * f],
            logits: vec![0f32; n * net.classes],
            packed: vec![0f32; packed],
            packed_grad: vec![0f32; train_len(packed)],
            col: vec![0f32; col],
            dcol: vec![0f32; train_len(col)],
            grad_a: vec![0f32; train_len(max_act)],
            grad_b: vec![0f32; train_len(max_act)],
            grad_skip: vec![0f32; train_len(max_act)],
            grad_conv: vec![0f32; train_len(max_act)],
            mode: None,
            frozen: None,
            training,
            profile: None,
            replica_sum: None,
        }
    }

    /// Uses the weights `other` was frozen with ([`Network::freeze`]), without a copy of its
    /// own: for workspaces of other batch sizes or resolutions of the same network.
    pub fn share_frozen(&mut self, other: &Workspace) {
        self.frozen = other.frozen.clone();
    }

    /// The (batch, height, width) this workspace was planned for.
    pub fn input_shape(&self) -> Nhwc {
        self.shapes[0]
    }

    /// The output of layer `i` after the last forward pass (after its block's residual add when
    /// it ends one): what another device's pass is compared with.
    pub fn layer_output(&self, i: usize) -> &[f32] {
        assert!(
            self.training,
            "an inference workspace reuses its buffers: plan with Network::workspace to keep every layer's output"
        );
        &self.acts[self.slots[i + 1].1]
    }

    /// Bytes held by activation and scratch buffers.
    pub fn bytes(&self) -> usize {
        let acts: usize = self.acts.iter().map(Vec::len).sum();
        let scratch =
            self.col.len() + self.dcol.len() + 4 * self.grad_a.len() + 2 * self.packed.len();
        4 * (acts + scratch + self.row_sums.len())
    }
}
