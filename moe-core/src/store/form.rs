//! The form of one expert (family, widths, activation, biases): what a stored bank's resident slots look like.

use ndarray::{Array2, Array3};

use crate::error::MoeError;
use crate::expert::{Activation, ExpertBank, GptOssBank, MlpBank, SwiGluBank};

/// The form of the experts of a bank, without their weights: enough to allocate resident slots
/// ([`ExpertForm::zeros`]) and to size a load. PEER and custom experts have no stored form (PEER's singletons are
/// two rows each; a custom expert's weights are its own).
#[derive(Debug, Clone, PartialEq)]
pub enum ExpertForm {
    /// [`SwiGluBank`]: tensors `gate_up` `[2f, d]`, `down` `[d, f]` per expert.
    SwiGlu {
        /// Hidden width `d`.
        d: usize,
        /// Expert FFN width `f`.
        f: usize,
        /// Gate activation.
        act: Activation,
    },
    /// [`GptOssBank`]: `gate_up` `[d, 2f]`, `gate_up_bias` `[2f]`, `down` `[f, d]`, `down_bias` `[d]` per expert.
    GptOss {
        /// Hidden width `d`.
        d: usize,
        /// Expert FFN width `f`.
        f: usize,
        /// The GLU's `alpha`.
        alpha: f32,
        /// The clamp `limit`.
        limit: f32,
    },
    /// [`MlpBank`]: `w1` `[f, d]`, `b1` `[f]` (if present), `w2` `[d, f]`, `b2` `[d]` (if present) per expert.
    Mlp {
        /// Hidden width `d`.
        d: usize,
        /// Expert FFN width `f`.
        f: usize,
        /// Hidden activation.
        act: Activation,
        /// Whether `b1` is present.
        b1: bool,
        /// Whether `b2` is present.
        b2: bool,
    },
}

impl ExpertForm {
    /// The form of `bank`'s experts.
    ///
    /// # Errors
    /// [`MoeError::Unsupported`] for PEER, custom and stored banks.
    pub fn of(bank: &ExpertBank) -> Result<Self, MoeError> {
        match bank {
            ExpertBank::SwiGlu(b) => Ok(ExpertForm::SwiGlu {
                d: bank.d_model(),
                f: bank.ffn(),
                act: b.act(),
            }),
            ExpertBank::GptOss(b) => Ok(ExpertForm::GptOss {
                d: bank.d_model(),
                f: bank.ffn(),
                alpha: b.alpha(),
                limit: b.limit(),
            }),
            ExpertBank::Mlp(b) => Ok(ExpertForm::Mlp {
                d: bank.d_model(),
                f: bank.ffn(),
                act: b.act(),
                b1: b.b1().is_some(),
                b2: b.b2().is_some(),
            }),
            ExpertBank::Stored(s) => Ok(s.form().clone()),
            other => Err(MoeError::Unsupported {
                owner: format!("{} experts", other.kind()),
                feature: "an expert store (SwiGLU, GPT-OSS and MLP experts are stored)".into(),
            }),
        }
    }

    /// Hidden width `d`.
    pub fn d_model(&self) -> usize {
        match *self {
            ExpertForm::SwiGlu { d, .. }
            | ExpertForm::GptOss { d, .. }
            | ExpertForm::Mlp { d, .. } => d,
        }
    }

    /// Expert FFN width `f`.
    pub fn ffn(&self) -> usize {
        match *self {
            ExpertForm::SwiGlu { f, .. }
            | ExpertForm::GptOss { f, .. }
            | ExpertForm::Mlp { f, .. } => f,
        }
    }

    /// The family's name, as [`ExpertBank::kind`]: `swiglu`, `gpt_oss`, `mlp`.
    pub fn kind(&self) -> &'static str {
        match self {
            ExpertForm::SwiGlu { .. } => "swiglu",
            ExpertForm::GptOss { .. } => "gpt_oss",
            ExpertForm::Mlp { .. } => "mlp",
        }
    }

    /// One expert's tensors: the name (as [`ExpertBank::params`] names the bank's) and the number of f32 values
    /// of one expert's slice, in the order of [`ExpertBank::params`]. A source fills them in this order.
    pub fn tensors(&self) -> Vec<(&'static str, usize)> {
        let (d, f) = (self.d_model(), self.ffn());
        match *self {
            ExpertForm::SwiGlu { .. } => vec![("gate_up", 2 * f * d), ("down", d * f)],
            ExpertForm::GptOss { .. } => vec![
                ("gate_up", d * 2 * f),
                ("gate_up_bias", 2 * f),
                ("down", f * d),
                ("down_bias", d),
            ],
            ExpertForm::Mlp { b1, b2, .. } => {
                let mut v = vec![("w1", f * d)];
                if b1 {
                    v.push(("b1", f));
                }
                v.push(("w2", d * f));
                if b2 {
                    v.push(("b2", d));
                }
                v
            }
        }
    }

    /// f32 values of one expert (the sum of [`ExpertForm::tensors`]).
    pub fn values_per_expert(&self) -> usize {
        self.tensors().iter().map(|(_, n)| n).sum()
    }

    /// Bytes one expert takes resident (f32).
    pub fn resident_bytes(&self) -> u64 {
        self.values_per_expert() as u64 * 4
    }

    /// A bank of `n` experts of this form, all zero: the resident slots of a stored bank.
    ///
    /// # Errors
    /// [`MoeError::TooLarge`] when `n` experts' values overflow `usize`; the banks' own shape errors.
    pub fn zeros(&self, n: usize) -> Result<ExpertBank, MoeError> {
        let per = self.values_per_expert() as u128;
        let total = per * n as u128;
        if total > isize::MAX as u128 / 4 {
            return Err(MoeError::TooLarge {
                what: format!("{n} resident expert slots of {per} values"),
                size: total * 4,
                limit: isize::MAX as u128,
            });
        }
        let (d, f) = (self.d_model(), self.ffn());
        match *self {
            ExpertForm::SwiGlu { act, .. } => Ok(ExpertBank::SwiGlu(SwiGluBank::new(
                Array3::zeros((n, 2 * f, d)),
                Array3::zeros((n, d, f)),
                act,
            )?)),
            ExpertForm::GptOss { alpha, limit, .. } => Ok(ExpertBank::GptOss(GptOssBank::new(
                Array3::zeros((n, d, 2 * f)),
                Array2::zeros((n, 2 * f)),
                Array3::zeros((n, f, d)),
                Array2::zeros((n, d)),
                alpha,
                limit,
            )?)),
            ExpertForm::Mlp { act, b1, b2, .. } => Ok(ExpertBank::Mlp(MlpBank::new(
                Array3::zeros((n, f, d)),
                b1.then(|| Array2::zeros((n, f))),
                Array3::zeros((n, d, f)),
                b2.then(|| Array2::zeros((n, d))),
                act,
            )?)),
        }
    }
}
