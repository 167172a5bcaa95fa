//! The plugin passes moe-core's conformance suite, built through its registry entry.

use moe_core::testing::{check_registered, check_router};
use moe_core::{RouterArgs, RouterRegistry};

#[test]
fn conformance() {
    let mut reg = RouterRegistry::new();
    custom_router::register(&mut reg).expect("register");
    let args = RouterArgs::new(16, 8, 2, 0).with_option("capacity_factor", "1.5");
    let router = reg.create("greedy-balanced", &args).expect("create");
    // Weights, determinism, T = 0, NaN, wrong width, padding, and causality since it says it is causal.
    check_router(router.as_ref(), 16).expect("conformance");
    // `moe list` (the registry) and the router agree on causality, for every enum or boolean option value.
    check_registered(&reg, "greedy-balanced", &args).expect("registry");
}
