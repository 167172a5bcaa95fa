//! The non-MoE pieces of the language model, forward and backward, written by hand: linear maps (over
//! [`matmul_nt`], the CPU backend's tiled GEMM), RMSNorm, causal multi-head attention, the embeddings and the
//! cross-entropy of the tied output projection. Every reduction runs in a fixed order that does not depend on the
//! thread count (per-row, per-(sequence, head) or sequential loops), so results are bit-identical on any number of
//! threads. Formulas: RMSNorm (Zhang & Sennrich 2019; `torch.nn.RMSNorm`), scaled dot-product attention (Vaswani et
//! al. 2017; `torch.nn.functional.scaled_dot_product_attention(is_causal=True)`), their standard derivatives.
//! Shapes: `T = B · C` rows, sequence-major; `d` the width; `H` heads of width `hd = d / H`.

use moe_backends::cpu::dense::matmul_nt;
use moe_core::MoeError;
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis, Zip};
use rayon::prelude::*;

/// `y = x · wᵀ` for `x` `[T, in]`, `w` `[out, in]`, `y` `[T, out]`.
///
/// # Errors
/// [`MoeError::Shape`] for operands that do not fit.
pub fn linear(
    y: ArrayViewMut2<'_, f32>,
    x: ArrayView2<'_, f32>,
    w: ArrayView2<'_, f32>,
) -> Result<(), MoeError> {
    matmul_nt(y, x, w)
}

/// The backward of [`linear`]: `dx = dy · w` (`[T, in]`) and `dw = dyᵀ · x` (`[out, in]`), both overwritten.
///
/// # Errors
/// [`MoeError::Shape`] for operands that do not fit.
pub fn linear_backward(
    dx: Option<ArrayViewMut2<'_, f32>>,
    dw: ArrayViewMut2<'_, f32>,
    dy: ArrayView2<'_, f32>,
    x: ArrayView2<'_, f32>,
    w: ArrayView2<'_, f32>,
) -> Result<(), MoeError> {
    if let Some(dx) = dx {
        matmul_nt(dx, dy, w.t())?;
    }
    matmul_nt(dw, dy.t(), x.t())
}

/// RMSNorm `y = x / sqrt(mean_j x_j² + eps) ⊙ w` row by row; writes `y` and the rows' `1 / rms` to `inv_rms`
/// (`[T]`), which the backward uses.
pub fn rmsnorm(
    mut y: ArrayViewMut2<'_, f32>,
    inv_rms: &mut [f32],
    x: ArrayView2<'_, f32>,
    w: ArrayView1<'_, f32>,
    eps: f32,
) {
    let d = x.ncols() as f32;
    Zip::from(y.rows_mut())
        .and(x.rows())
        .and(inv_rms)
        .par_for_each(|mut yr, xr, r| {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / d;
            *r = 1.0 / (ms + eps).sqrt();
            Zip::from(&mut yr)
                .and(xr)
                .and(w)
                .for_each(|y, &x, &w| *y = x * *r * w);
        });
}

/// The backward of [`rmsnorm`]: with `n = x · r` (`r = 1 / rms`, `[T]`),
/// `dx_j = r · (w_j dy_j − n_j · mean_i(w_i dy_i n_i))`, **added** to `dx`; `dw_j = Σ_t dy_tj n_tj` overwritten
/// (the sum over rows in row order).
pub fn rmsnorm_backward(
    mut dx: ArrayViewMut2<'_, f32>,
    mut dw: ArrayViewMut1<'_, f32>,
    dy: ArrayView2<'_, f32>,
    x: ArrayView2<'_, f32>,
    w: ArrayView1<'_, f32>,
    inv_rms: &[f32],
) {
    let d = x.ncols() as f32;
    Zip::from(dx.rows_mut())
        .and(dy.rows())
        .and(x.rows())
        .and(inv_rms)
        .par_for_each(|mut dxr, dyr, xr, &r| {
            let mut dot = 0.0f32;
            for ((&g, &xv), &wv) in dyr.iter().zip(xr).zip(w) {
                dot += wv * g * xv * r;
            }
            let mean = dot / d;
            for (((o, &g), &xv), &wv) in dxr.iter_mut().zip(dyr).zip(xr).zip(w) {
                *o += r * (wv * g - xv * r * mean);
            }
        });
    // dw: a sum over rows; columns are independent, each summed in row order.
    dw.fill(0.0);
    for ((dyr, xr), &r) in dy.rows().into_iter().zip(x.rows()).zip(inv_rms) {
        for ((o, &g), &xv) in dw.iter_mut().zip(dyr).zip(xr) {
            *o += g * xv * r;
        }
    }
}

