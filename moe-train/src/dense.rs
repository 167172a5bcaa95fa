//! The dense baseline's router: every token takes the one expert with weight 1, so an MoE layer with one expert
//! of width `k · F` is the dense FFN at equal active parameters, run by the same kernels as the routed ones.

use moe_core::{Assignment, MoeError, Router, RouterBackward, RouterGrads, RouterInput, Routing};
use ndarray::Array2;

/// Routes every token to expert 0 with weight 1. No parameters, no auxiliary loss, causal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DenseRouter {
    /// Hidden width `d`.
    pub d_model: usize,
}

impl Router for DenseRouter {
    fn name(&self) -> &str {
        "dense"
    }

    fn n_experts(&self) -> usize {
        1
    }

    fn d_model(&self) -> Option<usize> {
        Some(self.d_model)
    }

    fn route(&self, input: &RouterInput<'_>) -> Result<Routing, MoeError> {
        input.validate(Some(self.d_model))?;
        let t = input.n_tokens();
        let kept: Vec<Assignment> = (0..t)
            .filter(|&i| !input.is_padding(i))
            .map(|i| Assignment {
                token: i as u32,
                expert: 0,
                weight: 1.0,
                rank: 0,
            })
            .collect();
        let real = kept.len();
        Routing::new(t, 1, real, kept, Vec::new())
    }

    /// The weight is the constant 1: no gradient reaches the input through the router.
    fn backward(&self, grad: &RouterBackward<'_, '_>) -> Result<RouterGrads, MoeError> {
        grad.validate()?;
        Ok(RouterGrads {
            d_hidden: Array2::zeros(grad.input.hidden.raw_dim()),
            params: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_token_takes_expert_zero_with_weight_one() {
        let x = Array2::<f32>::ones((5, 3));
        let r = DenseRouter { d_model: 3 }
            .route(&RouterInput::new(x.view()))
            .expect("route");
        assert_eq!(r.n_slots(), 5);
        assert!(r.slot_weights().iter().all(|&w| w == 1.0));
        assert!(r.aux_losses().is_empty());
    }
}
