//! CPU kernels for EfficientNet, forward and backward, over NHWC `f32` activations.
//!
//! Every kernel works on plain slices: the caller (the model crate) owns the memory, plans it
//! once per (batch, resolution) and reuses it, so a training step allocates nothing here.
//! Weights arrive in PyTorch's layout (the flat parameter buffer mirrors timm's state dict);
//! kernels that want another layout take a packed copy made by the caller.

pub mod act;
pub mod ceiling;
pub mod conv;
pub mod depthwise;
pub mod linear;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod pointwise;
pub mod pool;
pub mod regularize;
pub mod rng;
pub mod se;
pub mod shape;
pub mod simd;
pub mod winograd;

pub use act::Act;

/// The precision mode a user picks for the CPU's matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f32 throughout: the reference results.
    F32,
    /// Products on bf16 operands with f32 sums, where the CPU has AVX512_BF16: in inference
    /// the blocks' expansions (`Network::freeze_in`, [`pointwise::Panels::Bf16`]), in
    /// training every general product ([`matmul::set_bf16`]); everything else f32.
    Bf16,
}

impl Precision {
    /// `f32` or `bf16`.
    pub fn parse(s: &str) -> Result<Precision, String> {
        match s {
            "f32" | "fp32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(format!("unknown precision {s:?} (f32 or bf16)")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// Whether this CPU runs it (bf16 products need AVX-512 with AVX512_BF16).
    pub fn available(self) -> bool {
        self == Precision::F32 || pointwise::bf16_available()
    }
}

/// Idle polls of [`on_pool_awake`]'s pollers between two yields of their core (some µs).
const YIELD_EVERY: u32 = 64;

/// Runs `f` on a worker of the thread pool, the other workers kept awake until it returns: each
/// polls the pool for work instead of going to sleep between parallel loops. A parallel loop
/// started from a thread outside the pool wakes a worker and puts the caller to sleep; a sleeping
/// worker takes 30–100 µs to wake on a virtual machine, as long as a small layer's work, and
/// rayon puts idle workers to sleep sooner than the gaps between some layers. ONNX Runtime's and
/// OpenMP's pools spin the same way. Wrap whole passes, and never code that waits on another
/// thread which may need the pool (the data loader's threads use it): with every worker busy
/// or waiting, nothing would run. A poller gives its core up (`sched_yield`) every few polls,
/// so that other runnable threads (a data loader's) are not starved by the spinning while `f`
/// runs serial code. A poller may run other work queued on the pool meanwhile (another thread's
/// pass, a loader's resize), and `f` returns only after it has finished.
pub fn on_pool_awake<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use std::sync::atomic::{AtomicBool, Ordering};
    /// Stops the pollers when `f` returns or panics (the scope waits for them either way).
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    let others = rayon::current_num_threads().saturating_sub(1);
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        let (caller, stop) = (rayon::current_thread_index(), &done);
        for _ in 0..others {
            s.spawn(move |_| {
                // A poller that starts on the caller's own thread means `f` is waiting there
                // (for work elsewhere, or it has returned): polling would keep `f` from going on.
                if rayon::current_thread_index() == caller {
                    return;
                }
                let mut idle = 0u32;
                while !stop.load(Ordering::Acquire) {
                    if rayon::yield_now() == Some(rayon::Yield::Executed) {
                        idle = 0;
                        continue;
                    }
                    idle += 1;
                    match idle.is_multiple_of(YIELD_EVERY) {
                        true => std::thread::yield_now(),
                        false => std::hint::spin_loop(),
                    }
                }
            });
        }
        let _stop = Stop(&done);
        f()
    })
}

pub use shape::{same_padding, Nhwc};

/// The largest size that any worker's buffer of one kind (packing, Winograd's scratch) has
/// been asked for. Tasks land on workers by chance, so a worker may meet a kind's largest need
/// for the first time many passes in; growing every worker's buffer to the high-water mark
/// ([`spread_worker_buffers`]) after a pass that raised it keeps later passes from allocating.
pub(crate) struct HighWater(std::sync::atomic::AtomicUsize);

/// Whether some [`HighWater`] rose since the last [`spread_worker_buffers`].
static RAISED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl HighWater {
    pub(crate) const fn new() -> HighWater {
        HighWater(std::sync::atomic::AtomicUsize::new(0))
    }

    /// `buf[..len]`, `buf` grown first (to the high-water mark) if it is shorter.
    pub(crate) fn grow<'a, T: Copy + Default>(
        &self,
        buf: &'a mut Vec<T>,
        len: usize,
    ) -> &'a mut [T] {
        use std::sync::atomic::Ordering;
        let before = self.0.fetch_max(len, Ordering::Relaxed);
        if before < len {
            RAISED.store(true, Ordering::Relaxed);
        }
        if buf.len() < len {
            buf.resize(before.max(len), T::default());
        }
        &mut buf[..len]
    }

    /// `buf` grown to the high-water mark.
    pub(crate) fn reach<T: Copy + Default>(&self, buf: &mut Vec<T>) {
        let high = self.0.load(std::sync::atomic::Ordering::Relaxed);
        if buf.len() < high {
            buf.resize(high, T::default());
        }
    }
}

