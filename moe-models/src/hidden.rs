//! Hidden states from a file, for routing real activations (`moe compare --input`): a `[T, d]` (or `[B, S, d]`,
//! flattened to `T = B·S` rows) float tensor in safetensors or NumPy `.npy`, with optional token ids.

use std::path::Path;

use ndarray::Array2;

use crate::checkpoint::Checkpoint;
use crate::error::LoadError;

/// Hidden states and, when the file has them, token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct HiddenStates {
    /// `[T, d]`.
    pub hidden: Array2<f32>,
    /// `[T]` token ids (safetensors `token_ids` or `input_ids`), if present.
    pub token_ids: Option<Vec<u32>>,
}

/// Tensor names tried, in order, for the hidden states in a safetensors file.
pub const HIDDEN_NAMES: &[&str] = &["hidden_states", "hidden", "x"];
/// Tensor names tried, in order, for token ids.
pub const TOKEN_ID_NAMES: &[&str] = &["token_ids", "input_ids"];

/// Reads hidden states from `path`: `.npy` by extension, safetensors otherwise. In safetensors the hidden states
/// are the first of [`HIDDEN_NAMES`] present, or else the only float tensor of rank 2 or 3.
///
/// # Errors
/// [`LoadError`] naming the file: unreadable, truncated or malformed, no or several candidate tensors, a rank other
/// than 2 or 3, a non-float dtype, token ids of the wrong length or outside `0..2³²` (non-finite values are reported by the router, naming the
/// token).
pub fn load_hidden(path: impl AsRef<Path>) -> Result<HiddenStates, LoadError> {
    let path = path.as_ref();
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"))
    {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Io {
            file: path.to_path_buf(),
            source,
        })?;
        let hidden = parse_npy(path, &bytes)?;
        return Ok(HiddenStates {
            hidden,
            token_ids: None,
        });
    }
    let ck = Checkpoint::open(path)?;
    let name = match HIDDEN_NAMES.iter().find(|n| ck.contains(n)) {
        Some(n) => n.to_string(),
        None => {
            let cands: Vec<String> = ck
                .names()
                .filter(|n| {
                    let float = ck
                        .dtype(n)
                        .is_ok_and(|d| matches!(d.as_str(), "F32" | "BF16" | "F16"));
                    float && ck.shape(n).is_ok_and(|s| s.len() == 2 || s.len() == 3)
                })
                .map(str::to_string)
                .collect();
            match cands.as_slice() {
                [one] => one.clone(),
                _ => {
                    return Err(LoadError::MissingTensor {
                        file: path.to_path_buf(),
                        tensor: format!(
                            "{} (or a single float tensor of rank 2 or 3; found {} candidates: {})",
                            HIDDEN_NAMES.join(" / "),
                            cands.len(),
                            cands.join(", ")
                        ),
                    });
                }
            }
        }
    };
    let t = ck.tensor(&name)?;
    let (rows, d) = match t.shape.as_slice() {
        [r, d] => (*r, *d),
        [b, s, d] => (b * s, *d),
        other => {
            return Err(LoadError::Shape {
                file: path.to_path_buf(),
                tensor: name,
                expected: "[T, d] or [B, S, d]".into(),
                found: other.to_vec(),
            });
        }
    };
    let hidden = Array2::from_shape_vec((rows, d), t.data).map_err(|_| LoadError::Shape {
        file: path.to_path_buf(),
        tensor: name.clone(),
        expected: "[T, d] or [B, S, d]".into(),
        found: vec![rows, d],
    })?;
    let token_ids = match TOKEN_ID_NAMES.iter().find(|n| ck.contains(n)) {
        None => None,
        Some(n) => {
            let (shape, ids) = ck.tensor_i64(n)?;
            if ids.len() != rows {
                return Err(LoadError::Shape {
                    file: path.to_path_buf(),
                    tensor: n.to_string(),
                    expected: format!("[{rows}]"),
                    found: shape,
                });
            }
            let mut out = Vec::with_capacity(rows);
            for (i, &v) in ids.iter().enumerate() {
                let id = u32::try_from(v).map_err(|_| LoadError::Config {
                    file: path.to_path_buf(),
                    field: format!("{n}[{i}]"),
                    reason: format!("token id {v} is outside 0..2^32"),
                })?;
                out.push(id);
            }
            Some(out)
        }
    };
    Ok(HiddenStates { hidden, token_ids })
}

fn npy_err(path: &Path, reason: impl Into<String>) -> LoadError {
    LoadError::Config {
        file: path.to_path_buf(),
        field: "npy header".into(),
        reason: reason.into(),
    }
}

