//! NCCL for data-parallel training on GPUs: one communicator across the replicas (one process
//! per GPU, `mpirun -np N`), its unique id sent from rank 0 over the MPI [`Communicator`], as
//! Horovod does. Gradients are averaged in device memory, on the device's stream.

use std::ffi::c_char;
use std::mem::MaybeUninit;

use cudarc::nccl::{result as nccl, sys};
use effnet_dist::Communicator;

use crate::device::{Gpu, Result};

/// Where to get NCCL when it is missing.
pub const NCCL_HELP: &str = "NCCL (libnccl.so.2) comes with PyTorch's wheels \
(nvidia-nccl-cu12) or NVIDIA's libnccl2 package; put its directory on LD_LIBRARY_PATH.";

/// Whether this process can open NCCL.
pub fn nccl_present() -> bool {
    // SAFETY: only tries to dlopen cudarc's candidate names.
    unsafe { sys::is_culib_present() }
}

pub struct Nccl {
    comm: sys::ncclComm_t,
    replicas: usize,
}

fn nccl_err(what: &'static str) -> impl FnOnce(nccl::NcclError) -> String {
    move |e| format!("NCCL {what}: {e:?}")
}

impl Nccl {
    /// Joins the replicas' NCCL communicator (collective: every rank of `comm` calls it).
    pub fn new(gpu: &Gpu, comm: &dyn Communicator) -> Result<Nccl> {
        let mut id = vec![0u8; 128];
        if comm.rank() == 0 {
            let unique = nccl::get_uniqueid().map_err(nccl_err("ncclGetUniqueId"))?;
            for (b, c) in id.iter_mut().zip(unique.internal) {
                *b = c as u8;
            }
        }
        comm.broadcast_bytes(&mut id, 0)?;
        if id.len() != 128 {
            return Err(format!("NCCL unique id of {} bytes from rank 0", id.len()));
        }
        let mut internal = [0 as c_char; 128];
        for (c, b) in internal.iter_mut().zip(&id) {
            *c = *b as c_char;
        }
        // NCCL takes the calling thread's current device.
        gpu.ctx
            .bind_to_thread()
            .map_err(|e| format!("binding the CUDA context: {e:?}"))?;
        let mut handle = MaybeUninit::uninit();
        // SAFETY: `handle` is written by ncclCommInitRank before it is read; rank and size come
        // from the MPI communicator every replica shares.
        let comm_handle = unsafe {
            nccl::comm_init_rank(
                handle.as_mut_ptr(),
                comm.size() as i32,
                sys::ncclUniqueId { internal },
                comm.rank() as i32,
            )
            .map_err(nccl_err("ncclCommInitRank"))?;
            handle.assume_init()
        };
        Ok(Nccl {
            comm: comm_handle,
            replicas: comm.size(),
        })
    }

    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// All-reduces `len` values of `dtype` at `ptr` in place on the device's stream.
    pub fn all_reduce(
        &self,
        gpu: &Gpu,
        ptr: u64,
        len: usize,
        dtype: sys::ncclDataType_t,
        op: sys::ncclRedOp_t,
    ) -> Result<()> {
        // SAFETY: `ptr` addresses `len` elements of `dtype` on this communicator's device (the
        // caller's buffer), and the stream is the device's one stream.
        unsafe {
            nccl::all_reduce(
                ptr as *const _,
                ptr as *mut _,
                len,
                dtype,
                op,
                self.comm,
                gpu.stream.cu_stream() as _,
            )
        }
        .map(|_| ())
        .map_err(nccl_err("ncclAllReduce"))
    }

    /// Averages `len` f32 at `ptr` over the replicas.
    pub fn all_reduce_mean_f32(&self, gpu: &Gpu, ptr: u64, len: usize) -> Result<()> {
        self.all_reduce(
            gpu,
            ptr,
            len,
            sys::ncclDataType_t::ncclFloat32,
            sys::ncclRedOp_t::ncclAvg,
        )
    }

    /// Sums `len` f16 (16-bit words) at `ptr` over the replicas.
    pub fn all_reduce_sum_f16(&self, gpu: &Gpu, ptr: u64, len: usize) -> Result<()> {
        self.all_reduce(
            gpu,
            ptr,
            len,
            sys::ncclDataType_t::ncclFloat16,
            sys::ncclRedOp_t::ncclSum,
        )
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: the communicator was created in `new` and is destroyed once, here.
        unsafe {
            let _ = nccl::comm_destroy(self.comm);
        }
    }
}
