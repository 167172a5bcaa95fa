//! [`PackedBank`]: a SwiGLU, GPT-OSS or MLP bank whose two weight tensors are [`PackedMatrix`]es.

use ndarray::{Array2, Axis};

use super::{PackedMatrix, WeightFormat};
use crate::error::MoeError;
use crate::expert::{Activation, ExpertBank, GptOssBank, MlpBank, SwiGluBank};

/// The family of a packed bank: which epilogue follows the first product.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PackedFamily {
    /// SwiGLU: `up` rows `[0, f)` are the gate, `[f, 2f)` the up projection; `h = act(g) ⊙ u`.
    SwiGlu {
        /// Gate activation.
        act: Activation,
    },
    /// GPT-OSS: `up` rows interleaved (`2j` gate `j`, `2j + 1` up `j`, as GPT-OSS's `gate_up_proj_blocks` and
    /// `gate_up_proj_bias`); `h = (clamp(u + b_u, ±limit) + 1) ⊙ glu(min(g + b_g, limit))`.
    GptOss {
        /// The GLU's slope.
        alpha: f32,
        /// The clamp.
        limit: f32,
    },
    /// MLP: `h = act(a · W₁ᵀ + b₁)`.
    Mlp {
        /// Hidden activation.
        act: Activation,
    },
}

/// A bank whose expert weights stay packed ([`WeightFormat`]); biases are f32. Built from a checkpoint's packed
/// tensors ([`PackedBank::new`]) or by quantising an f32 bank ([`PackedBank::quantize`]). Inference only: it lists
/// no parameters and is not trained ([`PackedBank::dequantize`] gives an f32 bank that is).
#[derive(Debug, Clone, PartialEq)]
pub struct PackedBank {
    family: PackedFamily,
    up: PackedMatrix,
    up_bias: Option<Array2<f32>>,
    down: PackedMatrix,
    down_bias: Option<Array2<f32>>,
}

/// How far a packed bank's decoded weights are from the f32 weights it was quantised from (over both tensors).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantError {
    /// Largest `|W − Ŵ|`.
    pub max_abs: f32,
    /// `‖W − Ŵ‖₂ / ‖W‖₂` (0 for an all-zero bank).
    pub rel_rms: f64,
}

impl PackedBank {
    /// A bank from its packed tensors: `up` `[E, U, d]` (`U = 2f` for SwiGLU and GPT-OSS, `f` for MLP), `down`
    /// `[E, d, f]`, both in one format; biases `[E, U]` and `[E, d]` (GPT-OSS needs both, SwiGLU takes none, MLP
    /// either).
    ///
    /// # Errors
    /// [`MoeError::Shape`] for tensors that do not fit together, [`MoeError::InvalidConfig`] for mixed formats,
    /// a missing or extra bias, or non-finite GPT-OSS constants; [`MoeError::BadTensor`] for a non-finite bias.
    pub fn new(
        family: PackedFamily,
        up: PackedMatrix,
        up_bias: Option<Array2<f32>>,
        down: PackedMatrix,
        down_bias: Option<Array2<f32>>,
    ) -> Result<Self, MoeError> {
        let [e, d, f] = down.dims();
        let u = match family {
            PackedFamily::Mlp { .. } => f,
            _ => 2 * f,
        };
        if up.dims() != [e, u, d] {
            return Err(MoeError::shape(
                "packed up weights",
                format!("[{e}, {u}, {d}]"),
                &up.dims(),
            ));
        }
        if up.format() != down.format() {
            return Err(MoeError::config(
                "packed bank formats",
                format!("{} and {}", up.format(), down.format()),
                "both tensors of a packed bank have one format",
            ));
        }
        let needs_bias = matches!(family, PackedFamily::GptOss { .. });
        for (name, bias, shape) in [
            ("up bias", &up_bias, [e, u]),
            ("down bias", &down_bias, [e, d]),
        ] {
            match bias {
                Some(b) if b.dim() != (shape[0], shape[1]) => {
                    return Err(MoeError::shape(
                        format!("packed {name}"),
                        format!("{shape:?}"),
                        b.shape(),
                    ));
                }
                Some(b) if b.iter().any(|v| !v.is_finite()) => {
                    return Err(MoeError::bad_tensor(
                        format!("packed {name}"),
                        "has a non-finite value",
                    ));
                }
                Some(_) if matches!(family, PackedFamily::SwiGlu { .. }) => {
                    return Err(MoeError::config(
                        format!("packed {name}"),
                        "present",
                        "SwiGLU banks have no biases",
                    ));
                }
                None if needs_bias => {
                    return Err(MoeError::config(
                        format!("packed {name}"),
                        "absent",
                        "GPT-OSS banks have both biases",
                    ));
                }
                _ => {}
            }
        }
        if let PackedFamily::GptOss { alpha, limit } = family
            && !(alpha.is_finite() && limit.is_finite())
        {
            return Err(MoeError::config(
                "gpt-oss alpha / limit",
                format!("{alpha} / {limit}"),
                "finite",
            ));
        }
        Ok(PackedBank {
            family,
            up,
            up_bias,
            down,
            down_bias,
        })
    }