/// Parses a NumPy `.npy` file (format 1.0, 2.0 or 3.0) holding a C-order `<f4` or `<f8` array of rank 2 or 3.
fn parse_npy(path: &Path, bytes: &[u8]) -> Result<Array2<f32>, LoadError> {
    let truncated = |what: &str| LoadError::Truncated {
        file: path.to_path_buf(),
        found: bytes.len() as u64,
        what: what.into(),
    };
    if bytes.len() < 10 || !bytes.starts_with(b"\x93NUMPY") {
        return Err(npy_err(path, "not a .npy file (magic \\x93NUMPY missing)"));
    }
    let major = bytes[6];
    let (header_len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 => {
            let b = bytes
                .get(8..12)
                .ok_or_else(|| truncated("the header length is missing"))?;
            (
                u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize,
                12usize,
            )
        }
        v => {
            return Err(npy_err(
                path,
                format!("unsupported .npy format version {v}"),
            ));
        }
    };
    let header = bytes
        .get(start..start + header_len)
        .ok_or_else(|| truncated("the header ends early"))?;
    let header = std::str::from_utf8(header).map_err(|_| npy_err(path, "header is not text"))?;
    let field = |key: &str| -> Option<&str> {
        let i = header.find(&format!("'{key}'"))?;
        let rest = header
            .get(i + key.len() + 2..)?
            .trim_start()
            .strip_prefix(':')?
            .trim_start();
        Some(rest)
    };
    let descr = field("descr")
        .and_then(|r| r.strip_prefix('\''))
        .and_then(|r| r.split('\'').next())
        .ok_or_else(|| npy_err(path, "no descr"))?;
    let fortran = field("fortran_order").ok_or_else(|| npy_err(path, "no fortran_order"))?;
    if fortran.starts_with("True") {
        return Err(npy_err(
            path,
            "Fortran-order arrays are not supported; save with np.ascontiguousarray",
        ));
    }
    let shape_txt = field("shape")
        .and_then(|r| r.strip_prefix('('))
        .and_then(|r| r.split(')').next())
        .ok_or_else(|| npy_err(path, "no shape"))?;
    let shape: Vec<usize> = shape_txt
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| npy_err(path, format!("bad shape ({shape_txt})")))
        })
        .collect::<Result<_, _>>()?;
    let (rows, d) = match shape.as_slice() {
        [r, d] => (*r, *d),
        [b, s, d] => (b.saturating_mul(*s), *d),
        _ => {
            return Err(LoadError::Shape {
                file: path.to_path_buf(),
                tensor: "array".into(),
                expected: "[T, d] or [B, S, d]".into(),
                found: shape,
            });
        }
    };
    let n = rows
        .checked_mul(d)
        .ok_or_else(|| npy_err(path, "shape overflows"))?;
    let data = &bytes[start + header_len..];
    let values: Vec<f32> = match descr {
        "<f4" => {
            let need = n
                .checked_mul(4)
                .ok_or_else(|| npy_err(path, "shape overflows"))?;
            let d = data
                .get(..need)
                .ok_or_else(|| truncated("the array data ends early"))?;
            d.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        }
        "<f8" => {
            let need = n
                .checked_mul(8)
                .ok_or_else(|| npy_err(path, "shape overflows"))?;
            let d = data
                .get(..need)
                .ok_or_else(|| truncated("the array data ends early"))?;
            d.chunks_exact(8)
                .map(|b| {
                    f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
                })
                .collect()
        }
        other => {
            return Err(npy_err(
                path,
                format!("dtype {other} is not supported (use float32 '<f4' or float64 '<f8')"),
            ));
        }
    };
    Array2::from_shape_vec((rows, d), values)
        .map_err(|_| npy_err(path, "shape does not match the data"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        b.extend_from_slice(h.as_bytes());
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn npy_f32_and_f64() {
        let vals: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let a = parse_npy(Path::new("x.npy"), &npy("<f4", "(2, 3)", &vals)).expect("f32");
        assert_eq!(a, ndarray::array![[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]]);
        let vals: Vec<u8> = [0.5f64, -1.5]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let a = parse_npy(Path::new("x.npy"), &npy("<f8", "(1, 1, 2)", &vals)).expect("f64");
        assert_eq!(a, ndarray::array![[0.5f32, -1.5]]);
    }

    #[test]
    fn npy_errors_name_the_problem() {
        let p = Path::new("bad.npy");
        let e = parse_npy(p, &npy("<f4", "(2, 3)", &[0u8; 8])).expect_err("truncated");
        assert!(e.to_string().contains("truncated"), "{e}");
        let e = parse_npy(p, &npy("<i8", "(1, 1)", &[0u8; 8])).expect_err("int");
        assert!(e.to_string().contains("<i8"), "{e}");
        let e = parse_npy(p, &npy("<f4", "(4,)", &[0u8; 16])).expect_err("rank 1");
        assert!(e.to_string().contains("[T, d]"), "{e}");
        assert!(parse_npy(p, b"not numpy at all").is_err());
        assert!(parse_npy(p, b"\x93NUMPY\x01\x00\xff\xff").is_err());
    }
}
