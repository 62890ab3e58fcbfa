//! NCCL for data-parallel training on GPUs: one communicator across the replicas (one process
//! per GPU, `mpirun -np N`), its unique id sent from rank 0 over the MPI [`Communicator`], as
//! Horovod does. Gradients are summed in device memory, on the device's stream.
//!
//! The five functions used are bound here, opening `libnccl.so.2` (the name NCCL's wheels and
//! packages install): cudarc's loader looks only for `libnccl.so` and CUDA-versioned names.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

use effnet_dist::Communicator;
use libloading::{Library, Symbol};

use crate::device::{Gpu, Result};

/// Where to get NCCL when it is missing.
pub const NCCL_HELP: &str = "NCCL (libnccl.so.2) comes with PyTorch's wheels \
(nvidia-nccl-cu12) or NVIDIA's libnccl2 package; put its directory on LD_LIBRARY_PATH.";

/// The names tried, in order, on the loader's search path.
const LIBRARY_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// `ncclUniqueId`: 128 opaque bytes, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; 128],
}

/// `ncclComm_t`.
type Comm = *mut c_void;

/// `ncclDataType_t` and `ncclRedOp_t` values (nccl.h).
const NCCL_FLOAT16: c_int = 6;
const NCCL_FLOAT32: c_int = 7;
const NCCL_FLOAT64: c_int = 8;
const NCCL_SUM: c_int = 0;

/// The library, opened once per process (None when absent).
fn library() -> Option<&'static Library> {
    static LIB: OnceLock<Option<Library>> = OnceLock::new();
    LIB.get_or_init(|| {
        LIBRARY_NAMES.iter().find_map(|name| {
            // SAFETY: loading NCCL runs its initializers only, which have no preconditions.
            unsafe { Library::new(*name) }.ok()
        })
    })
    .as_ref()
}

/// Whether this process can open NCCL.
pub fn nccl_present() -> bool {
    library().is_some()
}

/// Looks up `name` in NCCL (present: checked by the callers).
fn symbol<T>(name: &[u8]) -> Result<Symbol<'static, T>> {
    let lib = library().ok_or_else(|| format!("NCCL not found. {NCCL_HELP}"))?;
    // SAFETY: each caller names T as nccl.h declares the function.
    unsafe { lib.get(name) }
        .map_err(|e| format!("NCCL has no {}: {e}", String::from_utf8_lossy(name)))
}

/// NCCL's status code as an error naming the call.
fn check(what: &str, code: c_int) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    let text = symbol::<unsafe extern "C" fn(c_int) -> *const c_char>(b"ncclGetErrorString\0")
        .ok()
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
        .map(|f| {
            unsafe { CStr::from_ptr(f(code)) }
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    Err(format!("NCCL {what}: error {code} {text}"))
}

pub struct Nccl {
    comm: Comm,
    replicas: usize,
}

impl Nccl {
    /// Joins the replicas' NCCL communicator (collective: every rank of `comm` calls it). Rank
    /// 0 sends a status byte with the id, so a failure there fails every rank alike.
    pub fn new(gpu: &Gpu, comm: &dyn Communicator) -> Result<Nccl> {
        let mut message = vec![0u8; 129];
        let mut failure = None;
        if comm.rank() == 0 {
            let get = symbol::<unsafe extern "C" fn(*mut UniqueId) -> c_int>(b"ncclGetUniqueId\0");
            let mut id = UniqueId { internal: [0; 128] };
            // SAFETY: `id` is a valid place for the 128 bytes NCCL writes.
            match get.and_then(|f| check("ncclGetUniqueId", unsafe { f(&mut id) })) {
                Ok(()) => {
                    message[0] = 1;
                    for (b, c) in message[1..].iter_mut().zip(id.internal) {
                        *b = c as u8;
                    }
                }
                Err(e) => failure = Some(e),
            }
        }
        comm.broadcast_bytes(&mut message, 0)?;
        if message.len() != 129 || message[0] != 1 {
            return Err(failure.unwrap_or_else(|| "rank 0 could not create an NCCL id".into()));
        }
        let mut id = UniqueId { internal: [0; 128] };
        for (c, b) in id.internal.iter_mut().zip(&message[1..]) {
            *c = *b as c_char;
        }
        // NCCL takes the calling thread's current device.
        gpu.ctx
            .bind_to_thread()
            .map_err(|e| format!("binding the CUDA context: {e:?}"))?;
        let init = symbol::<unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int>(
            b"ncclCommInitRank\0",
        )?;
        let mut handle: Comm = std::ptr::null_mut();
        // SAFETY: `handle` receives the communicator; rank and size come from the MPI
        // communicator every replica shares, the id from rank 0.
        let code = unsafe { init(&mut handle, comm.size() as c_int, id, comm.rank() as c_int) };
        check("ncclCommInitRank", code)?;
        Ok(Nccl {
            comm: handle,
            replicas: comm.size(),
        })
    }

    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// Sums `len` values of NCCL type `dtype` at `ptr` over the replicas, in place, on the
    /// device's stream.
    fn all_reduce_sum(&self, gpu: &Gpu, ptr: u64, len: usize, dtype: c_int) -> Result<()> {
        type AllReduce = unsafe extern "C" fn(
            *const c_void,
            *mut c_void,
            usize,
            c_int,
            c_int,
            Comm,
            *mut c_void,
        ) -> c_int;
        let all_reduce = symbol::<AllReduce>(b"ncclAllReduce\0")?;
        // SAFETY: `ptr` addresses `len` elements of `dtype` on this communicator's device (the
        // caller's buffer), and the stream is the device's one stream.
        let code = unsafe {
            all_reduce(
                ptr as *const c_void,
                ptr as *mut c_void,
                len,
                dtype,
                NCCL_SUM,
                self.comm,
                gpu.stream.cu_stream() as *mut c_void,
            )
        };
        check("ncclAllReduce", code)
    }

    /// Sums `len` f32 at `ptr` over the replicas.
    pub fn all_reduce_sum_f32(&self, gpu: &Gpu, ptr: u64, len: usize) -> Result<()> {
        self.all_reduce_sum(gpu, ptr, len, NCCL_FLOAT32)
    }

    /// Sums `len` f64 at `ptr` over the replicas (synchronized batch norm's statistics).
    pub fn all_reduce_sum_f64(&self, gpu: &Gpu, ptr: u64, len: usize) -> Result<()> {
        self.all_reduce_sum(gpu, ptr, len, NCCL_FLOAT64)
    }

    /// Sums `len` f16 (16-bit words) at `ptr` over the replicas.
    pub fn all_reduce_sum_f16(&self, gpu: &Gpu, ptr: u64, len: usize) -> Result<()> {
        self.all_reduce_sum(gpu, ptr, len, NCCL_FLOAT16)
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        if let Ok(destroy) = symbol::<unsafe extern "C" fn(Comm) -> c_int>(b"ncclCommDestroy\0") {
            // SAFETY: the communicator was created in `new` and is destroyed once, here.
            unsafe { destroy(self.comm) };
        }
    }
}
