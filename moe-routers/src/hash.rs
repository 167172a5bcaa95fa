//! Hash routing (Roller et al. 2021, arXiv 2106.04426; docs/ROUTERS.md §4): the expert is a fixed function of the token
//! id, chosen before training, with no balancing loss. Tables: seeded random, frequency-balanced, or `id mod E`;
//! k-way hashing takes experts `(h(id) + j) mod E` for `j = 0..k`, weighted uniformly or by a gate.
//!
//! Out-of-vocabulary ids are an error, not folded: a table built for one vocabulary silently reused with another
//! tokenizer is a bug worth reporting. `table = modulo` takes any id.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use ndarray::{Array2, ArrayView1};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use moe_core::kit::{self, GATE_STREAM};
use moe_core::rng::CounterRng;
use moe_core::{
    Assignment, Grad, MoeError, Param, ParamMut, Router, RouterArgs, RouterBackward, RouterConfig,
    RouterEntry, RouterGrads, RouterInput, RouterRegistry, Routing,
};

/// Random stream of the random hash table in registry factories (the gate uses [`GATE_STREAM`]).
pub const HASH_STREAM: u64 = 2;

/// Default vocabulary size of the random table (the synthetic workload's vocabulary).
pub const DEFAULT_VOCAB: usize = 32_000;

/// Largest vocabulary a table may cover (`2^28` ids, 1 GiB of table).
pub const MAX_VOCAB: usize = 1 << 28;

/// How token ids map to their first expert `h(id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashTable {
    /// `table[v] = uniform(0..E)`, seeded: `CounterRng(seed, HASH_STREAM).u64_at(v) mod E`.
    #[default]
    Random,
    /// Ids by descending frequency (ties: lower id first), each to the currently emptiest expert.
    Balanced,
    /// `h(id) = id mod E`; needs no table and takes any id.
    Modulo,
}

/// How the `k` experts of a token are weighted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashWeights {
    /// `1 / k` each (for `k = 1`, the paper's hash layer: weight 1).
    #[default]
    Uniform,
    /// `softmax` over the `k` chosen experts' gate logits `x · W_g[e]` (recent k-way hash layers); the gate is
    /// `[E, d]`, so the router then has a fixed width.
    Gate,
}

moe_core::router_options! {
    /// Options of [`HashRouter`]; every field is optional.
    pub struct HashRouterConfig {
        /// The hash h(token id): a seeded random table, a frequency-balanced one (needs counts), or id mod E.
        table: HashTable = HashTable::Random,
        /// Vocabulary size of the random table; a token id >= vocab is an error (not used by the other tables).
        vocab: usize = DEFAULT_VOCAB,
        /// JSON array of token frequencies (index = id) for table = balanced; the vocabulary is its length.
        counts: Vec<u64>,
        /// Experts per token: (h(id) + j) mod E for j = 0..k (the paper's hash layer has 1; the layer's k is not
        /// used).
        k: usize = 1,
        /// Weights of the k experts: uniform 1/k, or gate (softmax over their gate logits x · W_g[e], which fixes
        /// the width d).
        weights: HashWeights = HashWeights::Uniform,
    }
}

impl RouterConfig for HashRouterConfig {
    /// Always causal: a token's experts are a function of its own id (and its weights of its own hidden state).
    fn is_causal(&self) -> bool {
        true
    }
}

/// Hash router: token `t` with id `v` goes to experts `(h(v) + j) mod E`, `j = 0..k` (distinct since `k <= E`),
/// rank `j`, weight `1/k` or the gate softmax. Needs [`RouterInput::token_ids`]; takes any hidden width unless a
/// gate is set.
#[derive(Debug, Clone, PartialEq)]
pub struct HashRouter {
    n_experts: usize,
    k: usize,
    kind: HashTable,
    /// `h(v)` for `v < table.len()`; `None` for modulo.
    table: Option<Vec<u32>>,
    /// Gate `[E, d]` when weights are gate scores.
    gate: Option<Array2<f32>>,
}

