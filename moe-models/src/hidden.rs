//! Hidden states from a file, for routing real activations (`moe route/compare --input`): a `[T, d]` or
//! `[B, S, d]` float tensor in safetensors or NumPy `.npy`, with optional token ids, sequence lengths and a
//! padding / attention mask. A `[B, S, d]` tensor stays `B` sequences of `S` tokens ([`HiddenStates::seq_lens`]).

use std::io::Read;
use std::path::Path;

use ndarray::Array2;

use crate::checkpoint::Checkpoint;
use crate::error::LoadError;

/// Hidden states and, when the file has them, token ids, sequence boundaries and padding.
#[derive(Debug, Clone, PartialEq)]
pub struct HiddenStates {
    /// `[T, d]` (`T = B·S` for a `[B, S, d]` tensor, sequence after sequence).
    pub hidden: Array2<f32>,
    /// `[T]` token ids (one of [`TOKEN_ID_NAMES`], shaped `[T]` or `[B, S]`), if present.
    pub token_ids: Option<Vec<u32>>,
    /// Lengths of the consecutive sequences (sum `T`): `[S; B]` for a `[B, S, d]` tensor, or the
    /// [`SEQ_LEN_NAMES`] tensor of a `[T, d]` file; `None` means one sequence of `T` tokens.
    pub seq_lens: Option<Vec<usize>>,
    /// `[T]`, `true` = padding: from [`ATTENTION_MASK_NAMES`] (0 = padding), [`PADDING_MASK_NAMES`]
    /// (non-zero = padding), or positions past a [`SEQ_LEN_NAMES`] length of a `[B, S, d]` file.
    pub padding: Option<Vec<bool>>,
}

impl HiddenStates {
    /// Number of tokens `T`.
    pub fn n_tokens(&self) -> usize {
        self.hidden.nrows()
    }

    /// Tokens that are not padding.
    pub fn n_real_tokens(&self) -> usize {
        match &self.padding {
            Some(p) => p.iter().filter(|&&x| !x).count(),
            None => self.n_tokens(),
        }
    }
}

/// Tensor names tried, in order, for the hidden states in a safetensors file.
pub const HIDDEN_NAMES: &[&str] = &["hidden_states", "hidden", "x"];
/// Tensor names tried, in order, for token ids (`[T]` or `[B, S]`, integer).
pub const TOKEN_ID_NAMES: &[&str] = &["token_ids", "input_ids"];
/// Tensor names tried for an attention mask (`[T]` or `[B, S]`, integer or bool; 1 = real token, 0 = padding,
/// as in Hugging Face tokenizers).
pub const ATTENTION_MASK_NAMES: &[&str] = &["attention_mask"];
/// Tensor names tried for a padding mask (`[T]` or `[B, S]`, integer or bool; 1 = padding).
pub const PADDING_MASK_NAMES: &[&str] = &["padding_mask"];
/// Tensor names tried for sequence lengths (`[B]`, integer): with `[B, S, d]` hidden states each is `<= S` and
/// the positions past it are padding; with `[T, d]` they split the `T` rows and sum to `T`.
pub const SEQ_LEN_NAMES: &[&str] = &["seq_lens", "sequence_lengths"];

/// Largest number of hidden values `T·d` read from a file (2³², 16 GiB of f32), as for generated workloads.
pub const MAX_HIDDEN_VALUES: u128 = 1 << 32;
/// Largest `.npy` header read (numpy itself refuses headers over 10 000 bytes by default).
pub const MAX_NPY_HEADER: usize = 1 << 16;

/// Reads hidden states from `path`: `.npy` by extension, safetensors otherwise. In safetensors the hidden states
/// are the first of [`HIDDEN_NAMES`] present, or else the only float tensor of rank 2 or 3; token ids, sequence
/// lengths and masks come from the tensors named by [`TOKEN_ID_NAMES`], [`SEQ_LEN_NAMES`],
/// [`ATTENTION_MASK_NAMES`] and [`PADDING_MASK_NAMES`]. A `.npy` file holds the hidden states alone.
///
/// # Errors
/// [`LoadError`] naming the file and tensor: unreadable, not a regular file, truncated or malformed, no or several
/// candidate tensors, a rank other than 2 or 3, width 0, more than [`MAX_HIDDEN_VALUES`] values, a non-float
/// dtype, f64 values outside the f32 range, token ids / masks / lengths of the wrong length or value
/// (non-finite values are reported by the router, naming the token).
pub fn load_hidden(path: impl AsRef<Path>) -> Result<HiddenStates, LoadError> {
    let path = path.as_ref();
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"))
    {
        let (hidden, seq_lens) = read_npy(path)?;
        return Ok(HiddenStates {
            hidden,
            token_ids: None,
            seq_lens,
            padding: None,
        });
    }
    load_safetensors(path)
}

