//! Tests of the product kernels against a naive product, on ragged shapes and both weight layouts.

use super::*;

/// The portable kernels always, and the AVX-512 dot kernel where this CPU has it (printed, so a log says
/// which ran).
fn both_kernel_sets() -> Vec<Kernels> {
    let auto = Kernels::new(crate::cpu::CpuKernels::Auto);
    let portable = Kernels::new(crate::cpu::CpuKernels::Portable);
    assert!(!portable.dot);
    println!("kernel sets tested: portable, and auto = {auto:?}");
    if auto.dot {
        vec![portable, auto]
    } else {
        vec![portable]
    }
}

fn naive(m: usize, n: usize, k: usize, a: &[f32], w: Weights<'_>) -> Vec<f64> {
    let mut c = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k)
                .map(|kk| a[i * k + kk] as f64 * w.data[j * w.col_stride + kk * w.k_stride] as f64)
                .sum();
        }
    }
    c
}

#[test]
fn every_kernel_matches_a_naive_product_on_ragged_shapes() {
    for &(m, n, k) in &[
        (1, 1, 1),
        (3, 7, 5),
        (4, 6, 16),
        (5, 13, 33),
        (SMALL_ROWS, 19, 70),
        (SMALL_ROWS + 1, 19, 70),
        (97, 31, 129),
        // Long reductions with a tail.
        (9, 13, 1100),
        (SMALL_ROWS, 7, 1030),
        // Above the transposed path's limit: plain gemm.
        (TRANSPOSED_ROWS + 3, 9, 37),
    ] {
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37) % 23) as f32 / 23.0 - 0.5)
            .collect();
        let wdata: Vec<f32> = (0..n * k)
            .map(|i| ((i * 11) % 19) as f32 / 19.0 - 0.5)
            .collect();
        // Both layouts of W: reduction axis contiguous (dot kernel eligible) and strided (gemm only).
        for w in [
            Weights {
                data: &wdata,
                col_stride: k,
                k_stride: 1,
            },
            Weights {
                data: &wdata,
                col_stride: 1,
                k_stride: n,
            },
        ] {
            let want = naive(m, n, k, &a, w);
            for kernels in both_kernel_sets() {
                let mut c = vec![f32::NAN; m * n];
                par_tiles(&mut c, n, &[0, m], n, 4, |_, col0, mut t| {
                    t.matmul(&a, k, k, w, col0, kernels)
                })
                .unwrap_or_else(|e| panic!("{e}"));
                for (got, want) in c.iter().zip(&want) {
                    assert!(
                        (*got as f64 - want).abs() < 1e-4,
                        "{m}x{n}x{k} ({kernels:?}): {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn out_of_bounds_operands_are_errors() {
    let mut c = vec![0f32; 4];
    let a = vec![1f32; 3];
    let w = vec![1f32; 4];
    let r = par_tiles(&mut c, 2, &[0, 2], 2, 2, |_, col0, mut t| {
        t.matmul(
            &a,
            2,
            2,
            Weights {
                data: &w,
                col_stride: 2,
                k_stride: 1,
            },
            col0,
            Kernels::new(crate::cpu::CpuKernels::Portable),
        )
    });
    assert!(r.is_err());
    assert!(par_tiles(&mut c, 2, &[0, 3], 2, 2, |_, _, _| Ok(())).is_err());
}
