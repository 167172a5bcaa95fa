//! Switch Transformers (`SwitchTransformersSparseMLP`): placeholder until the capacity router is written.

use moe_core::MoeLayer;

use crate::checkpoint::Weights;
use crate::config::MoeConfig;
use crate::error::LoadError;

/// Builds the block.
///
/// # Errors
/// [`LoadError::Config`]: not supported yet.
pub fn build(_cfg: &MoeConfig, w: &Weights<'_>) -> Result<MoeLayer, LoadError> {
    Err(LoadError::config(
        w.checkpoint().origin(),
        "model_type",
        "switch_transformers is not supported yet",
    ))
}
