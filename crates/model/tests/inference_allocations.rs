//! An inference pass allocates nothing once its workspace is planned and frozen: every buffer
//! (activations, Winograd's per-thread scratch, prepared weights) is reused. What heap traffic
//! is left is rayon's own: a 32-byte job box for each worker kept awake during the pass, and at
//! times a little queue bookkeeping. This test binary holds one test, so nothing else allocates
//! while it counts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use effnet_engine::rng::Rng;
use effnet_model::{arch, Mode, Network, Weights};

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

#[test]
fn an_inference_pass_allocates_nothing_after_the_first() {
    if !effnet_engine::pointwise::available() {
        // Without the pointwise kernel, squeeze-excitation's products keep the general matrix
        // product, which packs (and allocates) per call.
        eprintln!("skipped: no AVX2+FMA on this CPU");
        return;
    }
    let threads = 2;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a pool");
    let mut config = arch("efficientnetv2_b0").expect("known");
    config.num_classes = 10;
    let net = Network::new(config);
    let mut weights = Weights::init(&net, 1);
    // 64 px: Winograd (3×3, stride 1, ≥ 32 input channels), direct and 1×1 convolutions,
    // depthwise, squeeze-excitation and residuals all run.
    let (n, size) = (2, 64);
    let mut ws = net.inference_workspace(n, size, size);
    let image: Vec<f32> = (0..n * size * size * 3)
        .map(|i| (i % 17) as f32 / 17.0)
        .collect();
    let mut rng = Rng::new(0);
    pool.install(|| {
        // In the pool that runs the passes: it also grows each worker's Winograd scratch.
        net.freeze(&weights, &mut ws);
        let mut pass = || {
            net.forward(&mut weights, &mut ws, &image, Mode::Eval, &mut rng)
                .iter()
                .sum::<f32>()
        };
        let first = pass();
        pass();
        COUNTING.store(true, Ordering::Relaxed);
        let passes = 3;
        let mut sums = Vec::with_capacity(passes);
        for _ in 0..passes {
            sums.push(pass());
        }
        COUNTING.store(false, Ordering::Relaxed);
        assert!(
            sums.iter().all(|&s| s == first),
            "passes differ: {first} vs {sums:?}"
        );
        let (count, largest) = (
            COUNT.load(Ordering::Relaxed),
            LARGEST.load(Ordering::Relaxed),
        );
        assert!(
            count <= 2 * passes * threads && largest <= 64,
            "{count} allocations in {passes} passes, the largest {largest} bytes"
        );
    });
}