fn input_err(path: &Path, part: &str, reason: impl Into<String>) -> LoadError {
    LoadError::Input {
        file: path.to_path_buf(),
        part: part.into(),
        reason: reason.into(),
    }
}

/// `(B, S, d)` of hidden states shaped `shape` (`B = 1` for rank 2), checked: rank, width, value count.
fn hidden_dims(
    path: &Path,
    tensor: &str,
    shape: &[usize],
) -> Result<(usize, usize, usize), LoadError> {
    let (b, s, d) = match shape {
        [t, d] => (1, *t, *d),
        [b, s, d] => (*b, *s, *d),
        other => {
            return Err(LoadError::Shape {
                file: path.to_path_buf(),
                tensor: tensor.into(),
                expected: "[T, d] or [B, S, d]".into(),
                found: other.to_vec(),
            });
        }
    };
    if d == 0 {
        return Err(input_err(
            path,
            tensor,
            format!("hidden width d is 0 (shape {shape:?}); hidden states need d >= 1"),
        ));
    }
    let values = b as u128 * s as u128 * d as u128;
    if values > MAX_HIDDEN_VALUES {
        return Err(input_err(
            path,
            tensor,
            format!(
                "shape {shape:?} holds {values} values, over the limit of {MAX_HIDDEN_VALUES} (T·d = 2^32)"
            ),
        ));
    }
    Ok((b, s, d))
}

fn find_hidden_name(path: &Path, ck: &Checkpoint) -> Result<String, LoadError> {
    if let Some(n) = HIDDEN_NAMES.iter().find(|n| ck.contains(n)) {
        return Ok(n.to_string());
    }
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
        [one] => Ok(one.clone()),
        _ => Err(LoadError::MissingTensor {
            file: path.to_path_buf(),
            tensor: format!(
                "{} (or a single float tensor of rank 2 or 3; found {} candidates: {})",
                HIDDEN_NAMES.join(" / "),
                cands.len(),
                cands.join(", ")
            ),
        }),
    }
}

/// Reads the first present tensor of `names` as integers, checking it holds `[T]` or `[B, S]` values.
fn per_token_ints(
    path: &Path,
    ck: &Checkpoint,
    names: &[&str],
    (b, s): (usize, usize),
) -> Result<Option<(String, Vec<i64>)>, LoadError> {
    let Some(n) = names.iter().find(|n| ck.contains(n)) else {
        return Ok(None);
    };
    let (shape, vals) = ck.tensor_i64(n)?;
    let t = b * s;
    let ok = shape.as_slice() == [t] || shape.as_slice() == [b, s];
    if !ok {
        return Err(LoadError::Shape {
            file: path.to_path_buf(),
            tensor: n.to_string(),
            expected: if b == 1 {
                format!("[{t}]")
            } else {
                format!("[{t}] or [{b}, {s}]")
            },
            found: shape,
        });
    }
    Ok(Some((n.to_string(), vals)))
}