/// The sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    /// Sequences `B`.
    pub batch: usize,
    /// Tokens per sequence `C`.
    pub context: usize,
    /// Heads `H`.
    pub heads: usize,
    /// Head width `hd`.
    pub head_dim: usize,
}

impl AttnShape {
    fn d(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// Causal multi-head attention from `qkv` `[T, 3d]` (q, k, v side by side; head `h` at columns `h·hd..` of each):
/// writes `o` `[T, d]` and the attention probabilities `probs` `[B · H, C, C]` (row `i` holds `P[i, j]` for
/// `j <= i`, zeros above), which the backward uses. `scratch` is resized to `B · H · C · hd`.
///
/// # Errors
/// [`MoeError::Shape`] for a `qkv` that is not `[B · C, 3d]` in standard layout or a `probs` of another length.
pub fn attention(
    o: ArrayViewMut2<'_, f32>,
    probs: &mut [f32],
    scratch: &mut Vec<f32>,
    qkv: ArrayView2<'_, f32>,
    s: AttnShape,
) -> Result<(), MoeError> {
    let (c, hd, d) = (s.context, s.head_dim, s.d());
    let qs = standard(qkv, s.batch * c, 3 * d, "qkv")?;
    if probs.len() != s.batch * s.heads * c * c {
        return Err(MoeError::shape(
            "attention probabilities",
            format!("[{}]", s.batch * s.heads * c * c),
            &[probs.len()],
        ));
    }
    let scale = 1.0 / (hd as f32).sqrt();
    let ld = 3 * d;
    scratch.resize(s.batch * s.heads * c * hd, 0.0);
    probs
        .par_chunks_mut(c * c)
        .zip(scratch.par_chunks_mut(c * hd))
        .enumerate()
        .for_each(|(task, (p, out))| {
            let (b, h) = (task / s.heads, task % s.heads);
            let at = |t: usize, part: usize| {
                let off = (b * c + t) * ld + part * d + h * hd;
                &qs[off..off + hd]
            };
            for i in 0..c {
                let q = at(i, 0);
                let pi = &mut p[i * c..(i + 1) * c];
                let mut max = f32::NEG_INFINITY;
                for (j, pij) in pi.iter_mut().enumerate().take(i + 1) {
                    let sc = dot(q, at(j, 1)) * scale;
                    *pij = sc;
                    max = max.max(sc);
                }
                let mut sum = 0.0f32;
                for pij in pi.iter_mut().take(i + 1) {
                    *pij = (*pij - max).exp();
                    sum += *pij;
                }
                let inv = 1.0 / sum;
                pi.iter_mut().take(i + 1).for_each(|v| *v *= inv);
                pi.iter_mut().skip(i + 1).for_each(|v| *v = 0.0);
                let oi = &mut out[i * hd..(i + 1) * hd];
                oi.fill(0.0);
                for (j, &pij) in pi.iter().enumerate().take(i + 1) {
                    axpy(oi, pij, at(j, 2));
                }
            }
        });
    // Scatter the per-(sequence, head) outputs into o [T, d].
    scatter_heads(o, scratch, s, 1);
    Ok(())
}

/// The backward of [`attention`]: from `d_o` `[T, d]`, the saved `probs` and `qkv`, writes `d_qkv` `[T, 3d]`
/// (overwritten). Per (sequence, head): `dP = dO · Vᵀ`, `dS = P ⊙ (dP − rowsum(P ⊙ dP))`, `dQ = scale · dS · K`,
/// `dK = scale · dSᵀ · Q`, `dV = Pᵀ · dO`, each sum in index order.
///
/// # Errors
/// [`MoeError::Shape`] for operands of other shapes or not in standard layout.
pub fn attention_backward(
    d_qkv: ArrayViewMut2<'_, f32>,
    scratch: &mut Vec<f32>,
    d_o: ArrayView2<'_, f32>,
    probs: &[f32],
    qkv: ArrayView2<'_, f32>,
    s: AttnShape,
) -> Result<(), MoeError> {
    let (c, hd, d) = (s.context, s.head_dim, s.d());
    let qs = standard(qkv, s.batch * c, 3 * d, "qkv")?;
    let dos = standard(d_o, s.batch * c, d, "d_o")?;
    if probs.len() != s.batch * s.heads * c * c {
        return Err(MoeError::shape(
            "attention probabilities",
            format!("[{}]", s.batch * s.heads * c * c),
            &[probs.len()],
        ));
    }
    let scale = 1.0 / (hd as f32).sqrt();
    let (ld, w) = (3 * d, 3 * hd);
    scratch.resize(s.batch * s.heads * c * w, 0.0);
    scratch
        .par_chunks_mut(c * w)
        .zip(probs.par_chunks(c * c))
        .enumerate()
        .for_each(|(task, (g, p))| {
            let (b, h) = (task / s.heads, task % s.heads);
            let at = |t: usize, part: usize| {
                let off = (b * c + t) * ld + part * d + h * hd;
                &qs[off..off + hd]
            };
            g.fill(0.0);
            let mut dp = vec![0.0f32; c];
            for i in 0..c {
                let doi = &dos[(b * c + i) * d + h * hd..(b * c + i) * d + (h + 1) * hd];
                let pi = &p[i * c..(i + 1) * c];
                let mut rowsum = 0.0f32;
                for j in 0..=i {
                    dp[j] = dot(doi, at(j, 2));
                    rowsum += pi[j] * dp[j];
                }
                let qi = at(i, 0);
                for j in 0..=i {
                    let ds = pi[j] * (dp[j] - rowsum) * scale;
                    axpy(&mut g[i * w..i * w + hd], ds, at(j, 1));
                    axpy(&mut g[j * w + hd..j * w + 2 * hd], ds, qi);
                    axpy(&mut g[j * w + 2 * hd..j * w + 3 * hd], pi[j], doi);
                }
            }
        });
    scatter_heads(d_qkv, scratch, s, 3);
    Ok(())
}

/// Copies per-(sequence, head) blocks `[C, parts · hd]` of `src` (task `b · H + h`) into `dst` `[T, parts · d]`:
/// part `j` of head `h` goes to columns `j · d + h · hd ..` of the sequence's rows (attention's `o`: one part;
/// its backward's `d_qkv`: three).
fn scatter_heads(mut dst: ArrayViewMut2<'_, f32>, src: &[f32], s: AttnShape, parts: usize) {
    let (c, hd, d) = (s.context, s.head_dim, s.d());
    let w = parts * hd;
    for (task, g) in src.chunks(c * w).enumerate() {
        let (b, h) = (task / s.heads, task % s.heads);
        for i in 0..c {
            let mut r = dst.row_mut(b * c + i);
            for part in 0..parts {
                let from = &g[i * w + part * hd..i * w + (part + 1) * hd];
                for (x, &v) in r.iter_mut().skip(part * d + h * hd).take(hd).zip(from) {
                    *x = v;
                }
            }
        }
    }
}

/// The values of `a` `[rows, cols]` in standard layout, or a shape error naming it.
fn standard<'a>(
    a: ArrayView2<'a, f32>,
    rows: usize,
    cols: usize,
    name: &str,
) -> Result<&'a [f32], MoeError> {
    if a.dim() != (rows, cols) {
        return Err(MoeError::shape(
            name,
            format!("[{rows}, {cols}]"),
            a.shape(),
        ));
    }
    a.to_slice()
        .ok_or_else(|| MoeError::shape(name, "standard (row-major) layout", a.shape()))
}

