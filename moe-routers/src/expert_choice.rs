//! Expert choice routing (Zhou et al. 2022, arXiv 2202.09368; docs/ROUTERS.md §5): every expert takes its top `C = ceil(T·c/E)` tokens by
//! softmax score, so the load is balanced by construction. It looks at the whole batch: **not causal**.

use ndarray::Array2;
use rayon::prelude::*;

use moe_core::kit::{self, GATE_STREAM};
use moe_core::{
    Assignment, Grad, KEEP_LOGITS_MAX_EXPERTS, MoeError, Param, ParamMut, Router, RouterArgs,
    RouterBackward, RouterConfig, RouterEntry, RouterGrads, RouterInput, RouterRegistry, Routing,
};

/// Largest `T · E` a single call accepts: the router holds a few `[T, E]` f32 tables.
const MAX_SCORE_VALUES: u128 = 1 << 31;

/// Default capacity factor `c` (most experiments of the paper).
pub const DEFAULT_CAPACITY_FACTOR: f64 = 2.0;

/// Relative slack of the capacity's ceiling: `T · c / E` that is an integer in decimal arithmetic but lands a few
/// ulps above it in binary (`10 · 1.1 / 11`) is not rounded up to the next integer.
const CEIL_SLACK: f64 = 1e-12;

moe_core::router_options! {
    /// Options of [`ExpertChoice`]; every field is optional.
    pub struct ExpertChoiceConfig {
        /// c in C = ceil(T · c / E) tokens per expert, T = the non-padding tokens of the batch; finite, > 0.
        capacity_factor: f64 = DEFAULT_CAPACITY_FACTOR,
    }
}

impl RouterConfig for ExpertChoiceConfig {
    /// Never causal: whether an expert picks a token depends on the scores of every token of the batch, later ones
    /// included.
    fn is_causal(&self) -> bool {
        false
    }
}

impl ExpertChoiceConfig {
    /// Resolves the defaults and builds the router around `gate` (`[E, d]`).
    ///
    /// # Errors
    /// As [`ExpertChoice::new`].
    pub fn build(&self, gate: Array2<f32>) -> Result<ExpertChoice, MoeError> {
        ExpertChoice::new(gate, self.capacity_factor())
    }
}

/// Expert choice router (Zhou et al. 2022, arXiv 2202.09368).
///
/// Over the `T_real` non-padding tokens of the batch: scores `S = softmax(X · W_gᵀ)` per token (`[T_real, E]`);
/// each expert `e` takes the `C = min(T_real, ceil(T_real · c / E))` tokens with the largest `S[:, e]` (ties to
/// the lower token index), with combine weight `S[t, e]`. A token gets 0 to `E` experts; every expert gets exactly
/// `C` tokens. The rank of an assignment is the position of the expert among the token's chosen experts sorted
/// by descending `S[t, ·]` (ties to the lower expert id; saturates at `u16::MAX`). No auxiliary loss: balance holds
/// by construction. Capacity is counted over the whole batch (sequence lengths are ignored), and train and eval
/// route the same way. Calls with `T · E > 2^31` are refused with [`MoeError::TooLarge`].
///
/// **Not causal**: whether a token is picked depends on the scores of every other token in the batch, later ones
/// included, so it leaks future tokens in autoregressive decoding ([`Router::is_causal`] is `false`).
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertChoice {
    gate: Array2<f32>,
    capacity_factor: f64,
}

impl ExpertChoice {
    /// A router from the gate `W_g` (`[E, d]`, `nn.Linear` layout) and the capacity factor `c`.
    ///
    /// # Errors
    /// [`MoeError::Shape`] for an empty gate, [`MoeError::NonFinite`] for a NaN or infinity in it,
    /// [`MoeError::TooLarge`] past [`kit::MAX_DENSE_EXPERTS`] experts, [`MoeError::InvalidConfig`] for a capacity
    /// factor that is not finite and `> 0`.
    pub fn new(gate: Array2<f32>, capacity_factor: f64) -> Result<Self, MoeError> {
        kit::check_gate("w_gate", &gate)?;
        kit::check_dense_experts(gate.nrows())?;
        if !capacity_factor.is_finite() || capacity_factor <= 0.0 {
            return Err(MoeError::config(
                "capacity_factor",
                capacity_factor,
                "must be finite and > 0",
            ));
        }
        Ok(ExpertChoice {
            gate,
            capacity_factor,
        })
    }

    /// The gate matrix `W_g` `[E, d]`.
    pub fn gate(&self) -> &Array2<f32> {
        &self.gate
    }

    /// The capacity factor `c`.
    pub fn capacity_factor(&self) -> f64 {
        self.capacity_factor
    }

