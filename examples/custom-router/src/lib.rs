//! A router plugin written outside the built-ins: greedy least-loaded routing. Each token, in order, takes its k
//! best-scoring experts among those still under capacity `ceil(T·k/E · capacity_factor)`; weights are the softmax
//! of the chosen logits. It depends only on earlier tokens, so it is causal.

use moe_core::{
    Assignment, MoeError, OptionDoc, Router, RouterArgs, RouterEntry, RouterInput, RouterRegistry,
    Routing,
};
use ndarray::Array2;

/// Greedy least-loaded router with a gate `[E, d]`.
#[derive(Clone, Debug)]
pub struct GreedyBalanced {
    gate: Array2<f32>,
    k: usize,
    capacity_factor: f64,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    capacity_factor: Option<f64>,
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
    fn route(&self, input: &RouterInput<'_>) -> Result<Routing, MoeError> {
        input.validate(self.d_model())?;
        let (t, e) = (input.n_tokens(), self.n_experts());
        let cap = ((t * self.k) as f64 / e as f64 * self.capacity_factor).ceil() as usize;
        let logits = input.hidden.dot(&self.gate.t());
        let mut load = vec![0usize; e];
        let mut kept = Vec::with_capacity(t * self.k);
        for (tok, row) in logits.outer_iter().enumerate() {
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let chosen: Vec<usize> = order
                .into_iter()
                .filter(|&x| load[x] < cap)
                .take(self.k)
                .collect();
            let m = chosen
                .iter()
                .map(|&x| row[x])
                .fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = chosen.iter().map(|&x| (row[x] - m).exp()).sum();
            for (rank, &x) in chosen.iter().enumerate() {
                load[x] += 1;
                let weight = (row[x] - m).exp() / z;
                kept.push(Assignment {
                    token: tok as u32,
                    expert: x as u32,
                    weight,
                    rank: rank as u16,
                });
            }
        }
        Routing::new(t, e, t, kept, Vec::new())
    }
}

fn factory(args: &RouterArgs) -> Result<Box<dyn Router>, MoeError> {
    let o: Options = args.parse("greedy-balanced")?;
    let capacity_factor = o.capacity_factor.unwrap_or(1.0);
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
    let gate = moe_routers::util::init_gate(
        args.d_model,
        args.n_experts,
        args.seed,
        moe_routers::util::GATE_STREAM,
    )?;
    Ok(Box::new(GreedyBalanced {
        gate,
        k: args.top_k,
        capacity_factor,
    }))
}

/// Registers `greedy-balanced`.
///
/// # Errors
/// [`MoeError::DuplicateRouter`] if the name is taken.
pub fn register(reg: &mut RouterRegistry) -> Result<(), MoeError> {
    reg.register(RouterEntry {
        name: "greedy-balanced".into(),
        description: "greedy least-loaded top-k with capacity (plugin example)".into(),
        causal: true,
        options: vec![OptionDoc {
            name: "capacity_factor",
            default: "1.0",
            doc: "capacity = ceil(T*k/E * factor), >= 1",
        }],
        factory,
    })
}
