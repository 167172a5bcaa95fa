//! Checkpoints as safetensors: every parameter of the model under its name (`tok_emb`, `blocks.0.attn.qkv`,
//! `blocks.0.ffn.router.gate`, `blocks.0.ffn.experts.w1`, ...; frozen router state included), AdamW's moments as
//! `adamw.m.NAME` and `adamw.v.NAME`, all f32; the header's metadata holds `format` (`moe-train/1`), `label`,
//! `step`, `model` and `train` (the configurations as JSON), `adamw_steps` and `state` (the run's curve and
//! running sums as JSON), so a resumed run continues exactly where the saved one stopped. Files are written to a
//! temporary name and renamed, so an interrupted save leaves the previous checkpoint intact.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use moe_core::{MoeLayer, RouterRegistry};
use ndarray::{ArrayD, IxDyn};
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};

use crate::config::{LmConfig, TrainConfig};
use crate::error::TrainError;
use crate::model::Lm;
use crate::optim::{AdamW, Moments};

/// The `format` metadata value of this version.
pub const FORMAT: &str = "moe-train/1";

/// What a checkpoint holds, read from its header alone.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointInfo {
    /// The file.
    pub path: PathBuf,
    /// The run's label (`dense`, a router spec).
    pub label: String,
    /// Steps done.
    pub step: usize,
    /// The model.
    pub model: LmConfig,
    /// The loop.
    pub train: TrainConfig,
    /// Tensors (name, shape): the model's parameters by name, then the optimizer's moments (`adamw.m.NAME`,
    /// `adamw.v.NAME`) by name.
    pub tensors: Vec<(String, Vec<usize>)>,
}

/// What is saved besides the tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct Meta {
    /// The run's label.
    pub label: String,
    /// Steps done.
    pub step: usize,
    /// The model.
    pub model: LmConfig,
    /// The loop.
    pub train: TrainConfig,
    /// The run's own state (curve, sums), as JSON.
    pub state: serde_json::Value,
}

