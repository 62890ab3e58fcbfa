//! The EfficientNet family as data: block tables in timm's block-string notation, with the width
//! and depth scaling rules of timm's `tf_*` models (and of the TF reference they were ported from).

use effnet_engine::Act;

/// The four block kinds of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// `cn`: k×k conv + BN + act (Fused-MBConv with expansion 1).
    ConvBnAct,
    /// `er`: k×k expansion conv + BN + act, [SE], 1×1 projection + BN (Fused-MBConv).
    EdgeResidual,
    /// `ds`: depthwise conv + BN + act, [SE], 1×1 projection + BN (V1's first stage).
    DepthwiseSeparable,
    /// `ir`: 1×1 expansion + BN + act, depthwise + BN + act, [SE], 1×1 projection + BN (MBConv).
    InvertedResidual,
}

/// One stage line of an architecture table, e.g. `ir_r4_k3_s2_e4_c128_se0.25`.
#[derive(Debug, Clone, PartialEq)]
pub struct StageSpec {
    pub kind: BlockKind,
    pub repeats: usize,
    pub kernel: usize,
    pub stride: usize,
    pub expansion: f64,
    /// Output channels before width scaling.
    pub channels: usize,
    pub se_ratio: Option<f64>,
    /// `Some(true)` for `_skip`, `Some(false)` for `_noskip`, `None` for the kind's default.
    pub skip: Option<bool>,
    /// Activation override (`_nr6`, `_nre`, `_nsw`).
    pub act: Option<Act>,
}

impl StageSpec {
    /// Parses timm's block-string notation (the subset the family uses).
    pub fn parse(s: &str) -> Result<StageSpec, String> {
        let mut parts = s.split('_');
        let kind = match parts.next() {
            Some("cn") => BlockKind::ConvBnAct,
            Some("er") => BlockKind::EdgeResidual,
            Some("ds") => BlockKind::DepthwiseSeparable,
            Some("ir") => BlockKind::InvertedResidual,
            other => return Err(format!("block string {s:?}: unknown block type {other:?}")),
        };
        let mut spec = StageSpec {
            kind,
            repeats: 1,
            kernel: 3,
            stride: 1,
            expansion: 1.0,
            channels: 0,
            se_ratio: None,
            skip: None,
            act: None,
        };
        let bad = |op: &str| format!("block string {s:?}: cannot read option {op:?}");
        for op in parts {
            let int = |v: &str| v.parse::<usize>().map_err(|_| bad(op));
            let float = |v: &str| v.parse::<f64>().map_err(|_| bad(op));
            match op {
                "skip" => spec.skip = Some(true),
                "noskip" => spec.skip = Some(false),
                "nr6" => spec.act = Some(Act::Relu6),
                "nsw" => spec.act = Some(Act::Silu),
                _ if op.starts_with("se") => spec.se_ratio = Some(float(&op[2..])?),
                _ if op.starts_with('r') => spec.repeats = int(&op[1..])?,
                _ if op.starts_with('k') => spec.kernel = int(&op[1..])?,
                _ if op.starts_with('s') => spec.stride = int(&op[1..])?,
                _ if op.starts_with('e') => spec.expansion = float(&op[1..])?,
                _ if op.starts_with('c') => spec.channels = int(&op[1..])?,
                _ => return Err(bad(op)),
            }
        }
        if spec.channels == 0 || spec.repeats == 0 || spec.kernel == 0 || spec.stride == 0 {
            return Err(format!("block string {s:?}: needs c, and r, k, s above 0"));
        }
        Ok(spec)
    }
}

/// A network configuration: the block table, scaling and head, before any rounding.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchConfig {
    pub name: String,
    pub stages: Vec<StageSpec>,
    pub stem_size: usize,
    pub num_features: usize,
    pub width: f64,
    pub depth: f64,
    /// See [`round_channels`].
    pub round_limit: f64,
    /// Lite models keep stem, head and the first and last stages' depth unscaled.
    pub fix_stem_head: bool,
    pub act: Act,
    pub num_classes: usize,
    pub dropout: f32,
    pub drop_path: f32,
    pub bn_eps: f32,
    /// The evaluation resolution the architecture was published with.
    pub eval_size: usize,
    /// How images are prepared for the published weights (timm's pretrained configuration).
    pub preprocess: Preprocess,
}

