//! [`PackedMatrix`]: one weight tensor `[E, rows, cols]` of a bank, kept in its packed format.

use ndarray::{Array3, ArrayView3};

use super::WeightFormat;
use super::codec::{
    E2M1_MAX, FP8_E4M3_MAX, INT8_MAX, e2m1_to_f32, e8m0_for_amax, e8m0_to_f32, f32_to_e2m1,
    f32_to_fp8_e4m3, fp8_e4m3_to_f32,
};
use crate::error::MoeError;

/// Values per MXFP4 block (one E8M0 scale each, along `cols`).
pub const MXFP4_BLOCK: usize = 32;

/// The block shape of FP8 weights quantised here (DeepSeek-V3's `weight_block_size`).
pub const FP8_BLOCK: [usize; 2] = [128, 128];

/// The largest number of weight values one packed matrix may hold (2^40): sizes read from files are checked
/// against it before any allocation.
pub const MAX_VALUES: usize = 1 << 40;

/// The scales of a packed matrix, by format.
#[derive(Debug, Clone, PartialEq)]
pub enum Scales {
    /// f32, bf16, f16: none.
    None,
    /// int8: one f32 scale per output row, `[E, rows]`; `W[r, c] = q[r, c] · s[r]`.
    Rows(Vec<f32>),
    /// FP8 E4M3: one f32 scale per block of `block_rows × block_cols` values, `[E, ⌈rows / block_rows⌉,
    /// ⌈cols / block_cols⌉]`; `W[r, c] = q[r, c] · s[r / block_rows, c / block_cols]` (DeepSeek-V3's
    /// `weight_scale_inv`, a multiplier despite its name).
    Blocks {
        /// Rows per block.
        block_rows: usize,
        /// Columns per block.
        block_cols: usize,
        /// The scales.
        values: Vec<f32>,
    },
    /// MXFP4: one E8M0 code per [`MXFP4_BLOCK`] values along a row, `[E, rows, cols / 32]`;
    /// `W[r, c] = E2M1(q[r, c]) · 2^(s[r, c / 32] − 127)`.
    E8m0(Vec<u8>),
}

/// One expert's part of a [`PackedMatrix`], as the kernels read it.
#[derive(Debug, Clone, Copy)]
pub struct ExpertMatrix<'a> {
    /// The format.
    pub format: WeightFormat,
    /// Output rows.
    pub rows: usize,
    /// Reduction columns.
    pub cols: usize,
    /// `rows` rows of [`WeightFormat::row_bytes`] bytes each, row-major.
    pub data: &'a [u8],
    /// This expert's scales.
    pub scales: ExpertScales<'a>,
}