fn load_safetensors(path: &Path) -> Result<HiddenStates, LoadError> {
    let ck = Checkpoint::open(path)?;
    let name = find_hidden_name(path, &ck)?;
    let shape = ck.shape(&name)?;
    let rank3 = shape.len() == 3;
    let (b, s, d) = hidden_dims(path, &name, &shape)?;
    let rows = b * s;
    let t = ck.tensor(&name)?;
    let hidden = Array2::from_shape_vec((rows, d), t.data).map_err(|_| LoadError::Shape {
        file: path.to_path_buf(),
        tensor: name.clone(),
        expected: "[T, d] or [B, S, d]".into(),
        found: shape.clone(),
    })?;
    let token_ids = match per_token_ints(path, &ck, TOKEN_ID_NAMES, (b, s))? {
        None => None,
        Some((n, ids)) => Some(
            ids.iter()
                .enumerate()
                .map(|(i, &v)| {
                    u32::try_from(v).map_err(|_| {
                        input_err(
                            path,
                            &format!("{n}[{i}]"),
                            format!("token id {v} is outside 0..2^32"),
                        )
                    })
                })
                .collect::<Result<Vec<u32>, _>>()?,
        ),
    };
    let mut padding: Option<Vec<bool>> = None;
    for (names, pad_when_zero) in [(ATTENTION_MASK_NAMES, true), (PADDING_MASK_NAMES, false)] {
        if let Some((n, vals)) = per_token_ints(path, &ck, names, (b, s))? {
            let p = padding.get_or_insert_with(|| vec![false; rows]);
            for (i, &v) in vals.iter().enumerate() {
                if v != 0 && v != 1 {
                    return Err(input_err(
                        path,
                        &format!("{n}[{i}]"),
                        format!("mask value {v} is not 0 or 1"),
                    ));
                }
                p[i] |= (v == 0) == pad_when_zero;
            }
        }
    }
    let seq_lens = read_seq_lens(path, &ck, (b, s), rank3, &mut padding)?;
    Ok(HiddenStates {
        hidden,
        token_ids,
        seq_lens,
        padding,
    })
}

/// The sequence lengths: `[S; B]` for `[B, S, d]` (a lengths tensor marks the tail of each row as padding), the
/// lengths tensor for `[T, d]`, or `None`.
fn read_seq_lens(
    path: &Path,
    ck: &Checkpoint,
    (b, s): (usize, usize),
    rank3: bool,
    padding: &mut Option<Vec<bool>>,
) -> Result<Option<Vec<usize>>, LoadError> {
    let rows = b * s;
    let lens = match SEQ_LEN_NAMES.iter().find(|n| ck.contains(n)) {
        None => None,
        Some(n) => {
            let (shape, vals) = ck.tensor_i64(n)?;
            if shape.len() != 1 || (rank3 && shape[0] != b) {
                return Err(LoadError::Shape {
                    file: path.to_path_buf(),
                    tensor: n.to_string(),
                    expected: if rank3 {
                        format!("[{b}]")
                    } else {
                        "[B]".into()
                    },
                    found: shape,
                });
            }
            let max = if rank3 { s as i64 } else { rows as i64 };
            let mut out = Vec::with_capacity(vals.len());
            for (i, &v) in vals.iter().enumerate() {
                if v < 1 || v > max {
                    return Err(input_err(
                        path,
                        &format!("{n}[{i}]"),
                        format!("sequence length {v} is outside 1..={max}"),
                    ));
                }
                out.push(v as usize);
            }
            Some((n.to_string(), out))
        }
    };
    if rank3 {
        if let Some((_, lens)) = &lens {
            let p = padding.get_or_insert_with(|| vec![false; rows]);
            for (seq, &len) in lens.iter().enumerate() {
                for flag in &mut p[seq * s + len..(seq + 1) * s] {
                    *flag = true;
                }
            }
        }
        return Ok((rows > 0).then(|| vec![s; b]));
    }
    match lens {
        None => Ok(None),
        Some((n, lens)) => {
            let sum: usize = lens.iter().sum();
            if sum != rows {
                return Err(input_err(
                    path,
                    &n,
                    format!(
                        "sequence lengths sum to {sum}, but the hidden states have T = {rows} rows"
                    ),
                ));
            }
            Ok(Some(lens))
        }
    }
}

fn npy_err(path: &Path, reason: impl Into<String>) -> LoadError {
    input_err(path, "npy header", reason)
}

/// A parsed `.npy` header.
#[derive(Debug, Clone, PartialEq)]
struct NpyHeader {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
    /// Offset of the array data.
    data_start: usize,
}

