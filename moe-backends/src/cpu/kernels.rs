//! The matrix-product kernels of the fast CPU path, and the one place in the backend with `unsafe` code.
//!
//! Every expert product has the form `C[i, j] = Σ_kk A[i, kk] · W(j, kk)`: `A` is a block of rows (row-major),
//! `W` is one expert's weight matrix read in place (any strides, no copy), `C` is a tile of a row-major workspace.
//! Three kernels, chosen by the row count only (never by the thread count, so results do not depend on it):
//! - [`SMALL_ROWS`] rows or fewer, when `W`'s reduction axis is contiguous, the CPU has AVX-512 and the layer was
//!   uploaded with [`CpuKernels::Auto`](super::CpuKernels::Auto) (`cpu/dot.rs`): a dot-product
//!   kernel that streams each weight row once straight from memory, with no packing. With few rows per expert the
//!   product is bound by weight bandwidth, and packing `W` (what a classic GEMM does) would double that traffic.
//! - up to 256 rows with `W`'s reduction axis contiguous: the `gemm` crate on the transposed product
//!   `Cᵀ = W · Aᵀ`, written column-major to a per-thread scratch and transposed into the tile; asked this way,
//!   gemm reads `W` in place instead of packing it, which dominated at these sizes.
//! - otherwise the `gemm` crate (cache-blocked, packed, SIMD with run-time dispatch) on the product as it is.
//!
//! Each call is single-threaded: threads run over tiles, see [`par_tiles`].
//!
//! Safety: raw pointers exist only inside this module. [`par_tiles`] checks every bound once, then hands each
//! parallel task a [`Tile`] that owns a distinct rectangle of the buffer; [`Tile::matmul`] checks the operand
//! bounds before calling a kernel.
#![allow(
    unsafe_code,
    reason = "disjoint tiles over one buffer for parallel tasks, and the raw GEMM entry points; bounds checked once here"
)]

use std::marker::PhantomData;

use rayon::prelude::*;

use moe_core::MoeError;

/// Which matrix-product kernels the fast path may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuKernels {
    /// The best this CPU has: for groups of at most 48 rows the AVX-512 dot-product kernel where the CPU has
    /// AVX-512F, else the AVX2 one where it has AVX2, FMA and F16C; the `gemm` crate (run-time SIMD dispatch)
    /// elsewhere.
    #[default]
    Auto,
    /// The AVX2 dot-product kernel for groups of at most 48 rows even where AVX-512 is present (what a CPU
    /// without AVX-512 runs, forced: to test and measure that path on any AVX2 machine); `gemm` elsewhere.
    Avx2,
    /// The `gemm` crate for every product, whatever the CPU: the path CPUs without AVX-512 take, forced (tests
    /// run it on every machine; results agree with [`CpuKernels::Auto`] to rounding).
    Portable,
}

impl CpuKernels {
    /// Parses `auto`, `avx2` or `portable`.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for another name.
    pub fn parse(name: &str) -> Result<Self, MoeError> {
        match name {
            "auto" => Ok(CpuKernels::Auto),
            "avx2" => Ok(CpuKernels::Avx2),
            "portable" => Ok(CpuKernels::Portable),
            other => Err(MoeError::config(
                "cpu kernels",
                other,
                "one of: auto, avx2, portable",
            )),
        }
    }
}

/// Row counts up to this use the dot-product kernel (where it is available).
pub(crate) const SMALL_ROWS: usize = 48;

/// Row counts up to this (and above [`SMALL_ROWS`]) compute the transposed product with `gemm`, which then reads
/// weights in place instead of packing them.
const TRANSPOSED_ROWS: usize = 256;

/// The widest column block the grouped path hands a tile (see `grouped::block_cols`).
pub(crate) const MAX_BLOCK: usize = 768;

thread_local! {
    /// Per-thread column-major scratch of the transposed product.
    static TRANSPOSED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Grows this thread's scratch so that products of up to `rows` rows and `cols` columns need no allocation.
pub(crate) fn reserve_scratch(rows: usize, cols: usize) {
    if rows > SMALL_ROWS {
        let len = rows.min(TRANSPOSED_ROWS) * cols;
        TRANSPOSED.with(|cell| {
            let mut v = cell.borrow_mut();
            if v.len() < len {
                v.resize(len, 0.0);
            }
        });
    }
}

/// A weight operand read in place: element `(j, kk)` (output column `j`, reduction index `kk`) is
/// `data[j * col_stride + kk * k_stride]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Weights<'a> {
    /// The backing slice (one expert's matrix, or a bank's whole tensor).
    pub data: &'a [f32],
    /// Distance between consecutive output columns `j`.
    pub col_stride: usize,
    /// Distance between consecutive reduction indices `kk`.
    pub k_stride: usize,
}

