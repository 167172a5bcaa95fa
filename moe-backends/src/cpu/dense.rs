//! Dense matrix products on the CPU for the parts of a model around the MoE layers (attention projections, the
//! output head, their backward): the same `gemm` kernels as the expert products, tiled the same way.
//!
//! [`matmul_nt`] computes `C = A · Bᵀ` for operands given as ndarray views of any (non-negative) strides, so one
//! entry point covers a forward `Y = X · Wᵀ`, an input gradient `dX = dY · W` (`B = Wᵀ`, a transposed view) and a
//! weight gradient `dW = dYᵀ · X` (`A = dYᵀ`, `B = Xᵀ`). Threads (rayon, the pool the call runs in) take tiles of
//! `C` (blocks of [`ROW_BLOCK`] rows times [`COL_BLOCK`] columns); each tile is one single-threaded `gemm` call over
//! the whole reduction, so every value is computed by the same code in the same order on any thread count:
//! results are bit-identical on 1 and 16 threads.

use ndarray::{ArrayView2, ArrayViewMut2};

use moe_core::MoeError;

use super::kernels::{Strided, Tile, Weights, par_tiles, view_slice};

/// Rows of `C` per tile.
pub const ROW_BLOCK: usize = 64;
/// Columns of `C` per tile.
pub const COL_BLOCK: usize = 128;

/// `c = a · bᵀ` (`beta = 0`: `c` is overwritten) for `a` `[m, k]`, `b` `[n, k]`, `c` `[m, n]` in standard
/// (row-major, contiguous) layout. `a` and `b` may have any non-negative strides (transposed views included).
///
/// # Errors
/// [`MoeError::Shape`] naming the operand whose shape does not fit; [`MoeError::Backend`] for an operand with a
/// negative stride or a `c` that is not contiguous row-major.
pub fn matmul_nt(
    mut c: ArrayViewMut2<'_, f32>,
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
) -> Result<(), MoeError> {
    let (m, k) = a.dim();
    let (n, kb) = b.dim();
    if kb != k {
        return Err(MoeError::shape("b", format!("[{n}, {k}]"), b.shape()));
    }
    if c.dim() != (m, n) {
        return Err(MoeError::shape("c", format!("[{m}, {n}]"), c.shape()));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let backend = |reason: &str| MoeError::Backend {
        backend: "cpu".into(),
        reason: reason.to_string(),
    };
    let stride = |s: isize| usize::try_from(s).map_err(|_| backend("negative stride"));
    let (a_rs, a_cs) = (stride(a.strides()[0])?, stride(a.strides()[1])?);
    let (b_rs, b_cs) = (stride(b.strides()[0])?, stride(b.strides()[1])?);
    let a_data = view_slice(&a).ok_or_else(|| backend("a is not one contiguous allocation"))?;
    let b_data = view_slice(&b).ok_or_else(|| backend("b is not one contiguous allocation"))?;
    let c_data = c
        .as_slice_mut()
        .ok_or_else(|| backend("c is not contiguous row-major"))?;
    if k == 0 {
        c_data.fill(0.0);
        return Ok(());
    }
    let offsets: Vec<usize> = (0..m.div_ceil(ROW_BLOCK))
        .map(|g| g * ROW_BLOCK)
        .chain(std::iter::once(m))
        .collect();
    let w = Weights {
        data: b_data,
        col_stride: b_rs,
        k_stride: b_cs,
    };
    par_tiles(
        c_data,
        n,
        &offsets,
        n,
        COL_BLOCK,
        |g, col0, mut tile: Tile<'_>| {
            let row0 = offsets[g];
            let a_tile = Strided {
                data: &a_data[row0 * a_rs..],
                rs: a_rs,
                cs: a_cs,
            };
            tile.matmul_strided(a_tile, k, w, col0)
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_core::rng::SeqRng;
    use ndarray::Array2;

    fn naive(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>) -> Array2<f32> {
        let mut c = Array2::zeros((a.nrows(), b.nrows()));
        for i in 0..a.nrows() {
            for j in 0..b.nrows() {
                let mut s = 0.0f64;
                for kk in 0..a.ncols() {
                    s += f64::from(a[[i, kk]]) * f64::from(b[[j, kk]]);
                }
                c[[i, j]] = s as f32;
            }
        }
        c
    }

    #[test]
    fn agrees_with_a_naive_product_for_every_layout() {
        let mut rng = SeqRng::new(1, 0);
        for (m, n, k) in [
            (1, 1, 1),
            (3, 5, 7),
            (70, 130, 33),
            (129, 257, 64),
            (5, 0, 3),
        ] {
            let a = rng.normal_matrix(m, k, 1.0);
            let b = rng.normal_matrix(n, k, 1.0);
            let at = a.t().to_owned(); // [k, m]
            let bt = b.t().to_owned(); // [k, n]
            let want = naive(a.view(), b.view());
            for (av, bv) in [
                (a.view(), b.view()),
                (at.t(), b.view()),
                (a.view(), bt.t()),
                (at.t(), bt.t()),
            ] {
                let mut c = Array2::from_elem((m, n), f32::NAN);
                matmul_nt(c.view_mut(), av, bv).expect("matmul");
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn bit_identical_on_any_thread_count() {
        let mut rng = SeqRng::new(2, 0);
        let a = rng.normal_matrix(300, 96, 1.0);
        let b = rng.normal_matrix(260, 96, 1.0);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            pool.install(|| {
                let mut c = Array2::zeros((300, 260));
                matmul_nt(c.view_mut(), a.view(), b.view()).expect("matmul");
                c
            })
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn shape_errors_name_the_operand() {
        let a = Array2::<f32>::zeros((2, 3));
        let b = Array2::<f32>::zeros((4, 2));
        let mut c = Array2::<f32>::zeros((2, 4));
        let e = matmul_nt(c.view_mut(), a.view(), b.view()).expect_err("k mismatch");
        assert!(e.to_string().contains('b'), "{e}");
    }
}
