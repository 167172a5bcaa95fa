//! The NLLB-MoE top-2 router's backward against finite differences ([`moe_core::testing::check_router_grad`])
//! over random shapes and settings: fraction or fixed capacity (with drops), batch-prioritised order,
//! normalisation before or after dropping, a gate bias, padding.

use moe_core::testing::check_router_grad;
use moe_core::{Router, RouterInput, rng::SeqRng};
use moe_models::presets::nllb_moe::{Capacity, NllbTop2};
use ndarray::{Array1, Array2};

/// `N(0, 1)` hidden states `[t, d]` whose logits keep every token's best three at least 0.1 apart (redrawn up to 50
/// times), so the checker's steps (about `1e-2 · |x|` on a logit) rarely switch a token's two experts.
fn separated_input(router: &NllbTop2, t: usize, d: usize, rng: &mut SeqRng) -> Array2<f32> {
    let mut x = rng.normal_matrix(t, d, 1.0);
    for _ in 0..50 {
        let plan = router.route(&RouterInput::new(x.view())).expect("route");
        let separated = plan.logits().is_some_and(|l| {
            l.outer_iter().all(|row| {
                let mut v = row.to_vec();
                v.sort_by(|a, b| b.total_cmp(a));
                v.windows(2).take(2).all(|w| w[0] - w[1] >= 0.1)
            })
        });
        if separated {
            break;
        }
        x = rng.normal_matrix(t, d, 1.0);
    }
    x
}

#[test]
fn backward_matches_finite_differences() {
    let mut drops = 0usize;
    for case in 0..96u64 {
        let mut rng = SeqRng::new(case, 0x411B);
        let t = 1 + rng.below(16) as usize;
        let d = 1 + rng.below(7) as usize;
        let e = 2 + rng.below(6) as usize;
        let capacity = if rng.below(2) == 0 {
            Capacity::Fraction(0.1 + rng.uniform() * 0.9)
        } else {
            Capacity::Fixed(1 + rng.below(4) as usize)
        };
        let (prioritized, before) = (rng.below(2) == 0, rng.below(2) == 0);
        let bias =
            (rng.below(2) == 0).then(|| Array1::from_shape_fn(e, |_| rng.normal() as f32 * 0.5));
        let router = NllbTop2::new(
            rng.normal_matrix(e, d, 1.0),
            bias,
            capacity,
            prioritized,
            before,
        )
        .expect("router");
        let x = separated_input(&router, t, d, &mut rng);
        let padding: Vec<bool> = (0..t).map(|i| case % 3 == 0 && i % 4 == 1).collect();
        let input = RouterInput::new(x.view()).with_padding(&padding);
        drops += router.route(&input).expect("route").dropped().len();
        let report = check_router_grad(&router, &input, case).unwrap_or_else(|err| {
            panic!("case {case} (T {t}, d {d}, E {e}, {capacity:?}, prioritized {prioritized}, before {before}): {err}")
        });
        assert!(report.checked > 0, "case {case}");
    }
    assert!(drops > 0, "some cases drop assignments");
}