    /// `bank` (SwiGLU, GPT-OSS or MLP, f32) with its weights quantised to `format` ([`PackedMatrix::quantize`]);
    /// GPT-OSS's `[E, d, 2f]` / `[E, f, d]` tensors are transposed to the packed `[E, 2f, d]` / `[E, d, f]`.
    /// Biases stay f32.
    ///
    /// # Errors
    /// [`MoeError::Unsupported`] for PEER, custom, stored and packed banks; the errors of
    /// [`PackedMatrix::quantize`] (MXFP4 needs `d` and `f` multiples of 32).
    pub fn quantize(bank: &ExpertBank, format: WeightFormat) -> Result<Self, MoeError> {
        let q = PackedMatrix::quantize;
        match bank {
            ExpertBank::SwiGlu(b) => PackedBank::new(
                PackedFamily::SwiGlu { act: b.act() },
                q("gate_up", b.gate_up().view(), format)?,
                None,
                q("down", b.down().view(), format)?,
                None,
            ),
            ExpertBank::GptOss(b) => PackedBank::new(
                PackedFamily::GptOss {
                    alpha: b.alpha(),
                    limit: b.limit(),
                },
                q(
                    "gate_up",
                    b.gate_up().view().permuted_axes([0, 2, 1]),
                    format,
                )?,
                Some(b.gate_up_bias().clone()),
                q("down", b.down().view().permuted_axes([0, 2, 1]), format)?,
                Some(b.down_bias().clone()),
            ),
            ExpertBank::Mlp(b) => PackedBank::new(
                PackedFamily::Mlp { act: b.act() },
                q("w1", b.w1().view(), format)?,
                b.b1().cloned(),
                q("w2", b.w2().view(), format)?,
                b.b2().cloned(),
            ),
            other => Err(MoeError::Unsupported {
                owner: format!("a {} bank", other.kind()),
                feature: "quantisation (SwiGLU, GPT-OSS and MLP banks are quantised)".into(),
            }),
        }
    }

    /// The f32 bank of the family's usual layout holding exactly the decoded weights
    /// ([`PackedMatrix::dequantize`]).
    ///
    /// # Errors
    /// Only if the decoded tensors were refused by the family's constructor (never for a bank built here).
    pub fn dequantize(&self) -> Result<ExpertBank, MoeError> {
        let (up, down) = (self.up.dequantize(), self.down.dequantize());
        Ok(match self.family {
            PackedFamily::SwiGlu { act } => ExpertBank::SwiGlu(SwiGluBank::new(up, down, act)?),
            PackedFamily::GptOss { alpha, limit } => {
                let t = |a: ndarray::Array3<f32>| {
                    a.permuted_axes([0, 2, 1]).as_standard_layout().into_owned()
                };
                ExpertBank::GptOss(GptOssBank::new(
                    t(up),
                    self.up_bias.clone().unwrap_or_default(),
                    t(down),
                    self.down_bias.clone().unwrap_or_default(),
                    alpha,
                    limit,
                )?)
            }
            PackedFamily::Mlp { act } => ExpertBank::Mlp(MlpBank::new(
                up,
                self.up_bias.clone(),
                down,
                self.down_bias.clone(),
                act,
            )?),
        })
    }

