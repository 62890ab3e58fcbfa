//! One CUDA device: its context and stream, the cuBLAS and cuDNN handles, and every kernel of
//! [`crate::units`] compiled by NVRTC and loaded (with [`Math::Bf16`] or [`Math::F16`], the
//! 16-bit twins in place of their f32 originals, under the same names).
//!
//! Device memory is held in cudarc's `CudaSlice`s, but the network passes raw device addresses
//! (`u64`) to kernels, cuBLAS and cuDNN: one stream runs everything in order, so cudarc's
//! per-buffer event tracking is switched off and no borrow has to outlive a call.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::sys as blas_sys;
use cudarc::cudnn::sys as dnn_sys;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

/// How matrix products and convolutions run, and what the activations are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Math {
    /// Plain f32 fused multiply-adds: what the self-test compares with the CPU engine.
    F32,
    /// TF32 tensor cores for f32 data (Ampere and newer): the reference's default for f32.
    Tf32,
    /// Mixed precision (AMP): activations and their gradients stored in bf16, convolutions and
    /// 1×1 products on bf16 tensor cores with f32 accumulation; parameters, their gradients,
    /// optimizer and batch-norm statistics stay f32 (the small f32 products use TF32).
    Bf16,
    /// Mixed precision as [`Math::Bf16`], with IEEE f16 storage: Volta and Turing tensor cores
    /// (compute capability 7.x) have no bf16. f16's range ends at 65504, so training scales the
    /// loss dynamically ([`crate::passes`]), as the reference's `mixed_float16` policy does.
    F16,
}

impl Math {
    /// Bytes of one stored activation.
    pub fn act_bytes(self) -> usize {
        match self {
            Math::Bf16 | Math::F16 => 2,
            Math::F32 | Math::Tf32 => 4,
        }
    }

    /// The twin sources' tag of a 16-bit storage ([`crate::TWINS`]); None for f32.
    pub fn twin_tag(self) -> Option<&'static str> {
        match self {
            Math::Bf16 => Some("bf16"),
            Math::F16 => Some("f16"),
            Math::F32 | Math::Tf32 => None,
        }
    }

    /// Mixed precision for a GPU of compute capability `major`.x: bf16 from Ampere (8.0) on,
    /// f16 with loss scaling before.
    pub fn mixed_for(major: i32) -> Math {
        if major >= 8 {
            Math::Bf16
        } else {
            Math::F16
        }
    }
}

/// What is missing when a library cannot be opened, and where to get it.
const LIBRARY_HELP: &str = "The CUDA device needs the NVIDIA driver (libcuda.so.1), cuBLAS \
(libcublas.so.13 or .12), cuDNN 9 (libcudnn.so.9) and NVRTC (libnvrtc.so.13 or .12) on the \
library search path (LD_LIBRARY_PATH), as a CUDA toolkit or PyTorch's nvidia-* wheels install them.";

/// Errors of the device as text, naming the call that failed.
pub type Result<T> = std::result::Result<T, String>;

fn err<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e:?}")
}

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: blas_sys::cublasHandle_t,
    pub dnn: dnn_sys::cudnnHandle_t,
    pub math: Math,
    /// The device's name and compute capability, for reports.
    pub name: String,
    pub capability: (i32, i32),
    kernels: HashMap<String, CudaFunction>,
    /// cuBLAS's scratch, set once: a product captured in a graph must not allocate.
    _blas_workspace: CudaSlice<u8>,
    /// Passes that could not be captured and launch directly instead ([`crate::replay`]): the
    /// self-test requires none.
    pub capture_failures: Cell<usize>,
}

/// Fails with a clear message when a library is missing (cudarc would panic at first use).
fn check_libraries() -> Result<()> {
    // SAFETY: each call only tries to dlopen the library's candidate names.
    let present = unsafe {
        [
            (
                "the NVIDIA driver (libcuda)",
                cudarc::driver::sys::is_culib_present(),
            ),
            ("cuBLAS", cudarc::cublas::sys::is_culib_present()),
            ("cuDNN", cudarc::cudnn::sys::is_culib_present()),
        ]
    };
    for (name, found) in present {
        if !found {
            return Err(format!("{name} not found. {LIBRARY_HELP}"));
        }
    }
    crate::ensure_nvrtc()
}