/// Image preparation for a set of weights, in the CLI's own terms (the data crate parses them):
/// interpolation `bicubic|bilinear|nearest`, crop `pct:F|reference|squash`, normalization
/// `imagenet|inception|keras|lite|m1,m2,m3/s1,s2,s3`.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    pub interpolation: String,
    pub crop: String,
    pub normalize: String,
    pub train_size: usize,
    pub eval_size: usize,
}

impl Default for Preprocess {
    /// timm's defaults: bicubic, crop 0.875, ImageNet statistics, 224.
    fn default() -> Self {
        Preprocess {
            interpolation: "bicubic".into(),
            crop: "pct:0.875".into(),
            normalize: "imagenet".into(),
            train_size: 224,
            eval_size: 224,
        }
    }
}

impl Preprocess {
    /// The TF reference's eval preprocessing for weights trained there (e.g. EfficientNet-Lite's
    /// `(x − 127)/128`): center crop `size/(size+32)` of the short side, bicubic.
    pub fn tf_reference(normalize: &str, size: usize) -> Preprocess {
        Preprocess {
            interpolation: "bicubic".into(),
            crop: "reference".into(),
            normalize: normalize.into(),
            train_size: size,
            eval_size: size,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::json!({
            "interpolation": self.interpolation,
            "crop": self.crop,
            "normalize": self.normalize,
            "train_size": self.train_size,
            "eval_size": self.eval_size,
        })
        .to_string()
    }

    /// Reads what [`Preprocess::to_json`] wrote.
    pub fn from_json(text: &str) -> Result<Preprocess, String> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("preprocess metadata: {e}"))?;
        let s = |k: &str| {
            v[k].as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("preprocess metadata lacks {k}"))
        };
        let n = |k: &str| {
            v[k].as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| format!("preprocess metadata lacks {k}"))
        };
        Ok(Preprocess {
            interpolation: s("interpolation")?,
            crop: s("crop")?,
            normalize: s("normalize")?,
            train_size: n("train_size")?,
            eval_size: n("eval_size")?,
        })
    }
}

/// timm's `make_divisible` / `round_channels`: the nearest multiple of 8, raised by 8 when that
/// falls below `round_limit` of the exact value (0.9 for V1 and Lite; 0 for V2, which never raises).
pub fn round_channels(channels: f64, multiplier: f64, round_limit: f64) -> usize {
    let v = channels * multiplier;
    let divisor: f64 = 8.0;
    let mut new_v = divisor.max(((v + divisor / 2.0) / divisor).floor() * divisor);
    if new_v < round_limit * v {
        new_v += divisor;
    }
    new_v as usize
}

/// One block after scaling: everything needed to build its layers.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockSpec {
    pub kind: BlockKind,
    pub kernel: usize,
    pub stride: usize,
    pub in_chs: usize,
    pub mid_chs: usize,
    pub out_chs: usize,
    pub se_chs: Option<usize>,
    pub skip: bool,
    pub act: Act,
    /// Stochastic-depth rate of this block: `drop_path · index / block_count`.
    pub drop_path: f32,
}

impl ArchConfig {
    fn scale(&self, channels: usize) -> usize {
        round_channels(channels as f64, self.width, self.round_limit)
    }

    pub fn stem_chs(&self) -> usize {
        if self.fix_stem_head {
            self.stem_size
        } else {
            self.scale(self.stem_size)
        }
    }

    pub fn head_chs(&self) -> usize {
        if self.fix_stem_head {
            self.num_features
        } else {
            self.scale(self.num_features)
        }
    }

