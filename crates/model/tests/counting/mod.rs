//! A global allocator that counts, and the network the tests that check a pass allocates
//! nothing run (each such test binary holds one test, so nothing else allocates while it
//! counts).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static COUNT: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged; the counters are atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            COUNT.fetch_add(1, Ordering::Relaxed);
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` counting allocations: returns its result, how many allocations it made and the
/// size of the largest in bytes.
pub fn counted<R>(f: impl FnOnce() -> R) -> (R, usize, usize) {
    COUNT.store(0, Ordering::Relaxed);
    LARGEST.store(0, Ordering::Relaxed);
    COUNTING.store(true, Ordering::Relaxed);
    let out = f();
    COUNTING.store(false, Ordering::Relaxed);
    (
        out,
        COUNT.load(Ordering::Relaxed),
        LARGEST.load(Ordering::Relaxed),
    )
}

/// What both allocation tests run: EfficientNetV2-B0 with 10 classes and random weights, a
/// pool of `THREADS` workers, and a batch of 2 images at 64 px (Winograd, direct and 1×1
/// convolutions, depthwise, squeeze-excitation and residuals all run at that size).
pub struct Case {
    pub pool: rayon::ThreadPool,
    pub net: effnet_model::Network,
    pub weights: effnet_model::Weights,
    pub image: Vec<f32>,
    pub n: usize,
    pub size: usize,
}

pub const THREADS: usize = 2;

pub fn b0_case() -> Case {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(THREADS)
        .build()
        .expect("a pool");
    let mut config = effnet_model::arch("efficientnetv2_b0").expect("known");
    config.num_classes = 10;
    let net = effnet_model::Network::new(config);
    let weights = effnet_model::Weights::init(&net, 1);
    let (n, size) = (2, 64);
    let image = (0..n * size * size * 3)
        .map(|i| (i % 17) as f32 / 17.0)
        .collect();
    Case {
        pool,
        net,
        weights,
        image,
        n,
        size,
    }
}
