//! Packed expert banks from checkpoints ([`crate::quant`]): SwiGLU experts in FP8 with block scales (DeepSeek-V3
//! per-expert linears, transformers' fused FP8 experts, shared experts) or kept 16-bit, GPT-OSS MXFP4 blocks and
//! 16-bit GPT-OSS experts. Bytes are copied once from the memory map into a `PackedMatrix`; no f32 copy of a
//! weight is made unless [`ExpertWeights::F32`] asks for the f32 bank (then the packed bank is decoded once).
//! Every size is checked against the file's header before anything is allocated.

use moe_core::quant::matrix::MAX_VALUES;
use moe_core::quant::{PackedBank, PackedFamily, PackedMatrix, Scales};
use moe_core::{Activation, ExpertBank, WeightFormat};
use safetensors::tensor::Dtype;

use super::parts::{Loader, PerExpertNames};
use crate::error::LoadError;
use crate::quant::{ExpertWeights, QuantizationConfig};

/// The suffix of an FP8 weight's scale tensor: `gate_proj.weight` → `gate_proj.weight_scale_inv`,
/// `experts.gate_up_proj` → `experts.gate_up_proj_scale_inv`.
pub(crate) const SCALE_INV: &str = "_scale_inv";
/// The suffixes of GPT-OSS's MXFP4 tensors: `experts.gate_up_proj` → `experts.gate_up_proj_blocks` / `_scales`.
pub(crate) const BLOCKS: &str = "_blocks";
/// See [`BLOCKS`].
pub(crate) const SCALES: &str = "_scales";

/// The packed format of an element dtype kept as it is (`BF16`, `F16`).
fn half_format(dtype: Dtype) -> Option<WeightFormat> {
    match dtype {
        Dtype::BF16 => Some(WeightFormat::Bf16),
        Dtype::F16 => Some(WeightFormat::F16),
        _ => None,
    }
}

/// `a · b · …` bytes, refused past [`MAX_VALUES`] (sizes come from file headers).
fn checked_product(dims: &[usize]) -> Option<usize> {
    dims.iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .filter(|&n| n <= MAX_VALUES)
}

/// The three weight names (gate, up, down) of each expert of a stack, unprefixed.
type ExpertNames = Vec<[String; 3]>;

/// What one stacked SwiGLU bank is made of, checked against the header before any read.
struct StackPlan {
    /// `[gate, up, down]` weight names per expert.
    names: ExpertNames,
    /// Expert FFN width `f`.
    f: usize,
    /// Width `d`.
    d: usize,
    format: WeightFormat,
    /// FP8 block `[rows, cols]`.
    block: Option<[usize; 2]>,
}

impl Loader<'_, '_> {
    /// The bank the loader returns for a packed bank: the bank itself ([`ExpertWeights::Checkpoint`]) or its f32
    /// decoding ([`ExpertWeights::F32`]).
    fn finish_bank(&self, bank: PackedBank) -> Result<ExpertBank, LoadError> {
        // MXFP4 and FP8 tensors need the config that declares them (FP8's block size is read from it, so FP8
        // without one was refused already); 16-bit tensors need none.
        let declared = self.quant.map(QuantizationConfig::format);
        if matches!(bank.format(), WeightFormat::Mxfp4 | WeightFormat::Fp8)
            && declared != Some(bank.format())
        {
            return Err(self.config_err(
                "quantization_config",
                format!(
                    "the experts are {} tensors, but the config declares {}",
                    bank.format(),
                    self.quant
                        .map_or("no quantization_config".to_string(), |q| format!(
                            "\"quant_method\": \"{}\"",
                            q.quant_method()
                        ))
                ),
            ));
        }
        match self.experts {
            ExpertWeights::Checkpoint => Ok(ExpertBank::Packed(bank)),
            ExpertWeights::F32 => bank.dequantize().map_err(self.err()),
        }
    }

