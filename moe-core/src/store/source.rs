//! Where a stored bank's experts live: the [`ExpertSource`] contract and the host-memory source.

use std::sync::Arc;

use crate::error::MoeError;
use crate::expert::ExpertBank;

use super::form::ExpertForm;

/// The tier an expert is read from when it is not resident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Host memory (on the CPU backend a copy into a resident slot; on a GPU a host-to-device copy).
    Host,
    /// A file on disk, read on demand.
    Disk,
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tier::Host => "host",
            Tier::Disk => "disk",
        })
    }
}

/// Where the weights of `E` experts of one [`ExpertForm`] live, read one expert at a time.
///
/// A load writes expert `e`'s tensors into `dst`, one slice per entry of [`ExpertForm::tensors`] in that order,
/// each exactly that many f32 values (the layout of one expert of the bank [`ExpertForm::zeros`] makes). A load
/// either fills every slice or returns an error; on an error the caller uses nothing it wrote (a store marks the
/// slot empty). Loads of different experts may run concurrently (a prefetch thread beside a forward).
pub trait ExpertSource: Send + Sync + std::fmt::Debug {
    /// The experts' form.
    fn form(&self) -> &ExpertForm;

    /// Number of experts `E`.
    fn n_experts(&self) -> usize;

    /// The tier this source reads from.
    fn tier(&self) -> Tier;

    /// Bytes read from the tier to load one expert, at the stored dtype (a bf16 checkpoint reads half the f32
    /// size).
    fn stored_bytes_per_expert(&self) -> u64;

    /// Where the experts are, in words, for messages (`host memory`, `file model.safetensors`).
    fn describe(&self) -> String;

    /// Writes expert `expert`'s tensors into `dst` (see the trait's docs).
    ///
    /// # Errors
    /// [`MoeError::Expert`] naming the expert for an index out of range, a missing tensor or a read error;
    /// [`MoeError::Shape`] when `dst` does not match [`ExpertForm::tensors`].
    fn load(&self, expert: usize, dst: &mut [&mut [f32]]) -> Result<(), MoeError>;
}

/// Checks that `dst` has one slice per tensor of `form`, each of the tensor's size: what every
/// [`ExpertSource::load`] checks first.
///
/// # Errors
/// [`MoeError::Shape`] naming the tensor.
pub fn check_load_dst(form: &ExpertForm, dst: &[&mut [f32]]) -> Result<(), MoeError> {
    let want = form.tensors();
    if want.len() != dst.len() {
        return Err(MoeError::shape(
            "expert load destination",
            format!("{} tensors", want.len()),
            &[dst.len()],
        ));
    }
    for ((name, n), slice) in want.iter().zip(dst) {
        if slice.len() != *n {
            return Err(MoeError::shape(
                format!("expert load destination {name}"),
                format!("[{n}]"),
                &[slice.len()],
            ));
        }
    }
    Ok(())
}

/// Experts kept in host memory as an f32 bank: a load copies the expert's rows. On the CPU backend this tier
/// costs a memory copy (it models a GPU's host tier and serves tests); the disk tier is `moe_models::store`.
#[derive(Debug, Clone)]
pub struct HostSource {
    bank: Arc<ExpertBank>,
    form: ExpertForm,
}

impl HostSource {
    /// A source over `bank` (SwiGLU, GPT-OSS or MLP).
    ///
    /// # Errors
    /// As [`ExpertForm::of`].
    pub fn new(bank: Arc<ExpertBank>) -> Result<Self, MoeError> {
        let form = ExpertForm::of(&bank)?;
        if matches!(*bank, ExpertBank::Stored(_)) {
            return Err(MoeError::Unsupported {
                owner: "a stored bank".into(),
                feature: "serving as the host source of another store".into(),
            });
        }
        Ok(HostSource { bank, form })
    }
}

impl ExpertSource for HostSource {
    fn form(&self) -> &ExpertForm {
        &self.form
    }

    fn n_experts(&self) -> usize {
        self.bank.n_experts()
    }

    fn tier(&self) -> Tier {
        Tier::Host
    }

    fn stored_bytes_per_expert(&self) -> u64 {
        self.form.resident_bytes()
    }

    fn describe(&self) -> String {
        "host memory".into()
    }

    fn load(&self, expert: usize, dst: &mut [&mut [f32]]) -> Result<(), MoeError> {
        check_load_dst(&self.form, dst)?;
        if expert >= self.n_experts() {
            return Err(MoeError::Expert {
                expert,
                reason: format!("the store has {} experts", self.n_experts()),
            });
        }
        for (param, out) in self.bank.params().iter().zip(dst.iter_mut()) {
            let n = out.len();
            let all = param.value.as_slice().ok_or_else(|| MoeError::Expert {
                expert,
                reason: format!("host tensor {} is not contiguous", param.name),
            })?;
            let src = all
                .get(expert * n..(expert + 1) * n)
                .ok_or_else(|| MoeError::Expert {
                    expert,
                    reason: format!("host tensor {} is too short", param.name),
                })?;
            out.copy_from_slice(src);
        }
        Ok(())
    }
}
