//! Machine probes that give the CPU figures a scale: the memory read bandwidth (what a call with few tokens per
//! expert, which streams every weight once, can at best reach).

use std::time::Instant;

use rayon::prelude::*;

use moe_core::MoeError;

/// Largest buffer the probe accepts (16 GiB).
const MAX_PROBE_BYTES: usize = 1 << 34;

/// Read bandwidth in GB/s (10⁹ bytes/s): the median of `repeats` read-only passes (a sum) over a buffer of `bytes`
/// bytes, in parallel on `threads` threads. Use a buffer much larger than the last-level cache (1 GiB or more).
///
/// # Errors
/// [`MoeError::InvalidConfig`] for a buffer under 1 MiB or over 16 GiB, or zero repeats;
/// [`MoeError::Backend`] if the thread pool cannot start.
pub fn read_bandwidth(bytes: usize, threads: usize, repeats: usize) -> Result<f64, MoeError> {
    if !(1 << 20..=MAX_PROBE_BYTES).contains(&bytes) {
        return Err(MoeError::config(
            "probe bytes",
            bytes,
            "between 1 MiB and 16 GiB",
        ));
    }
    if repeats == 0 {
        return Err(MoeError::config("probe repeats", 0, "must be >= 1"));
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(|e| MoeError::Backend {
            backend: "cpu".into(),
            reason: e.to_string(),
        })?;
    let n = bytes / 4;
    let buf: Vec<f32> = pool.install(|| (0..n).into_par_iter().map(|i| (i % 7) as f32).collect());
    let mut times = Vec::with_capacity(repeats);
    let mut sink = 0.0f32;
    for _ in 0..=repeats {
        let t0 = Instant::now();
        let s: f32 = pool.install(|| {
            buf.par_chunks(1 << 16)
                .map(|c| {
                    // 16 independent lanes, so the pass is bound by memory, not by one add chain.
                    let lanes = c.chunks_exact(16).fold([0.0f32; 16], |mut acc, x| {
                        acc.iter_mut().zip(x).for_each(|(a, &b)| *a += b);
                        acc
                    });
                    lanes.iter().sum::<f32>()
                })
                .sum()
        });
        times.push(t0.elapsed().as_secs_f64());
        sink += s;
    }
    std::hint::black_box(sink);
    // The first pass warms the pages and the pool: not counted.
    let mut times = times.split_off(1);
    times.sort_by(f64::total_cmp);
    Ok((n * 4) as f64 / times[times.len() / 2] / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_is_positive_and_bad_sizes_are_errors() {
        let gbs = read_bandwidth(8 << 20, 2, 3).unwrap_or_else(|e| panic!("{e}"));
        assert!(gbs.is_finite() && gbs > 0.0);
        assert!(read_bandwidth(10, 1, 1).is_err());
        assert!(read_bandwidth(8 << 20, 1, 0).is_err());
    }
}