impl HashRouterConfig {
    /// Resolves the defaults and builds the router for `E = n_experts`; the random table and the gate (`[E, d]`,
    /// `N(0, 1/d)`, the same `W_g` as the dense routers for this seed) are drawn from `seed`.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for `counts` without `table = balanced` or the reverse, or `vocab` with a table
    /// it does not apply to, or a `vocab` that disagrees with `counts`; then the constructors' errors.
    pub fn build(
        &self,
        d_model: usize,
        n_experts: usize,
        seed: u64,
    ) -> Result<HashRouter, MoeError> {
        let (table, k) = (self.table(), self.k());
        let router = match table {
            HashTable::Random => {
                if self.counts.is_some() {
                    return Err(MoeError::config(
                        "counts",
                        "[..]",
                        "counts are only used with table = balanced",
                    ));
                }
                HashRouter::random(self.vocab(), n_experts, k, seed)?
            }
            HashTable::Balanced => {
                let Some(counts) = &self.counts else {
                    return Err(MoeError::config(
                        "table",
                        "balanced",
                        "needs counts, a JSON array of token frequencies",
                    ));
                };
                if let Some(v) = self.vocab
                    && v != counts.len()
                {
                    return Err(MoeError::config(
                        "vocab",
                        v,
                        format!(
                            "table = balanced takes its vocabulary from counts ({} ids)",
                            counts.len()
                        ),
                    ));
                }
                HashRouter::balanced(counts, n_experts, k)?
            }
            HashTable::Modulo => {
                if let Some(v) = self.vocab {
                    return Err(MoeError::config(
                        "vocab",
                        v,
                        "table = modulo takes any id; vocab does not apply",
                    ));
                }
                if self.counts.is_some() {
                    return Err(MoeError::config(
                        "counts",
                        "[..]",
                        "counts are only used with table = balanced",
                    ));
                }
                HashRouter::modulo(n_experts, k)?
            }
        };
        match self.weights() {
            HashWeights::Uniform => Ok(router),
            HashWeights::Gate => {
                router.with_gate(kit::init_gate(d_model, n_experts, seed, GATE_STREAM)?)
            }
        }
    }
}

/// Checks `E` and `k` for every constructor.
fn check_shape(n_experts: usize, k: usize) -> Result<(), MoeError> {
    if n_experts > u32::MAX as usize {
        return Err(MoeError::TooLarge {
            what: "experts".into(),
            size: n_experts as u128,
            limit: u32::MAX as u128,
        });
    }
    if k == 0 || k > n_experts {
        return Err(MoeError::TopK { k, n_experts });
    }
    if k > u16::MAX as usize + 1 {
        return Err(MoeError::TooLarge {
            what: "k (ranks are u16)".into(),
            size: k as u128,
            limit: 1 << 16,
        });
    }
    Ok(())
}

/// Checks a vocabulary size.
fn check_vocab(vocab: usize) -> Result<(), MoeError> {
    if vocab == 0 {
        return Err(MoeError::config("vocab", vocab, "must be >= 1"));
    }
    if vocab > MAX_VOCAB {
        return Err(MoeError::TooLarge {
            what: "hash table vocabulary".into(),
            size: vocab as u128,
            limit: MAX_VOCAB as u128,
        });
    }
    Ok(())
}

/// The balanced table: ids sorted by descending count (ties: lower id first), each given to the expert with the
/// smallest `(assigned count sum, assigned ids, expert id)`. The second key spreads zero-count ids round-robin
/// instead of piling them onto one expert. `O(V log V + V log E)`.
fn balanced_table(counts: &[u64], n_experts: usize) -> Vec<u32> {
    let mut order: Vec<usize> = (0..counts.len()).collect();
    order.sort_by_key(|&v| (Reverse(counts[v]), v));
    let mut heap: BinaryHeap<Reverse<(u128, usize, u32)>> =
        (0..n_experts as u32).map(|e| Reverse((0, 0, e))).collect();
    let mut table = vec![0u32; counts.len()];
    for v in order {
        if let Some(Reverse((load, n_ids, e))) = heap.pop() {
            table[v] = e;
            heap.push(Reverse((load + u128::from(counts[v]), n_ids + 1, e)));
        }
    }
    table
}