/// Grows every worker's kept buffers to their kinds' high-water marks, if any rose since the
/// last call (a broadcast over the pool then; otherwise nothing). Run after each pass.
pub fn spread_worker_buffers() {
    if RAISED.swap(false, std::sync::atomic::Ordering::Relaxed) {
        rayon::broadcast(|_| {
            conv::reach_high_water();
            matmul::reach_high_water();
            winograd::reach_high_water();
            pointwise::reach_high_water();
        });
    }
}

/// `buf[..len]`, grown to that first if it is shorter (a kept buffer).
pub(crate) fn at_least<T: Copy + Default>(buf: &mut Vec<T>, len: usize) -> &mut [T] {
    if buf.len() < len {
        buf.resize(len, T::default());
    }
    &mut buf[..len]
}

/// `f` with `kept`, buffers a kernel keeps between calls so that a training step allocates
/// nothing once they have grown, or with `fresh()` ones while another call holds them: the
/// network runs one such kernel at a time, tests run several at once.
pub(crate) fn with_kept<T, R>(
    kept: &std::sync::Mutex<T>,
    fresh: impl FnOnce() -> T,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    match kept.try_lock() {
        Ok(mut buffers) => f(&mut buffers),
        Err(_) => f(&mut fresh()),
    }
}

/// The global allocator of programs that run the engine on large tensors (`effnet` installs
/// it): the system's, with blocks of 64 KiB and more on 64-byte lines. Kernels can then write
/// whole cache lines of an activation past the caches ([`pointwise::Then::Stream`]); malloc
/// alone puts large blocks 16 bytes off a line. Small blocks are left as asked.
pub struct LineAligned;

impl LineAligned {
    /// `layout`, aligned to a cache line when large.
    fn widen(layout: std::alloc::Layout) -> std::alloc::Layout {
        match layout.size() >= 64 << 10 {
            true => layout.align_to(64).unwrap_or(layout),
            false => layout,
        }
    }
}

// SAFETY: every call goes to the system allocator with the layout `widen` gives, a function of
// the caller's layout alone, so a block is freed (or resized) with the layout it was made with;
// `widen` only raises the alignment, which still satisfies the caller's.
unsafe impl std::alloc::GlobalAlloc for LineAligned {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        unsafe { std::alloc::System.alloc(Self::widen(layout)) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        unsafe { std::alloc::System.alloc_zeroed(Self::widen(layout)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, Self::widen(layout)) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        let (old, new) = match std::alloc::Layout::from_size_align(size, layout.align()) {
            Ok(new) => (Self::widen(layout), Self::widen(new)),
            Err(_) => return std::ptr::null_mut(),
        };
        if old.align() == new.align() {
            return unsafe { std::alloc::System.realloc(ptr, old, size) };
        }
        // Across the threshold: a new block with the new alignment, the old one's bytes moved.
        let fresh = unsafe { std::alloc::System.alloc(new) };
        if !fresh.is_null() {
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, fresh, layout.size().min(size));
                std::alloc::System.dealloc(ptr, old);
            }
        }
        fresh
    }
}

#[cfg(test)]
mod tests {
    use rayon::prelude::*;

    /// The pollers take the pass's parallel work and stop when it returns, waits on another
    /// pool, or panics (the panic reaches the caller instead of the scope waiting forever).
    #[test]
    fn awake_pass_runs_parallel_work_and_ends_on_panic() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("a pool");
        pool.install(|| {
            let sum = super::on_pool_awake(|| (0..10_000u64).into_par_iter().sum::<u64>());
            assert_eq!(sum, 49_995_000);
            let threads = super::on_pool_awake(|| {
                (0..64)
                    .into_par_iter()
                    .map(|_| {
                        std::thread::sleep(std::time::Duration::from_millis(2));
                        rayon::current_thread_index()
                    })
                    .collect::<std::collections::HashSet<_>>()
                    .len()
            });
            assert!(threads > 1, "only {threads} worker ran the loop");
            // `f` waiting on another pool: its own thread may pick a poller up meanwhile.
            let other = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .expect("a pool");
            assert_eq!(super::on_pool_awake(|| other.install(|| 7)), 7);
            let caught =
                std::panic::catch_unwind(|| super::on_pool_awake(|| panic!("in the pass")));
            assert!(caught.is_err());
        });
    }
}