/// A rectangle `[rows, width]` of a row-major buffer with row stride `ld`, owned by one task.
pub(crate) struct Tile<'a> {
    ptr: *mut f32,
    rows: usize,
    width: usize,
    ld: usize,
    _buf: PhantomData<&'a mut [f32]>,
}

// SAFETY: a tile is an exclusive view of its rectangle (par_tiles never hands out two overlapping tiles), like
// a `&mut [f32]`, which is Send.
unsafe impl Send for Tile<'_> {}

impl<'a> Tile<'a> {
    /// A tile over `buf` viewed as `[rows, width]` with row stride `ld`.
    ///
    /// # Errors
    /// [`MoeError::Backend`] if the rectangle does not fit in `buf`.
    pub(crate) fn from_slice(
        buf: &'a mut [f32],
        rows: usize,
        width: usize,
        ld: usize,
    ) -> Result<Self, MoeError> {
        if width > ld || (rows > 0 && (rows - 1) * ld + width > buf.len()) {
            return Err(MoeError::Backend {
                backend: "cpu".into(),
                reason: format!(
                    "tile [{rows}, {width}] / {ld} does not fit in {}",
                    buf.len()
                ),
            });
        }
        Ok(Tile {
            ptr: buf.as_mut_ptr(),
            rows,
            width,
            ld,
            _buf: PhantomData,
        })
    }

    /// Columns in the tile.
    pub(crate) fn width(&self) -> usize {
        self.width
    }

    /// Rows in the tile.
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Columns `c0..c0 + n` of the tile (clamped to its width), borrowed as a tile of their own.
    pub(crate) fn columns(&mut self, c0: usize, n: usize) -> Tile<'_> {
        let c0 = c0.min(self.width);
        Tile {
            // SAFETY: c0 <= width, so the pointer stays inside (or one past) the tile's first row; the sub-tile
            // covers columns of this tile only and borrows it mutably for its lifetime.
            ptr: unsafe { self.ptr.add(c0) },
            rows: self.rows,
            width: n.min(self.width - c0),
            ld: self.ld,
            _buf: PhantomData,
        }
    }

    /// Row `i` of the tile, `width` values.
    pub(crate) fn row_mut(&mut self, i: usize) -> &mut [f32] {
        assert!(i < self.rows, "tile row {i} out of {}", self.rows);
        // SAFETY: par_tiles checked that every row of the rectangle lies inside the buffer, and the tile owns
        // the rectangle exclusively for its lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * self.ld), self.width) }
    }

    /// `self[i, j] = Σ_kk a[i * lda + kk] · w(col0 + j, kk)` for every row `i` and column `j` of the tile, with
    /// the kernel `kernels` and the row count choose (see the module docs).
    ///
    /// # Errors
    /// [`MoeError::Backend`] if an operand is too short for the product (a bug in the caller, never a panic).
    pub(crate) fn matmul(
        &mut self,
        a: &[f32],
        lda: usize,
        k: usize,
        w: Weights<'_>,
        col0: usize,
        kernels: Kernels,
    ) -> Result<(), MoeError> {
        let (m, n) = (self.rows, self.width);
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            for i in 0..m {
                self.row_mut(i).fill(0.0);
            }
            return Ok(());
        }
        let a_end = (m - 1) * lda + k;
        let w_end = (col0 + n - 1) * w.col_stride + (k - 1) * w.k_stride + 1;
        if lda < k || a.len() < a_end || w.data.len() < w_end {
            return Err(MoeError::Backend {
                backend: "cpu".into(),
                reason: format!(
                    "product operands out of bounds: a {} < {a_end} or w {} < {w_end}",
                    a.len(),
                    w.data.len()
                ),
            });
        }
        let wp = w.data[col0 * w.col_stride..].as_ptr();
        #[cfg(target_arch = "x86_64")]
        if m <= SMALL_ROWS && w.k_stride == 1 && (kernels.dot || kernels.avx2) {
            let rows = super::rows::F32Rows {
                p: wp,
                ld: w.col_stride,
            };
            // SAFETY: bounds checked above; `Kernels::dot` / `Kernels::avx2` are set only where the CPU has
            // AVX-512F / AVX2, FMA and F16C (checked at run time by `Kernels::new`).
            unsafe { self.dot_kernel(m, n, k, a.as_ptr(), lda, rows, kernels) };
            return Ok(());
        }
        // As (pointer, row stride, column stride): A is [m, k] row-major; W read as B [k, n], B[kk, j] = w(j, kk).
        let a = (a.as_ptr(), lda as isize, 1);
        let b = (wp, w.k_stride as isize, w.col_stride as isize);
        if m <= TRANSPOSED_ROWS && w.k_stride == 1 {
            // C^T = W · A^T into a column-major scratch: gemm then reads the weights in place (each column of
            // W^T is contiguous) instead of packing them, which dominates at these row counts; the tile is the
            // scratch transposed.
            return TRANSPOSED.with(|cell| {
                let mut scratch = cell.borrow_mut();
                if scratch.len() < m * n {
                    scratch.resize(m * n, 0.0);
                }
                // SAFETY: A and W are in bounds (checked above); the scratch holds m * n values, written
                // column-major (row stride 1, column stride m).
                unsafe { gemm_call(m, n, k, (scratch.as_mut_ptr(), 1, m as isize), a, b) };
                for i in 0..m {
                    for (j, v) in self.row_mut(i).iter_mut().enumerate() {
                        *v = scratch[j * m + i];
                    }
                }
                Ok(())
            });
        }
        // SAFETY: bounds checked above; gemm reads A and W inside those bounds and writes the m x n tile, which
        // this tile owns exclusively.
        unsafe { gemm_call(m, n, k, (self.ptr, self.ld as isize, 1), a, b) };
        Ok(())
    }
}