/// Reads a `.npy` file: a regular file, its header read with a cap, then exactly the bytes the shape needs.
fn read_npy(path: &Path) -> Result<(Array2<f32>, Option<Vec<usize>>), LoadError> {
    let io = |source| LoadError::Io {
        file: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(npy_err(
            path,
            "not a regular file (a directory, device or pipe cannot be read as .npy)",
        ));
    }
    let file = std::fs::File::open(path).map_err(io)?;
    let mut head = Vec::new();
    file.take((12 + MAX_NPY_HEADER) as u64)
        .read_to_end(&mut head)
        .map_err(io)?;
    let h = parse_npy_header(path, &head)?;
    let elem = npy_elem_size(path, &h.descr)?;
    let (b, s, d) = hidden_dims(path, "array", &h.shape)?;
    let need = (b * s * d) as u64 * elem as u64;
    let have = meta.len().saturating_sub(h.data_start as u64);
    if have < need {
        return Err(LoadError::Truncated {
            file: path.to_path_buf(),
            found: meta.len(),
            what: format!(
                "the array data ends early: shape {:?} needs {need} bytes, {have} present",
                h.shape
            ),
        });
    }
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut data = Vec::new();
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(h.data_start as u64)).map_err(io)?;
    file.take(need).read_to_end(&mut data).map_err(io)?;
    let hidden = decode_npy(path, &h, &data)?;
    let seq_lens = (h.shape.len() == 3 && b * s > 0).then(|| vec![s; b]);
    Ok((hidden, seq_lens))
}

/// Parses a NumPy `.npy` file held in memory (format 1.0, 2.0 or 3.0): a `<f4`/`>f4`/`<f8`/`>f8` array of rank 2
/// or 3, C or Fortran order, returned as `[T, d]`.
#[cfg(test)]
fn parse_npy(path: &Path, bytes: &[u8]) -> Result<Array2<f32>, LoadError> {
    let h = parse_npy_header(path, bytes)?;
    let elem = npy_elem_size(path, &h.descr)?;
    let (b, s, d) = hidden_dims(path, "array", &h.shape)?;
    let need = b * s * d * elem;
    let data = bytes
        .get(h.data_start..)
        .and_then(|r| r.get(..need))
        .ok_or_else(|| LoadError::Truncated {
            file: path.to_path_buf(),
            found: bytes.len() as u64,
            what: "the array data ends early".into(),
        })?;
    decode_npy(path, &h, data)
}

fn npy_elem_size(path: &Path, descr: &str) -> Result<usize, LoadError> {
    match descr {
        "<f4" | ">f4" => Ok(4),
        "<f8" | ">f8" => Ok(8),
        other => Err(npy_err(
            path,
            format!("dtype {other} is not supported (use float32 '<f4' or float64 '<f8')"),
        )),
    }
}

/// Parses the magic, version, header length and the header dict, as `numpy.lib.format` does: the header must be
/// a Python dict literal with exactly the keys `descr` (a string), `fortran_order` (a bool) and `shape` (a tuple
/// of non-negative ints).
fn parse_npy_header(path: &Path, bytes: &[u8]) -> Result<NpyHeader, LoadError> {
    let truncated = |what: String| LoadError::Truncated {
        file: path.to_path_buf(),
        found: bytes.len() as u64,
        what,
    };
    const MAGIC: &[u8] = b"\x93NUMPY";
    let n = bytes.len().min(MAGIC.len());
    if bytes[..n] != MAGIC[..n] {
        return Err(npy_err(
            path,
            "not a .npy file: it does not start with the magic \\x93NUMPY",
        ));
    }
    if bytes.len() < 8 {
        return Err(truncated(
            "the .npy version bytes after the magic are missing".into(),
        ));
    }
    let (header_len, start) = match bytes[6] {
        1 => {
            let b = bytes
                .get(8..10)
                .ok_or_else(|| truncated("the 2-byte header length is missing".into()))?;
            (u16::from_le_bytes([b[0], b[1]]) as usize, 10usize)
        }
        2 | 3 => {
            let b = bytes
                .get(8..12)
                .ok_or_else(|| truncated("the 4-byte header length is missing".into()))?;
            (
                u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize,
                12usize,
            )
        }
        v => {
            return Err(npy_err(
                path,
                format!("unsupported .npy format version {v}.{}", bytes[7]),
            ));
        }
    };
    if header_len > MAX_NPY_HEADER {
        return Err(npy_err(
            path,
            format!("header length {header_len} is over the limit of {MAX_NPY_HEADER} bytes"),
        ));
    }
    let header = bytes
        .get(start..start + header_len)
        .ok_or_else(|| truncated(format!("the header of {header_len} bytes ends early")))?;
    let text: String = if bytes[6] == 3 {
        std::str::from_utf8(header)
            .map_err(|_| npy_err(path, "header is not UTF-8"))?
            .to_string()
    } else {
        header.iter().map(|&c| c as char).collect()
    };
    let dict = pylit::parse_dict(&text)
        .map_err(|e| npy_err(path, format!("header is not a Python dict literal: {e}")))?;
    npy_header_fields(path, &dict, start + header_len)
}

