//! `convert` and `info`.

use std::path::PathBuf;

use clap::Args;
use effnet_model::family::BlockKind;
use effnet_model::{arch, Network};

#[derive(Args)]
pub struct InfoArgs {
    #[arg(long, default_value = "efficientnetv2_s")]
    arch: String,
    #[arg(long = "img-size", alias = "img_size")]
    img_size: Option<usize>,
}

pub fn info(args: &InfoArgs) -> Result<(), String> {
    let config = arch(&args.arch)?;
    let size = args.img_size.unwrap_or(config.eval_size);
    crate::check_image_size("--img-size", size)?;
    let net = Network::new(config.clone());
    println!("{} (timm: tf_{})", config.name, config.name);
    println!(
        "stem {} channels, head {} features, {} classes, activation {}",
        config.stem_chs(),
        net.features,
        net.classes,
        config.act.name()
    );
    for (i, stage) in config.blocks().iter().enumerate() {
        let b = &stage[0];
        let kind = match b.kind {
            BlockKind::ConvBnAct => "fused-mbconv e1",
            BlockKind::EdgeResidual => "fused-mbconv",
            BlockKind::DepthwiseSeparable => "depthwise-separable",
            BlockKind::InvertedResidual => "mbconv",
        };
        let se = b.se_chs.map_or("no SE".to_string(), |c| format!("SE {c}"));
        println!(
            "  stage {i}: {} × {kind:<20} k{} s{} {:>4} → {:<4} (mid {}, {se})",
            stage.len(),
            b.kernel,
            b.stride,
            b.in_chs,
            b.out_chs,
            b.mid_chs
        );
    }
    println!("trainable parameters: {}", net.layout.trainable_count());
    println!(
        "forward at {size}×{size}: {:.3} GMACs per image",
        net.macs(size, size) as f64 / 1e9
    );
    Ok(())
}

#[derive(Args)]
pub struct ConvertArgs {
    /// Input weights: a timm state dict (`.safetensors`, `.pth`), or lukemelas-style
    /// EfficientNet-PyTorch / efficientnet_lite_pytorch weights (renamed to timm's names).
    input: PathBuf,
    /// Output `.safetensors` (timm names, with effnet's metadata).
    output: PathBuf,
    /// The architecture the weights belong to (the class count is read from the file).
    #[arg(long)]
    arch: String,
}

pub fn convert(args: &ConvertArgs) -> Result<(), String> {
    let (net, weights) = effnet_model::weights::load(&args.input, Some(&args.arch))?;
    effnet_model::weights::save(&net, &weights, &args.output).map_err(|e| e.to_string())?;
    println!(
        "wrote {} ({}, {} classes, preprocess {})",
        args.output.display(),
        net.config.name,
        net.classes,
        net.config.preprocess.to_json()
    );
    Ok(())
}
