//! Low-precision expert weights kept packed: the formats ([`WeightFormat`]), one packed weight tensor
//! ([`PackedMatrix`]) and a bank of them ([`PackedBank`], [`crate::ExpertBank::Packed`]).
//!
//! Every packed matrix is `[E, rows, cols]` with the reduction axis `cols` contiguous (`out = a · Wᵀ`, `W` row-major
//! `[out, in]`): the layout GPT-OSS's MXFP4 blocks and DeepSeek-V3's FP8 linears ship in, so checkpoints load
//! without moving a byte. A decoded weight is the code's exact value times its scale, rounded once to f32
//! ([`ExpertMatrix::decode_row`]); backends decode tiles inside their products and must equal that bit for bit.
//! Routers, gate biases and correction biases never enter this module: they stay f32.
//!
//! | format | bits / weight | scales | decoded value | source |
//! | --- | --: | --- | --- | --- |
//! | `f32` | 32 | none | the value | |
//! | `bf16` | 16 | none | the value | |
//! | `f16` | 16 | none | the value | IEEE 754 binary16 |
//! | `int8` | 8 | f32 per output row | `q · s[r]` | symmetric per-channel (LLM.int8(), Dettmers et al. 2022, without outliers) |
//! | `fp8` | 8 | f32 per 128 × 128 block | `E4M3(q) · s[r / 128, c / 128]` | DeepSeek-V3 (arXiv:2412.19437 §3.3), `weight_scale_inv` |
//! | `mxfp4` | 4 | E8M0 per 32 values | `E2M1(q) · 2^(s − 127)` | OCP MX v1.0; GPT-OSS, transformers `integrations/mxfp4.py` |

pub mod bank;
pub mod codec;
pub mod matrix;

pub use bank::{PackedBank, PackedFamily, QuantError};
pub use matrix::{ExpertMatrix, ExpertScales, FP8_BLOCK, MXFP4_BLOCK, PackedMatrix, Scales};

use crate::error::MoeError;

/// The format of packed expert weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WeightFormat {
    /// 32-bit floats (the canonical layout, unscaled).
    #[default]
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
    /// Symmetric int8 with one f32 scale per output row.
    Int8,
    /// FP8 E4M3 with f32 scales per block (DeepSeek-V3).
    Fp8,
    /// MXFP4: E2M1 codes, two a byte, with an E8M0 scale per 32 (GPT-OSS).
    Mxfp4,
}

impl WeightFormat {
    /// Every format, widest first.
    pub const ALL: [WeightFormat; 6] = [
        WeightFormat::F32,
        WeightFormat::Bf16,
        WeightFormat::F16,
        WeightFormat::Int8,
        WeightFormat::Fp8,
        WeightFormat::Mxfp4,
    ];

    /// `f32`, `bf16`, `f16`, `int8`, `fp8` or `mxfp4`.
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::Bf16 => "bf16",
            WeightFormat::F16 => "f16",
            WeightFormat::Int8 => "int8",
            WeightFormat::Fp8 => "fp8",
            WeightFormat::Mxfp4 => "mxfp4",
        }
    }

    /// Parses a [`WeightFormat::name`].
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] naming the choices.
    pub fn parse(s: &str) -> Result<Self, MoeError> {
        WeightFormat::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| MoeError::config("dtype", s, "one of: f32, bf16, f16, int8, fp8, mxfp4"))
    }

    /// Bytes of one row of `cols` values (MXFP4: `cols / 2`, `cols` a multiple of 32).
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            WeightFormat::F32 => 4 * cols,
            WeightFormat::Bf16 | WeightFormat::F16 => 2 * cols,
            WeightFormat::Int8 | WeightFormat::Fp8 => cols,
            WeightFormat::Mxfp4 => cols / 2,
        }
    }

    /// What scales the format takes, in words.
    pub(crate) fn scale_kind(self) -> &'static str {
        match self {
            WeightFormat::F32 | WeightFormat::Bf16 | WeightFormat::F16 => "no scales",
            WeightFormat::Int8 => "row scales",
            WeightFormat::Fp8 => "block scales",
            WeightFormat::Mxfp4 => "E8M0 block scales",
        }
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