    /// Tokens per expert for `n_real_tokens` non-padding tokens: `min(T_real, ceil(T_real · c / E))`, at least 1
    /// when `T_real > 0` and 0 when `T_real = 0`.
    pub fn capacity(&self, n_real_tokens: usize) -> usize {
        if n_real_tokens == 0 {
            return 0;
        }
        let exact = n_real_tokens as f64 * self.capacity_factor / self.n_experts() as f64;
        let c = (exact * (1.0 - CEIL_SLACK)).ceil().max(1.0);
        if c < n_real_tokens as f64 {
            c as usize
        } else {
            n_real_tokens
        }
    }
}

impl Router for ExpertChoice {
    fn name(&self) -> &str {
        "expert-choice"
    }

    fn n_experts(&self) -> usize {
        self.gate.nrows()
    }

    fn d_model(&self) -> Option<usize> {
        Some(self.gate.ncols())
    }

    /// [`ExpertChoiceConfig::is_causal`]: always `false`, an expert's choice of tokens depends on the whole batch.
    fn is_causal(&self) -> bool {
        ExpertChoiceConfig::default().is_causal()
    }

    /// `gate`: `W_g`, `[E, d]`.
    fn params(&self) -> Vec<Param<'_>> {
        vec![Param::new("gate", self.gate.view())]
    }

    fn params_mut(&mut self) -> Vec<ParamMut<'_>> {
        vec![ParamMut::new("gate", self.gate.view_mut())]
    }

    fn route(&self, input: &RouterInput<'_>) -> Result<Routing, MoeError> {
        input.validate(self.d_model())?;
        let (t, e) = (input.n_tokens(), self.n_experts());
        let size = t as u128 * e as u128;
        if size > MAX_SCORE_VALUES {
            return Err(MoeError::TooLarge {
                what: "expert-choice scores T * E".into(),
                size,
                limit: MAX_SCORE_VALUES,
            });
        }
        let logits = kit::gate_logits(input.hidden, self.gate.view(), None)?;
        let real: Vec<usize> = (0..t).filter(|&i| !input.is_padding(i)).collect();
        // S over experts, one row per real token, in f32 as every reference computes router probabilities, and
        // each row's `lse = m + log1p(r)` (m the row maximum, r = Σ e^{l_j − m} over all but its first maximum):
        // `(l − m) − log1p(r)`, the log-probability, is the exact-arithmetic tie-break key of probabilities compared
        // across tokens. It is strictly increasing in the true probability, never underflows as the f32
        // probability does, and keeps saturated rows apart (p = 1.0 in f32 for both, r = e^-20 vs e^-30).
        let scores: Vec<(Vec<f32>, f32, f32)> = real
            .par_iter()
            .map(|&i| {
                let mut row = logits.row(i).to_vec();
                let top = kit::argmax_ranked(&row, &row).unwrap_or(0);
                let m = row.get(top).copied().unwrap_or(0.0);
                let r: f32 = row
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != top)
                    .map(|(_, &l)| (l - m).exp())
                    .sum();
                kit::softmax_in_place(&mut row);
                (row, m, r.ln_1p())
            })
            .collect();
        let cap = self.capacity(real.len());
        // Each expert's top C of its column by the exact-arithmetic order (probability, log-probability, then the
        // position into `real`, which is ascending, so ties go to the lower token index). Experts are independent:
        // the same picks on any thread count.
        let picks: Vec<Vec<usize>> = (0..e)
            .into_par_iter()
            .map(|ex| {
                let column: Vec<f32> = scores
                    .iter()
                    .map(|(row, ..)| row.get(ex).copied().unwrap_or(0.0))
                    .collect();
                let key: Vec<f32> = real
                    .iter()
                    .zip(&scores)
                    .map(|(&i, (_, m, log1p_r))| {
                        logits
                            .get((i, ex))
                            .map_or(f32::NEG_INFINITY, |l| (l - m) - log1p_r)
                    })
                    .collect();
                kit::top_k_ranked(&column, &key, cap)
            })
            .collect();
        let mut per_token: Vec<Vec<(u32, f32)>> = vec![Vec::new(); real.len()];
        for (ex, p) in picks.iter().enumerate() {
            for &j in p {
                if let (Some(list), Some(&w)) = (
                    per_token.get_mut(j),
                    scores.get(j).and_then(|(row, ..)| row.get(ex)),
                ) {
                    list.push((ex as u32, w));
                }
            }
        }
        let mut kept = Vec::with_capacity(cap.saturating_mul(e));
        for (list, &token) in per_token.iter_mut().zip(&real) {
            // A token's experts in rank order: probability, then the logit, then the lower id.
            let lrow = logits.row(token);
            let l = |ex: u32| lrow.get(ex as usize).copied().unwrap_or(f32::NEG_INFINITY);
            list.sort_by(|a, b| {
                b.1.total_cmp(&a.1)
                    .then(l(b.0).total_cmp(&l(a.0)))
                    .then(a.0.cmp(&b.0))
            });
            for (rank, &(expert, weight)) in list.iter().enumerate() {
                kept.push(Assignment {
                    token: token as u32,
                    expert,
                    weight,
                    rank: u16::try_from(rank).unwrap_or(u16::MAX),
                });
            }
        }
        let mut routing = Routing::new(t, e, real.len(), kept, Vec::new())?;
        if e <= KEEP_LOGITS_MAX_EXPERTS {
            routing.set_logits(logits);
        }
        Ok(routing)
    }

    /// The exact backward of [`Router::route`]. The weight of a kept (token `t`, expert `e`) is `S[t, e]`, the
    /// softmax over all `E` experts of token `t`'s logits `l = x · W_gᵀ`, so with `dS[t, e] = dL/dw` of that slot
    /// (a pair holds at most one slot; 0 for pairs not taken): `dl_t = S_t ⊙ (dS_t − ⟨S_t, dS_t⟩)` over the whole
    /// row ([`kit::softmax_backward`]), then the gate's backward ([`kit::gate_backward`]): `dx = dl · W_g`,
    /// `dW_g = dlᵀ · x`. Which tokens each expert took gets no gradient (selection is not differentiable), there
    /// is no auxiliary loss, and padding rows get 0. Rows are independent, so the result is the same on any
    /// thread count.
    ///
    /// # Errors
    /// [`RouterBackward::validate`]'s errors; [`MoeError::Mismatch`] for a plan of another `E`; the input errors
    /// of [`Router::route`].
    fn backward(&self, grad: &RouterBackward<'_, '_>) -> Result<RouterGrads, MoeError> {
        grad.validate()?;
        let input = grad.input;
        input.validate(self.d_model())?;
        let (t, e) = (input.n_tokens(), self.n_experts());
        if grad.routing.n_experts() != e {
            return Err(MoeError::mismatch(
                "expert-choice backward",
                "plan experts",
                grad.routing.n_experts(),
                "router experts",
                e,
            ));
        }
        let logits = kit::gate_logits(input.hidden, self.gate.view(), None)?;
        let mut d_scores = Array2::<f32>::zeros((t, e));
        for g in grad.routing.groups() {
            for (j, &token) in g.tokens.iter().enumerate() {
                let dw = grad.d_weights.get(g.slot_start + j).copied().unwrap_or(0.0);
                if let Some(v) = d_scores.get_mut((token as usize, g.expert)) {
                    *v += dw;
                }
            }
        }
        let mut d_logits = vec![0.0f32; t * e];
        d_logits
            .par_chunks_mut(e.max(1))
            .enumerate()
            .for_each(|(i, out)| {
                let ds = d_scores.row(i);
                if ds.iter().all(|&v| v == 0.0) {
                    return;
                }
                let mut s = logits.row(i).to_vec();
                kit::softmax_in_place(&mut s);
                kit::softmax_backward(&s, &ds.to_vec(), out);
            });
        let d_logits = Array2::from_shape_vec((t, e), d_logits).map_err(|_| {
            MoeError::shape("expert-choice d_logits", format!("[{t}, {e}]"), &[t * e])
        })?;
        let g = kit::gate_backward(input.hidden, self.gate.view(), d_logits.view())?;
        Ok(RouterGrads {
            d_hidden: g.d_x,
            params: vec![Grad::dense("gate", g.d_gate)],
        })
    }
}

