//! The one error type of the contracts: every message names the tensor or option involved and what was expected.

use thiserror::Error;

/// Errors of routers, layers and the registry. Messages are lowercase, name the offending tensor or option, and
/// for shape errors give both the expected and the found shape.
#[derive(Debug, Clone, Error, PartialEq)]
#[non_exhaustive]
pub enum MoeError {
    /// A tensor has the wrong shape: `expected experts.gate_up_proj [8, 256, 64], found [8, 64, 256]`.
    #[error("expected {tensor} {expected}, found {found:?}")]
    Shape {
        /// Name of the tensor (HF name where there is one).
        tensor: String,
        /// The expected shape, written with symbols where a size is free (`[T, 64]`).
        expected: String,
        /// The shape that was passed.
        found: Vec<usize>,
    },
    /// `k` is larger than the number of experts, or zero.
    #[error("top-k must be between 1 and the number of experts: k = {k}, experts = {n_experts}")]
    TopK {
        /// The requested k.
        k: usize,
        /// The number of experts.
        n_experts: usize,
    },
    /// A NaN or infinity in an input or an intermediate (logits).
    #[error("{tensor} has a non-finite value ({value}) at token {token}, column {column}")]
    NonFinite {
        /// Which tensor: `hidden`, `router logits`, ...
        tensor: String,
        /// Token (row) index.
        token: usize,
        /// Column index.
        column: usize,
        /// The offending value, printed (`NaN`, `inf`).
        value: f32,
    },
    /// A router needs an input that was not given (token ids for hash routing).
    #[error("router {router} needs {what}, which the input does not have")]
    MissingInput {
        /// Router name.
        router: String,
        /// What is missing: `token ids`, ...
        what: String,
    },
    /// An option value that is not allowed.
    #[error("invalid value for {option}: {value} ({reason})")]
    InvalidConfig {
        /// Option name as the user wrote it.
        option: String,
        /// The value as the user wrote it.
        value: String,
        /// What would be valid.
        reason: String,
    },
    /// A size too large to be served (would overflow an index or ask for absurd memory).
    #[error("{what} is too large: {size} (limit {limit})")]
    TooLarge {
        /// What was too large.
        what: String,
        /// The requested size.
        size: u128,
        /// The largest accepted size.
        limit: u128,
    },
    /// The registry has no router of that name.
    #[error("unknown router {name:?}; known routers: {known}")]
    UnknownRouter {
        /// The name asked for.
        name: String,
        /// The registered names, comma-separated.
        known: String,
    },
    /// A router of that name is already registered.
    #[error("a router named {name:?} is already registered")]
    DuplicateRouter {
        /// The duplicate name.
        name: String,
    },
    /// A custom expert failed.
    #[error("expert {expert} failed: {reason}")]
    Expert {
        /// Expert index.
        expert: usize,
        /// What went wrong.
        reason: String,
    },
    /// A backend failed on its device (out of memory, a kernel error).
    #[error("backend {backend} failed: {reason}")]
    Backend {
        /// Backend name.
        backend: String,
        /// What happened.
        reason: String,
    },
    /// Something this router, expert bank or backend does not do yet (a router without a backward, training
    /// on a GPU backend): `router noisy-topk does not support backward yet`.
    #[error("{owner} does not support {feature} yet")]
    Unsupported {
        /// Who lacks it: `router my-router`, `backend wgpu`, `custom experts`.
        owner: String,
        /// What is missing: `backward`, `training`.
        feature: String,
    },
    /// A call out of order: `backward` without a training forward before it.
    #[error("{call} needs {before} first")]
    Order {
        /// The call that came too early: `backward`.
        call: String,
        /// What must come first: `a training forward (forward_train)`.
        before: String,
    },
    /// A collective operation between ranks failed: a peer left or stalled past the timeout, a message was
    /// malformed, or the ranks' layers differ (expert parallelism, crate `moe-ep`).
    #[error("{op} on rank {rank} failed: {reason}")]
    Communication {
        /// The operation: `all_to_all_v`, `barrier`, `layer check`.
        op: String,
        /// The rank that reports it.
        rank: usize,
        /// What happened, naming the peer where one is at fault.
        reason: String,
    },
    /// A weight tensor whose contents are malformed (a packed tensor of the wrong byte length, a scale that is NaN,
    /// infinite or of the wrong shape, a block size that does not divide its dimension): `tensor
    /// mlp.experts.down_proj_scales: scale 255 (E8M0 NaN) at [0, 3, 1]`.
    #[error("tensor {tensor}: {reason}")]
    BadTensor {
        /// Name of the tensor (the checkpoint's name where there is one).
        tensor: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two parts of a layer disagree (router and bank expert counts, widths).
    #[error("{what}: {left} = {left_value} but {right} = {right_value}")]
    Mismatch {
        /// What is being matched.
        what: String,
        /// Left-hand name.
        left: String,
        /// Left-hand value.
        left_value: usize,
        /// Right-hand name.
        right: String,
        /// Right-hand value.
        right_value: usize,
    },
}

impl MoeError {
    /// Malformed-tensor helper: `MoeError::bad_tensor("down_proj_scales", "scale 255 (E8M0 NaN)")`.
    pub fn bad_tensor(tensor: impl Into<String>, reason: impl Into<String>) -> Self {
        MoeError::BadTensor {
            tensor: tensor.into(),
            reason: reason.into(),
        }
    }

    /// Shape error helper: `MoeError::shape("hidden", "[T, 64]", &[3, 32])`.
    pub fn shape(tensor: impl Into<String>, expected: impl Into<String>, found: &[usize]) -> Self {
        MoeError::Shape {
            tensor: tensor.into(),
            expected: expected.into(),
            found: found.to_vec(),
        }
    }

    /// Invalid option helper.
    pub fn config(
        option: impl Into<String>,
        value: impl ToString,
        reason: impl Into<String>,
    ) -> Self {
        MoeError::InvalidConfig {
            option: option.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// Mismatch helper.
    pub fn mismatch(
        what: impl Into<String>,
        left: impl Into<String>,
        left_value: usize,
        right: impl Into<String>,
        right_value: usize,
    ) -> Self {
        MoeError::Mismatch {
            what: what.into(),
            left: left.into(),
            left_value,
            right: right.into(),
            right_value,
        }
    }
}

/// Checks that every value of a `[T, n]` tensor is finite; the error names the first bad token and column.
///
/// # Errors
/// [`MoeError::NonFinite`] at the first NaN or infinity, in row-major order.
pub fn check_finite(tensor: &str, a: ndarray::ArrayView2<'_, f32>) -> Result<(), MoeError> {
    for (token, row) in a.outer_iter().enumerate() {
        for (column, &value) in row.iter().enumerate() {
            if !value.is_finite() {
                return Err(MoeError::NonFinite {
                    tensor: tensor.to_string(),
                    token,
                    column,
                    value,
                });
            }
        }
    }
    Ok(())
}