impl Tile<'_> {
    /// `self[i, j] = Σ_kk a(i, kk) · w(col0 + j, kk)` with `a(i, kk) = a.data[i * a.rs + kk * a.cs]` (any strides:
    /// the backward's transposed operands), by the `gemm` crate in one call (so each value has one fixed reduction
    /// order). `k = 0` fills the tile with zeros.
    ///
    /// # Errors
    /// [`MoeError::Backend`] if an operand is too short for the product (a bug in the caller, never a panic).
    pub(crate) fn matmul_strided(
        &mut self,
        a: Strided<'_>,
        k: usize,
        w: Weights<'_>,
        col0: usize,
    ) -> Result<(), MoeError> {
        let (m, n) = (self.rows, self.width);
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            for i in 0..m {
                self.row_mut(i).fill(0.0);
            }
            return Ok(());
        }
        let a_end = (m - 1) * a.rs + (k - 1) * a.cs + 1;
        let w_end = (col0 + n - 1) * w.col_stride + (k - 1) * w.k_stride + 1;
        if a.data.len() < a_end || w.data.len() < w_end {
            return Err(MoeError::Backend {
                backend: "cpu".into(),
                reason: format!(
                    "strided product operands out of bounds: a {} < {a_end} or w {} < {w_end}",
                    a.data.len(),
                    w.data.len()
                ),
            });
        }
        let wp = w.data[col0 * w.col_stride..].as_ptr();
        // SAFETY: bounds checked above; gemm reads A and W inside them and writes the m x n tile, which this tile
        // owns exclusively.
        unsafe {
            gemm_call(
                m,
                n,
                k,
                (self.ptr, self.ld as isize, 1),
                (a.data.as_ptr(), a.rs as isize, a.cs as isize),
                (wp, w.k_stride as isize, w.col_stride as isize),
            )
        };
        Ok(())
    }
}

/// A row operand with any strides: element `(i, kk)` is `data[i * rs + kk * cs]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Strided<'a> {
    /// The backing slice.
    pub data: &'a [f32],
    /// Distance between consecutive rows `i`.
    pub rs: usize,
    /// Distance between consecutive reduction indices `kk`.
    pub cs: usize,
}