/// One expert's scales (see [`Scales`]).
#[derive(Debug, Clone, Copy)]
pub enum ExpertScales<'a> {
    /// No scales.
    None,
    /// `[rows]`.
    Rows(&'a [f32]),
    /// `[⌈rows / block_rows⌉, grid_cols]`.
    Blocks {
        /// Rows per block.
        block_rows: usize,
        /// Columns per block.
        block_cols: usize,
        /// Blocks per block row, `⌈cols / block_cols⌉`.
        grid_cols: usize,
        /// The scales.
        values: &'a [f32],
    },
    /// `[rows, cols / 32]` E8M0 codes.
    E8m0(&'a [u8]),
}

impl ExpertMatrix<'_> {
    /// The bytes of row `r`.
    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.format.row_bytes(self.cols);
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Decodes row `r` into `out[..cols]` (`W[r, c]` as f32: the code's exact value times its scale, one f32
    /// rounding). This is the reference every kernel's decode equals bit for bit.
    pub fn decode_row(&self, r: usize, out: &mut [f32]) {
        let cols = self.cols;
        let row = self.row(r);
        let out = &mut out[..cols];
        match self.format {
            WeightFormat::F32 => {
                for (o, b) in out.iter_mut().zip(row.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            WeightFormat::Bf16 => {
                for (o, b) in out.iter_mut().zip(row.chunks_exact(2)) {
                    *o = half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
            WeightFormat::F16 => {
                for (o, b) in out.iter_mut().zip(row.chunks_exact(2)) {
                    *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
            WeightFormat::Int8 => {
                let s = match self.scales {
                    ExpertScales::Rows(s) => s[r],
                    _ => f32::NAN,
                };
                for (o, &b) in out.iter_mut().zip(row) {
                    *o = f32::from(b as i8) * s;
                }
            }
            WeightFormat::Fp8 => {
                if let ExpertScales::Blocks {
                    block_rows,
                    block_cols,
                    grid_cols,
                    values,
                } = self.scales
                {
                    let srow = &values[(r / block_rows) * grid_cols..][..grid_cols];
                    for (c, (o, &b)) in out.iter_mut().zip(row).enumerate() {
                        *o = fp8_e4m3_to_f32(b).unwrap_or(f32::NAN) * srow[c / block_cols];
                    }
                }
            }
            WeightFormat::Mxfp4 => {
                if let ExpertScales::E8m0(s) = self.scales {
                    let nb = cols / MXFP4_BLOCK;
                    for (c, o) in out.iter_mut().enumerate() {
                        let byte = row[c / 2];
                        let code = if c.is_multiple_of(2) {
                            byte & 0xF
                        } else {
                            byte >> 4
                        };
                        let scale = e8m0_to_f32(s[r * nb + c / MXFP4_BLOCK]).unwrap_or(f32::NAN);
                        *o = e2m1_to_f32(code) * scale;
                    }
                }
            }
        }
    }
}

/// Bytes whose data starts on a 64-byte boundary (SIMD rows load faster); moving the value keeps the alignment.
#[derive(Clone, PartialEq, Eq)]
struct AlignedBytes {
    buf: Vec<u8>,
    off: usize,
    len: usize,
}

impl std::fmt::Debug for AlignedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBytes({} bytes)", self.len)
    }
}

impl AlignedBytes {
    const ALIGN: usize = 64;

    fn from_vec(v: Vec<u8>) -> Self {
        if (v.as_ptr() as usize).is_multiple_of(Self::ALIGN) {
            let len = v.len();
            return AlignedBytes {
                buf: v,
                off: 0,
                len,
            };
        }
        let mut buf = Vec::with_capacity(v.len() + Self::ALIGN);
        let off = (Self::ALIGN - buf.as_ptr() as usize % Self::ALIGN) % Self::ALIGN;
        buf.resize(off, 0);
        buf.extend_from_slice(&v);
        AlignedBytes {
            buf,
            off,
            len: v.len(),
        }
    }

    fn as_slice(&self) -> &[u8] {
        &self.buf[self.off..self.off + self.len]
    }
}

/// A weight tensor `[E, rows, cols]` (per expert `out = a · Wᵀ`: `rows` outputs, `cols` the reduction axis,
/// contiguous) kept in a packed [`WeightFormat`] with its [`Scales`]. Immutable once built; every constructor
/// validates, so a held matrix has the right byte length, finite scales, no NaN codes, and every decoded weight
/// finite.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedMatrix {
    format: WeightFormat,
    dims: [usize; 3],
    data: AlignedBytes,
    scales: Scales,
}

fn checked_len(tensor: &str, dims: [usize; 3]) -> Result<usize, MoeError> {
    let n = dims
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .filter(|&n| n <= MAX_VALUES)
        .ok_or_else(|| MoeError::TooLarge {
            what: format!("tensor {tensor} {dims:?}"),
            size: dims.iter().map(|&d| d as u128).product(),
            limit: MAX_VALUES as u128,
        })?;
    Ok(n)
}

impl PackedMatrix {
    /// A matrix from its raw parts: `data` holds `E · rows` rows of [`WeightFormat::row_bytes`] bytes (values
    /// little-endian; MXFP4 two codes a byte, the even column in the low nibble), `scales` as [`Scales`] says
    /// for `format`. `tensor` and `scales_tensor` name the two in errors (checkpoint names where there are some).
    ///
    /// # Errors
    /// [`MoeError::BadTensor`] naming the tensor: a byte length or a scale count that does not match `dims`, a
    /// zero dimension, MXFP4 `cols` not a multiple of 32, zero block sizes, the wrong kind of scales for the
    /// format, a NaN, infinite or negative scale, a NaN or infinite value, an FP8 NaN code (`0x7F`, `0xFF`), the
    /// E8M0 NaN code 255, a scale
    /// that would decode a value past f32's range (int8 `|s| · 128`, FP8 `|s| · 448`, MXFP4 code 254 with a value
    /// of magnitude 2 or more): every decoded weight of a held matrix is finite;
    /// [`MoeError::TooLarge`] past [`MAX_VALUES`].
    pub fn from_parts(
        tensor: &str,
        scales_tensor: &str,
        format: WeightFormat,
        dims: [usize; 3],
        data: Vec<u8>,
        scales: Scales,
    ) -> Result<Self, MoeError> {
        let bad = |reason: String| MoeError::bad_tensor(tensor, reason);
        let bad_scale = |reason: String| MoeError::bad_tensor(scales_tensor, reason);
        checked_len(tensor, dims)?;
        let [n, rows, cols] = dims;
        if n == 0 || rows == 0 || cols == 0 {
            return Err(bad(format!("a dimension of {dims:?} is zero")));
        }
        if format == WeightFormat::Mxfp4 && !cols.is_multiple_of(MXFP4_BLOCK) {
            return Err(bad(format!(
                "MXFP4 block size {MXFP4_BLOCK} does not divide the row length {cols}"
            )));
        }
        let want = n * rows * format.row_bytes(cols);
        if data.len() != want {
            return Err(bad(format!(
                "holds {} bytes, but {} [{n}, {rows}, {cols}] needs {want}",
                data.len(),
                format.name()
            )));
        }
        let at = |i: usize, per: usize| {
            let r = i / per;
            [r / rows, r % rows, (i % per)]
        };
        match format {
            WeightFormat::F32 => {
                if let Some(i) = data
                    .chunks_exact(4)
                    .position(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite())
                {
                    return Err(bad(format!("non-finite value at {:?}", at(i, cols))));
                }
            }
            WeightFormat::Bf16 | WeightFormat::F16 => {
                let finite = |b: &[u8]| {
                    let bits = u16::from_le_bytes([b[0], b[1]]);
                    if format == WeightFormat::Bf16 {
                        half::bf16::from_bits(bits).is_finite()
                    } else {
                        half::f16::from_bits(bits).is_finite()
                    }
                };
                if let Some(i) = data.chunks_exact(2).position(|b| !finite(b)) {
                    return Err(bad(format!("non-finite value at {:?}", at(i, cols))));
                }
            }
            WeightFormat::Fp8 => {
                if let Some(i) = data.iter().position(|&b| b & 0x7F == 0x7F) {
                    return Err(bad(format!(
                        "FP8 E4M3 NaN code {:#04x} at {:?}",
                        data[i],
                        at(i, cols)
                    )));
                }
            }
            WeightFormat::Int8 | WeightFormat::Mxfp4 => {}
        }
        match (format, &scales) {
            (WeightFormat::F32 | WeightFormat::Bf16 | WeightFormat::F16, Scales::None) => {}
            (WeightFormat::Int8, Scales::Rows(v)) => {
                if v.len() != n * rows {
                    return Err(bad_scale(format!(
                        "has {} scales, expected [{n}, {rows}] (one per output row)",
                        v.len()
                    )));
                }
                if let Some(i) = v.iter().position(|s| !(s * 128.0).is_finite() || *s < 0.0) {
                    return Err(bad_scale(format!(
                        "scale {} at [{}, {}] is negative, non-finite or decodes past f32's range (× 128)",
                        v[i],
                        i / rows,
                        i % rows
                    )));
                }
            }
            (
                WeightFormat::Fp8,
                Scales::Blocks {
                    block_rows,
                    block_cols,
                    values,
                },
            ) => {
                if *block_rows == 0 || *block_cols == 0 {
                    return Err(bad_scale(format!(
                        "block size [{block_rows}, {block_cols}] has a zero"
                    )));
                }
                let (gr, gc) = (rows.div_ceil(*block_rows), cols.div_ceil(*block_cols));
                if values.len() != n * gr * gc {
                    return Err(bad_scale(format!(
                        "has {} scales, but [{n}, {rows}, {cols}] in blocks of [{block_rows}, {block_cols}] \
                         needs [{n}, {gr}, {gc}]",
                        values.len()
                    )));
                }
                if let Some(i) = values
                    .iter()
                    .position(|s| !(s * FP8_E4M3_MAX).is_finite() || *s < 0.0)
                {
                    return Err(bad_scale(format!(
                        "scale {} at [{}, {}, {}] is negative, non-finite or decodes past f32's range (× 448)",
                        values[i],
                        i / (gr * gc),
                        i / gc % gr,
                        i % gc
                    )));
                }
            }
            (WeightFormat::Mxfp4, Scales::E8m0(v)) => {
                let nb = cols / MXFP4_BLOCK;
                if v.len() != n * rows * nb {
                    return Err(bad_scale(format!(
                        "has {} scales, expected [{n}, {rows}, {nb}] (one per {MXFP4_BLOCK} values)",
                        v.len()
                    )));
                }
                if let Some(i) = v.iter().position(|&s| e8m0_to_f32(s).is_none()) {
                    return Err(bad_scale(format!("E8M0 NaN code 255 at {:?}", at(i, nb))));
                }
                // 2^127 (code 254) times an E2M1 magnitude of 2 or more is past f32's range.
                let overflows = |i: usize| {
                    v[i] == 254
                        && data[i * MXFP4_BLOCK / 2..(i + 1) * MXFP4_BLOCK / 2]
                            .iter()
                            .any(|&b| b & 0x4 != 0 || b & 0x40 != 0)
                };
                if let Some(i) = (0..v.len()).find(|&i| overflows(i)) {
                    return Err(bad_scale(format!(
                        "scale code 254 at {:?} times a value of magnitude 2 or more decodes to infinity",
                        at(i, nb)
                    )));
                }
            }
            (f, s) => {
                return Err(bad_scale(format!(
                    "{} weights take {}, found {}",
                    f.name(),
                    f.scale_kind(),
                    match s {
                        Scales::None => "none",
                        Scales::Rows(_) => "row scales",
                        Scales::Blocks { .. } => "block scales",
                        Scales::E8m0(_) => "E8M0 block scales",
                    }
                )));
            }
        }
        Ok(PackedMatrix {
            format,
            dims,
            data: AlignedBytes::from_vec(data),
            scales,
        })
    }

    /// `w` (`[E, rows, cols]`) quantised to `format`: bf16 / f16 rounded to nearest even; int8 symmetric per
    /// output row (`s = max|w| / 127`, `q = round(w / s)`); FP8 E4M3 in [`FP8_BLOCK`] blocks (`s = max|w| / 448`,
    /// DeepSeek-V3's recipe); MXFP4 per 32 values (OCP MX v1.0: `s = 2^(⌊log2 max|w|⌋ − 2)`, codes saturating
    /// at ±6). Rounding is to nearest, ties to even, everywhere.
    ///
    /// # Errors
    /// [`MoeError::BadTensor`] for a non-finite weight or an MXFP4 row length that is not a multiple of 32.
    pub fn quantize(
        tensor: &str,
        w: ArrayView3<'_, f32>,
        format: WeightFormat,
    ) -> Result<Self, MoeError> {
        let (n, rows, cols) = w.dim();
        if let Some(((e, r, c), v)) = w.indexed_iter().find(|(_, v)| !v.is_finite()) {
            return Err(MoeError::bad_tensor(
                tensor,
                format!("non-finite weight {v} at [{e}, {r}, {c}]"),
            ));
        }
        if format == WeightFormat::F16
            && let Some(((e, r, c), v)) = w
                .indexed_iter()
                .find(|(_, v)| !half::f16::from_f32(**v).is_finite())
        {
            return Err(MoeError::bad_tensor(
                tensor,
                format!("weight {v} at [{e}, {r}, {c}] is beyond f16's largest value 65504"),
            ));
        }
        let w = w.as_standard_layout();
        let flat = w.as_slice().unwrap_or(&[]);
        let dims = [n, rows, cols];
        let rb = format.row_bytes(cols);
        let mut data = Vec::with_capacity(n * rows * rb);
        let scales = match format {
            WeightFormat::F32 => {
                flat.iter()
                    .for_each(|v| data.extend_from_slice(&v.to_le_bytes()));
                Scales::None
            }
            WeightFormat::Bf16 => {
                flat.iter().for_each(|&v| {
                    data.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes())
                });
                Scales::None
            }
            WeightFormat::F16 => {
                flat.iter().for_each(|&v| {
                    data.extend_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes())
                });
                Scales::None
            }
            WeightFormat::Int8 => {
                let mut s = Vec::with_capacity(n * rows);
                for row in flat.chunks_exact(cols.max(1)) {
                    let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let scale = amax / INT8_MAX;
                    s.push(scale);
                    for &v in row {
                        let q = if scale == 0.0 {
                            0.0
                        } else {
                            (v / scale).round_ties_even().clamp(-INT8_MAX, INT8_MAX)
                        };
                        data.push(q as i8 as u8);
                    }
                }
                Scales::Rows(s)
            }
            WeightFormat::Fp8 => encode_fp8(flat, dims, &mut data),
            WeightFormat::Mxfp4 => {
                if !cols.is_multiple_of(MXFP4_BLOCK) {
                    return Err(MoeError::bad_tensor(
                        tensor,
                        format!(
                            "MXFP4 block size {MXFP4_BLOCK} does not divide the row length {cols}"
                        ),
                    ));
                }
                let mut s = Vec::with_capacity(flat.len() / MXFP4_BLOCK);
                for block in flat.chunks_exact(MXFP4_BLOCK) {
                    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let code = e8m0_for_amax(amax);
                    s.push(code);
                    let scale = e8m0_to_f32(code).unwrap_or(1.0);
                    for pair in block.chunks_exact(2) {
                        let q = |v: f32| f32_to_e2m1((v / scale).clamp(-E2M1_MAX, E2M1_MAX));
                        data.push(q(pair[0]) | (q(pair[1]) << 4));
                    }
                }
                Scales::E8m0(s)
            }
        };
        PackedMatrix::from_parts(
            tensor,
            &format!("{tensor} scales"),
            format,
            dims,
            data,
            scales,
        )
    }

    /// The format.
    pub fn format(&self) -> WeightFormat {
        self.format
    }

    /// `[E, rows, cols]`.
    pub fn dims(&self) -> [usize; 3] {
        self.dims
    }

    /// The packed bytes, `[E, rows, row_bytes]`.
    pub fn data(&self) -> &[u8] {
        self.data.as_slice()
    }

    /// The scales.
    pub fn scales(&self) -> &Scales {
        &self.scales
    }

    /// Expert `e`'s matrix (`e < E`).
    pub fn expert(&self, e: usize) -> ExpertMatrix<'_> {
        let [_, rows, cols] = self.dims;
        let per = rows * self.format.row_bytes(cols);
        let scales = match &self.scales {
            Scales::None => ExpertScales::None,
            Scales::Rows(v) => ExpertScales::Rows(&v[e * rows..(e + 1) * rows]),
            Scales::Blocks {
                block_rows,
                block_cols,
                values,
            } => {
                let (gr, gc) = (rows.div_ceil(*block_rows), cols.div_ceil(*block_cols));
                ExpertScales::Blocks {
                    block_rows: *block_rows,
                    block_cols: *block_cols,
                    grid_cols: gc,
                    values: &values[e * gr * gc..(e + 1) * gr * gc],
                }
            }
            Scales::E8m0(v) => {
                let nb = rows * cols / MXFP4_BLOCK;
                ExpertScales::E8m0(&v[e * nb..(e + 1) * nb])
            }
        };
        ExpertMatrix {
            format: self.format,
            rows,
            cols,
            data: &self.data()[e * per..(e + 1) * per],
            scales,
        }
    }

    /// Bytes one expert's matrix occupies, weights and scales: what a forward streams per expert used.
    pub fn bytes_per_expert(&self) -> usize {
        let [n, _, _] = self.dims;
        let scale_bytes = match &self.scales {
            Scales::None => 0,
            Scales::Rows(v) => 4 * v.len(),
            Scales::Blocks { values, .. } => 4 * values.len(),
            Scales::E8m0(v) => v.len(),
        };
        (self.data.len + scale_bytes) / n
    }

    /// The matrix decoded to f32 (`[E, rows, cols]`), each value as [`ExpertMatrix::decode_row`] gives it.
    pub fn dequantize(&self) -> Array3<f32> {
        let [n, rows, cols] = self.dims;
        let mut out = Array3::<f32>::zeros((n, rows, cols));
        if let Some(flat) = out.as_slice_mut() {
            for (i, row) in flat.chunks_exact_mut(cols).enumerate() {
                self.expert(i / rows).decode_row(i % rows, row);
            }
        }
        out
    }

    /// The matrix of experts `ids`, in that order (ids checked by the caller: each `< E`).
    pub(crate) fn select(&self, ids: &[usize]) -> Result<Self, MoeError> {
        let [_, rows, cols] = self.dims;
        let per = rows * self.format.row_bytes(cols);
        let mut data = Vec::with_capacity(ids.len() * per);
        for &e in ids {
            data.extend_from_slice(&self.data()[e * per..(e + 1) * per]);
        }
        let pick = |v: &[f32], per: usize| -> Vec<f32> {
            ids.iter()
                .flat_map(|&e| v[e * per..(e + 1) * per].iter().copied())
                .collect()
        };
        let scales = match &self.scales {
            Scales::None => Scales::None,
            Scales::Rows(v) => Scales::Rows(pick(v, rows)),
            Scales::Blocks {
                block_rows,
                block_cols,
                values,
            } => Scales::Blocks {
                block_rows: *block_rows,
                block_cols: *block_cols,
                values: pick(
                    values,
                    rows.div_ceil(*block_rows) * cols.div_ceil(*block_cols),
                ),
            },
            Scales::E8m0(v) => {
                let per = rows * cols / MXFP4_BLOCK;
                Scales::E8m0(
                    ids.iter()
                        .flat_map(|&e| v[e * per..(e + 1) * per].iter().copied())
                        .collect(),
                )
            }
        };
        PackedMatrix::from_parts(
            "selected experts",
            "selected experts' scales",
            self.format,
            [ids.len(), rows, cols],
            data,
            scales,
        )
    }
}

/// FP8 E4M3 codes of `flat` (`[E, rows, cols]`) into `data`, with DeepSeek-V3's [`FP8_BLOCK`] scales
/// (`s = max|w| / 448` per block; an all-zero block has scale 0 and codes 0).
fn encode_fp8(flat: &[f32], [n, rows, cols]: [usize; 3], data: &mut Vec<u8>) -> Scales {
    let [br, bc] = FP8_BLOCK;
    let (gr, gc) = (rows.div_ceil(br), cols.div_ceil(bc));
    let mut s = vec![0f32; n * gr * gc];
    for (i, &v) in flat.iter().enumerate() {
        let (e, r, c) = (i / (rows * cols), i / cols % rows, i % cols);
        let k = e * gr * gc + (r / br) * gc + c / bc;
        s[k] = s[k].max(v.abs());
    }
    s.iter_mut().for_each(|v| *v /= FP8_E4M3_MAX);
    for (i, &v) in flat.iter().enumerate() {
        let (e, r, c) = (i / (rows * cols), i / cols % rows, i % cols);
        let scale = s[e * gr * gc + (r / br) * gc + c / bc];
        data.push(if scale == 0.0 {
            0
        } else {
            f32_to_fp8_e4m3(v / scale)
        });
    }
    Scales::Blocks {
        block_rows: br,
        block_cols: bc,
        values: s,
    }
}