impl Gpu {
    /// Opens device `ordinal`, compiles and loads the kernels, and creates the library handles
    /// on one stream. `math` None: mixed precision as the chip has it ([`Math::mixed_for`]).
    pub fn new(ordinal: usize, math: Option<Math>) -> Result<Gpu> {
        check_libraries()?;
        let ctx = CudaContext::new(ordinal).map_err(err("opening the CUDA device"))?;
        // SAFETY: every buffer and call of this device runs on the one stream created below, in
        // order, so the events cudarc records to order streams are not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(err("creating a stream"))?;
        let name = ctx.name().map_err(err("device name"))?;
        let capability = ctx
            .compute_capability()
            .map_err(err("compute capability"))?;
        let (major, minor) = capability;
        let math = math.unwrap_or(Math::mixed_for(major));
        if math == Math::Bf16 && major < 8 {
            return Err(format!(
                "{name} (compute capability {major}.{minor}) has no bf16 conversions: bf16 mixed \
                 precision needs 8.0 or newer (A100, H100); use --math f16 (mixed precision with \
                 loss scaling) or f32"
            ));
        }
        if math == Math::F16 && major < 7 {
            return Err(format!(
                "{name} (compute capability {major}.{minor}) has no f16 tensor cores: use --math f32"
            ));
        }
        if math == Math::Tf32 && major < 8 {
            eprintln!(
                "effnet: {name} (compute capability {major}.{minor}) has no TF32: f32 products \
                 run as plain f32"
            );
        }
        let mut kernels = HashMap::new();
        // With 16-bit storage, a twinned source's twin is loaded under the original's names
        // instead of it; the other storages' twins are not compiled.
        let storage = math.twin_tag();
        for (file, source) in crate::units() {
            let tag = crate::twin_tag(&file);
            let replaced = storage.is_some() && crate::ACT_SOURCES.contains(&file.as_str());
            if tag != storage && (tag.is_some() || replaced) {
                continue;
            }
            let cubin = crate::compile_cubin(&file, &source, capability)?;
            let module = ctx
                .load_module(Ptx::from_binary(cubin))
                .map_err(err(&format!("loading the machine code of {file}")))?;
            for kernel in crate::kernel_names(&source) {
                let f = module
                    .load_function(kernel)
                    .map_err(err(&format!("loading kernel {kernel}")))?;
                let suffix = tag.map(|t| format!("_{t}")).unwrap_or_default();
                let name = kernel.strip_suffix(suffix.as_str()).unwrap_or(kernel);
                kernels.insert(name.to_string(), f);
            }
        }
        let blas = cudarc::cublas::result::create_handle().map_err(err("cublasCreate"))?;
        let dnn = cudarc::cudnn::result::create_handle().map_err(err("cudnnCreate"))?;
        // SAFETY: the handles were just created; the stream lives as long as `self`.
        unsafe {
            cudarc::cublas::result::set_stream(blas, stream.cu_stream() as _)
                .map_err(err("cublasSetStream"))?;
            cudarc::cudnn::result::set_stream(dnn, stream.cu_stream() as _)
                .map_err(err("cudnnSetStream"))?;
            // TF32 for f32 products where the chip has it (the small f32 products of mixed
            // precision too); f16 products take tensor cores by default.
            let mode = match math {
                Math::Tf32 | Math::Bf16 | Math::F16 if major >= 8 => {
                    blas_sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
                }
                _ => blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH,
            };
            blas_sys::cublasSetMathMode(blas, mode)
                .result()
                .map_err(err("cublasSetMathMode"))?;
        }
        const BLAS_WORKSPACE: usize = 32 << 20;
        let blas_workspace = stream
            .alloc_zeros::<u8>(BLAS_WORKSPACE)
            .map_err(err("allocating cuBLAS's workspace"))?;
        // SAFETY: the buffer lives as long as the handle (both in `Gpu`, the handle destroyed
        // first in `drop`).
        unsafe {
            let (ptr, _) = blas_workspace.device_ptr(&stream);
            blas_sys::cublasSetWorkspace_v2(blas, ptr as *mut _, BLAS_WORKSPACE)
                .result()
                .map_err(err("cublasSetWorkspace"))?;
        }
        Ok(Gpu {
            ctx,
            stream,
            blas,
            dnn,
            math,
            name,
            capability,
            kernels,
            _blas_workspace: blas_workspace,
            capture_failures: Cell::new(0),
        })
    }

    /// Records what `work` queues on the stream into a CUDA graph (nothing runs while it is
    /// recorded); `launch()` on the result replays it. Host-side effects of `work` happen once.
    pub fn capture(&self, work: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        // cudarc keeps errors of earlier frees and reports them at its next call: inside the
        // capture that would fail a launch and hide the cause.
        self.ctx
            .check_err()
            .map_err(err("an earlier device error"))?;
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(err("beginning a graph capture"))?;
        let recorded = work();
        let graph = self
            .stream
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(err("ending the graph capture"));
        if graph.is_err() {
            self.abandon_capture();
        }
        recorded?;
        graph?.ok_or_else(|| "the graph capture recorded nothing".to_string())
    }