/// `Σ a_i b_i` with eight partial sums (lane `i mod 8`, so the compiler keeps them in one SIMD register), added
/// in a fixed order at the end: the same value on every thread count and machine.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `y += alpha · x`.
fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (a, &b) in y.iter_mut().zip(x) {
        *a += alpha * b;
    }
}

/// `x[t] = tok_emb[tokens[t]] + pos_emb[t mod C]`.
///
/// # Errors
/// [`MoeError::InvalidConfig`] for a token id outside the vocabulary.
pub fn embed(
    mut x: ArrayViewMut2<'_, f32>,
    tokens: &[u32],
    tok_emb: ArrayView2<'_, f32>,
    pos_emb: ArrayView2<'_, f32>,
) -> Result<(), MoeError> {
    let (v, c) = (tok_emb.nrows(), pos_emb.nrows());
    for (t, (mut row, &id)) in x.rows_mut().into_iter().zip(tokens).enumerate() {
        if id as usize >= v {
            return Err(MoeError::config(
                "token id",
                id.to_string(),
                format!("an id below the vocabulary size {v}"),
            ));
        }
        Zip::from(&mut row)
            .and(tok_emb.row(id as usize))
            .and(pos_emb.row(t % c))
            .for_each(|o, &a, &b| *o = a + b);
    }
    Ok(())
}