    /// How far the decoded weights are from `original`'s (the bank this one was quantised from).
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] when `original` is not of this bank's family, [`MoeError::Shape`] when a
    /// tensor's shape differs.
    pub fn error_against(&self, original: &ExpertBank) -> Result<QuantError, MoeError> {
        let back = self.dequantize()?;
        let (a, b) = (original.params(), back.params());
        if a.len() != b.len() || original.kind() != back.kind() {
            return Err(MoeError::config(
                "original bank",
                original.kind(),
                format!("a {} bank of the same shape", back.kind()),
            ));
        }
        let (mut max_abs, mut num, mut den) = (0f32, 0f64, 0f64);
        for (p, q) in a.iter().zip(&b) {
            if p.value.shape() != q.value.shape() {
                return Err(MoeError::shape(
                    p.name.clone(),
                    format!("{:?}", q.value.shape()),
                    p.value.shape(),
                ));
            }
            for (&x, &y) in p.value.iter().zip(q.value.iter()) {
                max_abs = max_abs.max((x - y).abs());
                num += f64::from(x - y).powi(2);
                den += f64::from(x).powi(2);
            }
        }
        Ok(QuantError {
            max_abs,
            rel_rms: if den > 0.0 { (num / den).sqrt() } else { 0.0 },
        })
    }

    /// The family.
    pub fn family(&self) -> PackedFamily {
        self.family
    }

    /// The format of both tensors.
    pub fn format(&self) -> WeightFormat {
        self.up.format()
    }

    /// The first weight, `[E, U, d]`.
    pub fn up(&self) -> &PackedMatrix {
        &self.up
    }

    /// The first product's bias, `[E, U]` (row order of [`PackedBank::up`]).
    pub fn up_bias(&self) -> Option<&Array2<f32>> {
        self.up_bias.as_ref()
    }

    /// The second weight, `[E, d, f]`.
    pub fn down(&self) -> &PackedMatrix {
        &self.down
    }

    /// The second product's bias, `[E, d]`.
    pub fn down_bias(&self) -> Option<&Array2<f32>> {
        self.down_bias.as_ref()
    }

    /// Experts `E`.
    pub fn n_experts(&self) -> usize {
        self.down.dims()[0]
    }

    /// Width `d`.
    pub fn d_model(&self) -> usize {
        self.down.dims()[1]
    }

    /// Expert FFN width `f`.
    pub fn ffn(&self) -> usize {
        self.down.dims()[2]
    }

    /// Bytes of one expert, packed weights, scales and f32 biases: what a forward streams for each expert it
    /// uses.
    pub fn bytes_per_expert(&self) -> usize {
        let bias = |b: &Option<Array2<f32>>| b.as_ref().map_or(0, |b| 4 * b.ncols());
        self.up.bytes_per_expert()
            + self.down.bytes_per_expert()
            + bias(&self.up_bias)
            + bias(&self.down_bias)
    }

    /// The bank of experts `ids` in that order (ids checked by the caller).
    pub(crate) fn select(&self, ids: &[usize]) -> Result<Self, MoeError> {
        PackedBank::new(
            self.family,
            self.up.select(ids)?,
            self.up_bias.as_ref().map(|b| b.select(Axis(0), ids)),
            self.down.select(ids)?,
            self.down_bias.as_ref().map(|b| b.select(Axis(0), ids)),
        )
    }
}