    /// A packed SiLU SwiGLU bank (no biases) of `up` `[E, 2f, d]` and `down` `[E, d, f]`, finished as
    /// [`Loader::finish_bank`] says.
    fn finish_swiglu(&self, up: PackedMatrix, down: PackedMatrix) -> Result<ExpertBank, LoadError> {
        let family = PackedFamily::SwiGlu {
            act: Activation::Silu,
        };
        let bank = PackedBank::new(family, up, None, down, None).map_err(self.err())?;
        self.finish_bank(bank)
    }

    /// A [`LoadError::Shape`] for tensor `name` (unprefixed).
    fn shape_err(&self, name: &str, expected: String, found: Vec<usize>) -> LoadError {
        let full = self.w.full(name);
        LoadError::Shape {
            file: self.w.checkpoint().file_of(&full).to_path_buf(),
            tensor: full,
            expected,
            found,
        }
    }

    /// A [`LoadError::Dtype`] for tensor `name` (unprefixed).
    fn dtype_err(&self, name: &str, found: Dtype, expected: &str) -> LoadError {
        let full = self.w.full(name);
        LoadError::Dtype {
            file: self.w.checkpoint().file_of(&full).to_path_buf(),
            tensor: full,
            found: format!("{found:?}"),
            expected: expected.into(),
        }
    }

    /// A [`LoadError::BadTensor`] for tensor `name` (unprefixed).
    fn bad_tensor(&self, name: &str, reason: String) -> LoadError {
        let full = self.w.full(name);
        LoadError::BadTensor {
            file: self.w.checkpoint().file_of(&full).to_path_buf(),
            tensor: full,
            reason,
        }
    }

    /// The FP8 block size of the config, or a config error naming `tensor` (an F8_E4M3 tensor without one).
    fn fp8_block(&self, tensor: &str) -> Result<[usize; 2], LoadError> {
        match self.quant {
            Some(QuantizationConfig::Fp8 { weight_block_size }) => Ok(weight_block_size),
            _ => Err(self.config_err(
                "quantization_config",
                format!(
                    "tensor {} is F8_E4M3, but the config has no quantization_config with \
                     \"quant_method\": \"fp8\" (its weight_block_size gives the scale blocks)",
                    self.w.full(tensor)
                ),
            )),
        }
    }

    /// Packed SwiGLU experts, when the checkpoint's tensors call for them: FP8 (`F8_E4M3` weights), or BF16 / F16
    /// under [`ExpertWeights::Checkpoint`] (every expert tensor of one dtype). `None`: load the f32 bank.
    pub fn packed_swiglu(
        &mut self,
        fused: (&str, &str),
        per_expert: PerExpertNames,
        n_experts: usize,
        d: usize,
    ) -> Result<Option<ExpertBank>, LoadError> {
        if self.contains(fused.0) {
            return self.packed_fused_swiglu(fused, n_experts, d);
        }
        let name = |e: usize, proj: &str| format!("experts.{e}.{proj}.weight");
        let names: ExpertNames = (0..n_experts)
            .map(|e| {
                [
                    name(e, per_expert.gate),
                    name(e, per_expert.up),
                    name(e, per_expert.down),
                ]
            })
            .collect();
        let pattern = |proj: &str| format!("experts.{{e}}.{proj}.weight");
        let (gate, up, down) = (
            pattern(per_expert.gate),
            pattern(per_expert.up),
            pattern(per_expert.down),
        );
        let Some((up_m, down_m)) = self.stacked_swiglu(names, d, [&gate, &up, &down])? else {
            return Ok(None);
        };
        self.record("experts.gate_up", &[&gate, &up]);
        self.record("experts.down", &[&down]);
        self.finish_swiglu(up_m, down_m).map(Some)
    }

