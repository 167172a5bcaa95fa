//! The precision of resident expert weights: [`Dtype`] is [`moe_core::WeightFormat`] under the name `moe bench
//! --dtype` and [`crate::BackendOptions`] use; [`moe_core::Capabilities::dtypes`] names what each backend runs.

/// Precision of a backend's resident expert weights (`f32`, `bf16`, `f16`, `int8`, `fp8`, `mxfp4`): an f32 bank
/// uploaded with another format is quantised at upload ([`moe_core::PackedBank::quantize`]); a packed bank runs
/// in its own format. Router weights and all arithmetic stay f32.
pub use moe_core::WeightFormat as Dtype;

/// The 16-bit patterns of `v` in `dtype` (`None` for every format but bf16 and f16), rounded to nearest even.
#[cfg(feature = "cuda")]
pub(crate) fn half_bits(dtype: Dtype, v: &[f32]) -> Option<Vec<u16>> {
    match dtype {
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
        _ => None,
    }
}

/// Bytes per weight of the 16- and 32-bit formats (the CUDA backend's staging; packed formats are sized by
/// [`moe_core::PackedMatrix::bytes_per_expert`]).
#[cfg(feature = "cuda")]
pub(crate) fn dense_bytes(dtype: Dtype) -> usize {
    match dtype {
        Dtype::Bf16 | Dtype::F16 => 2,
        _ => 4,
    }
}
