//! `make_tfrecords`: a labelled image folder to TFRecord shards in the reference's ImageNet
//! layout (`train-00000-of-01024`, `image/encoded` + 1-based `image/class/label`).

use std::path::PathBuf;

use clap::Args;
use effnet_data::files::labelled_folder;
use effnet_data::tfrecord::{shard_name, write_shards};

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
    let folder = labelled_folder(&args.data_dir)?;
    // Numeric folder names are class indices, not names: write no `image/class/text` then.
    let numeric = folder.classes.iter().all(|c| c.parse::<usize>().is_ok());
    let classes: &[String] = if numeric { &[] } else { &folder.classes };
    let counts = write_shards(
        &folder.samples,
        classes,
        &args.out,
        &args.prefix,
        args.shards,
    )?;
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
        folder.samples.len(),
        folder.classes.len(),
        args.data_dir.display(),
        counts.len()
    );
    Ok(())
}
