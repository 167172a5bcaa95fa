//! Scalar encodings of the packed weight formats: decoding is exact (every code is an f32 value), encoding rounds
//! to nearest, ties to even, and saturates at the format's largest finite value.
//!
//! Sources: bf16 and f16 as `half` implements them; FP8 E4M3 ("fn": no infinities, NaN = `S.1111.111`, largest
//! finite 448) from the OCP 8-bit floating point specification (2023) and PyTorch's `torch.float8_e4m3fn`; E2M1
//! (FP4) and E8M0 scales from the OCP Microscaling Formats (MX) specification v1.0 (2023), as transformers'
//! `integrations/mxfp4.py` decodes them (`FP4_VALUES`, `ldexp(value, scale - 127)`).

/// The 16 E2M1 values by code (bit 3 the sign): transformers' `FP4_VALUES`.
pub const E2M1_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Largest finite FP8 E4M3 value.
pub const FP8_E4M3_MAX: f32 = 448.0;

/// Largest E2M1 value.
pub const E2M1_MAX: f32 = 6.0;

/// Largest int8 code used by the symmetric int8 format (−127..=127; −128 is never produced, and is decoded as
/// −128 if a checkpoint holds it).
pub const INT8_MAX: f32 = 127.0;

/// The E8M0 code that means NaN.
pub const E8M0_NAN: u8 = 255;

/// The value of an FP8 E4M3 code (`None` for the NaN codes `0x7F`, `0xFF`).
pub fn fp8_e4m3_to_f32(code: u8) -> Option<f32> {
    let sign = if code & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = (code >> 3) & 0xF;
    let m = f32::from(code & 7);
    if e == 0xF && code & 7 == 7 {
        return None;
    }
    let mag = if e == 0 {
        m * (1.0 / 512.0)
    } else {
        (8.0 + m) * pow2(i32::from(e) - 10)
    };
    Some(sign * mag)
}

/// `v` rounded to the nearest FP8 E4M3 value (ties to even), saturating at ±448; NaN maps to the NaN code.
pub fn f32_to_fp8_e4m3(v: f32) -> u8 {
    if v.is_nan() {
        return 0x7F;
    }
    let sign = if v.is_sign_negative() { 0x80 } else { 0 };
    let a = v.abs();
    // Halfway between 448 and the next step (480) and above: saturate.
    if a >= 464.0 {
        return sign | 0x7E;
    }
    if a < 1.0 / 64.0 {
        // Subnormals (steps of 2^-9); 8 steps is the smallest normal, whose code is 8 as well.
        let q = (a * 512.0).round_ties_even() as u8;
        return sign | q;
    }
    let bits = a.to_bits();
    let mut exp = ((bits >> 23) & 0xFF) as i32 - 127;
    let mant = bits & 0x7F_FFFF;
    let mut m = mant >> 20;
    let rem = mant & 0xF_FFFF;
    let half = 1 << 19;
    if rem > half || (rem == half && m & 1 == 1) {
        m += 1;
    }
    if m == 8 {
        m = 0;
        exp += 1;
    }
    let e = (exp + 7) as u32;
    if e > 15 || (e == 15 && m == 7) {
        return sign | 0x7E;
    }
    sign | ((e << 3) | m) as u8
}

/// The value of an E2M1 code (the low four bits of `code`).
pub fn e2m1_to_f32(code: u8) -> f32 {
    E2M1_VALUES[usize::from(code & 0xF)]
}

