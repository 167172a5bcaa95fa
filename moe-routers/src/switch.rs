//! Placeholder: being written.

use moe_core::{MoeError, RouterRegistry};

/// Registers this router.
///
/// # Errors
/// [`MoeError::DuplicateRouter`] if the name is taken.
pub fn register(reg: &mut RouterRegistry) -> Result<(), MoeError> {
    let _ = reg;
    Ok(())
}