    /// The shared experts `{prefix}.gate_proj|up_proj|down_proj.weight` packed as [`Loader::packed_swiglu`]
    /// packs routed experts; `None`: load the f32 bank.
    pub fn packed_shared_swiglu(
        &mut self,
        prefix: &str,
        d: usize,
    ) -> Result<Option<ExpertBank>, LoadError> {
        let [g, u, dn] =
            ["gate_proj", "up_proj", "down_proj"].map(|p| format!("{prefix}.{p}.weight"));
        let names = vec![[g.clone(), u.clone(), dn.clone()]];
        let Some((up_m, down_m)) = self.stacked_swiglu(names, d, [&g, &u, &dn])? else {
            return Ok(None);
        };
        self.record("shared.gate_up", &[&g, &u]);
        self.record("shared.down", &[&dn]);
        self.finish_swiglu(up_m, down_m).map(Some)
    }

    /// The header checks of a stack: every tensor present, of its shape and of the stack's dtype. `None` when the
    /// stack is not packed (f32 weights, 16-bit weights under [`ExpertWeights::F32`], mixed 16-bit dtypes).
    fn plan_stack(&self, names: ExpertNames, d: usize) -> Result<Option<StackPlan>, LoadError> {
        let Some(first) = names.first().map(|n| n[0].clone()) else {
            return Ok(None);
        };
        if !self.contains(&first) {
            return Ok(None);
        }
        let dtype = self.w.dtype(&first)?;
        let (format, block) = match dtype {
            Dtype::F8_E4M3 => (WeightFormat::Fp8, Some(self.fp8_block(&first)?)),
            other => match half_format(other) {
                Some(f) if self.experts == ExpertWeights::Checkpoint => (f, None),
                _ => return Ok(None),
            },
        };
        let shape = self.w.shape(&first)?;
        let f = match shape.as_slice() {
            [f, dd] if *dd == d && *f > 0 => *f,
            _ => return Err(self.shape_err(&first, format!("[f, {d}]"), shape)),
        };
        for e in &names {
            for (name, rows, cols) in [(&e[0], f, d), (&e[1], f, d), (&e[2], d, f)] {
                let shape = self.w.shape(name)?;
                if shape != [rows, cols] {
                    return Err(self.shape_err(name, format!("[{rows}, {cols}]"), shape));
                }
                let dt = self.w.dtype(name)?;
                if dt != dtype {
                    if format == WeightFormat::Fp8 {
                        return Err(self.dtype_err(
                            name,
                            dt,
                            "F8_E4M3, as the other expert weights",
                        ));
                    }
                    // Mixed 16-bit dtypes: the f32 bank takes them all.
                    return Ok(None);
                }
                if let Some([br, bc]) = block {
                    let sname = format!("{name}{SCALE_INV}");
                    let want = [rows.div_ceil(br), cols.div_ceil(bc)];
                    let shape = self.w.shape(&sname)?;
                    if shape != want {
                        return Err(self.shape_err(
                            &sname,
                            format!(
                                "{want:?} (⌈[{rows}, {cols}] / [{br}, {bc}]⌉, weight_block_size)"
                            ),
                            shape,
                        ));
                    }
                }
            }
        }
        Ok(Some(StackPlan {
            names,
            f,
            d,
            format,
            block,
        }))
    }

    /// Reads FP8 weight `name` (unprefixed) and its `weight_scale_inv` as the plan's block grid says: the raw
    /// bytes (NaN codes refused) and the scales (finite).
    fn fp8_parts(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        block: [usize; 2],
    ) -> Result<(&[u8], Vec<f32>), LoadError> {
        let raw = self.w.get_raw(name, &[Some(rows), Some(cols)])?;
        if let Some(i) = raw.bytes.iter().position(|&b| b & 0x7F == 0x7F) {
            return Err(self.bad_tensor(
                name,
                format!(
                    "FP8 E4M3 NaN code {:#04x} at [{}, {}]",
                    raw.bytes[i],
                    i / cols,
                    i % cols
                ),
            ));
        }
        let sname = format!("{name}{SCALE_INV}");
        let grid = [rows.div_ceil(block[0]), cols.div_ceil(block[1])];
        let scales = self.w.get(&sname, &[Some(grid[0]), Some(grid[1])])?.data;
        if let Some(i) = scales.iter().position(|v| !v.is_finite()) {
            return Err(self.bad_tensor(
                &sname,
                format!(
                    "non-finite scale {} at [{}, {}]",
                    scales[i],
                    i / grid[1],
                    i % grid[1]
                ),
            ));
        }
        Ok((raw.bytes, scales))
    }