    /// Ends a capture that cudarc's `end_capture` left open (it can fail before reaching the
    /// driver), so that the stream takes work again; the partial graph is discarded.
    fn abandon_capture(&self) {
        use cudarc::driver::result::{graph, stream};
        use cudarc::driver::sys::CUstreamCaptureStatus;
        let s = self.stream.cu_stream();
        // SAFETY: `s` is this device's live stream; a graph the driver returns is ours alone and
        // destroyed at once, never launched.
        unsafe {
            if stream::is_capturing(s)
                .is_ok_and(|c| c != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
            {
                if let Ok(g) = stream::end_capture(s) {
                    if !g.is_null() {
                        let _ = graph::destroy(g);
                    }
                }
            }
        }
    }

    pub fn kernel(&self, name: &str) -> &CudaFunction {
        self.kernels
            .get(name)
            .unwrap_or_else(|| panic!("no kernel {name} in the compiled sources"))
    }

    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        // At least one element: a zero-length allocation has no address to pass around.
        self.stream
            .alloc_zeros(len.max(1))
            .map_err(err("allocating device memory"))
    }

    pub fn upload(&self, host: &[f32]) -> Result<CudaSlice<f32>> {
        if host.is_empty() {
            return self.zeros(1);
        }
        self.stream.clone_htod(host).map_err(err("copy to device"))
    }

    /// Copies `host` into the start of `dst` (nothing to do for an empty `host`: SGD's second
    /// optimizer slot).
    pub fn write(&self, host: &[f32], dst: &mut CudaSlice<f32>) -> Result<()> {
        if host.is_empty() {
            return Ok(());
        }
        let mut view = dst.slice_mut(..host.len());
        self.stream
            .memcpy_htod(host, &mut view)
            .map_err(err("copy to device"))
    }

    /// The first `len` elements of `src`, on the host (waits for the stream).
    pub fn read<T: DeviceRepr + Default + Clone>(
        &self,
        src: &CudaSlice<T>,
        len: usize,
    ) -> Result<Vec<T>> {
        let mut host = vec![T::default(); len];
        if len == 0 {
            return Ok(host);
        }
        self.stream
            .memcpy_dtoh(&src.slice(..len), &mut host)
            .map_err(err("copy from device"))?;
        self.sync()?;
        Ok(host)
    }

    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(err("stream synchronize"))
    }

    /// Zeroes `len` f32 elements at `ptr`.
    pub fn memset_zero(&self, ptr: u64, len: usize) -> Result<()> {
        // SAFETY: `ptr` addresses at least `len` f32 of device memory (the caller's plan).
        unsafe { cudarc::driver::result::memset_d8_async(ptr, 0, len * 4, self.stream.cu_stream()) }
            .map_err(err("memset"))
    }

    /// Launches kernel `name` with `args` (raw addresses as `u64`, sizes as the kernel's types).
    pub fn launch(&self, name: &str, cfg: LaunchConfig, args: &[&dyn Arg]) -> Result<()> {
        let f = self.kernel(name);
        let mut b = self.stream.launch_builder(f);
        for a in args {
            a.push(&mut b);
        }
        // SAFETY: the caller passes the kernel's parameters in order and with its types, and
        // every address spans what the launch shape makes the kernel touch (net.rs plans both).
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(err(&format!("launching {name}")))
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // SAFETY: the handles were created in `new` and are destroyed once, here.
        unsafe {
            let _ = cudarc::cublas::result::destroy_handle(self.blas);
            let _ = cudarc::cudnn::result::destroy_handle(self.dnn);
        }
    }
}

/// The device address of a buffer's element `offset` (f32 or f64 elements).
pub fn addr<T>(buf: &CudaSlice<T>, stream: &CudaStream, offset: usize) -> u64 {
    let (ptr, _sync) = buf.device_ptr(stream);
    ptr + (offset * std::mem::size_of::<T>()) as u64
}

/// A kernel argument: pushed by value, as the kernel declares it.
pub trait Arg {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>);
}

macro_rules! kernel_arg {
    ($($t:ty),*) => {$(
        impl Arg for $t {
            fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
                b.arg(self);
            }
        }
    )*};
}
kernel_arg!(u64, i64, i32, f32, f64);

/// A 1D grid-stride launch over `n` elements.
pub fn linear(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535 * 4) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The 2D launch of the column reductions: (32 channels × 8 rows) threads, channel tiles in x,
/// `parts` row slices (or images) in y.
pub fn columns(c: usize, parts: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (c.div_ceil(32) as u32, parts.clamp(1, 65_535) as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    }
}

/// Row slices for the batch-norm partial sums: ~2048 rows each (see norm.cu).
pub fn bn_parts(rows: usize) -> usize {
    rows.div_ceil(2048).clamp(1, 4096)
}
