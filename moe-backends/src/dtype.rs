//! The precision of resident expert weights, as `moe bench --dtype` and [`moe_core::Capabilities`] name it.

/// Precision of a backend's resident expert weights ([`moe_core::Capabilities::dtypes`] names what each runs).
/// Router weights and all arithmetic stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dtype {
    /// f32 weights: every backend.
    #[default]
    F32,
    /// bfloat16 weights (the cuda backend: tensor cores from compute capability 8.0, activations rounded to
    /// bf16 at each product).
    Bf16,
    /// IEEE half weights (the cuda backend, as bf16 with f16 rounding).
    F16,
}

impl Dtype {
    /// `f32`, `bf16` or `f16`.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }

    /// Parses `f32`, `bf16` or `f16`.
    pub fn parse(s: &str) -> Option<Dtype> {
        match s {
            "f32" => Some(Dtype::F32),
            "bf16" => Some(Dtype::Bf16),
            "f16" => Some(Dtype::F16),
            _ => None,
        }
    }

    /// Bytes per weight.
    pub fn bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }

    /// `v` rounded to this precision (to nearest even), as the kernels see it.
    pub fn round(self, v: f32) -> f32 {
        match self {
            Dtype::F32 => v,
            Dtype::Bf16 => half::bf16::from_f32(v).to_f32(),
            Dtype::F16 => half::f16::from_f32(v).to_f32(),
        }
    }

    /// The 16-bit patterns of `v` in this precision (`None` for f32).
    #[cfg(feature = "cuda")]
    pub(crate) fn bits(self, v: &[f32]) -> Option<Vec<u16>> {
        match self {
            Dtype::F32 => None,
            Dtype::Bf16 => Some(
                v.iter()
                    .map(|&x| half::bf16::from_f32(x).to_bits())
                    .collect(),
            ),
            Dtype::F16 => Some(
                v.iter()
                    .map(|&x| half::f16::from_f32(x).to_bits())
                    .collect(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-8 is halfway between two bf16 values: it rounds to the even one, 1.0.
        assert_eq!(Dtype::Bf16.round(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(Dtype::Bf16.round(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(Dtype::F16.round(1.0 + 1.0 / 4096.0), 1.0);
        assert_eq!(Dtype::F32.round(0.1), 0.1);
        assert_eq!(Dtype::parse("bf16"), Some(Dtype::Bf16));
        assert_eq!(Dtype::parse("fp8"), None);
    }
}