    /// One SwiGLU stack (`names[e]` = gate, up, down weights of expert `e`) as packed `up` `[E, 2f, d]` (gate
    /// rows, then up rows) and `down` `[E, d, f]`; `patterns` name the stacked tensors in errors. FP8 scale grids
    /// stack exactly when `f` is a multiple of the block's rows; otherwise every row gets its own copy of its
    /// block row's scales (`block_rows = 1`), also exact.
    fn stacked_swiglu(
        &self,
        names: ExpertNames,
        d: usize,
        patterns: [&str; 3],
    ) -> Result<Option<(PackedMatrix, PackedMatrix)>, LoadError> {
        let Some(plan) = self.plan_stack(names, d)? else {
            return Ok(None);
        };
        let StackPlan {
            names,
            f,
            d,
            format,
            block,
        } = plan;
        let n = names.len();
        // The header holds every tensor of the stack at its shape: these sizes are bytes in the file.
        let (up_bytes, down_bytes) = checked_product(&[n, 2 * f, format.row_bytes(d)])
            .zip(checked_product(&[n, d, format.row_bytes(f)]))
            .ok_or_else(|| {
                self.shape_err(
                    &names[0][0],
                    format!("a bank of {n} experts that fits in memory"),
                    vec![f, d],
                )
            })?;
        let mut up = Vec::with_capacity(up_bytes);
        let mut down = Vec::with_capacity(down_bytes);
        let (mut up_s, mut down_s) = (Vec::new(), Vec::new());
        for [g, u, dn] in &names {
            match block {
                Some(b) => {
                    let (gb, gs) = self.fp8_parts(g, f, d, b)?;
                    let (ub, us) = self.fp8_parts(u, f, d, b)?;
                    let (db, ds) = self.fp8_parts(dn, d, f, b)?;
                    up.extend_from_slice(gb);
                    up.extend_from_slice(ub);
                    down.extend_from_slice(db);
                    let gc = d.div_ceil(b[1]);
                    if f.is_multiple_of(b[0]) {
                        up_s.extend_from_slice(&gs);
                        up_s.extend_from_slice(&us);
                    } else {
                        for s in [&gs, &us] {
                            for r in 0..f {
                                up_s.extend_from_slice(&s[(r / b[0]) * gc..][..gc]);
                            }
                        }
                    }
                    down_s.extend_from_slice(&ds);
                }
                None => {
                    for name in [g, u] {
                        up.extend_from_slice(self.w.get_raw(name, &[Some(f), Some(d)])?.bytes);
                    }
                    down.extend_from_slice(self.w.get_raw(dn, &[Some(d), Some(f)])?.bytes);
                }
            }
        }
        let (up_scales, down_scales) = match block {
            Some([br, bc]) => (
                Scales::Blocks {
                    block_rows: if f.is_multiple_of(br) { br } else { 1 },
                    block_cols: bc,
                    values: up_s,
                },
                Scales::Blocks {
                    block_rows: br,
                    block_cols: bc,
                    values: down_s,
                },
            ),
            None => (Scales::None, Scales::None),
        };
        let full = |p: &str| self.w.full(p);
        let up_name = format!("{} + {}", full(patterns[0]), full(patterns[1]));
        let scale_name = |p: &str| format!("{}{SCALE_INV}", full(p));
        let up_m = PackedMatrix::from_parts(
            &up_name,
            &format!("{} + {}", scale_name(patterns[0]), scale_name(patterns[1])),
            format,
            [n, 2 * f, d],
            up,
            up_scales,
        )
        .map_err(self.err())?;
        let down_m = PackedMatrix::from_parts(
            &full(patterns[2]),
            &scale_name(patterns[2]),
            format,
            [n, d, f],
            down,
            down_scales,
        )
        .map_err(self.err())?;
        Ok(Some((up_m, down_m)))
    }