/// The backward of [`embed`]: `d_tok_emb[tokens[t]] += dx[t]` and `d_pos_emb[t mod C] += dx[t]` in row order
/// (`d_pos_emb` is overwritten; `d_tok_emb` is added to: the output head wrote its part first).
pub fn embed_backward(
    mut d_tok_emb: ArrayViewMut2<'_, f32>,
    mut d_pos_emb: ArrayViewMut2<'_, f32>,
    dx: ArrayView2<'_, f32>,
    tokens: &[u32],
) {
    let c = d_pos_emb.nrows();
    d_pos_emb.fill(0.0);
    for (t, (row, &id)) in dx.rows().into_iter().zip(tokens).enumerate() {
        d_tok_emb
            .row_mut(id as usize)
            .zip_mut_with(&row, |a, &b| *a += b);
        d_pos_emb.row_mut(t % c).zip_mut_with(&row, |a, &b| *a += b);
    }
}

/// Cross-entropy of `logits` `[T, V]` against `targets` `[T]`, averaged over rows: returns the mean loss (nats,
/// summed in f64 in row order) and, when `grad` is given, overwrites `logits` with `dL/dlogits =
/// (softmax − onehot) / T`.
///
/// # Errors
/// [`MoeError::InvalidConfig`] for a target outside the vocabulary.
pub fn cross_entropy(
    mut logits: ArrayViewMut2<'_, f32>,
    targets: &[u32],
    grad: bool,
) -> Result<f64, MoeError> {
    let (t, v) = logits.dim();
    if let Some(&bad) = targets.iter().find(|&&y| y as usize >= v) {
        return Err(MoeError::config(
            "target",
            bad.to_string(),
            format!("an id below the vocabulary size {v}"),
        ));
    }
    let mut per_row = vec![0.0f64; t];
    let inv_t = 1.0 / t as f32;
    Zip::from(logits.rows_mut())
        .and(targets)
        .and(&mut per_row)
        .par_for_each(|mut row, &y, loss| {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
            let lse = max + sum.ln();
            *loss = f64::from(lse - row[y as usize]);
            if grad {
                row.mapv_inplace(|x| (x - lse).exp() * inv_t);
                row[y as usize] -= inv_t;
            }
        });
    Ok(per_row.iter().sum::<f64>() / t.max(1) as f64)
}

/// `a += b` elementwise.
pub fn add_assign(mut a: ArrayViewMut2<'_, f32>, b: ArrayView2<'_, f32>) {
    Zip::from(&mut a).and(&b).par_for_each(|x, &y| *x += y);
}

/// Whether every value is finite.
pub fn all_finite(a: ArrayView2<'_, f32>) -> bool {
    a.iter().all(|v| v.is_finite())
}

/// A zero `[rows, cols]` matrix (a helper for workspaces).
pub fn zeros(rows: usize, cols: usize) -> Array2<f32> {
    Array2::zeros((rows, cols))
}

/// A `[n]` vector of ones (norm weights at init).
pub fn ones(n: usize) -> Array1<f32> {
    Array1::ones(n)
}

/// The column sums of `a` in row order (used by tests).
pub fn col_sums(a: ArrayView2<'_, f32>) -> Array1<f32> {
    a.sum_axis(Axis(0))
}