/// The one call of the `gemm` crate's entry point: `C = A · B` for `C` `[m, n]`, `A` `[m, k]`, `B` `[k, n]`, each
/// given as `(pointer, row stride, column stride)` in values, single-threaded, overwriting `C`.
///
/// # Safety
/// Every element the strides address must be in bounds: `C` writable and not aliased by `A` or `B`.
unsafe fn gemm_call(
    m: usize,
    n: usize,
    k: usize,
    c: (*mut f32, isize, isize),
    a: (*const f32, isize, isize),
    b: (*const f32, isize, isize),
) {
    // gemm takes column stride first ("cs") and row stride second ("rs") for each operand.
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.0,
            c.2,
            c.1,
            false,
            a.0,
            a.2,
            a.1,
            b.0,
            b.2,
            b.1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Which kernels the fast path may use, decided once per resident layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Kernels {
    /// The AVX-512 dot-product kernel for few rows (only where the CPU has AVX-512F).
    pub dot: bool,
    /// The AVX2 dot-product kernel for few rows, where the AVX-512 one is not used (only where the CPU has AVX2,
    /// FMA and F16C).
    pub avx2: bool,
    /// bf16 weights times bf16-rounded activations (`cpu/dot_bf16.rs`, `CpuBackend::with_bf16_activations`).
    pub bf16: bool,
}

impl Kernels {
    /// The kernels `choice` allows on this CPU.
    pub(crate) fn new(choice: CpuKernels) -> Self {
        use CpuKernels as K;
        let dot = choice == K::Auto && has("avx512f");
        Kernels {
            bf16: false,
            dot,
            avx2: !dot
                && matches!(choice, K::Auto | K::Avx2)
                && has("avx2")
                && has("fma")
                && has("f16c"),
        }
    }
}

/// Whether this CPU has the x86 feature `name` (the macro caches the CPUID answer itself).
fn has(name: &str) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match name {
            "avx512f" => std::is_x86_feature_detected!("avx512f"),
            "avx2" => std::is_x86_feature_detected!("avx2"),
            "fma" => std::is_x86_feature_detected!("fma"),
            "f16c" => std::is_x86_feature_detected!("f16c"),
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = name;
        false
    }
}

/// Runs `f(group, col0, tile)` in parallel over every tile of a row-major buffer `[rows, ld]`: row ranges
/// `row_offsets[g]..row_offsets[g + 1]` times column blocks `[col0, col0 + block)` of `[0, cols)`. Tiles are
/// disjoint, and which tile covers which elements depends only on the arguments, never on the thread count.
///
/// # Errors
/// [`MoeError::Backend`] for inconsistent bounds; the first error `f` returns.
pub(crate) fn par_tiles<F>(
    buf: &mut [f32],
    ld: usize,
    row_offsets: &[usize],
    cols: usize,
    block: usize,
    f: F,
) -> Result<(), MoeError>
where
    F: Fn(usize, usize, Tile<'_>) -> Result<(), MoeError> + Sync,
{
    let groups = row_offsets.len().saturating_sub(1);
    if groups == 0 || cols == 0 {
        return Ok(());
    }
    let bad = |what: &str| MoeError::Backend {
        backend: "cpu".into(),
        reason: format!("tiling: {what}"),
    };
    if block == 0 || cols > ld {
        return Err(bad("block is 0 or columns exceed the row stride"));
    }
    if row_offsets.windows(2).any(|w| w[0] > w[1]) {
        return Err(bad("row offsets decrease"));
    }
    let last = row_offsets[groups];
    if last > 0 && (last - 1) * ld + cols > buf.len() {
        return Err(bad("rows exceed the buffer"));
    }
    let blocks = cols.div_ceil(block);
    let base = SyncPtr(buf.as_mut_ptr());
    (0..groups * blocks).into_par_iter().try_for_each(|task| {
        let (g, b) = (task / blocks, task % blocks);
        let col0 = b * block;
        let rows = row_offsets[g + 1] - row_offsets[g];
        let tile = Tile {
            // SAFETY: the offset is inside the buffer (checked above), and (g, b) is visited once, so this tile
            // is the only one covering rows row_offsets[g].. and columns col0..col0 + width.
            ptr: unsafe { base.get().add(row_offsets[g] * ld + col0) },
            rows,
            width: block.min(cols - col0),
            ld,
            _buf: PhantomData,
        };
        f(g, col0, tile)
    })
}

/// The elements a view addresses as one slice starting at its first element (views with non-negative strides
/// over one allocation: standard, transposed, sliced).
pub(crate) fn view_slice<'a>(v: &ndarray::ArrayView2<'a, f32>) -> Option<&'a [f32]> {
    let (r, c) = v.dim();
    if r == 0 || c == 0 {
        return Some(&[]);
    }
    let (rs, cs) = (v.strides()[0], v.strides()[1]);
    if rs < 0 || cs < 0 {
        return None;
    }
    let len = (r - 1) * rs as usize + (c - 1) * cs as usize + 1;
    // SAFETY: the view addresses elements ptr + i·rs + j·cs for i < r, j < c, all inside its allocation with
    // non-negative strides, so [ptr, ptr + len) is inside it and lives as long as the view's data ('a).
    Some(unsafe { std::slice::from_raw_parts(v.as_ptr(), len) })
}

/// A raw pointer that may cross threads; only [`par_tiles`] uses it, to build disjoint tiles.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);

// SAFETY: used only to derive disjoint tiles (see par_tiles).
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[path = "kernels_packed.rs"]
mod packed;

#[cfg(test)]
#[path = "kernels_tests.rs"]
mod tests;