    /// Fused SwiGLU experts `gate_up` `[E, 2f, d]` / `down` `[E, d, f]` kept packed: FP8 (transformers'
    /// `FP8Experts` state dict, with `gate_up_proj_scale_inv` `[E, 2f / br, ⌈d / bc⌉]` and `down_proj_scale_inv`
    /// `[E, ⌈d / br⌉, ⌈f / bc⌉]`; `f` must be a multiple of the block's rows, or the fused grid is ambiguous), or
    /// BF16 / F16 under [`ExpertWeights::Checkpoint`]. `None`: load the f32 bank.
    pub fn packed_fused_swiglu(
        &mut self,
        names: (&str, &str),
        n_experts: usize,
        d: usize,
    ) -> Result<Option<ExpertBank>, LoadError> {
        let (gu_name, dn_name) = names;
        let dtype = self.w.dtype(gu_name)?;
        let (format, block) = match dtype {
            Dtype::F8_E4M3 => (WeightFormat::Fp8, Some(self.fp8_block(gu_name)?)),
            other => match half_format(other) {
                Some(f) if self.experts == ExpertWeights::Checkpoint => (f, None),
                _ => return Ok(None),
            },
        };
        let gu = self.w.get_raw(gu_name, &[Some(n_experts), None, Some(d)])?;
        let f2 = gu.shape[1];
        if f2 % 2 != 0 {
            return Err(self.shape_err(
                gu_name,
                format!("[{n_experts}, 2f (even), {d}]"),
                gu.shape.to_vec(),
            ));
        }
        let f = f2 / 2;
        let dn = self
            .w
            .get_raw(dn_name, &[Some(n_experts), Some(d), Some(f)])?;
        if dn.dtype != dtype {
            if format == WeightFormat::Fp8 {
                return Err(self.dtype_err(dn_name, dn.dtype, "F8_E4M3, as the gate_up weights"));
            }
            return Ok(None);
        }
        let scales = |name: &str, rows: usize, cols: usize| -> Result<Scales, LoadError> {
            let Some([br, bc]) = block else {
                return Ok(Scales::None);
            };
            if name == gu_name && !f.is_multiple_of(br) {
                return Err(self.bad_tensor(
                    &format!("{name}{SCALE_INV}"),
                    format!(
                        "fused FP8 gate/up scales with f = {f} not a multiple of the block rows {br} are \
                         ambiguous (read the per-expert tensors instead)"
                    ),
                ));
            }
            let sname = format!("{name}{SCALE_INV}");
            let grid = [rows.div_ceil(br), cols.div_ceil(bc)];
            let values = self
                .w
                .get(&sname, &[Some(n_experts), Some(grid[0]), Some(grid[1])])?
                .data;
            Ok(Scales::Blocks {
                block_rows: br,
                block_cols: bc,
                values,
            })
        };
        let (up_s, down_s) = (scales(gu_name, f2, d)?, scales(dn_name, d, f)?);
        let full = |p: &str| self.w.full(p);
        let up_m = PackedMatrix::from_parts(
            &full(gu_name),
            &format!("{}{SCALE_INV}", full(gu_name)),
            format,
            [n_experts, f2, d],
            gu.bytes.to_vec(),
            up_s,
        )
        .map_err(self.err())?;
        let down_m = PackedMatrix::from_parts(
            &full(dn_name),
            &format!("{}{SCALE_INV}", full(dn_name)),
            format,
            [n_experts, d, f],
            dn.bytes.to_vec(),
            down_s,
        )
        .map_err(self.err())?;
        self.record("experts.gate_up", &[gu_name]);
        self.record("experts.down", &[dn_name]);
        self.finish_swiglu(up_m, down_m).map(Some)
    }

