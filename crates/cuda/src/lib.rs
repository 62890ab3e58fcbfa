//! CUDA kernels for effnet, as CUDA C sources compiled at run time with NVRTC.
//!
//! The crate links nothing from CUDA: cudarc opens `libnvrtc` with `dlopen` at first use, so it
//! builds on any machine, and compiling the kernels needs NVRTC only (no GPU, no driver, no
//! toolkit: PyPI's `nvidia-cuda-nvrtc-cu12` wheel is enough; see [`NVRTC_HELP`]).
//!
//! Every kernel works on NHWC tensors seen as `[rows, c]` (rows = n·h·w) or on flat buffers,
//! with grid-stride loops (any grid covers any size). Each source's header says how the host
//! sequences its kernels and which launch shape they expect. Activations are stored in f32, or
//! in bf16 or f16 for mixed precision: the sources of [`ACT_SOURCES`] are compiled three times,
//! the others as `*.bf16.cu` and `*.f16.cu` with 16-bit activation storage and every kernel
//! named `NAME_bf16` or `NAME_f16` ([`units`]).

pub mod classify;
pub mod conv;
pub mod device;
pub mod gemm;
pub mod nccl;
pub mod net;
pub mod passes;
pub mod replay;
pub mod state;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};

/// What every kernel source uses (grid-stride loop, activations, column sums): [`compile`]
/// puts it in front of each source, since NVRTC sees one file at a time and no include path.
pub const COMMON: &str = include_str!("../kernels/common.cuh");

/// The kernel sources: (file name, CUDA C source). Each is compiled on its own, after [`COMMON`].
pub const SOURCES: &[(&str, &str)] = &[
    ("act.cu", include_str!("../kernels/act.cu")),
    ("norm.cu", include_str!("../kernels/norm.cu")),
    ("se.cu", include_str!("../kernels/se.cu")),
    ("pool.cu", include_str!("../kernels/pool.cu")),
    ("regularize.cu", include_str!("../kernels/regularize.cu")),
    ("loss.cu", include_str!("../kernels/loss.cu")),
    ("optim.cu", include_str!("../kernels/optim.cu")),
    ("tensor.cu", include_str!("../kernels/tensor.cu")),
];

/// The sources whose kernels read or write activations (type `act_t` in common.cuh): each has a
/// twin per 16-bit storage of [`TWINS`].
pub const ACT_SOURCES: &[&str] = &["norm.cu", "se.cu", "pool.cu", "regularize.cu", "tensor.cu"];

/// The 16-bit activation storages: (tag, the macro common.cuh reads). The twin of `STEM.cu` for
/// tag T is `STEM.T.cu`, its kernels named `NAME_T`.
pub const TWINS: &[(&str, &str)] = &[("bf16", "ACT_BF16"), ("f16", "ACT_F16")];

/// The compilation units: (file name, source) for every source of [`SOURCES`], then the twins
/// of each of [`ACT_SOURCES`] for every storage of [`TWINS`], kernels renamed ([`program`]
/// compiles each with its storage).
pub fn units() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = SOURCES
        .iter()
        .map(|(name, source)| (name.to_string(), source.to_string()))
        .collect();
    for (tag, _) in TWINS {
        for (name, source) in SOURCES.iter().filter(|(n, _)| ACT_SOURCES.contains(n)) {
            let twin = name.replace(".cu", &format!(".{tag}.cu"));
            out.push((twin, twin_names(source, tag)));
        }
    }
    out
}

/// The storage tag of a unit's file name: `Some("bf16")` for `norm.bf16.cu`, None for an
/// original source.
pub fn twin_tag(file: &str) -> Option<&'static str> {
    TWINS
        .iter()
        .map(|(tag, _)| *tag)
        .find(|tag| file.ends_with(&format!(".{tag}.cu")))
}

/// `source` with each kernel declaration's name `NAME` turned into `NAME_tag` (only the
/// declarations: kernels do not call each other).
fn twin_names(source: &str, tag: &str) -> String {
    source
        .split_inclusive('\n')
        .map(|line| match kernel_names(line).first() {
            Some(name) => line.replacen(&format!("{name}("), &format!("{name}_{tag}("), 1),
            None => line.to_string(),
        })
        .collect()
}

/// The virtual architecture the PTX targets: Ampere and later (A100, H100/H200) JIT it.
pub const ARCH: &str = "compute_80";

/// The environment variable naming a directory that holds `libnvrtc.so.12` (CI sets it).
pub const NVRTC_DIR_ENV: &str = "EFFNET_NVRTC_DIR";

