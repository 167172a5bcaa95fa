//! Measures the disk store's read throughput, warm (page cache) against cold (each load from the device), on one
//! Qwen3-30B-A3B-shaped MoE layer: 128 experts of `d` = 2048, `f` = 768 in BF16, 1.2 GB.
//!
//! ```text
//! cargo run --release -p moe-models --example disk_read_throughput -- [DIR] [N_EXPERTS]
//! ```
//! writes `DIR/qwen3-layer.safetensors` (default `DIR` = `target/store-bench`), loads every expert in a scrambled
//! order, and prints MB/s per pass with the bytes the kernel read from storage (`read_bytes` of `/proc/self/io`).
//! MB/s counts the file's bytes (BF16) and includes the conversion to f32.

#[cfg(unix)]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    bench::run()
}

#[cfg(not(unix))]
fn main() {
    eprintln!("the disk store needs a unix system");
}

#[cfg(unix)]
mod bench {
    use std::path::PathBuf;
    use std::time::Instant;

    use moe_core::store::ExpertSource;
    use moe_models::store::{DiskDtype, DiskSource, Layout, write_expert_checkpoint};

    const PREFIX: &str = "model.layers.0.mlp.";

    /// Bytes this process has caused to be fetched from storage so far (`read_bytes` of `/proc/self/io`).
    fn storage_read_bytes() -> Option<u64> {
        let io = std::fs::read_to_string("/proc/self/io").ok()?;
        io.lines()
            .find_map(|l| l.strip_prefix("read_bytes: "))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Loads every expert once in a scrambled order (dropping the file's page cache before each load when
    /// `drop_each`); prints and returns MB/s.
    fn pass(
        label: &str,
        src: &DiskSource,
        dst: &mut [Vec<f32>],
        drop_each: bool,
    ) -> Result<f64, Box<dyn std::error::Error>> {
        let n = src.n_experts();
        let before = storage_read_bytes();
        let t = Instant::now();
        for i in 0..n {
            // 37 is prime to any n that is not a multiple of 37: a permutation of the experts.
            let e = (i * 37 + 11) % n;
            if drop_each {
                src.drop_page_cache()?;
            }
            let mut slices: Vec<&mut [f32]> = dst.iter_mut().map(Vec::as_mut_slice).collect();
            src.load(e, &mut slices)?;
        }
        let secs = t.elapsed().as_secs_f64();
        let bytes = src.stored_bytes_per_expert() * n as u64;
        let mbps = bytes as f64 / secs / 1e6;
        let from_storage = match (before, storage_read_bytes()) {
            (Some(a), Some(b)) => format!("{:.1} MB", (b - a) as f64 / 1e6),
            _ => "unknown".into(),
        };
        println!(
            "{label:<34} {n} experts, {:.1} MB in {:.3} s: {mbps:>8.1} MB/s ({:.2} ms per expert); read from storage: {from_storage}",
            bytes as f64 / 1e6,
            secs,
            secs * 1e3 / n as f64
        );
        Ok(mbps)
    }

    pub fn run() -> Result<(), Box<dyn std::error::Error>> {
        let mut args = std::env::args().skip(1);
        let dir = PathBuf::from(args.next().unwrap_or_else(|| "target/store-bench".into()));
        let n_experts: usize = args.next().map_or(Ok(128), |s| s.parse())?;
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("qwen3-layer.safetensors");
        let t = Instant::now();
        write_expert_checkpoint(
            &path,
            PREFIX,
            Layout::PerExpert,
            n_experts,
            2048,
            768,
            DiskDtype::Bf16,
            1,
            true,
        )?;
        let len = std::fs::metadata(&path)?.len();
        println!(
            "wrote {} ({:.1} MB) in {:.1} s",
            path.display(),
            len as f64 / 1e6,
            t.elapsed().as_secs_f64()
        );
        let src = DiskSource::open(&path, PREFIX)?;
        println!(
            "{}: {} bytes per expert",
            src.describe(),
            src.stored_bytes_per_expert()
        );
        let mut dst: Vec<Vec<f32>> = src
            .form()
            .tensors()
            .iter()
            .map(|(_, n)| vec![0.0; *n])
            .collect();
        // Warm: the file is in the page cache after the first pass.
        pass("warm-up (page cache state unknown)", &src, &mut dst, false)?;
        for i in 1..=3 {
            pass(&format!("warm pass {i}"), &src, &mut dst, false)?;
        }
        // Cold, readahead on: the page cache dropped once, then one pass.
        src.drop_page_cache()?;
        pass(
            "cold pass (cache dropped, readahead)",
            &src,
            &mut dst,
            false,
        )?;
        // Cold on every load, readahead on: the whole file's cache dropped before each load.
        pass("cold each load (drop, readahead)", &src, &mut dst, true)?;
        // Cold on every load: no readahead, each expert's ranges dropped after reading.
        src.drop_page_cache()?;
        let cold = src.with_cold_reads(true)?;
        for i in 1..=2 {
            pass(&format!("cold reads pass {i}"), &cold, &mut dst, false)?;
        }
        std::fs::remove_file(&path)?;
        Ok(())
    }
}
