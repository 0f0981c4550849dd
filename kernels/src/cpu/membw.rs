//! The machine's streaming-read bandwidth, measured the way a decode step reads weights
//! (all threads, sequential, no writes): the baseline every bandwidth figure is a ratio to.

use rayon::prelude::*;
use std::time::Instant;

/// Best of `reps` parallel reads over a `bytes`-sized buffer, in bytes per second.
pub fn read_bandwidth(bytes: usize, reps: usize) -> f64 {
    let buf = vec![1u64; (bytes / 8).max(1 << 12)];
    let mut best = f64::INFINITY;
    let mut sink = 0u64;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        // Integer sums vectorize freely, so this is bound by memory, not by an add chain.
        sink = sink.wrapping_add(
            buf.par_chunks(1 << 15)
                .map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
                .reduce(|| 0, u64::wrapping_add),
        );
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    (buf.len() * 8) as f64 / best
}