/// How to get NVRTC on a machine without the CUDA toolkit.
pub const NVRTC_HELP: &str = "NVRTC (libnvrtc.so.12) is needed to compile the CUDA kernels; a GPU \
is not. Without the CUDA toolkit, take it from PyPI:\n\
\x20   python3 -m pip install --no-deps --target /opt/nvrtc nvidia-cuda-nvrtc-cu12==12.9.86\n\
\x20   export EFFNET_NVRTC_DIR=/opt/nvrtc/nvidia/cuda_nvrtc/lib\n\
(or point EFFNET_NVRTC_DIR at a CUDA 12 toolkit's lib64 directory).";

/// The names of the `extern "C" __global__` functions of a source, in order: the lines that
/// start with that declaration (so commented-out ones do not count), the identifier before `(`.
pub fn kernel_names(source: &str) -> Vec<&str> {
    source
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("extern \"C\" __global__"))
        .filter_map(|rest| rest.split('(').next()?.split_whitespace().last())
        .collect()
}

/// Loads `libnvrtc.so*` from `dir` by its full path, so that cudarc finds it: cudarc opens the
/// library by bare names (`libnvrtc.so`, `libnvrtc.so.12`, …), and the dynamic loader answers a
/// bare name with an already loaded library whose soname matches, before any search path. A
/// process cannot change its own library search path (`LD_LIBRARY_PATH` is read at start-up),
/// so this is how a directory chosen at run time takes effect. Returns the file loaded.
pub fn load_nvrtc_from(dir: &Path) -> Result<PathBuf, String> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read the NVRTC directory {}: {e}", dir.display()))?;
    // `libnvrtc.so.12` (the soname) over `libnvrtc.so` (a link the toolkit's dev package adds)
    // and `libnvrtc.so.12.9.86`; never `libnvrtc-builtins` or `libnvrtc.alt` (other libraries).
    let mut candidates: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libnvrtc.so"))
        })
        .collect();
    candidates.sort_by_key(|p| {
        let len = p.file_name().map_or(0, |n| n.len());
        (len == "libnvrtc.so".len(), len)
    });
    let path = candidates
        .into_iter()
        .next()
        .ok_or_else(|| format!("no libnvrtc.so* in {}", dir.display()))?;
    // SAFETY: loading NVRTC runs its initializers only, which have no preconditions.
    let lib = unsafe { libloading::Library::new(&path) }
        .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
    // Kept loaded for the life of the process: cudarc's later dlopen must find it.
    std::mem::forget(lib);
    Ok(path)
}

/// Makes NVRTC available to cudarc, once per process: from [`NVRTC_DIR_ENV`] when it is set,
/// else from the loader's usual search (`LD_LIBRARY_PATH`, the system's libraries). The error
/// says how to get NVRTC; cudarc itself would panic instead.
pub fn ensure_nvrtc() -> Result<(), String> {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    READY
        .get_or_init(|| {
            let from = match std::env::var_os(NVRTC_DIR_ENV) {
                Some(dir) => {
                    let path = load_nvrtc_from(Path::new(&dir))
                        .map_err(|e| format!("{NVRTC_DIR_ENV}: {e}\n{NVRTC_HELP}"))?;
                    format!("{} ({NVRTC_DIR_ENV})", path.display())
                }
                None => format!("the library search path ({NVRTC_DIR_ENV} is not set)"),
            };
            // SAFETY: only tries to dlopen cudarc's candidate names.
            if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                Ok(())
            } else {
                Err(format!(
                    "NVRTC not found from {from}: cudarc looks for the names {:?}\n{NVRTC_HELP}",
                    cudarc::get_lib_name_candidates("nvrtc")
                ))
            }
        })
        .clone()
}

/// The version of the NVRTC that cudarc loaded, as (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32), String> {
    ensure_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (checked above); the pointers are valid for the call.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| format!("nvrtcVersion: {e:?}"))?;
    Ok((major, minor))
}

/// Compiles one CUDA C source, after [`COMMON`], to PTX for [`ARCH`]. `name` is the file name
/// NVRTC's messages give (`name(line): error: …`, lines of `source` itself); the error carries
/// NVRTC's whole log.
pub fn compile(name: &str, source: &str) -> Result<String, String> {
    ensure_nvrtc()?;
    let opts = CompileOptions {
        arch: Some(ARCH),
        name: Some(name.to_string()),
        ..Default::default()
    };
    match compile_ptx_with_opts(program(name, source), opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(CompileError::CompileError { nvrtc, log, .. }) => Err(format!(
            "NVRTC failed to compile {name} ({nvrtc:?}):\n{}",
            log.to_string_lossy()
        )),
        Err(e) => Err(format!("NVRTC failed on {name}: {e:?}")),
    }
}