/// `v` rounded to the nearest E2M1 value (ties to even), saturating at ±6; NaN encodes as +0 (never produced by
/// [`crate::quant::PackedMatrix::quantize`], which refuses non-finite weights).
pub fn f32_to_e2m1(v: f32) -> u8 {
    let sign = if v.is_sign_negative() { 8 } else { 0 };
    let a = v.abs();
    let code = if a.is_nan() || a <= 0.25 {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    sign | code
}

/// The value of an E8M0 scale code, `2^(code − 127)` (`None` for the NaN code 255). Exact: code 0 is the f32
/// subnormal `2^-127`.
pub fn e8m0_to_f32(code: u8) -> Option<f32> {
    if code == E8M0_NAN {
        return None;
    }
    Some(if code == 0 {
        f32::from_bits(1 << 22)
    } else {
        f32::from_bits(u32::from(code) << 23)
    })
}

/// The E8M0 scale of a block of 32 values whose largest magnitude is `amax` (OCP MX v1.0 §6.3:
/// `2^(⌊log2 amax⌋ − 2)`, 2 being E2M1's largest exponent), clamped to the codes 0..=254; 0 for an all-zero block.
pub fn e8m0_for_amax(amax: f32) -> u8 {
    if amax <= 0.0 || !amax.is_finite() {
        return 0;
    }
    let bits = amax.to_bits();
    let biased = ((bits >> 23) & 0xFF) as i32;
    // ⌊log2 amax⌋ for normal amax is biased − 127; subnormal amax is below every code's reach anyway.
    let floor_log2 = if biased == 0 { -127 } else { biased - 127 };
    (floor_log2 - 2 + 127).clamp(0, 254) as u8
}

/// `2^e` as f32 for `e` in the normal range.
fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_round_trips_every_finite_code() {
        for code in 0..=255u8 {
            match fp8_e4m3_to_f32(code) {
                None => assert!(code & 0x7F == 0x7F),
                Some(v) => {
                    let back = f32_to_fp8_e4m3(v);
                    // −0 and +0 are distinct codes with equal values.
                    assert_eq!(back, code, "code {code:#04x} value {v}");
                }
            }
        }
        assert_eq!(fp8_e4m3_to_f32(0x7E), Some(448.0));
        assert_eq!(fp8_e4m3_to_f32(0x01), Some(1.0 / 512.0));
        assert_eq!(fp8_e4m3_to_f32(0x08), Some(1.0 / 64.0));
        assert_eq!(fp8_e4m3_to_f32(0x38), Some(1.0));
        assert_eq!(fp8_e4m3_to_f32(0xB8), Some(-1.0));
    }

    #[test]
    fn fp8_rounds_to_nearest_even_and_saturates() {
        // 1 + 1/16 is halfway between 1 and 1.125: the even mantissa (1.0) wins; 1 + 3/16 goes to 1.25.
        assert_eq!(fp8_e4m3_to_f32(f32_to_fp8_e4m3(1.0625)), Some(1.0));
        assert_eq!(fp8_e4m3_to_f32(f32_to_fp8_e4m3(1.1875)), Some(1.25));
        assert_eq!(fp8_e4m3_to_f32(f32_to_fp8_e4m3(1.0e6)), Some(448.0));
        assert_eq!(fp8_e4m3_to_f32(f32_to_fp8_e4m3(-460.0)), Some(-448.0));
        assert_eq!(fp8_e4m3_to_f32(f32_to_fp8_e4m3(1.0 / 1024.0)), Some(0.0));
        assert_eq!(
            fp8_e4m3_to_f32(f32_to_fp8_e4m3(3.0 / 1024.0)),
            Some(2.0 / 512.0)
        );
        // Every value between two neighbours goes to the nearer one.
        for code in 0..0x7Eu8 {
            let (lo, hi) = (
                fp8_e4m3_to_f32(code).unwrap_or(0.0),
                fp8_e4m3_to_f32(code + 1).unwrap_or(0.0),
            );
            let q = |v: f32| fp8_e4m3_to_f32(f32_to_fp8_e4m3(v)).unwrap_or(f32::NAN);
            assert_eq!(q(lo + (hi - lo) * 0.25), lo);
            assert_eq!(q(lo + (hi - lo) * 0.75), hi);
        }
    }

    #[test]
    fn e2m1_rounds_to_nearest_even() {
        for code in 0..16u8 {
            assert_eq!(
                e2m1_to_f32(f32_to_e2m1(e2m1_to_f32(code))),
                e2m1_to_f32(code)
            );
        }
        let q = |v: f32| e2m1_to_f32(f32_to_e2m1(v));
        assert_eq!(q(0.25), 0.0);
        assert_eq!(q(0.75), 1.0);
        assert_eq!(q(1.25), 1.0);
        assert_eq!(q(1.75), 2.0);
        assert_eq!(q(2.5), 2.0);
        assert_eq!(q(3.5), 4.0);
        assert_eq!(q(5.0), 4.0);
        assert_eq!(q(5.1), 6.0);
        assert_eq!(q(-100.0), -6.0);
    }

    #[test]
    fn e8m0_is_a_power_of_two() {
        assert_eq!(e8m0_to_f32(127), Some(1.0));
        assert_eq!(e8m0_to_f32(128), Some(2.0));
        assert_eq!(e8m0_to_f32(0), Some(2f32.powi(-127)));
        assert_eq!(e8m0_to_f32(254), Some(2f32.powi(127)));
        assert_eq!(e8m0_to_f32(255), None);
        // amax 6 → 2^(2 − 2) = 1: the block's largest value is exactly E2M1's largest.
        assert_eq!(e8m0_for_amax(6.0), 127);
        assert_eq!(e8m0_for_amax(7.9), 127);
        assert_eq!(e8m0_for_amax(8.0), 128);
        assert_eq!(e8m0_for_amax(0.0), 0);
    }
}
