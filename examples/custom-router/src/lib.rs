//! A router plugin written outside the built-ins: greedy least-loaded routing. Each real (non-padding) token, in
//! order, takes its k best-scoring experts among those still under capacity `ceil(T·k/E · capacity_factor)`
//! (`T` real tokens); weights are the softmax of the chosen logits; padding tokens get no expert. A token's
//! experts depend only on earlier tokens (and on `T`), so it is causal. It needs `moe-core` alone: the router kit
//! gives the seeded gate, the logits, top-k and softmax, and their backward (so it trains); `router_options!`
//! declares the options once.

use moe_core::kit::{self, GATE_STREAM};
use moe_core::ndarray::Array2;
use moe_core::{
    Assignment, Grad, MoeError, Param, ParamMut, Router, RouterArgs, RouterBackward, RouterConfig,
    RouterEntry, RouterGrads, RouterInput, RouterRegistry, Routing,
};

moe_core::router_options! {
    /// Options of `greedy-balanced`.
    pub struct GreedyBalancedConfig {
        /// capacity = ceil(T·k/E · capacity_factor) tokens per expert, T = real tokens; finite, >= 1.
        capacity_factor: f64 = 1.0,
    }
}

impl RouterConfig for GreedyBalancedConfig {
    /// Tokens claim capacity in order, so a later token never changes an earlier token's experts.
    fn is_causal(&self) -> bool {
        true
    }
}

/// Greedy least-loaded router with a gate `[E, d]`.
#[derive(Clone, Debug)]
pub struct GreedyBalanced {
    gate: Array2<f32>,
    k: usize,
    capacity_factor: f64,
    cfg: GreedyBalancedConfig,
}

impl Router for GreedyBalanced {
    fn name(&self) -> &str {
        "greedy-balanced"
    }
    fn n_experts(&self) -> usize {
        self.gate.nrows()
    }
    fn d_model(&self) -> Option<usize> {
        Some(self.gate.ncols())
    }
    fn is_causal(&self) -> bool {
        // The one source of causality: the config this router was built from.
        self.cfg.is_causal()
    }
    fn params(&self) -> Vec<Param<'_>> {
        vec![Param::new("gate", self.gate.view())]
    }
    fn params_mut(&mut self) -> Vec<ParamMut<'_>> {
        vec![ParamMut::new("gate", self.gate.view_mut())]
    }
    fn route(&self, input: &RouterInput<'_>) -> Result<Routing, MoeError> {
        let (t, e) = (input.n_tokens(), self.n_experts());
        kit::check_input(input, self.d_model(), e, self.k)?;
        let logits = kit::gate_logits(input.hidden, self.gate.view(), None)?;
        let real: Vec<usize> = (0..t).filter(|&i| !input.is_padding(i)).collect();
        let cap = ((real.len() * self.k) as f64 / e as f64 * self.capacity_factor).ceil() as usize;
        let mut load = vec![0usize; e];
        let mut kept = Vec::with_capacity(real.len() * self.k);
        for &tok in &real {
            let scores = logits.row(tok).to_vec();
            let chosen: Vec<usize> = kit::top_k(&scores, e)
                .into_iter()
                .filter(|&x| load[x] < cap)
                .take(self.k)
                .collect();
            let mut weights: Vec<f32> = chosen.iter().map(|&x| scores[x]).collect();
            kit::softmax_in_place(&mut weights);
            for (rank, (&x, &weight)) in chosen.iter().zip(&weights).enumerate() {
                load[x] += 1;
                kept.push(Assignment {
                    token: tok as u32,
                    expert: x as u32,
                    weight,
                    rank: rank as u16,
                });
            }
        }
        Routing::new(t, e, real.len(), kept, Vec::new())
    }
    /// Back through the forward: each token's weights are the softmax of its chosen logits, the logits come from
    /// the gate; which experts were chosen (capacity included) gets no gradient.
    fn backward(&self, grad: &RouterBackward<'_, '_>) -> Result<RouterGrads, MoeError> {
        grad.validate()?;
        let (input, plan, e) = (grad.input, grad.routing, self.n_experts());
        kit::check_input(input, self.d_model(), e, self.k)?;
        if plan.n_experts() != e {
            return Err(MoeError::mismatch(
                "backward",
                "plan experts",
                plan.n_experts(),
                "E",
                e,
            ));
        }
        let logits = kit::gate_logits(input.hidden, self.gate.view(), None)?;
        let expert = plan.slot_experts();
        let (offsets, slots) = plan.token_slots();
        let mut d_logits = Array2::zeros(logits.dim());
        for (t, span) in offsets.windows(2).enumerate() {
            let slots = &slots[span[0]..span[1]];
            let mut w: Vec<f32> = slots
                .iter()
                .map(|&s| logits[[t, expert[s] as usize]])
                .collect();
            kit::softmax_in_place(&mut w);
            let dw: Vec<f32> = slots.iter().map(|&s| grad.d_weights[s]).collect();
            let mut dl = vec![0.0; w.len()];
            kit::softmax_backward(&w, &dw, &mut dl);
            for (&s, g) in slots.iter().zip(dl) {
                d_logits[[t, expert[s] as usize]] += g;
            }
        }
        let g = kit::gate_backward(input.hidden, self.gate.view(), d_logits.view())?;
        Ok(RouterGrads {
            d_hidden: g.d_x,
            params: vec![Grad::dense("gate", g.d_gate)],
        })
    }
}

fn factory(args: &RouterArgs) -> Result<Box<dyn Router>, MoeError> {
    let cfg: GreedyBalancedConfig = args.parse("greedy-balanced")?;
    let capacity_factor = cfg.capacity_factor();
    if !(capacity_factor.is_finite() && capacity_factor >= 1.0) {
        return Err(MoeError::config(
            "capacity_factor",
            capacity_factor,
            "must be finite and >= 1",
        ));
    }
    if args.top_k == 0 || args.top_k > args.n_experts {
        return Err(MoeError::TopK {
            k: args.top_k,
            n_experts: args.n_experts,
        });
    }
    let gate = kit::init_gate(args.d_model, args.n_experts, args.seed, GATE_STREAM)?;
    Ok(Box::new(GreedyBalanced {
        gate,
        k: args.top_k,
        capacity_factor,
        cfg,
    }))
}

/// Registers `greedy-balanced`; its option docs and causality come from [`GreedyBalancedConfig`].
///
/// # Errors
/// [`MoeError::DuplicateRouter`] if the name is taken.
pub fn register(reg: &mut RouterRegistry) -> Result<(), MoeError> {
    reg.register(RouterEntry::new::<GreedyBalancedConfig>(
        "greedy-balanced",
        "greedy least-loaded top-k with capacity (plugin example)",
        factory,
    ))
}
