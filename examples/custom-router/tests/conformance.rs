//! The plugin passes moe-core's conformance suite and gradient checker, built through its registry entry.

use moe_core::testing::{check_registered, check_router, check_router_grad};
use moe_core::{RouterArgs, RouterInput, RouterRegistry, rng::SeqRng};

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
    // Its backward against finite differences, on N(0, 1) hidden states [T = 24, d = 16] with padding.
    let x = SeqRng::new(1, 0).normal_matrix(24, 16, 1.0);
    let padding: Vec<bool> = (0..24).map(|t| t % 5 == 4).collect();
    let input = RouterInput::new(x.view()).with_padding(&padding);
    check_router_grad(router.as_ref(), &input, 0).expect("gradient");
}
