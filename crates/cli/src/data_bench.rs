//! `data_benchmark`: the train input pipeline's speed per core — JPEG decode (of only what the
//! crop reads, unless `--full-decode`), the reference's random-resized crop and flip, resize,
//! RandAugment, normalization — over a folder of images.
//! `tools/bench_pipeline.sh` runs it beside PIL + torchvision on the same files and threads.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use effnet_data::augment::RandAugment;
use effnet_data::sampler::TrainGeometry;
use effnet_data::transform::Normalize;
use effnet_data::{files, load_rgb};
use effnet_engine::rng::Rng;
use rayon::prelude::*;

#[derive(Args)]
pub struct DataBenchArgs {
    /// A folder of JPEG/PNG images (searched recursively).
    images: PathBuf,
    #[arg(long = "img-size", default_value_t = 224)]
    img_size: usize,
    /// RandAugment magnitude (0: no RandAugment).
    #[arg(long, default_value_t = 10.0)]
    magnitude: f32,
    /// Passes over the folder.
    #[arg(long, default_value_t = 3)]
    passes: usize,
    #[arg(long)]
    json: bool,
    /// Decode every image whole before cropping (no decode-and-crop), for comparison.
    #[arg(long = "full-decode")]
    full_decode: bool,
}

pub fn run(args: &DataBenchArgs) -> Result<(), String> {
    crate::check_image_size("--img-size", args.img_size)?;
    if args.passes == 0 {
        return Err("--passes must be at least 1".into());
    }
    let paths = files::collect_images(&[args.images.display().to_string()])?;
    if paths.is_empty() {
        return Err(format!("{}: no images", args.images.display()));
    }
    let geometry = TrainGeometry::new(args.img_size);
    let augment = RandAugment {
        magnitude: args.magnitude,
        ..RandAugment::default()
    };
    let normalize = Normalize::parse("imagenet")?;
    let one = |i: usize, path: &PathBuf| -> Result<f32, String> {
        let mut rng = Rng::new(i as u64);
        let mut out = if args.full_decode {
            geometry.apply(&load_rgb(path)?, &mut rng)
        } else {
            let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
            geometry.apply_encoded(bytes, &mut rng)?
        };
        if args.magnitude > 0.0 {
            augment.apply(&mut out, &mut rng);
        }
        Ok(normalize.to_vec(&out.pixels)[0])
    };
    one(0, &paths[0])?; // warm-up: page cache, allocator
    let start = Instant::now();
    let mut count = 0;
    for pass in 0..args.passes {
        let results: Vec<Result<f32, String>> = paths
            .par_iter()
            .enumerate()
            .map(|(i, p)| one(pass * paths.len() + i, p))
            .collect();
        for (r, p) in results.iter().zip(&paths) {
            if let Err(e) = r {
                return Err(format!("{}: {e}", p.display()));
            }
        }
        count += paths.len();
    }
    let secs = start.elapsed().as_secs_f64();
    let threads = rayon::current_num_threads();
    let ips = count as f64 / secs;
    if args.json {
        let line = serde_json::json!({
            "impl": format!("effnet-{}", env!("CARGO_PKG_VERSION")),
            "mode": "pipeline",
            "res": args.img_size,
            "magnitude": args.magnitude,
            "img_per_s": (ips * 100.0).round() / 100.0,
            "img_per_s_per_thread": (ips / threads as f64 * 100.0).round() / 100.0,
            "threads": threads,
        });
        println!("{line}");
    } else {
        println!(
            "{count} images ({} files × {} passes) at {}: {ips:.1} img/s on {threads} threads ({:.1} per thread)",
            paths.len(),
            args.passes,
            args.img_size,
            ips / threads as f64
        );
    }
    Ok(())
}