/// What NVRTC compiles: [`COMMON`], then the source; `#line` makes NVRTC's messages point into
/// `source`, not into the shared prefix. A twin (`*.bf16.cu`, `*.f16.cu`) gets its 16-bit
/// activation storage (`ACT_BF16`, `ACT_F16`).
fn program(name: &str, source: &str) -> String {
    let storage = TWINS
        .iter()
        .find(|(tag, _)| twin_tag(name) == Some(tag))
        .map_or(String::new(), |(_, define)| format!("#define {define} 1\n"));
    format!("{storage}{COMMON}\n#line 1 \"{name}\"\n{source}")
}

/// Compiles one source, after [`COMMON`], to machine code (CUBIN) for compute capability
/// `major.minor` (`sm_90` for an H100/H200). What the device loads: a CUBIN for the exact chip
/// loads under any driver of the same CUDA major version, where PTX from an NVRTC newer than the
/// driver would be refused (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION`).
pub fn compile_cubin(
    name: &str,
    source: &str,
    (major, minor): (i32, i32),
) -> Result<Vec<u8>, String> {
    use cudarc::nvrtc::{result, sys};
    ensure_nvrtc()?;
    let c = |s: String| std::ffi::CString::new(s).map_err(|e| format!("{name}: {e}"));
    let (src, file) = (c(program(name, source))?, c(name.to_string())?);
    let prog = result::create_program(&src, Some(&file))
        .map_err(|e| format!("NVRTC cannot create a program for {name}: {e:?}"))?;
    let arch = format!("--gpu-architecture=sm_{major}{minor}");
    // SAFETY: `prog` is live until destroyed below; the buffers are sized by NVRTC's answers.
    let out = unsafe {
        let compiled = result::compile_program(prog, &[arch.as_str()]);
        let out = match compiled {
            Ok(()) => {
                let mut size = 0usize;
                sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .and_then(|()| {
                        let mut cubin = vec![0u8; size];
                        sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _)
                            .result()
                            .map(|()| cubin)
                    })
                    .map_err(|e| format!("NVRTC gave no CUBIN for {name}: {e:?}"))
            }
            Err(e) => {
                let log = result::get_program_log(prog)
                    .map(|l| {
                        let bytes: Vec<u8> =
                            l.iter().map(|&b| b as u8).take_while(|&b| b != 0).collect();
                        String::from_utf8_lossy(&bytes).into_owned()
                    })
                    .unwrap_or_default();
                Err(format!(
                    "NVRTC failed to compile {name} for sm_{major}{minor} ({e:?}):\n{log}"
                ))
            }
        };
        let _ = result::destroy_program(prog);
        out
    };
    out
}

/// Compiles every unit of [`units`]: (file name, PTX), in order.
pub fn compile_all() -> Result<Vec<(String, String)>, String> {
    units()
        .iter()
        .map(|(name, source)| Ok((name.clone(), compile(name, source)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_reads_declarations_only() {
        let src = "// extern \"C\" __global__ void commented(int n) {}\n\
                   extern \"C\" __global__ void first(const float* __restrict__ x,\n\
                   \x20   long long n) {}\n\
                   __device__ float helper(float v) { return v; }\n\
                   \x20 extern \"C\" __global__ void second(int n) {}\n";
        assert_eq!(kernel_names(src), ["first", "second"]);
    }

    #[test]
    fn every_source_declares_kernels() {
        assert!(
            kernel_names(COMMON).is_empty(),
            "the shared prefix declares no kernels"
        );
        let mut all: Vec<&str> = Vec::new();
        for (name, source) in SOURCES {
            let names = kernel_names(source);
            assert!(!names.is_empty(), "{name} declares no kernels");
            all.extend(names);
        }
        let count = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), count, "kernel names repeat across sources");
    }

    #[test]
    fn twins_rename_every_kernel_and_nothing_else() {
        let units = units();
        assert_eq!(units.len(), SOURCES.len() + TWINS.len() * ACT_SOURCES.len());
        let original = SOURCES.iter().find(|(n, _)| *n == "norm.cu").unwrap().1;
        assert_eq!(twin_tag("norm.cu"), None);
        assert!(program("norm.cu", original).starts_with(COMMON));
        for (tag, define) in TWINS {
            let file = format!("norm.{tag}.cu");
            let (_, twin) = units
                .iter()
                .find(|(n, _)| *n == file)
                .expect("norm.cu has a twin");
            assert_eq!(twin_tag(&file), Some(*tag));
            let want: Vec<String> = kernel_names(original)
                .iter()
                .map(|k| format!("{k}_{tag}"))
                .collect();
            assert_eq!(kernel_names(twin), want);
            // Only the declarations changed: the same lines, the same length plus the suffixes.
            assert_eq!(twin.lines().count(), original.lines().count());
            assert_eq!(twin.len(), original.len() + want.len() * (tag.len() + 1));
            assert!(program(&file, twin).starts_with(&format!("#define {define} 1\n")));
        }
    }
}
