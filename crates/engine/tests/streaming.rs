//! Products whose output is far larger than the caches stream it past them
//! (`pointwise::Then::Stream`), on the cache lines that `effnet`'s allocator gives large
//! buffers ([`effnet_engine::LineAligned`], installed here as there): the same values as plain
//! stores. In a binary of its own: the allocator is the whole process's.

use effnet_engine::matmul::{matmul, Layout};

#[global_allocator]
static ALLOCATOR: effnet_engine::LineAligned = effnet_engine::LineAligned;

#[test]
fn large_blocks_sit_on_cache_lines_and_keep_their_bytes_when_resized() {
    let mut v: Vec<u32> = (0..1000).collect();
    // Grown past the threshold, then shrunk below it: moved both times, bytes kept.
    v.extend(1000..100_000);
    assert_eq!(
        v.as_ptr() as usize % 64,
        0,
        "a 400 KB block on a cache line"
    );
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
    v.truncate(100);
    v.shrink_to_fit();
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
}

#[test]
fn streamed_products_equal_stored_ones() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("a pool");
    // An input gradient like stage 2's at batch 8 (a 9 MB output, one reduction block).
    let (m, k, n) = (12_000, 48, 192);
    let a: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7919) % 13) as f32 * 0.1 - 0.6)
        .collect();
    let b: Vec<f32> = (0..k * n)
        .map(|i| ((i * 31) % 11) as f32 * 0.02 - 0.1)
        .collect();
    let mut streamed = vec![f32::NAN; m * n];
    assert_eq!(
        streamed.as_ptr() as usize % 64,
        0,
        "the output on a cache line"
    );
    let (normal, rows) = (Layout::Normal, 1000);
    pool.install(|| matmul(&mut streamed, m, n, k, &a, normal, &b, normal, false));
    // The same rows a few at a time: outputs of 0.8 MB, stored as usual.
    let mut stored = vec![f32::NAN; m * n];
    for (i, part) in stored.chunks_mut(rows * n).enumerate() {
        let r = part.len() / n;
        let a = &a[i * rows * k..][..r * k];
        pool.install(|| matmul(part, r, n, k, a, normal, &b, normal, false));
    }
    assert!(streamed == stored, "streamed and stored products differ");
}