impl HashRouter {
    /// A seeded random table over `vocab` ids: `table[v] = CounterRng(seed, HASH_STREAM).u64_at(v) mod E`.
    ///
    /// # Errors
    /// [`MoeError::TopK`] for `k = 0` or `k > E`; [`MoeError::InvalidConfig`] for `vocab = 0`;
    /// [`MoeError::TooLarge`] past [`MAX_VOCAB`] ids or `u32::MAX` experts.
    pub fn random(vocab: usize, n_experts: usize, k: usize, seed: u64) -> Result<Self, MoeError> {
        check_shape(n_experts, k)?;
        check_vocab(vocab)?;
        let rng = CounterRng::new(seed, HASH_STREAM);
        let table = (0..vocab as u64)
            .map(|v| (rng.u64_at(v) % n_experts as u64) as u32)
            .collect();
        Ok(HashRouter {
            n_experts,
            k,
            kind: HashTable::Random,
            table: Some(table),
            gate: None,
        })
    }

    /// The balanced table of Roller et al. from token frequencies `counts[v]` (`[V]`): ids by descending count,
    /// each to the currently emptiest expert (smallest assigned count sum; ties: fewer ids, then lower expert id).
    ///
    /// # Errors
    /// As [`HashRouter::random`], with `V = counts.len()`.
    pub fn balanced(counts: &[u64], n_experts: usize, k: usize) -> Result<Self, MoeError> {
        check_shape(n_experts, k)?;
        check_vocab(counts.len())?;
        let table = balanced_table(counts, n_experts);
        Ok(HashRouter {
            n_experts,
            k,
            kind: HashTable::Balanced,
            table: Some(table),
            gate: None,
        })
    }

    /// `h(id) = id mod E`, for any id.
    ///
    /// # Errors
    /// [`MoeError::TopK`] for `k = 0` or `k > E`; [`MoeError::TooLarge`] past `u32::MAX` experts.
    pub fn modulo(n_experts: usize, k: usize) -> Result<Self, MoeError> {
        check_shape(n_experts, k)?;
        Ok(HashRouter {
            n_experts,
            k,
            kind: HashTable::Modulo,
            table: None,
            gate: None,
        })
    }

    /// A user-given table `[V]` of first experts (reported as `random`, the family of fixed lookup tables).
    ///
    /// # Errors
    /// As [`HashRouter::random`]; [`MoeError::InvalidConfig`] naming the first id whose entry is `>= E`.
    pub fn from_table(table: Vec<u32>, n_experts: usize, k: usize) -> Result<Self, MoeError> {
        check_shape(n_experts, k)?;
        check_vocab(table.len())?;
        if let Some((v, &e)) = table
            .iter()
            .enumerate()
            .find(|(_, e)| **e as usize >= n_experts)
        {
            return Err(MoeError::config(
                format!("table[{v}]"),
                e,
                format!("must be < E = {n_experts}"),
            ));
        }
        Ok(HashRouter {
            n_experts,
            k,
            kind: HashTable::Random,
            table: Some(table),
            gate: None,
        })
    }

    /// Weights the `k` experts by `softmax` over their gate logits `x · gate[e]` (`gate` is `[E, d]`); the router
    /// then expects width `d`. With `k = 1` the weight is 1 whatever the gate.
    ///
    /// # Errors
    /// [`MoeError::Shape`] for a gate that is not `[E, d >= 1]`; [`MoeError::NonFinite`] for a non-finite entry.
    pub fn with_gate(mut self, gate: Array2<f32>) -> Result<Self, MoeError> {
        kit::check_gate("hash gate.weight", &gate)?;
        if gate.nrows() != self.n_experts {
            return Err(MoeError::shape(
                "hash gate.weight",
                format!("[{}, d]", self.n_experts),
                gate.shape(),
            ));
        }
        self.gate = Some(gate);
        Ok(self)
    }

    /// Experts per token.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The table family.
    pub fn table_kind(&self) -> HashTable {
        self.kind
    }

    /// The lookup table `h(v)` (`[V]`), or `None` for `modulo`.
    pub fn table(&self) -> Option<&[u32]> {
        self.table.as_deref()
    }

    /// The first expert `h(id)` of a token id.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] naming the token if `id` is outside the table's vocabulary.
    pub fn first_expert(&self, token: usize, id: u32) -> Result<usize, MoeError> {
        match &self.table {
            None => Ok(id as usize % self.n_experts),
            Some(t) => t.get(id as usize).map(|&e| e as usize).ok_or_else(|| {
                MoeError::config(
                    format!("token_ids[{token}]"),
                    id,
                    format!(
                        "token id outside the hash table's vocabulary of {} ids",
                        t.len()
                    ),
                )
            }),
        }
    }