    /// Repeats per stage after depth scaling (`ceil`, as timm's default `depth_trunc`).
    pub fn stage_repeats(&self) -> Vec<usize> {
        let last = self.stages.len().saturating_sub(1);
        self.stages
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let fixed = self.fix_stem_head && (i == 0 || i == last);
                let mult = if fixed { 1.0 } else { self.depth };
                ((s.repeats as f64 * mult).ceil() as usize).max(1)
            })
            .collect()
    }

    /// The blocks of every stage, with channels rounded as timm's builder does.
    pub fn blocks(&self) -> Vec<Vec<BlockSpec>> {
        let repeats = self.stage_repeats();
        let total: usize = repeats.iter().sum();
        let mut in_chs = self.stem_chs();
        let mut index = 0;
        let mut stages = Vec::new();
        for (stage, &r) in self.stages.iter().zip(&repeats) {
            let out_chs = self.scale(stage.channels);
            let mut blocks = Vec::new();
            for i in 0..r {
                let stride = if i == 0 { stage.stride } else { 1 };
                let mid_chs = match stage.kind {
                    BlockKind::EdgeResidual | BlockKind::InvertedResidual => {
                        round_channels(in_chs as f64 * stage.expansion, 1.0, 0.9)
                    }
                    BlockKind::ConvBnAct | BlockKind::DepthwiseSeparable => in_chs,
                };
                // timm divides the ratio by the expansion, then rounds mid·ratio with Python's `round`
                // (halves to even; se_from_exp=False).
                let se_chs = stage.se_ratio.filter(|&r| r > 0.0).map(|r| {
                    ((mid_chs as f64 * (r / stage.expansion)).round_ties_even() as usize).max(1)
                });
                let same_shape = stride == 1 && in_chs == out_chs;
                let skip = match stage.kind {
                    BlockKind::ConvBnAct => same_shape && stage.skip == Some(true),
                    _ => same_shape && stage.skip != Some(false),
                };
                blocks.push(BlockSpec {
                    kind: stage.kind,
                    kernel: stage.kernel,
                    stride,
                    in_chs,
                    mid_chs,
                    out_chs,
                    se_chs,
                    skip,
                    act: stage.act.unwrap_or(self.act),
                    drop_path: self.drop_path * index as f32 / total as f32,
                });
                in_chs = out_chs;
                index += 1;
            }
            stages.push(blocks);
        }
        stages
    }
}

const V2_S: &[&str] = &[
    "cn_r2_k3_s1_e1_c24_skip",
    "er_r4_k3_s2_e4_c48",
    "er_r4_k3_s2_e4_c64",
    "ir_r6_k3_s2_e4_c128_se0.25",
    "ir_r9_k3_s1_e6_c160_se0.25",
    "ir_r15_k3_s2_e6_c256_se0.25",
];
const V2_M: &[&str] = &[
    "cn_r3_k3_s1_e1_c24_skip",
    "er_r5_k3_s2_e4_c48",
    "er_r5_k3_s2_e4_c80",
    "ir_r7_k3_s2_e4_c160_se0.25",
    "ir_r14_k3_s1_e6_c176_se0.25",
    "ir_r18_k3_s2_e6_c304_se0.25",
    "ir_r5_k3_s1_e6_c512_se0.25",
];
const V2_L: &[&str] = &[
    "cn_r4_k3_s1_e1_c32_skip",
    "er_r7_k3_s2_e4_c64",
    "er_r7_k3_s2_e4_c96",
    "ir_r10_k3_s2_e4_c192_se0.25",
    "ir_r19_k3_s1_e6_c224_se0.25",
    "ir_r25_k3_s2_e6_c384_se0.25",
    "ir_r7_k3_s1_e6_c640_se0.25",
];
const V2_XL: &[&str] = &[
    "cn_r4_k3_s1_e1_c32_skip",
    "er_r8_k3_s2_e4_c64",
    "er_r8_k3_s2_e4_c96",
    "ir_r16_k3_s2_e4_c192_se0.25",
    "ir_r24_k3_s1_e6_c256_se0.25",
    "ir_r32_k3_s2_e6_c512_se0.25",
    "ir_r8_k3_s1_e6_c640_se0.25",
];
const V2_BASE: &[&str] = &[
    "cn_r1_k3_s1_e1_c16_skip",
    "er_r2_k3_s2_e4_c32",
    "er_r2_k3_s2_e4_c48",
    "ir_r3_k3_s2_e4_c96_se0.25",
    "ir_r5_k3_s1_e6_c112_se0.25",
    "ir_r8_k3_s2_e6_c192_se0.25",
];
const V1: &[&str] = &[
    "ds_r1_k3_s1_e1_c16_se0.25",
    "ir_r2_k3_s2_e6_c24_se0.25",
    "ir_r2_k5_s2_e6_c40_se0.25",
    "ir_r3_k3_s2_e6_c80_se0.25",
    "ir_r3_k5_s1_e6_c112_se0.25",
    "ir_r4_k5_s2_e6_c192_se0.25",
    "ir_r1_k3_s1_e6_c320_se0.25",
];
const LITE: &[&str] = &[
    "ds_r1_k3_s1_e1_c16",
    "ir_r2_k3_s2_e6_c24",
    "ir_r2_k5_s2_e6_c40",
    "ir_r3_k3_s2_e6_c80",
    "ir_r3_k5_s1_e6_c112",
    "ir_r4_k5_s2_e6_c192",
    "ir_r1_k3_s1_e6_c320",
];