fn factory(args: &RouterArgs) -> Result<Box<dyn Router>, MoeError> {
    let cfg: ExpertChoiceConfig = args.parse("expert-choice")?;
    let gate = kit::init_gate(args.d_model, args.n_experts, args.seed, GATE_STREAM)?;
    Ok(Box::new(cfg.build(gate)?))
}

/// Registers `expert-choice` (marked not causal).
///
/// # Errors
/// [`MoeError::DuplicateRouter`] if the name is taken.
pub fn register(reg: &mut RouterRegistry) -> Result<(), MoeError> {
    reg.register(RouterEntry::new::<ExpertChoiceConfig>(
        "expert-choice",
        "each expert takes its top ceil(T*c/E) tokens (Zhou 2022); not causal",
        factory,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_core::Mode;
    use ndarray::array;

    /// With an identity gate the logits are the inputs themselves.
    fn eye_router(e: usize, c: f64) -> ExpertChoice {
        ExpertChoice::new(Array2::eye(e), c).expect("valid router")
    }

    #[test]
    fn hand_computed() {
        // E = 2, c = 1, T = 3: C = ceil(3 · 1 / 2) = 2.
        // Logits (identity gate) and S = softmax per row:
        //   t0 [ln 3, 0] -> [3/4, 1/4]; t1 [0, 0] -> [1/2, 1/2]; t2 [0, ln 3] -> [1/4, 3/4].
        // Expert 0 column [0.75, 0.5, 0.25] -> tokens 0, 1; expert 1 column [0.25, 0.5, 0.75] -> tokens 2, 1.
        // Per token: t0 {e0: 0.75}; t1 {e0: 0.5 rank 0, e1: 0.5 rank 1 (tie -> lower expert first)}; t2 {e1: 0.75}.
        let l3 = 3f32.ln();
        let r = eye_router(2, 1.0);
        let x = array![[l3, 0.0f32], [0.0, 0.0], [0.0, l3]];
        let plan = r.route(&RouterInput::new(x.view())).expect("route");
        assert_eq!(plan.expert_counts(), vec![2, 2]);
        let t = plan.per_token();
        assert_eq!(t[0].len(), 1);
        assert_eq!((t[0][0].0, t[0][0].2), (0, 0));
        assert!((t[0][0].1 - 0.75).abs() < 1e-6);
        assert_eq!(
            t[1].iter().map(|a| (a.0, a.2)).collect::<Vec<_>>(),
            vec![(0, 0), (1, 1)]
        );
        assert!(t[1].iter().all(|a| (a.1 - 0.5).abs() < 1e-6));
        assert_eq!((t[2][0].0, t[2].len()), (1, 1));
        assert!((t[2][0].1 - 0.75).abs() < 1e-6);
        assert!(plan.aux_losses().is_empty());
        assert_eq!(plan.logits(), Some(&x));
    }

    #[test]
    fn underflowed_probabilities_rank_by_the_log_probability() {
        // E = 2, c = 1, T = 2: C = 1. Expert 1's probabilities e^{-200} and e^{-150} are both exactly 0 in f32;
        // the exact order (log-probability -150 above -200) gives expert 1 token 1.
        let r = eye_router(2, 1.0);
        let x = array![[0.0f32, -200.0], [0.0, -150.0]];
        let plan = r.route(&RouterInput::new(x.view())).expect("route");
        let t = plan.per_token();
        assert_eq!(t[1].iter().map(|a| a.0).collect::<Vec<_>>(), vec![1]);
        assert_eq!(t[0].iter().map(|a| a.0).collect::<Vec<_>>(), vec![0]);
        // Without the tie-break key both would go to the lower token.
        let mut p = [-200.0f32, 0.0];
        kit::softmax_in_place(&mut p);
        assert_eq!(p[0], 0.0);
        // Saturated: expert 0's probabilities 1 / (1 + e^-20) and 1 / (1 + e^-30) are both exactly 1.0 in f32; the
        // second is larger (c = 0.5: C = 1): expert 0 takes token 1, expert 1 token 0 (e^-20 > e^-30).
        let r = eye_router(2, 0.5);
        let x = array![[0.0f32, -20.0], [0.0, -30.0]];
        let mut p = [0.0f32, -20.0];
        kit::softmax_in_place(&mut p);
        assert_eq!(p[0], 1.0);
        let t = r
            .route(&RouterInput::new(x.view()))
            .expect("route")
            .per_token();
        assert_eq!(t[0].iter().map(|a| a.0).collect::<Vec<_>>(), vec![1]);
        assert_eq!(t[1].iter().map(|a| a.0).collect::<Vec<_>>(), vec![0]);
    }

    #[test]
    fn ties_go_to_lower_tokens_and_padding_is_skipped() {
        // Four identical real tokens (S = [1/2, 1/2] each) and a padding token that would score highest.
        // T_real = 4, E = 2, c = 1: C = 2, and every tie goes to the lower token: both experts take tokens 0 and 1.
        let r = eye_router(2, 1.0);
        let x = array![
            [0.0f32, 0.0],
            [9.0, 9.0],
            [0.0, 0.0],
            [0.0, 0.0],
            [0.0, 0.0]
        ];
        let pad = [false, true, false, false, false];
        let plan = r
            .route(&RouterInput::new(x.view()).with_padding(&pad))
            .expect("route");
        assert_eq!(plan.n_real_tokens(), 4);
        for g in plan.groups() {
            assert_eq!(g.tokens, &[0, 2]);
        }
        assert_eq!(plan.diagnostics().tokens_without_expert, 2);
    }

    #[test]
    fn capacity_rounding() {
        // ceil(8 · 2 / 4) = 4; ceil(10 · 1.1 / 11) = 1 (1.0000000000000002 in f64, absorbed by the slack);
        // ceil(5 · 1 / 4) = 2; capped at T_real: ceil(3 · 8 / 2) = 12 -> 3; T_real = 0 -> 0; tiny c -> 1.
        let e4 = eye_router(4, 2.0);
        assert_eq!(e4.capacity(8), 4);
        assert_eq!(eye_router(11, 1.1).capacity(10), 1);
        assert_eq!(eye_router(4, 1.0).capacity(5), 2);
        assert_eq!(eye_router(2, 8.0).capacity(3), 3);
        assert_eq!(e4.capacity(0), 0);
        assert_eq!(eye_router(4, 1e-300).capacity(7), 1);
        assert_eq!(eye_router(4, f64::MAX).capacity(7), 7);
    }

    #[test]
    fn errors_are_typed() {
        for c in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                ExpertChoice::new(Array2::eye(2), c),
                Err(MoeError::InvalidConfig { .. })
            ));
        }
        assert!(matches!(
            ExpertChoice::new(Array2::zeros((0, 2)), 1.0),
            Err(MoeError::Shape { .. })
        ));
        let r = eye_router(2, 1.0);
        let x = array![[1.0f32, f32::NAN]];
        assert!(matches!(
            r.route(&RouterInput::new(x.view())),
            Err(MoeError::NonFinite {
                token: 0,
                column: 1,
                ..
            })
        ));
    }

    #[test]
    fn absurd_sizes_are_refused() {
        // T · E = 2^22 · 2^10 = 2^32 > 2^31 scores: refused before any allocation of scores. The hidden view is a
        // zero-stride broadcast of one row, so the test itself allocates almost nothing.
        let r = ExpertChoice::new(Array2::zeros((1 << 10, 1)), 1.0).expect("router");
        let row = Array2::<f32>::zeros((1, 1));
        let hidden = row.broadcast((1 << 22, 1)).expect("broadcast");
        assert!(matches!(
            r.route(&RouterInput::new(hidden)),
            Err(MoeError::TooLarge { .. })
        ));
    }

    #[test]
    fn train_equals_eval_and_is_deterministic() {
        let gate = kit::init_gate(8, 5, 3, GATE_STREAM).expect("gate");
        let r = ExpertChoice::new(gate, 1.5).expect("router");
        let x = moe_core::rng::SeqRng::new(4, 0).normal_matrix(37, 8, 1.0);
        let eval = r.route(&RouterInput::new(x.view())).expect("route");
        let train = r
            .route(&RouterInput::new(x.view()).with_mode(Mode::Train { seed: 9 }))
            .expect("route");
        assert_eq!(eval, train);
        assert_eq!(
            eval,
            r.route(&RouterInput::new(x.view())).expect("route again")
        );
        // C = ceil(37 · 1.5 / 5) = ceil(11.1) = 12 for each of the 5 experts.
        assert_eq!(eval.expert_counts(), vec![12; 5]);
    }

    #[test]
    fn registry_marks_not_causal() {
        let mut reg = RouterRegistry::new();
        register(&mut reg).expect("register");
        let args = RouterArgs::new(8, 4, 2, 0).with_option("capacity_factor", 1.0);
        assert!(
            reg.get("expert-choice")
                .is_some_and(|e| e.is_causal(&args) == Ok(false)
                    && e.causality() == Ok(moe_core::Causality::NotCausal))
        );
        let r = reg.create("expert-choice", &args).expect("create");
        assert!(!r.is_causal());
        let bad = RouterArgs::new(8, 4, 2, 0).with_option("capacity_factor", -2.0);
        assert!(matches!(
            reg.create("expert-choice", &bad),
            Err(MoeError::InvalidConfig { .. })
        ));
        let unknown = RouterArgs::new(8, 4, 2, 0).with_option("capacity", 2.0);
        assert!(matches!(
            reg.create("expert-choice", &unknown),
            Err(MoeError::InvalidConfig { .. })
        ));
    }

    #[test]
    fn conformance() {
        for (e, c) in [(1, 1.0), (6, 2.0), (16, 0.5)] {
            let gate = kit::init_gate(12, e, 1, GATE_STREAM).expect("gate");
            let r = ExpertChoice::new(gate, c).expect("router");
            moe_core::testing::check_router(&r, 12).expect("conformance");
        }
    }
}
