//! Routed experts computed somewhere else: the contract an expert-parallel layer (crate `moe-ep`) drives a backend
//! through. The layer's own rank keeps the frame of a forward (routing, gathering the rows, the weighted combine,
//! shared experts, output bias) and hands the routed experts' products to a [`RemoteExperts`]; the ranks that own
//! the experts run them on a [`ResidentExperts`] (a bank resident on a backend without a router). Both halves
//! compute exactly what the backend's own [`DeviceLayer::forward`](crate::DeviceLayer::forward) and
//! [`DeviceLayer::backward`](crate::DeviceLayer::backward) compute, so an expert-parallel layer is bit-identical to
//! one rank (`docs/EP.md`).

use ndarray::{Array2, ArrayView2};

use crate::error::MoeError;
use crate::expert::ExpertBank;
use crate::grad::Grad;
use crate::routing::Routing;

/// Groups of rows for experts of one resident bank: group `g` is rows `offsets[g]..offsets[g + 1]` of the rows
/// passed with it, for the bank's expert `experts[g]` (an id of that bank, `< its E`).
#[derive(Debug, Clone, Copy)]
pub struct ExpertGroups<'a> {
    /// The bank-local expert of each group.
    pub experts: &'a [u32],
    /// `[groups + 1]` row offsets, ascending, starting at 0.
    pub offsets: &'a [usize],
    /// The row count of the largest group of the whole plan these groups come from (at least the largest of
    /// these groups). A backend whose tiling depends on the plan's shape (the CPU's column blocks) tiles with
    /// it, so each row gets exactly the value a forward of the whole plan gives it.
    pub plan_max_rows: usize,
}

impl ExpertGroups<'_> {
    /// The number of rows the groups cover.
    pub fn rows(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0)
    }

    /// Checks the groups against a bank of `n_experts` experts and `rows` rows.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] naming `groups` when offsets are not `[groups + 1]`, do not start at 0, are
    /// not ascending, do not end at `rows`, an expert id is `>= n_experts`, or a group is larger than
    /// `plan_max_rows`.
    pub fn check(&self, n_experts: usize, rows: usize) -> Result<(), MoeError> {
        let bad = |why: String| Err(MoeError::config("groups", self.experts.len(), why));
        if self.offsets.len() != self.experts.len() + 1 || self.offsets.first() != Some(&0) {
            return bad(format!(
                "offsets must be [groups + 1] starting at 0, found {} offsets for {} groups",
                self.offsets.len(),
                self.experts.len()
            ));
        }
        if self.offsets.windows(2).any(|w| w[1] < w[0]) {
            return bad("offsets must be ascending".into());
        }
        if self.rows() != rows {
            return bad(format!(
                "the groups cover {} rows, {rows} were given",
                self.rows()
            ));
        }
        if let Some(&e) = self.experts.iter().find(|&&e| e as usize >= n_experts) {
            return bad(format!(
                "expert {e} is not below the bank's {n_experts} experts"
            ));
        }
        let widest = self
            .offsets
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(0);
        if widest > self.plan_max_rows {
            return bad(format!(
                "a group has {widest} rows, more than plan_max_rows = {}",
                self.plan_max_rows
            ));
        }
        Ok(())
    }
}

/// A bank resident on a backend with no router: it runs groups of rows through its experts, the part of a
/// dispatch plan an expert-parallel rank owns ([`Backend::upload_experts`](crate::Backend::upload_experts)).
pub trait ResidentExperts: Send {
    /// The bank this was uploaded from.
    fn bank(&self) -> &ExpertBank;

    /// The unweighted outputs `expert(row)` of every group's rows, `[rows, d]` in the rows' order. Each value is
    /// bit-identical to the one the backend's layer forward computes for the same row in a plan whose groups have
    /// these sizes and whose largest group is `groups.plan_max_rows`.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for groups that do not fit ([`ExpertGroups::check`]); [`MoeError::Shape`] for
    /// rows that are not `[rows, d]`; expert errors.
    fn forward(
        &mut self,
        groups: &ExpertGroups<'_>,
        rows: ArrayView2<'_, f32>,
    ) -> Result<Array2<f32>, MoeError>;

    /// As [`ResidentExperts::forward`], keeping what [`ResidentExperts::backward`] needs as batch number `i`
    /// (the count of training forwards since the last [`ResidentExperts::take_grads`]), which it returns beside
    /// the outputs.
    ///
    /// # Errors
    /// As [`ResidentExperts::forward`]; [`MoeError::Unsupported`] on a backend or bank without training.
    fn forward_train(
        &mut self,
        groups: &ExpertGroups<'_>,
        rows: ArrayView2<'_, f32>,
    ) -> Result<(usize, Array2<f32>), MoeError> {
        let _ = (groups, rows);
        Err(MoeError::Unsupported {
            owner: "these resident experts".into(),
            feature: "training".into(),
        })
    }

    /// The backward of training batch `batch`: given `d_out` (`dL/d output`, `[rows, d]`), returns `dL/d rows`
    /// (`[rows, d]`) and adds the batch's expert weight gradients to the sums [`ResidentExperts::take_grads`]
    /// returns (the first backward after a `take_grads` writes them; later ones add theirs in call order).
    ///
    /// # Errors
    /// [`MoeError::Order`] for a batch that has no training forward or had its backward; [`MoeError::Shape`]
    /// naming `d_out`; [`MoeError::Unsupported`] as for `forward_train`.
    fn backward(
        &mut self,
        batch: usize,
        d_out: ArrayView2<'_, f32>,
    ) -> Result<Array2<f32>, MoeError> {
        let _ = (batch, d_out);
        Err(MoeError::Unsupported {
            owner: "these resident experts".into(),
            feature: "training".into(),
        })
    }

    /// The summed expert weight gradients of the backwards since the last call, named as the bank's
    /// [`ExpertBank::params`] with prefix `experts.` (`experts.gate_up`, `experts.down`, ...), and forgets every
    /// saved batch. Zero gradients when no backward ran.
    ///
    /// # Errors
    /// [`MoeError::Unsupported`] as for `forward_train`.
    fn take_grads(&mut self) -> Result<Vec<Grad>, MoeError> {
        Err(MoeError::Unsupported {
            owner: "these resident experts".into(),
            feature: "training".into(),
        })
    }
}

/// The routed experts' products of a layer forward, done by somebody else (an expert-parallel layer sends the rows
/// to the experts' owners and brings back their outputs). Called by
/// [`DeviceLayer::forward_remote`](crate::DeviceLayer::forward_remote) and its training twins on the layer's own
/// rank.
pub trait RemoteExperts {
    /// The unweighted expert outputs of the plan's slots: `rows` are the gathered inputs `[slots, d]` in the
    /// plan's slot order (expert-major, [`Routing::offsets`]); returns `[slots, d]` in the same order. `train`:
    /// the owners keep what [`RemoteExperts::backward`] needs.
    ///
    /// # Errors
    /// Whatever the owners or the transport report.
    fn forward(
        &mut self,
        routing: &Routing,
        rows: ArrayView2<'_, f32>,
        train: bool,
    ) -> Result<Array2<f32>, MoeError>;

    /// The backward of the last training `forward`: `d_out` is `dL/d expert output` per slot (`[slots, d]`, the
    /// plan's order); returns `dL/d rows` per slot in the same order. The owners keep their experts' weight
    /// gradients.
    ///
    /// # Errors
    /// Whatever the owners or the transport report.
    fn backward(
        &mut self,
        routing: &Routing,
        d_out: ArrayView2<'_, f32>,
    ) -> Result<Array2<f32>, MoeError>;
}