fn bad(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn le_bytes(a: &ndarray::ArrayViewD<'_, f32>) -> Vec<u8> {
    a.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Writes `lm`, `opt` and `meta` to `path` (atomically: a temporary file renamed over it).
///
/// # Errors
/// [`TrainError::Io`] when the file cannot be written; [`TrainError::Checkpoint`] for a header safetensors refuses.
pub fn save(path: &Path, lm: &Lm, opt: &AdamW, meta: &Meta) -> Result<(), TrainError> {
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = lm
        .named_params()
        .into_iter()
        .map(|(n, a)| (n, a.shape().to_vec(), le_bytes(&a)))
        .collect();
    for (name, m) in opt.moments() {
        owned.push((
            format!("adamw.m.{name}"),
            m.m.shape().to_vec(),
            le_bytes(&m.m.view()),
        ));
        owned.push((
            format!("adamw.v.{name}"),
            m.v.shape().to_vec(),
            le_bytes(&m.v.view()),
        ));
    }
    let views = owned
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| bad(path, format!("tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let json = |v: serde_json::Result<String>| v.map_err(|e| bad(path, e.to_string()));
    let info: HashMap<String, String> = [
        ("format", FORMAT.to_string()),
        ("label", meta.label.clone()),
        ("step", meta.step.to_string()),
        ("model", json(serde_json::to_string(&meta.model))?),
        ("train", json(serde_json::to_string(&meta.train))?),
        ("adamw_steps", opt.steps_taken().to_string()),
        ("state", meta.state.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let bytes = safetensors::serialize(views, Some(info)).map_err(|e| bad(path, e.to_string()))?;
    let tmp = path.with_extension("safetensors.tmp");
    let io = |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Reads a checkpoint file (a regular file; checkpoints of the sizes moe-train writes fit in memory).
fn read_bytes(path: &Path) -> Result<Vec<u8>, TrainError> {
    let meta = std::fs::metadata(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(bad(path, "not a regular file"));
    }
    std::fs::read(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The parsed header metadata.
struct Header {
    meta: Meta,
    adamw_steps: u64,
}

fn header(path: &Path, st_meta: &Option<HashMap<String, String>>) -> Result<Header, TrainError> {
    let m = st_meta
        .as_ref()
        .ok_or_else(|| bad(path, "no metadata: not a moe-train checkpoint"))?;
    let get = |k: &str| {
        m.get(k).ok_or_else(|| {
            bad(
                path,
                format!("metadata has no `{k}`: not a moe-train checkpoint"),
            )
        })
    };
    let format = get("format")?;
    if format != FORMAT {
        return Err(bad(path, format!("format `{format}`, expected `{FORMAT}`")));
    }
    let num = |k: &str| -> Result<u64, TrainError> {
        get(k)?
            .parse()
            .map_err(|_| bad(path, format!("metadata `{k}` is not a count")))
    };
    let model: LmConfig = serde_json::from_str(get("model")?)
        .map_err(|e| bad(path, format!("metadata `model`: {e}")))?;
    model
        .validate()
        .map_err(|e| bad(path, format!("metadata `model`: {e}")))?;
    let train: TrainConfig = serde_json::from_str(get("train")?)
        .map_err(|e| bad(path, format!("metadata `train`: {e}")))?;
    let state = serde_json::from_str(get("state")?)
        .map_err(|e| bad(path, format!("metadata `state`: {e}")))?;
    Ok(Header {
        meta: Meta {
            label: get("label")?.clone(),
            step: usize::try_from(num("step")?).map_err(|_| bad(path, "step too large"))?,
            model,
            train,
            state,
        },
        adamw_steps: num("adamw_steps")?,
    })
}

/// Largest header `read_info` reads (safetensors' own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// The header of a safetensors file (its 8-byte length and the JSON), read without the tensors' data.
fn read_header_bytes(path: &Path) -> Result<Vec<u8>, TrainError> {
    use std::io::Read;
    let io = |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(bad(path, "not a regular file"));
    }
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| bad(path, "shorter than a safetensors header"))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER || n + 8 > meta.len() {
        return Err(bad(
            path,
            format!("header length {n} does not fit the file"),
        ));
    }
    let mut buf = len.to_vec();
    buf.resize(8 + n as usize, 0);
    f.read_exact(&mut buf[8..]).map_err(io)?;
    Ok(buf)
}

/// Reads a checkpoint's header alone (not the tensors' data). Tensors are listed model parameters first, then
/// the optimizer's moments, each group by name.
///
/// # Errors
/// [`TrainError::Checkpoint`] for a file that is not a moe-train checkpoint; [`TrainError::Io`].
pub fn read_info(path: &Path) -> Result<CheckpointInfo, TrainError> {
    let bytes = read_header_bytes(path)?;
    let json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..])
        .map_err(|e| bad(path, format!("header is not safetensors JSON: {e}")))?;
    let metadata: Option<HashMap<String, String>> = match json.get("__metadata__") {
        Some(m) => Some(
            serde_json::from_value(m.clone())
                .map_err(|e| bad(path, format!("header `__metadata__`: {e}")))?,
        ),
        None => None,
    };
    let h = header(path, &metadata)?;
    let mut tensors = Vec::with_capacity(json.len());
    for (name, t) in json.iter().filter(|(k, _)| *k != "__metadata__") {
        let shape: Vec<usize> = t
            .get("shape")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| bad(path, format!("tensor `{name}` has no shape")))?;
        tensors.push((name.clone(), shape));
    }
    tensors
        .sort_by(|a, b| (a.0.starts_with("adamw."), &a.0).cmp(&(b.0.starts_with("adamw."), &b.0)));
    Ok(CheckpointInfo {
        path: path.to_path_buf(),
        label: h.meta.label,
        step: h.meta.step,
        model: h.meta.model,
        train: h.meta.train,
        tensors,
    })
}

/// A tensor of the checkpoint as f32 values of the expected shape.
fn tensor(
    path: &Path,
    st: &SafeTensors<'_>,
    name: &str,
    shape: &[usize],
) -> Result<ArrayD<f32>, TrainError> {
    let t = st
        .tensor(name)
        .map_err(|_| bad(path, format!("tensor `{name}` is missing")))?;
    if t.dtype() != Dtype::F32 {
        return Err(bad(
            path,
            format!("tensor `{name}` is {:?}, expected F32", t.dtype()),
        ));
    }
    if t.shape() != shape {
        return Err(bad(
            path,
            format!(
                "tensor `{name}` has shape {:?}, this model needs {shape:?} (a checkpoint of another shape)",
                t.shape()
            ),
        ));
    }
    let vals: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    ArrayD::from_shape_vec(IxDyn(shape), vals)
        .map_err(|e| bad(path, format!("tensor `{name}`: {e}")))
}

/// Loads a checkpoint for a run of `model`: the model with the saved weights (its MoE layers uploaded), the
/// optimizer with the saved moments, and the metadata.
///
/// # Errors
/// [`TrainError::Checkpoint`] for a file of another model (naming the configuration fields that differ), a
/// missing tensor, or one of another shape or dtype.
pub fn load(
    path: &Path,
    registry: &RouterRegistry,
    model: &LmConfig,
    opt: AdamW,
) -> Result<(Lm, AdamW, Meta), TrainError> {
    let bytes = read_bytes(path)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(path, e.to_string()))?;
    let (_, md) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(path, e.to_string()))?;
    let h = header(path, md.metadata())?;
    if &h.meta.model != model {
        return Err(bad(
            path,
            format!(
                "a checkpoint of another model: {}",
                diff(&h.meta.model, model)
            ),
        ));
    }
    let lm = weights(path, &st, registry, model, h.meta.train.seed)?;
    let mut moments = BTreeMap::new();
    for (name, value) in lm.named_params() {
        let m_name = format!("adamw.m.{name}");
        if st.tensor(&m_name).is_err() {
            continue; // never updated (frozen state)
        }
        let shape = value.shape().to_vec();
        moments.insert(
            name.clone(),
            Moments {
                m: tensor(path, &st, &m_name, &shape)?,
                v: tensor(path, &st, &format!("adamw.v.{name}"), &shape)?,
            },
        );
    }
    let mut opt = opt;
    opt.restore(h.adamw_steps, moments);
    Ok((lm, opt, h.meta))
}

/// A model of configuration `model` with every parameter read from `st` (each tensor by its name, shapes checked).
fn weights(
    path: &Path,
    st: &SafeTensors<'_>,
    registry: &RouterRegistry,
    model: &LmConfig,
    seed: u64,
) -> Result<Lm, TrainError> {
    let load_layer = |(l, layer): (usize, &mut MoeLayer)| -> Result<(), TrainError> {
        for p in layer.params_mut() {
            let name = format!("blocks.{l}.ffn.{}", p.name);
            let shape = p.value.shape().to_vec();
            let mut value = p.value;
            value.assign(&tensor(path, st, &name, &shape)?);
        }
        Ok(())
    };
    let mut lm = Lm::build(registry, model, seed, load_layer)?;
    for (name, mut value) in lm.params.named_mut() {
        let shape = value.shape().to_vec();
        value.assign(&tensor(path, st, &name, &shape)?);
    }
    Ok(lm)
}

/// A model of configuration `model` with the weights of a safetensors file of parameters by name (a checkpoint,
/// or the `init.safetensors` of a PyTorch reference directory); no metadata is needed. `seed` seeds what the file
/// does not hold (a router's noise has no tensor).
///
/// # Errors
/// [`TrainError::Checkpoint`] for a missing tensor or one of another shape or dtype; [`TrainError::Io`].
pub fn load_weights(
    path: &Path,
    registry: &RouterRegistry,
    model: &LmConfig,
    seed: u64,
) -> Result<Lm, TrainError> {
    let bytes = read_bytes(path)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(path, e.to_string()))?;
    weights(path, &st, registry, model, seed)
}

/// The fields of two model configurations that differ, in words.
fn diff(saved: &LmConfig, run: &LmConfig) -> String {
    config_diff(saved, run)
}

/// The fields of two configurations that differ, in words (nested objects by their dotted path, e.g.
/// `optim.lr is 0.001 in the checkpoint, 0.5 in this run`).
pub(crate) fn config_diff<T: serde::Serialize>(saved: &T, run: &T) -> String {
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        match (a.as_object(), b.as_object()) {
            // The FFN is one unit in words: its fields mean little apart.
            (Some(ao), Some(bo)) if path != "ffn" => {
                for (k, va) in ao {
                    let vb = bo.get(k).cloned().unwrap_or_default();
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(&p, va, &vb, out);
                }
            }
            _ if a != b => out.push(format!("{path} is {a} in the checkpoint, {b} in this run")),
            _ => {}
        }
    }
    // Through the text (not `to_value`), so that an f32 reads as written (0.001, not 0.0010000000474974513).
    let value = |v: &T| -> serde_json::Value {
        serde_json::to_string(v)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    };
    let (a, b) = (value(saved), value(run));
    let mut out = Vec::new();
    walk("", &a, &b, &mut out);
    if out.is_empty() {
        "the configurations differ".into()
    } else {
        out.join("; ")
    }
}