    /// GPT-OSS experts kept packed: MXFP4 when the checkpoint has `{gate_up}_blocks` ([`Loader::mxfp4_gpt_oss`]),
    /// else BF16 / F16 under [`ExpertWeights::Checkpoint`] ([`Loader::half_gpt_oss`]); biases read as f32.
    /// `None`: load the f32 bank.
    pub fn packed_gpt_oss(
        &mut self,
        names: GptOssNames<'_>,
        n_experts: usize,
        d: usize,
        family: PackedFamily,
    ) -> Result<Option<ExpertBank>, LoadError> {
        let blocks = format!("{}{BLOCKS}", names.gate_up);
        if self.contains(&blocks) && self.contains(names.gate_up) {
            return Err(self.bad_tensor(
                names.gate_up,
                format!(
                    "the checkpoint holds both {} and {}: one set of expert weights only",
                    self.w.full(&blocks),
                    self.w.full(names.gate_up)
                ),
            ));
        }
        let (up, down, f2) = if self.contains(&blocks) {
            self.mxfp4_gpt_oss(names, n_experts, d)?
        } else {
            match self.half_gpt_oss(names, n_experts, d)? {
                Some(m) => m,
                None => return Ok(None),
            }
        };
        let ub = self.mat(
            "experts.gate_up_bias",
            names.gate_up_bias,
            Some(n_experts),
            Some(f2),
        )?;
        let db = self.mat(
            "experts.down_bias",
            names.down_bias,
            Some(n_experts),
            Some(d),
        )?;
        let bank = PackedBank::new(family, up, Some(ub), down, Some(db)).map_err(self.err())?;
        self.finish_bank(bank).map(Some)
    }

    /// GPT-OSS MXFP4 experts: `{gate_up}_blocks` U8 `[E, 2f, d/32, 16]` with `{gate_up}_scales` U8
    /// `[E, 2f, d/32]`, `{down}_blocks` `[E, d, f/32, 16]` with `{down}_scales` `[E, d, f/32]`, kept as they are
    /// (rows interleaved gate / up, as `PackedFamily::GptOss` reads them). Returns up, down and `2f`.
    fn mxfp4_gpt_oss(
        &mut self,
        names: GptOssNames<'_>,
        n_experts: usize,
        d: usize,
    ) -> Result<(PackedMatrix, PackedMatrix, usize), LoadError> {
        let gu_blocks = format!("{}{BLOCKS}", names.gate_up);
        let (up_m, f2) = self.mxfp4_matrix(names.gate_up, n_experts, None, d)?;
        if f2 % 2 != 0 {
            return Err(self.shape_err(
                &gu_blocks,
                format!("[{n_experts}, 2f (even), {}, 16]", d / 32),
                self.w.shape(&gu_blocks)?,
            ));
        }
        let (down_m, _) = self.mxfp4_matrix(names.down, n_experts, Some(d), f2 / 2)?;
        self.record("experts.gate_up", &[&gu_blocks]);
        self.record("experts.down", &[&format!("{}{BLOCKS}", names.down)]);
        Ok((up_m, down_m, f2))
    }

    /// One MXFP4 matrix `[E, rows, cols]` from `{name}_blocks` `[E, rows, cols/32, 16]` and `{name}_scales`
    /// `[E, rows, cols/32]` (both U8); `rows` free when `None`. Returns the matrix and its rows.
    fn mxfp4_matrix(
        &self,
        name: &str,
        n_experts: usize,
        rows: Option<usize>,
        cols: usize,
    ) -> Result<(PackedMatrix, usize), LoadError> {
        let (bname, sname) = (format!("{name}{BLOCKS}"), format!("{name}{SCALES}"));
        if !cols.is_multiple_of(32) {
            let found = self.w.shape(&bname)?;
            return Err(self.bad_tensor(
                &bname,
                format!("MXFP4 blocks of 32 do not divide the row length {cols} (shape {found:?})"),
            ));
        }
        let nb = cols / 32;
        let blocks = self
            .w
            .get_raw(&bname, &[Some(n_experts), rows, Some(nb), Some(16)])?;
        if blocks.dtype != Dtype::U8 {
            return Err(self.dtype_err(&bname, blocks.dtype, "U8 (two E2M1 codes a byte)"));
        }
        let r = blocks.shape[1];
        if !self.contains(&sname) {
            return Err(LoadError::MissingTensor {
                file: self.w.checkpoint().origin().to_path_buf(),
                tensor: self.w.full(&sname),
            });
        }
        let scales = self
            .w
            .get_raw(&sname, &[Some(n_experts), Some(r), Some(nb)])?;
        if scales.dtype != Dtype::U8 {
            return Err(self.dtype_err(&sname, scales.dtype, "U8 (E8M0 exponents)"));
        }
        let m = PackedMatrix::from_parts(
            &self.w.full(&bname),
            &self.w.full(&sname),
            WeightFormat::Mxfp4,
            [n_experts, r, cols],
            blocks.bytes.to_vec(),
            Scales::E8m0(scales.bytes.to_vec()),
        )
        .map_err(self.err())?;
        Ok((m, r))
    }

