//! A router without a backward still routes, and its backward is a typed error naming it: the default of
//! `Router::backward`, seen from a plugin written outside the built-ins.

use moe_core::testing::check_router_grad;
use moe_core::{Assignment, MoeError, Router, RouterBackward, RouterInput, Routing, rng::SeqRng};

/// Every real token to expert `t mod E` with weight 1: forward only.
#[derive(Debug, Clone)]
struct RoundRobin {
    n_experts: usize,
}

impl Router for RoundRobin {
    fn name(&self) -> &str {
        "round-robin-plugin"
    }
    fn n_experts(&self) -> usize {
        self.n_experts
    }
    fn d_model(&self) -> Option<usize> {
        None
    }
    fn route(&self, input: &RouterInput<'_>) -> Result<Routing, MoeError> {
        let t = input.n_tokens();
        let kept = (0..t)
            .map(|i| Assignment {
                token: i as u32,
                expert: (i % self.n_experts) as u32,
                weight: 1.0,
                rank: 0,
            })
            .collect();
        Routing::new(t, self.n_experts, t, kept, Vec::new())
    }
}

#[test]
fn a_router_without_backward_is_unsupported_by_name() {
    let r = RoundRobin { n_experts: 3 };
    let x = SeqRng::new(1, 1).normal_matrix(5, 4, 1.0);
    let input = RouterInput::new(x.view());
    let plan = r.route(&input).expect("the forward still runs");
    let dw = vec![1.0f32; plan.n_slots()];
    let err = r
        .backward(&RouterBackward {
            input: &input,
            routing: &plan,
            d_weights: &dw,
            d_aux: &[],
        })
        .expect_err("no backward");
    match &err {
        MoeError::Unsupported { owner, feature } => {
            assert_eq!(owner, "router round-robin-plugin");
            assert_eq!(feature, "backward");
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    assert!(err.to_string().contains("round-robin-plugin"), "{err}");
    // The checker reports it, naming the router, rather than passing or panicking.
    let msg = check_router_grad(&r, &input, 0).expect_err("no backward to check");
    assert!(
        msg.contains("round-robin-plugin") && msg.contains("backward"),
        "{msg}"
    );
}