fn npy_header_fields(
    path: &Path,
    dict: &[(String, pylit::Lit)],
    data_start: usize,
) -> Result<NpyHeader, LoadError> {
    use pylit::Lit;
    let mut keys: Vec<&str> = dict.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort_unstable();
    if keys != ["descr", "fortran_order", "shape"] {
        return Err(npy_err(
            path,
            format!(
                "the header must have exactly the keys descr, fortran_order and shape, found {keys:?}"
            ),
        ));
    }
    let get = |k: &str| dict.iter().find(|(n, _)| n == k).map(|(_, v)| v);
    let descr = match get("descr") {
        Some(Lit::Str(s)) => s.clone(),
        Some(Lit::List(_)) | Some(Lit::Tuple(_)) => {
            return Err(npy_err(
                path,
                "structured dtypes (a descr list of fields) are not supported; save a plain float32 or float64 array",
            ));
        }
        _ => return Err(npy_err(path, "descr must be a dtype string such as '<f4'")),
    };
    let fortran_order = match get("fortran_order") {
        Some(Lit::Bool(b)) => *b,
        _ => return Err(npy_err(path, "fortran_order must be True or False")),
    };
    let shape = match get("shape") {
        Some(Lit::Tuple(items)) => items
            .iter()
            .map(|v| match v {
                Lit::Int(i) => usize::try_from(*i).ok(),
                _ => None,
            })
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| npy_err(path, "shape must be a tuple of non-negative integers"))?,
        _ => {
            return Err(npy_err(
                path,
                "shape must be a tuple of non-negative integers",
            ));
        }
    };
    Ok(NpyHeader {
        descr,
        fortran_order,
        shape,
        data_start,
    })
}

/// Decodes `data` (exactly the array's bytes) into `[T, d]`, honouring byte order and Fortran order; f64 values
/// outside the f32 range are an error naming the element.
fn decode_npy(path: &Path, h: &NpyHeader, data: &[u8]) -> Result<Array2<f32>, LoadError> {
    let big = h.descr.starts_with('>');
    let values: Vec<f32> = if h.descr.ends_with("f4") {
        data.chunks_exact(4)
            .map(|b| {
                let a = [b[0], b[1], b[2], b[3]];
                if big {
                    f32::from_be_bytes(a)
                } else {
                    f32::from_le_bytes(a)
                }
            })
            .collect()
    } else {
        let mut out = Vec::with_capacity(data.len() / 8);
        for (i, b) in data.chunks_exact(8).enumerate() {
            let a = [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]];
            let v = if big {
                f64::from_be_bytes(a)
            } else {
                f64::from_le_bytes(a)
            };
            let f = v as f32;
            if v.is_finite() && !f.is_finite() {
                return Err(input_err(
                    path,
                    &format!("array element {i}"),
                    format!(
                        "float64 value {v:e} overflows float32 (largest {:e})",
                        f32::MAX
                    ),
                ));
            }
            out.push(f);
        }
        out
    };
    let shape = &h.shape;
    let (rows, d) = match shape.as_slice() {
        [t, d] => (*t, *d),
        [b, s, d] => (b * s, *d),
        _ => (0, 0),
    };
    let bad = || npy_err(path, "shape does not match the data");
    if h.fortran_order {
        use ndarray::ShapeBuilder;
        let a = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape).f(), values)
            .map_err(|_| bad())?;
        let c: Vec<f32> = a.iter().copied().collect();
        Array2::from_shape_vec((rows, d), c).map_err(|_| bad())
    } else {
        Array2::from_shape_vec((rows, d), values).map_err(|_| bad())
    }
}

/// A parser of the Python literals a `.npy` header may hold (what `ast.literal_eval` accepts for it): a dict of
/// string keys, strings, ints, `True`/`False`/`None`, tuples and lists.
mod pylit {
    /// A Python literal.
    #[derive(Debug, Clone, PartialEq)]
    pub(super) enum Lit {
        Str(String),
        Int(i128),
        Bool(bool),
        None,
        Tuple(Vec<Lit>),
        List(Vec<Lit>),
    }

