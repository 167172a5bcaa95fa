//! # moe-routers
//!
//! The six built-in routers of moe-rs, each a plugin of the same [`moe_core::Router`] API, built from the same
//! router kit ([`moe_core::kit`]), with options declared by [`moe_core::router_options!`], and registered in
//! [`builtin`] exactly as a third-party router would be. Formulas cite the papers and the repository's
//! `docs/ROUTERS.md`. Causality comes from each config's [`moe_core::RouterConfig::is_causal`]; `moe list` prints it.
//!
//! | name | type | what |
//! | --- | --- | --- |
//! | `softmax-topk` | [`SoftmaxTopK`] | token-choice top-k: softmax / sigmoid / sqrt-softplus scores, either order, renormalisation, scaling, group-limited selection, correction bias; presets `mixtral`, `qwen2_moe`, `olmoe`, `granite`, `deepseek_v3` |
//! | `noisy-topk` | [`NoisyTopK`] | Shazeer 2017: learned noise, KeepTopK, importance and smooth load losses |
//! | `switch-top1` | [`SwitchTop1`] | Switch top-1 with capacity (named roundings), drop policies, jitter, aux and z-loss; causal only with `drop = position` |
//! | `hash` | [`HashRouter`] | random / balanced / modulo / k-way hash of token ids |
//! | `expert-choice` | [`ExpertChoice`] | each expert takes its top `C = ceil(T·c/E)` tokens; **not causal** |
//! | `peer` | [`Peer`] | product-key retrieval over `n²` singleton experts, exact top-k, multi-head |
//!
//! ```
//! use moe_core::{RouterArgs, RouterInput, WorkloadConfig};
//!
//! let registry = moe_routers::builtin();
//! let router = registry.create("softmax-topk", &RouterArgs::new(16, 4, 2, 0))?;
//! let w = WorkloadConfig { tokens: 32, d_model: 16, ..Default::default() }.generate()?;
//! let plan = router.route(&RouterInput::new(w.hidden.view()))?;
//! assert_eq!(plan.n_slots(), 32 * 2);
//! # Ok::<(), moe_core::MoeError>(())
//! ```

pub mod expert_choice;
pub mod hash;
pub mod noisy_topk;
pub mod peer;
pub mod softmax_topk;
pub mod switch;

pub use expert_choice::{ExpertChoice, ExpertChoiceConfig};
pub use hash::{HashRouter, HashRouterConfig};
pub use noisy_topk::{NoisyTopK, NoisyTopKConfig};
pub use peer::{Peer, PeerConfig};
pub use softmax_topk::{SoftmaxTopK, SoftmaxTopKConfig, TopKPreset};
pub use switch::{CapacityRounding, SwitchTop1, SwitchTop1Config};

use moe_core::{MoeError, RouterRegistry};

/// Registers the six built-in routers into `reg`.
///
/// # Errors
/// [`MoeError::DuplicateRouter`] if one of their names is already taken.
pub fn register_builtin(reg: &mut RouterRegistry) -> Result<(), MoeError> {
    softmax_topk::register(reg)?;
    noisy_topk::register(reg)?;
    switch::register(reg)?;
    hash::register(reg)?;
    expert_choice::register(reg)?;
    peer::register(reg)?;
    Ok(())
}

/// A registry holding the six built-in routers.
pub fn builtin() -> RouterRegistry {
    let mut reg = RouterRegistry::new();
    // The built-in names are distinct constants, so registering them into an empty registry cannot collide.
    if let Err(e) = register_builtin(&mut reg) {
        debug_assert!(false, "built-in routers collide: {e}");
    }
    reg
}
