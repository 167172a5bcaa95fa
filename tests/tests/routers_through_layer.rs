//! Every registered router, created by name from the registry, drives a full MoE layer on the CPU backend: the
//! output equals the weighted sum of the experts the plan names, computed one token at a time.

use std::sync::Arc;

use moe_backends::cpu::{CpuBackend, expert_forward};
use moe_core::{
    Activation, Backend, ExpertBank, MoeLayer, RouterArgs, RouterInput, SwiGluBank, WorkloadConfig,
    rng::SeqRng,
};
use ndarray::{Array3, s};

#[test]
fn every_router_drives_a_layer() {
    let (t, d, e, k, f) = (96, 16, 16, 2, 24);
    let registry = moe_routers::builtin();
    let w = WorkloadConfig {
        tokens: t,
        d_model: d,
        ..Default::default()
    }
    .generate()
    .expect("workload");
    let mut rng = SeqRng::new(5, 0);
    let sc = 1.0 / (d as f32).sqrt();
    let gate_up = Array3::from_shape_simple_fn((e, 2 * f, d), || rng.normal() as f32 * sc);
    let down = Array3::from_shape_simple_fn((e, d, f), || rng.normal() as f32 * sc);
    let bank = ExpertBank::SwiGlu(SwiGluBank::new(gate_up, down, Activation::Silu).expect("bank"));
    for name in registry.names() {
        let router = registry
            .create(&name, &RouterArgs::new(d, e, k, 0))
            .expect("router");
        moe_core::testing::check_router(router.as_ref(), d).unwrap_or_else(|m| panic!("{m}"));
        let layer = Arc::new(MoeLayer::new(router, bank.clone()).expect("layer"));
        let mut resident = CpuBackend::new().upload(layer).expect("upload");
        let input = RouterInput::new(w.hidden.view()).with_token_ids(&w.token_ids);
        let out = resident
            .forward(&input)
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(out.output.dim(), (t, d), "{name}");
        for (tok, choices) in out.routing.per_token().iter().enumerate() {
            let x = w.hidden.slice(s![tok..tok + 1, ..]);
            let mut want = ndarray::Array1::<f32>::zeros(d);
            let mut sorted = choices.clone();
            sorted.sort_by_key(|c| c.0);
            for &(ex, wt, _) in &sorted {
                let y = expert_forward(&bank, ex, x).expect("expert");
                want.scaled_add(wt, &y.row(0));
            }
            for j in 0..d {
                let (g, wv) = (out.output[[tok, j]], want[j]);
                assert!(
                    (g - wv).abs() <= 1e-5 * (1.0 + wv.abs()),
                    "{name} token {tok} col {j}: {g} vs {wv}"
                );
            }
        }
    }
}