    struct P<'a> {
        s: &'a [u8],
        i: usize,
        depth: usize,
    }

    /// Parses `text` as one dict literal (surrounding whitespace allowed); duplicate keys are refused.
    pub(super) fn parse_dict(text: &str) -> Result<Vec<(String, Lit)>, String> {
        let mut p = P {
            s: text.as_bytes(),
            i: 0,
            depth: 0,
        };
        p.ws();
        p.expect(b'{')?;
        let mut out: Vec<(String, Lit)> = Vec::new();
        loop {
            p.ws();
            if p.eat(b'}') {
                break;
            }
            let key = match p.value()? {
                Lit::Str(k) => k,
                other => return Err(format!("a key must be a string, found {other:?}")),
            };
            if out.iter().any(|(k, _)| *k == key) {
                return Err(format!("key {key:?} appears twice"));
            }
            p.ws();
            p.expect(b':')?;
            let v = p.value()?;
            out.push((key, v));
            p.ws();
            if p.eat(b'}') {
                break;
            }
            p.expect(b',')?;
        }
        p.ws();
        if p.i != p.s.len() {
            return Err(format!("unexpected text after the dict at byte {}", p.i));
        }
        Ok(out)
    }

    impl P<'_> {
        fn ws(&mut self) {
            while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
                self.i += 1;
            }
        }

        fn eat(&mut self, c: u8) -> bool {
            if self.s.get(self.i) == Some(&c) {
                self.i += 1;
                true
            } else {
                false
            }
        }

        fn expect(&mut self, c: u8) -> Result<(), String> {
            if self.eat(c) {
                Ok(())
            } else {
                Err(match self.s.get(self.i) {
                    Some(&f) => format!(
                        "expected {:?} at byte {}, found {:?}",
                        c as char, self.i, f as char
                    ),
                    None => format!("expected {:?} at byte {}, found the end", c as char, self.i),
                })
            }
        }

        fn value(&mut self) -> Result<Lit, String> {
            self.ws();
            match self.s.get(self.i) {
                None => Err("unexpected end of the header".into()),
                Some(b'\'') | Some(b'"') => self.string(),
                Some(b'(') => self.seq(b')').map(|(items, _)| Lit::Tuple(items)),
                Some(b'[') => self.seq(b']').map(|(items, _)| Lit::List(items)),
                Some(c) if c.is_ascii_digit() || *c == b'-' || *c == b'+' => self.int(),
                Some(_) => self.word(),
            }
        }

        fn seq(&mut self, close: u8) -> Result<(Vec<Lit>, bool), String> {
            self.depth += 1;
            if self.depth > 16 {
                return Err("literals nested too deep".into());
            }
            self.i += 1;
            let mut items = Vec::new();
            let mut trailing = false;
            loop {
                self.ws();
                if self.eat(close) {
                    break;
                }
                items.push(self.value()?);
                self.ws();
                if self.eat(close) {
                    trailing = false;
                    break;
                }
                self.expect(b',')?;
                trailing = true;
            }
            self.depth -= 1;
            // `(3)` is the int 3, not a tuple.
            if close == b')' && items.len() == 1 && !trailing {
                return Err("a one-element tuple needs a trailing comma, as (3,)".into());
            }
            Ok((items, trailing))
        }

        fn string(&mut self) -> Result<Lit, String> {
            let q = self.s[self.i];
            self.i += 1;
            let mut out = Vec::new();
            loop {
                let c = *self.s.get(self.i).ok_or("unterminated string")?;
                self.i += 1;
                if c == q {
                    break;
                }
                if c == b'\\' {
                    let e = *self.s.get(self.i).ok_or("unterminated string")?;
                    self.i += 1;
                    out.push(match e {
                        b'n' => b'\n',
                        b't' => b'\t',
                        b'\\' | b'\'' | b'"' => e,
                        other => return Err(format!("unsupported escape \\{}", other as char)),
                    });
                } else if c == b'\n' {
                    return Err("newline inside a string".into());
                } else {
                    out.push(c);
                }
            }
            String::from_utf8(out)
                .map(Lit::Str)
                .map_err(|_| "string is not UTF-8".into())
        }

        fn int(&mut self) -> Result<Lit, String> {
            let start = self.i;
            if matches!(self.s[self.i], b'-' | b'+') {
                self.i += 1;
            }
            while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                self.i += 1;
            }
            let txt = std::str::from_utf8(&self.s[start..self.i]).map_err(|e| e.to_string())?;
            // Python 2 headers write longs as `3L`.
            if self.s.get(self.i) == Some(&b'L') {
                self.i += 1;
            }
            txt.parse::<i128>()
                .map(Lit::Int)
                .map_err(|_| format!("bad integer {txt:?}"))
        }

        fn word(&mut self) -> Result<Lit, String> {
            let start = self.i;
            while self.i < self.s.len() && self.s[self.i].is_ascii_alphanumeric() {
                self.i += 1;
            }
            match &self.s[start..self.i] {
                b"True" => Ok(Lit::Bool(true)),
                b"False" => Ok(Lit::Bool(false)),
                b"None" => Ok(Lit::None),
                w => Err(format!(
                    "unexpected {:?} at byte {start}",
                    String::from_utf8_lossy(if w.is_empty() {
                        &self.s[start..start + 1]
                    } else {
                        w
                    })
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while !(10 + h.len() + 1).is_multiple_of(64) {
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

    #[test]
    fn npy_header_is_a_real_dict() {
        let p = Path::new("h.npy");
        let fake = npy_raw(
            "{'note': \"'descr': '<f4', 'fortran_order': False, 'shape': (2, 2)\", 'descr': '<i4', 'fortran_order': False, 'shape': (2, 2), }",
            &[0u8; 16],
        );
        let e = parse_npy(p, &fake).expect_err("extra key");
        assert!(e.to_string().contains("exactly the keys"), "{e}");
        let dup = npy_raw(
            "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (1, 1), }",
            &[0u8; 4],
        );
        assert!(
            parse_npy(p, &dup)
                .expect_err("dup")
                .to_string()
                .contains("twice")
        );
        let e = parse_npy(p, b"\x93NUMPY").expect_err("magic only");
        assert!(e.to_string().contains("truncated"), "{e}");
        let e = parse_npy(p, b"\x93NUMP").expect_err("short");
        assert!(e.to_string().contains("truncated"), "{e}");
        let e = parse_npy(p, b"PK\x03\x04 zip").expect_err("not npy");
        assert!(e.to_string().contains("magic"), "{e}");
    }

    #[test]
    fn npy_fortran_order_is_honoured() {
        // [[1, 2, 3], [4, 5, 6]] stored column-major: 1 4 2 5 3 6.
        let vals: Vec<u8> = [1.0f32, 4.0, 2.0, 5.0, 3.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let b = npy_raw(
            "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }",
            &vals,
        );
        let a = parse_npy(Path::new("f.npy"), &b).expect("fortran");
        assert_eq!(a, ndarray::array![[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]]);
        let be: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_be_bytes()).collect();
        let b = npy_raw(
            "{'descr': '>f4', 'fortran_order': False, 'shape': (1, 2)}",
            &be,
        );
        assert_eq!(
            parse_npy(Path::new("b.npy"), &b).expect("big endian"),
            ndarray::array![[1.0f32, 2.0]]
        );
    }

    #[test]
    fn npy_width_zero_and_f64_overflow_are_named() {
        let p = Path::new("z.npy");
        let e = parse_npy(p, &npy("<f4", "(1000000000000, 0)", &[])).expect_err("d = 0");
        let m = e.to_string();
        assert!(
            m.contains("z.npy") && m.contains("array") && m.contains("width d is 0"),
            "{m}"
        );
        let big: Vec<u8> = [1e300f64].iter().flat_map(|v| v.to_le_bytes()).collect();
        let e = parse_npy(p, &npy("<f8", "(1, 1)", &big)).expect_err("overflow");
        assert!(e.to_string().contains("overflows float32"), "{e}");
    }

    #[test]
    fn batch_file_keeps_its_sequences() {
        let f = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../moe-cli/tests/fixtures/cases/switch-input-batch/b2s8.safetensors");
        let h = load_hidden(&f).expect("b2s8");
        assert_eq!(h.hidden.dim(), (16, 16));
        assert_eq!(h.seq_lens, Some(vec![8, 8]));
        assert_eq!(h.padding, None);
        assert_eq!(h.n_real_tokens(), 16);
    }

    fn npy_raw(dict: &str, data: &[u8]) -> Vec<u8> {
        let mut h = dict.to_string();
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        b.extend_from_slice(h.as_bytes());
        b.extend_from_slice(data);
        b
    }
}