    /// The `(expert, weight)` pairs of one token, rank order.
    fn route_token(
        &self,
        token: usize,
        id: u32,
        x: ArrayView1<'_, f32>,
    ) -> Result<Vec<(u32, f32)>, MoeError> {
        let first = self.first_expert(token, id)?;
        let experts: Vec<usize> = (0..self.k).map(|j| (first + j) % self.n_experts).collect();
        let weights = match &self.gate {
            None => vec![1.0 / self.k as f32; self.k],
            Some(g) => {
                let mut l: Vec<f32> = experts.iter().map(|&e| g.row(e).dot(&x)).collect();
                if let Some((j, &v)) = l.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                    return Err(MoeError::NonFinite {
                        tensor: "router logits".into(),
                        token,
                        column: experts[j],
                        value: v,
                    });
                }
                kit::softmax_in_place(&mut l);
                l
            }
        };
        Ok(experts.into_iter().map(|e| e as u32).zip(weights).collect())
    }
}

/// One token's `(expert, weight)` pairs in rank order, or its error.
type TokenChoice = Result<Vec<(u32, f32)>, MoeError>;

impl Router for HashRouter {
    fn name(&self) -> &str {
        "hash"
    }

    fn n_experts(&self) -> usize {
        self.n_experts
    }

    fn d_model(&self) -> Option<usize> {
        self.gate.as_ref().map(|g| g.ncols())
    }

    /// [`HashRouterConfig::is_causal`]: always `true`.
    fn is_causal(&self) -> bool {
        HashRouterConfig::default().is_causal()
    }

    /// `gate` (`[E, d]`) with `weights = gate`; none otherwise. The hash table (`[V]` expert ids, `u32`) is not a
    /// parameter: it is fixed before training and is not f32 (read it with [`HashRouter::table`]).
    fn params(&self) -> Vec<Param<'_>> {
        self.gate
            .iter()
            .map(|g| Param::new("gate", g.view()))
            .collect()
    }

    fn params_mut(&mut self) -> Vec<ParamMut<'_>> {
        self.gate
            .iter_mut()
            .map(|g| ParamMut::new("gate", g.view_mut()))
            .collect()
    }

    fn route(&self, input: &RouterInput<'_>) -> Result<Routing, MoeError> {
        kit::check_input(input, self.d_model(), self.n_experts, self.k)?;
        let ids = input.token_ids.ok_or_else(|| MoeError::MissingInput {
            router: "hash".into(),
            what: "token ids".into(),
        })?;
        let t = input.n_tokens();
        // Tokens are independent; each one's result is computed the same way on any thread count, and the first
        // error in token order is reported.
        let per_token: Vec<Option<TokenChoice>> = (0..t)
            .into_par_iter()
            .map(|i| {
                (!input.is_padding(i)).then(|| {
                    let id = ids.get(i).copied().unwrap_or_default();
                    self.route_token(i, id, input.hidden.row(i))
                })
            })
            .collect();
        let mut kept = Vec::with_capacity(t * self.k);
        let mut real = 0usize;
        for (i, choice) in per_token.into_iter().enumerate() {
            let Some(choice) = choice else { continue };
            real += 1;
            for (rank, (expert, weight)) in choice?.into_iter().enumerate() {
                kept.push(Assignment {
                    token: i as u32,
                    expert,
                    weight,
                    rank: rank as u16,
                });
            }
        }
        Routing::new(t, self.n_experts, real, kept, Vec::new())
    }

    /// The exact derivative of [`Router::route`]. The experts are a function of the token ids: no gradient.
    /// - `weights = gate`: a token's weights are `softmax` over its chosen experts' logits `l_j = x · gate[e_j]`,
    ///   so `dL/dl = softmax_backward(w, dw)` ([`kit::softmax_backward`]) and, through the gate
    ///   ([`kit::gate_backward`]), `dL/dx` and `gate` (`[E, d]`; an expert no token chose has zero rows, and with
    ///   `k = 1` the weight is the constant 1, so everything is 0);
    /// - `weights = uniform`: the weights `1/k` are constants: `dL/dx = 0` and no parameter gradient (the router
    ///   lists no parameter).
    ///
    /// # Errors
    /// [`RouterBackward::validate`]'s errors; the input's errors as in [`Router::route`];
    /// [`MoeError::Mismatch`] for a plan of another `E`.
    fn backward(&self, grad: &RouterBackward<'_, '_>) -> Result<RouterGrads, MoeError> {
        grad.validate()?;
        let (input, routing) = (grad.input, grad.routing);
        kit::check_input(input, self.d_model(), self.n_experts, self.k)?;
        if routing.n_experts() != self.n_experts {
            return Err(MoeError::mismatch(
                "hash backward",
                "plan experts",
                routing.n_experts(),
                "router experts",
                self.n_experts,
            ));
        }
        let Some(gate) = &self.gate else {
            return Ok(RouterGrads {
                d_hidden: Array2::zeros(input.hidden.dim()),
                params: Vec::new(),
            });
        };
        let mut experts = vec![0usize; routing.n_slots()];
        for g in routing.groups() {
            experts[g.slot_start..g.slot_start + g.tokens.len()].fill(g.expert);
        }
        let (offsets, slots) = routing.token_slots();
        let mut d_logits = Array2::<f32>::zeros((input.n_tokens(), self.n_experts));
        let (mut w, mut dw, mut dl) = (Vec::new(), Vec::new(), Vec::new());
        for (t, span) in offsets.windows(2).enumerate() {
            let token_slots = slots.get(span[0]..span[1]).unwrap_or(&[]);
            if token_slots.is_empty() {
                continue;
            }
            let x = input.hidden.row(t);
            // The forward's weights, recomputed: softmax over the chosen experts' logits.
            w.clear();
            w.extend(token_slots.iter().map(|&s| gate.row(experts[s]).dot(&x)));
            kit::softmax_in_place(&mut w);
            dw.clear();
            dw.extend(token_slots.iter().map(|&s| grad.d_weights[s]));
            dl.clear();
            dl.resize(w.len(), 0.0);
            kit::softmax_backward(&w, &dw, &mut dl);
            for (&s, &g) in token_slots.iter().zip(&dl) {
                d_logits[[t, experts[s]]] += g;
            }
        }
        let g = kit::gate_backward(input.hidden, gate.view(), d_logits.view())?;
        Ok(RouterGrads {
            d_hidden: g.d_x,
            params: vec![Grad::dense("gate", g.d_gate)],
        })
    }
}