/// (name, table, stem, width, depth, dropout, eval size, train size, crop fraction, family)
type Entry = (
    &'static str,
    &'static [&'static str],
    usize,
    f64,
    f64,
    f32,
    usize,
    usize,
    f32,
    Family,
);

#[derive(Clone, Copy)]
enum Family {
    V2,
    V1,
    Lite,
}

#[rustfmt::skip]
const ARCHS: &[Entry] = &[
    ("efficientnetv2_s", V2_S, 24, 1.0, 1.0, 0.2, 384, 300, 1.0, Family::V2),
    ("efficientnetv2_m", V2_M, 24, 1.0, 1.0, 0.3, 480, 384, 1.0, Family::V2),
    ("efficientnetv2_l", V2_L, 32, 1.0, 1.0, 0.4, 480, 384, 1.0, Family::V2),
    ("efficientnetv2_xl", V2_XL, 32, 1.0, 1.0, 0.4, 512, 384, 1.0, Family::V2),
    ("efficientnetv2_b0", V2_BASE, 32, 1.0, 1.0, 0.2, 224, 192, 0.875, Family::V2),
    ("efficientnetv2_b1", V2_BASE, 32, 1.0, 1.1, 0.2, 240, 192, 0.882, Family::V2),
    ("efficientnetv2_b2", V2_BASE, 32, 1.1, 1.2, 0.3, 260, 208, 0.89, Family::V2),
    ("efficientnetv2_b3", V2_BASE, 32, 1.2, 1.4, 0.3, 300, 240, 0.9, Family::V2),
    ("efficientnet_b0", V1, 32, 1.0, 1.0, 0.2, 224, 224, 0.875, Family::V1),
    ("efficientnet_b1", V1, 32, 1.0, 1.1, 0.2, 240, 240, 0.882, Family::V1),
    ("efficientnet_b2", V1, 32, 1.1, 1.2, 0.3, 260, 260, 0.89, Family::V1),
    ("efficientnet_b3", V1, 32, 1.2, 1.4, 0.3, 300, 300, 0.904, Family::V1),
    ("efficientnet_b4", V1, 32, 1.4, 1.8, 0.4, 380, 380, 0.922, Family::V1),
    ("efficientnet_b5", V1, 32, 1.6, 2.2, 0.4, 456, 456, 0.934, Family::V1),
    ("efficientnet_b6", V1, 32, 1.8, 2.6, 0.5, 528, 528, 0.942, Family::V1),
    ("efficientnet_b7", V1, 32, 2.0, 3.1, 0.5, 600, 600, 0.949, Family::V1),
    ("efficientnet_lite0", LITE, 32, 1.0, 1.0, 0.2, 224, 224, 0.875, Family::Lite),
    ("efficientnet_lite1", LITE, 32, 1.0, 1.1, 0.2, 240, 240, 0.882, Family::Lite),
    ("efficientnet_lite2", LITE, 32, 1.1, 1.2, 0.3, 260, 260, 0.89, Family::Lite),
    ("efficientnet_lite3", LITE, 32, 1.2, 1.4, 0.3, 300, 300, 0.904, Family::Lite),
    ("efficientnet_lite4", LITE, 32, 1.4, 1.8, 0.3, 380, 380, 0.92, Family::Lite),
];