    /// GPT-OSS experts stored 16-bit (`gate_up` `[E, d, 2f]`, `down` `[E, f, d]`, both BF16 or both F16) kept
    /// 16-bit under [`ExpertWeights::Checkpoint`], transposed to the packed `[E, 2f, d]` / `[E, d, f]` (values
    /// moved, not converted). Returns up, down and `2f`; `None`: load the f32 bank.
    fn half_gpt_oss(
        &mut self,
        names: GptOssNames<'_>,
        n_experts: usize,
        d: usize,
    ) -> Result<Option<(PackedMatrix, PackedMatrix, usize)>, LoadError> {
        let names = (names.gate_up, names.down);
        if self.experts != ExpertWeights::Checkpoint || !self.contains(names.0) {
            return Ok(None);
        }
        let gu = self.w.get_raw(names.0, &[Some(n_experts), Some(d), None])?;
        let f2 = gu.shape[2];
        let dn = self
            .w
            .get_raw(names.1, &[Some(n_experts), Some(f2 / 2), Some(d)])?;
        let Some(format) = half_format(gu.dtype).filter(|_| dn.dtype == gu.dtype) else {
            return Ok(None);
        };
        let transpose = |bytes: &[u8], r: usize, c: usize| -> Vec<u8> {
            // `[E, r, c]` 2-byte values to `[E, c, r]`.
            let mut out = vec![0u8; bytes.len()];
            for (src, dst) in bytes
                .chunks_exact(2 * r * c)
                .zip(out.chunks_exact_mut(2 * r * c))
            {
                for i in 0..r {
                    for j in 0..c {
                        let s = 2 * (i * c + j);
                        let t = 2 * (j * r + i);
                        dst[t..t + 2].copy_from_slice(&src[s..s + 2]);
                    }
                }
            }
            out
        };
        let full = |p: &str| self.w.full(p);
        let up_m = PackedMatrix::from_parts(
            &full(names.0),
            &full(names.0),
            format,
            [n_experts, f2, d],
            transpose(gu.bytes, d, f2),
            Scales::None,
        )
        .map_err(self.err())?;
        let down_m = PackedMatrix::from_parts(
            &full(names.1),
            &full(names.1),
            format,
            [n_experts, d, f2 / 2],
            transpose(dn.bytes, f2 / 2, d),
            Scales::None,
        )
        .map_err(self.err())?;
        self.record("experts.gate_up", &[names.0]);
        self.record("experts.down", &[names.1]);
        Ok(Some((up_m, down_m, f2)))
    }
}

/// GPT-OSS's expert tensor names (unprefixed; MXFP4 adds `_blocks` / `_scales` to the weights').
#[derive(Debug, Clone, Copy)]
pub(crate) struct GptOssNames<'n> {
    /// `experts.gate_up_proj`.
    pub gate_up: &'n str,
    /// `experts.gate_up_proj_bias`.
    pub gate_up_bias: &'n str,
    /// `experts.down_proj`.
    pub down: &'n str,
    /// `experts.down_proj_bias`.
    pub down_bias: &'n str,
}