fn factory(args: &RouterArgs) -> Result<Box<dyn Router>, MoeError> {
    let cfg: HashRouterConfig = args.parse("hash")?;
    Ok(Box::new(cfg.build(
        args.d_model,
        args.n_experts,
        args.seed,
    )?))
}

/// Registers `hash`.
///
/// # Errors
/// [`MoeError::DuplicateRouter`] if the name is taken.
pub fn register(reg: &mut RouterRegistry) -> Result<(), MoeError> {
    reg.register(RouterEntry::new::<HashRouterConfig>(
        "hash",
        "hash of token ids (Roller 2021): random, balanced or modulo table, k-way, uniform or gate weights",
        factory,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn plan(r: &HashRouter, x: &Array2<f32>, ids: &[u32]) -> Vec<Vec<(usize, f32, u16)>> {
        r.route(&RouterInput::new(x.view()).with_token_ids(ids))
            .expect("route")
            .per_token()
    }

    #[test]
    fn modulo_hand_computed() {
        // E = 4: ids [0, 5, 7, 12] -> id mod 4 = [0, 1, 3, 0]. k = 2 adds (h + 1) mod 4 = [1, 2, 0, 1]; weights 1/2.
        let r = HashRouter::modulo(4, 2).expect("router");
        let x = Array2::zeros((4, 3));
        let got = plan(&r, &x, &[0, 5, 7, 12]);
        let experts: Vec<Vec<usize>> = got
            .iter()
            .map(|t| t.iter().map(|a| a.0).collect())
            .collect();
        assert_eq!(
            experts,
            vec![vec![0, 1], vec![1, 2], vec![3, 0], vec![0, 1]]
        );
        assert!(got.iter().flatten().all(|a| a.1 == 0.5));
        // Ranks follow j: (h + 0) has rank 0, (h + 1) rank 1.
        assert_eq!(got[2], vec![(3, 0.5, 0), (0, 0.5, 1)]);
    }

    #[test]
    fn random_table_is_the_seeded_counter_stream() {
        // table[v] = CounterRng(seed, HASH_STREAM).u64_at(v) mod E, by definition; k-way shifts it by j.
        let (e, seed) = (7usize, 42u64);
        let r = HashRouter::random(100, e, 3, seed).expect("router");
        let rng = CounterRng::new(seed, HASH_STREAM);
        let table = r.table().expect("table");
        for v in 0..100u64 {
            assert_eq!(table[v as usize] as u64, rng.u64_at(v) % e as u64);
        }
        let ids = [3u32, 99, 0];
        let got = plan(&r, &Array2::zeros((3, 2)), &ids);
        for (t, &id) in got.iter().zip(&ids) {
            let h = table[id as usize] as usize;
            let want: Vec<usize> = (0..3).map(|j| (h + j) % e).collect();
            assert_eq!(t.iter().map(|a| a.0).collect::<Vec<_>>(), want);
            assert!(t.iter().all(|a| (a.1 - 1.0 / 3.0).abs() < 1e-7));
        }
        // Every expert appears in a table of 100 ids over 7 experts (a sanity check of the spread).
        let mut seen = [false; 7];
        table.iter().for_each(|&x| seen[x as usize] = true);
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn balanced_hand_computed() {
        // counts (id: count) 0:5, 1:1, 2:3, 3:3, 4:0, 5:2 over E = 3; order by count desc, id asc:
        // 0(5), 2(3), 3(3), 5(2), 1(1), 4(0). State (load, ids) per expert, pick the smallest, ties lower expert:
        //   id 0 -> e0: e0 (5,1) e1 (0,0) e2 (0,0)
        //   id 2 -> e1: e1 (3,1)
        //   id 3 -> e2: e2 (3,1)
        //   id 5 -> e1 (tie (3,1) with e2, lower id): e1 (5,2)
        //   id 1 -> e2: e2 (4,2)
        //   id 4 -> e2 (load 4 < 5): e2 (4,3)
        // table = [0, 2, 1, 2, 2, 1]; loads 5, 5, 4.
        let r = HashRouter::balanced(&[5, 1, 3, 3, 0, 2], 3, 1).expect("router");
        assert_eq!(r.table(), Some(&[0u32, 2, 1, 2, 2, 1][..]));
        assert_eq!(r.table_kind(), HashTable::Balanced);
        let got = plan(&r, &Array2::zeros((2, 1)), &[3, 5]);
        assert_eq!(got, vec![vec![(2, 1.0, 0)], vec![(1, 1.0, 0)]]);
    }

    #[test]
    fn zero_count_ids_spread_round_robin() {
        // All counts 0: loads stay 0, so the ids-assigned key spreads ids 0..6 as 0, 1, 2, 0, 1, 2.
        let r = HashRouter::balanced(&[0; 6], 3, 1).expect("router");
        assert_eq!(r.table(), Some(&[0u32, 1, 2, 0, 1, 2][..]));
    }

    #[test]
    fn gate_weights_hand_computed() {
        // E = 3, gate = I, modulo, k = 2: id 1 -> experts 1, 2; x = [0, 1, 0] -> logits l1 = 1, l2 = 0;
        // softmax = [e / (e + 1), 1 / (e + 1)] = [0.7310586, 0.2689414]. d_model becomes 3.
        let r = HashRouter::modulo(3, 2)
            .and_then(|r| r.with_gate(Array2::eye(3)))
            .expect("router");
        assert_eq!(r.d_model(), Some(3));
        let got = plan(&r, &array![[0.0f32, 1.0, 0.0]], &[1]);
        assert_eq!((got[0][0].0, got[0][1].0), (1, 2));
        assert!((got[0][0].1 - 0.731_058_6).abs() < 1e-6);
        assert!((got[0][1].1 - 0.268_941_4).abs() < 1e-6);
    }

    #[test]
    fn missing_ids_and_out_of_vocab_are_typed_errors() {
        let r = HashRouter::random(10, 4, 1, 0).expect("router");
        let x = Array2::zeros((2, 3));
        assert_eq!(
            r.route(&RouterInput::new(x.view())),
            Err(MoeError::MissingInput {
                router: "hash".into(),
                what: "token ids".into()
            })
        );
        match r.route(&RouterInput::new(x.view()).with_token_ids(&[1, 10])) {
            Err(MoeError::InvalidConfig { option, value, .. }) => {
                assert_eq!(option, "token_ids[1]");
                assert_eq!(value, "10");
            }
            other => panic!("expected an out-of-vocabulary error, got {other:?}"),
        }
        // Modulo takes any id.
        let m = HashRouter::modulo(4, 1).expect("router");
        assert!(
            m.route(&RouterInput::new(x.view()).with_token_ids(&[u32::MAX, 7]))
                .is_ok()
        );
    }

    #[test]
    fn config_errors_are_typed() {
        let bad = |c: HashRouterConfig| c.build(8, 4, 0);
        assert!(matches!(
            bad(HashRouterConfig {
                k: Some(5),
                ..Default::default()
            }),
            Err(MoeError::TopK { k: 5, n_experts: 4 })
        ));
        assert!(matches!(
            bad(HashRouterConfig {
                k: Some(0),
                ..Default::default()
            }),
            Err(MoeError::TopK { .. })
        ));
        let balanced = HashRouterConfig {
            table: Some(HashTable::Balanced),
            ..Default::default()
        };
        assert!(matches!(
            bad(balanced.clone()),
            Err(MoeError::InvalidConfig { .. })
        ));
        let mismatch = HashRouterConfig {
            counts: Some(vec![1, 2]),
            vocab: Some(3),
            ..balanced
        };
        assert!(matches!(bad(mismatch), Err(MoeError::InvalidConfig { .. })));
        assert!(matches!(
            bad(HashRouterConfig {
                counts: Some(vec![1]),
                ..Default::default()
            }),
            Err(MoeError::InvalidConfig { .. })
        ));
        let modulo_vocab = HashRouterConfig {
            table: Some(HashTable::Modulo),
            vocab: Some(3),
            ..Default::default()
        };
        assert!(matches!(
            bad(modulo_vocab),
            Err(MoeError::InvalidConfig { .. })
        ));
        assert!(matches!(
            bad(HashRouterConfig {
                vocab: Some(0),
                ..Default::default()
            }),
            Err(MoeError::InvalidConfig { .. })
        ));
        assert!(matches!(
            bad(HashRouterConfig {
                vocab: Some(MAX_VOCAB + 1),
                ..Default::default()
            }),
            Err(MoeError::TooLarge { .. })
        ));
        assert!(matches!(
            HashRouter::from_table(vec![0, 4], 4, 1),
            Err(MoeError::InvalidConfig { .. })
        ));
        assert!(matches!(
            HashRouter::modulo(3, 1).and_then(|r| r.with_gate(Array2::eye(4))),
            Err(MoeError::Shape { .. })
        ));
    }

    #[test]
    fn padding_tokens_are_not_routed() {
        let r = HashRouter::modulo(4, 2).expect("router");
        let x = Array2::zeros((2, 2));
        let p = r
            .route(
                &RouterInput::new(x.view())
                    .with_token_ids(&[1, 2])
                    .with_padding(&[true, false]),
            )
            .expect("route");
        assert_eq!(p.n_slots(), 2);
        assert_eq!(p.n_real_tokens(), 1);
        assert!(p.per_token()[0].is_empty());
    }

    #[test]
    fn registry_options() {
        let mut reg = RouterRegistry::new();
        register(&mut reg).expect("register");
        let args = RouterArgs::new(8, 3, 2, 0)
            .with_option("counts", serde_json::json!([5, 1, 3, 3, 0, 2]));
        let args = args.with_option("table", "balanced");
        let r = reg.create("hash", &args).expect("create");
        let x = Array2::zeros((1, 8));
        let p = r
            .route(&RouterInput::new(x.view()).with_token_ids(&[1]))
            .expect("route");
        // Table from balanced_hand_computed: id 1 -> expert 2; k defaults to 1, not the layer's 2.
        assert_eq!(p.per_token(), vec![vec![(2, 1.0, 0)]]);
        let typo = RouterArgs::new(8, 3, 2, 0).with_option("tabel", "modulo");
        assert!(matches!(
            reg.create("hash", &typo),
            Err(MoeError::InvalidConfig { .. })
        ));
        let gate = RouterArgs::new(8, 3, 2, 0)
            .with_option("weights", "gate")
            .with_option("k", 2);
        assert_eq!(
            reg.create("hash", &gate).expect("create").d_model(),
            Some(8)
        );
    }
}
