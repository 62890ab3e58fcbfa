//! `make_tfrecords`: a labelled image folder to TFRecord shards in the reference's ImageNet
//! layout (`train-00000-of-01024`, `image/encoded` + 1-based `image/class/label`).

use std::path::PathBuf;

use clap::Args;
use effnet_data::files::labelled_folder;
use effnet_data::load_rgb;
use effnet_data::tfrecord::{shard_name, write_shards};
use rayon::prelude::*;

#[derive(Args)]
pub struct MakeTfrecordsArgs {
    /// Labelled image folder: one subfolder per class (sorted names give labels 1, 2, ...).
    #[arg(long = "data-dir", alias = "data_dir")]
    data_dir: PathBuf,
    /// Output folder for the shards (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Shard name prefix: `train` or `validation` in the reference's layout.
    #[arg(long, default_value = "train")]
    prefix: String,
    /// Number of shards (ImageNet: 1024 train, 128 validation).
    #[arg(long, default_value_t = 1)]
    shards: usize,
}

pub fn make_tfrecords(args: &MakeTfrecordsArgs) -> Result<(), String> {
    if args.prefix.is_empty() || args.prefix.contains(['/', '\\']) || args.prefix == ".." {
        return Err(format!(
            "--prefix {:?}: a file name start such as train or validation, not a path",
            args.prefix
        ));
    }
    let folder = labelled_folder(&args.data_dir)?;
    // Numeric folder names are class indices, not names: write no `image/class/text` then.
    let numeric = folder.classes.iter().all(|c| c.parse::<usize>().is_ok());
    let classes: &[String] = if numeric { &[] } else { &folder.classes };
    // Every image decoded once, in parallel: a broken one is reported and left out, so that
    // training never meets it.
    let checked: Vec<Result<(), String>> = folder
        .samples
        .par_iter()
        .map(|(path, _)| load_rgb(path).map(|_| ()))
        .collect();
    let mut samples = Vec::with_capacity(folder.samples.len());
    for (sample, check) in folder.samples.iter().zip(&checked) {
        match check {
            Ok(()) => samples.push(sample.clone()),
            Err(reason) => eprintln!("effnet: {}: {reason}", sample.0.display()),
        }
    }
    let failed = folder.samples.len() - samples.len();
    let counts = write_shards(&samples, classes, &args.out, &args.prefix, args.shards)?;
    // One line per shard for a handful; ImageNet's 1024 get a summary.
    if counts.len() <= 16 {
        for (i, n) in counts.iter().enumerate() {
            let name = shard_name(&args.prefix, i, args.shards);
            println!("{}: {n} records", args.out.join(name).display());
        }
    } else {
        let (lo, hi) = (counts.iter().min(), counts.iter().max());
        println!(
            "{}/{}-*-of-{:05}: {} to {} records each",
            args.out.display(),
            args.prefix,
            args.shards,
            lo.unwrap_or(&0),
            hi.unwrap_or(&0)
        );
    }
    println!(
        "{} images of {} classes from {} in {} shards (labels 1-based)",
        samples.len(),
        folder.classes.len(),
        args.data_dir.display(),
        counts.len()
    );
    if failed > 0 {
        return Err(format!(
            "{failed} of {} images could not be read (listed above) and are not in the shards",
            folder.samples.len()
        ));
    }
    Ok(())
}
