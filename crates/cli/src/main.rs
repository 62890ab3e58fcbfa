//! `effnet`: EfficientNet training and inference from the command line.

mod bench;
#[cfg(feature = "cuda")]
mod cuda_cmd;
mod data_bench;
mod dllogger;
mod infer;
mod plot;
mod progress;
mod records_cmd;
mod train_cmd;
mod weights_cmd;

use std::process::ExitCode;

/// Large buffers on cache lines, so that the engine's kernels can stream outputs past the caches.
#[global_allocator]
static ALLOCATOR: effnet_engine::LineAligned = effnet_engine::LineAligned;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "effnet",
    version,
    // A flag given twice keeps the last value: --config's flags come first, the user's win.
    args_override_self = true,
    about = "EfficientNet (V2, V1, Lite) training and inference on a Rust engine"
)]
struct Cli {
    /// Worker threads for the engine (default: every core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train with the reference's recipe on TFRecords, image folders or Fashion-MNIST, evaluating
    /// once at the end (see --help).
    Train(train_cmd::TrainArgs),
    /// Train and evaluate every --num-epochs-between-eval epochs (the reference's default mode).
    #[command(name = "train_and_eval", visible_alias = "train-and-eval")]
    TrainAndEval(train_cmd::TrainArgs),
    /// Time inference (eval mode) on synthetic input, at one or more batch sizes.
    #[command(name = "inference_benchmark", visible_alias = "inference-benchmark")]
    InferenceBenchmark(bench::BenchArgs),
    /// Time full training steps (forward, loss, backward, SGD update) on synthetic input.
    #[command(name = "training_benchmark", visible_alias = "training-benchmark")]
    TrainingBenchmark(bench::BenchArgs),
    /// Classify images (files, folders, globs) or a preprocessed .npy tensor with trained weights.
    Predict(infer::PredictArgs),
    /// Evaluate trained weights on a labelled image folder: top-1, top-5, loss, speed, latency.
    Eval(infer::EvalArgs),
    /// Time the train input pipeline (decode, crop, flip, resize, RandAugment, normalize).
    #[command(name = "data_benchmark", visible_alias = "data-benchmark")]
    DataBenchmark(data_bench::DataBenchArgs),
    /// Write a labelled image folder as TFRecord shards in the ImageNet layout (train-00000-of-0000N).
    #[command(name = "make_tfrecords", visible_alias = "make-tfrecords")]
    MakeTfrecords(records_cmd::MakeTfrecordsArgs),
    /// Convert a weight file (timm `.safetensors` or PyTorch `.pth`) into effnet's safetensors.
    Convert(weights_cmd::ConvertArgs),
    /// Describe an architecture: blocks, channels, parameters, multiply-adds.
    Info(weights_cmd::InfoArgs),
    /// Compare a GPU's forward and backward passes with the CPU engine's, op by op; exits
    /// non-zero on any difference beyond tolerance (needs a build with `--features cuda`).
    #[cfg(feature = "cuda")]
    Selftest(cuda_cmd::SelftestArgs),
}

/// Where the passes run (`--device`): the CPU engine, or a GPU in a build with `--features cuda`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda,
}

impl Device {
    pub fn parse(s: &str) -> Result<Device, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            #[cfg(feature = "cuda")]
            "cuda" => Ok(Device::Cuda),
            #[cfg(not(feature = "cuda"))]
            "cuda" => Err(
                "this effnet was built without CUDA: cargo build --release --features cuda".into(),
            ),
            d => Err(format!("unknown --device {d:?}: expected cpu or cuda")),
        }
    }
}

/// `--precision`: `f32`, or `bf16` where this CPU multiplies bf16 (AVX512_BF16).
pub fn precision(s: &str) -> Result<effnet_engine::Precision, String> {
    let p = effnet_engine::Precision::parse(s)?;
    if !p.available() {
        return Err(format!(
            "--precision {s} needs a CPU with AVX-512 and AVX512_BF16 (and EFFNET_SIMD not capping below avx512); use f32"
        ));
    }
    Ok(p)
}

/// The largest image side a command accepts: far beyond EfficientNet's sizes (800 px for the
/// largest), a mistyped size would ask for tens of GB before failing.
pub const MAX_IMAGE_SIZE: usize = 4096;

/// `size` as an image side given by `flag`: from 8 pixels (the stem's and stages' strides) to
/// [`MAX_IMAGE_SIZE`].
pub fn check_image_size(flag: &str, size: usize) -> Result<(), String> {
    if (8..=MAX_IMAGE_SIZE).contains(&size) {
        Ok(())
    } else {
        Err(format!(
            "{flag} {size}: expected 8 to {MAX_IMAGE_SIZE} pixels"
        ))
    }
}

/// An output file's folder must exist before a long run, not be found missing at its end.
pub fn check_output_folder(flag: &str, file: &std::path::Path) -> Result<(), String> {
    match file.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) if !dir.is_dir() => Err(format!(
            "{flag} {}: the folder {} does not exist",
            file.display(),
            dir.display()
        )),
        _ => Ok(()),
    }
}

/// Engine threads a user may ask for: a typo of 100000 would hang creating them.
const MAX_THREADS: usize = 1024;

/// A closed standard output (`effnet … | head`) ends the process quietly, with the status a
/// SIGPIPE gives, as command-line tools do; `println!` would panic with a backtrace. Any other
/// panic keeps the default report.
fn quiet_on_closed_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    quiet_on_closed_pipe();
    let argv = match train_cmd::with_config_file(std::env::args_os().collect(), &Cli::command()) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("effnet: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse_from(argv);
    if let Some(n) = cli.threads {
        if !(1..=MAX_THREADS).contains(&n) {
            eprintln!("effnet: --threads {n}: expected 1 to {MAX_THREADS}");
            return ExitCode::FAILURE;
        }
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
        {
            eprintln!("effnet: cannot start {n} threads: {e}");
            return ExitCode::FAILURE;
        }
    }
    let result = match cli.command {
        Command::Train(args) => train_cmd::train(&args, train_cmd::Mode::Train),
        Command::TrainAndEval(args) => train_cmd::train(&args, train_cmd::Mode::TrainAndEval),
        Command::InferenceBenchmark(args) => bench::run(&args, bench::Kind::Inference),
        Command::TrainingBenchmark(args) => bench::run(&args, bench::Kind::Training),
        Command::Predict(args) => infer::predict(&args),
        Command::Eval(args) => infer::eval(&args),
        Command::DataBenchmark(args) => data_bench::run(&args),
        Command::MakeTfrecords(args) => records_cmd::make_tfrecords(&args),
        Command::Convert(args) => weights_cmd::convert(&args),
        Command::Info(args) => weights_cmd::info(&args),
        #[cfg(feature = "cuda")]
        Command::Selftest(args) => cuda_cmd::selftest(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("effnet: {e}");
            ExitCode::FAILURE
        }
    }
}