/// Every architecture name `effnet` knows.
pub fn arch_names() -> impl Iterator<Item = &'static str> {
    ARCHS.iter().map(|e| e.0)
}

/// The configuration of a named architecture (1000 classes; the caller may change it).
pub fn arch(name: &str) -> Result<ArchConfig, String> {
    let key = name.strip_prefix("tf_").unwrap_or(name);
    let &(name, table, stem, width, depth, dropout, eval_size, train_size, crop_pct, family) =
        ARCHS.iter().find(|e| e.0 == key).ok_or_else(|| {
            format!(
                "unknown architecture {name:?}; known: {}",
                arch_names().collect::<Vec<_>>().join(", ")
            )
        })?;
    let stages = table
        .iter()
        .map(|s| StageSpec::parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    // timm's pretrained configurations: V1 and V2 B0–B2 use ImageNet statistics, the V2 S–XL, B3
    // and Lite weights x/127.5 − 1; Lite3 and Lite4 resize bilinearly, all others bicubically.
    let imagenet_stats = matches!(family, Family::V1)
        || matches!(
            name,
            "efficientnetv2_b0" | "efficientnetv2_b1" | "efficientnetv2_b2"
        );
    let bilinear = matches!(name, "efficientnet_lite3" | "efficientnet_lite4");
    Ok(ArchConfig {
        name: name.to_string(),
        stages,
        stem_size: stem,
        num_features: 1280,
        width,
        depth,
        round_limit: if matches!(family, Family::V2) {
            0.0
        } else {
            0.9
        },
        fix_stem_head: matches!(family, Family::Lite),
        act: if matches!(family, Family::Lite) {
            Act::Relu6
        } else {
            Act::Silu
        },
        num_classes: 1000,
        dropout,
        drop_path: 0.2,
        bn_eps: 1e-3,
        eval_size,
        preprocess: Preprocess {
            interpolation: if bilinear { "bilinear" } else { "bicubic" }.into(),
            crop: format!("pct:{crop_pct}"),
            normalize: if imagenet_stats {
                "imagenet"
            } else {
                "inception"
            }
            .into(),
            train_size,
            eval_size,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_block_strings() {
        let s = StageSpec::parse("ir_r4_k5_s2_e6_c128_se0.25_nr6").unwrap();
        assert_eq!(s.kind, BlockKind::InvertedResidual);
        assert_eq!((s.repeats, s.kernel, s.stride, s.channels), (4, 5, 2, 128));
        assert_eq!(s.expansion, 6.0);
        assert_eq!(s.se_ratio, Some(0.25));
        assert_eq!(s.act, Some(Act::Relu6));
        assert!(StageSpec::parse("xx_r1_c8").is_err());
        assert!(StageSpec::parse("ir_r1_k3").is_err());
        assert!(StageSpec::parse("ir_q1_c8").is_err());
    }

    #[test]
    fn rounds_channels_like_timm() {
        assert_eq!(round_channels(32.0, 1.1, 0.9), 32); // 35.2 → 32 (≥ 90%)
        assert_eq!(round_channels(16.0, 1.4, 0.9), 24); // 22.4 → 24
        assert_eq!(round_channels(1280.0, 1.2, 0.9), 1536);
        assert_eq!(round_channels(40.0, 1.1, 0.9), 48); // 44 rounds up to 48
        assert_eq!(round_channels(3.0, 1.0, 0.9), 8);
        assert_eq!(round_channels(16.0, 1.2, 0.9), 24); // 19.2 → 16 < 17.28 → 24
        assert_eq!(round_channels(16.0, 1.2, 0.0), 16); // V2: no raise
    }

    #[test]
    fn v2_s_blocks() {
        let cfg = arch("efficientnetv2_s").unwrap();
        let stages = cfg.blocks();
        assert_eq!(stages.iter().map(Vec::len).sum::<usize>(), 40);
        let b = &stages[3][0];
        assert_eq!(
            (b.in_chs, b.mid_chs, b.out_chs, b.se_chs, b.skip),
            (64, 256, 128, Some(16), false)
        );
        assert!(stages[0][1].skip && stages[5][14].skip);
        assert!((stages[5][14].drop_path - 0.2 * 39.0 / 40.0).abs() < 1e-7);
    }
}
