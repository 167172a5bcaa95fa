//! The router conformance suite (feature `testing`): checks any [`Router`] against the contract, so plugin authors
//! test their router the same way the built-ins are tested. [`check_router`] checks one router instance,
//! [`check_registered`] a registry entry over every combination of its finite-valued options.
//! [`check_router_grad`] and [`check_layer_grad`] check a backward against central finite differences (method and
//! tolerance in their module docs).

mod banks;
mod grad;

pub use banks::{BANK_KINDS, random_bank};
pub use grad::{ATOL, GradReport, RTOL, check_layer_grad, check_router_grad};

use ndarray::Array2;

use crate::error::MoeError;
use crate::registry::{RouterArgs, RouterRegistry};
use crate::rng::SeqRng;
use crate::router::{Mode, Router, RouterInput};
use crate::routing::Routing;

/// Tokens of the suite's input.
const T: usize = 64;

/// Runs the conformance checks on `router` with hidden width `d` and returns the first failure as text:
/// - every assignment names a real token and expert, with a finite weight `>= 0` (checked by [`Routing::new`]);
/// - the same input and seed give the identical plan, in eval and in train mode;
/// - `T = 0` gives an empty plan;
/// - a NaN in the input gives [`MoeError::NonFinite`] naming the token;
/// - a wrong width gives [`MoeError::Shape`] (when the router has a fixed width);
/// - padding ([`check_padding`]): padding tokens get no assignment, kept or dropped, and are left out of
///   [`Routing::n_real_tokens`];
/// - causality ([`check_causal`]), when [`Router::is_causal`] says so.
///
/// Token ids `0..T` are supplied so that hash-style routers can be checked too.
///
/// # Errors
/// A description of the first violated property.
pub fn check_router(router: &dyn Router, d: usize) -> Result<(), String> {
    let name = router.name();
    let x = suite_input(d, 0);
    let ids: Vec<u32> = (0..T as u32).collect();
    for mode in [Mode::Eval, Mode::Train { seed: 3 }] {
        let input = RouterInput::new(x.view())
            .with_token_ids(&ids)
            .with_mode(mode);
        let a = router
            .route(&input)
            .map_err(|e| format!("{name}: route failed: {e}"))?;
        let b = router
            .route(&input)
            .map_err(|e| format!("{name}: second route failed: {e}"))?;
        if a != b {
            return Err(format!(
                "{name}: the same input and mode {mode:?} gave different plans"
            ));
        }
        if a.n_tokens() != T || a.n_experts() != router.n_experts() {
            return Err(format!(
                "{name}: plan has T = {}, E = {}",
                a.n_tokens(),
                a.n_experts()
            ));
        }
    }
    let empty = Array2::<f32>::zeros((0, d));
    let r = router
        .route(&RouterInput::new(empty.view()).with_token_ids(&[]))
        .map_err(|e| format!("{name}: T = 0 failed: {e}"))?;
    if r.n_slots() != 0 {
        return Err(format!("{name}: T = 0 gave {} assignments", r.n_slots()));
    }
    let mut bad = x.clone();
    bad[[5, 0]] = f32::NAN;
    match router.route(&RouterInput::new(bad.view()).with_token_ids(&ids)) {
        Err(MoeError::NonFinite { token: 5, .. }) => {}
        other => return Err(format!("{name}: NaN at token 5 gave {other:?}")),
    }
    if router.d_model().is_some() {
        let wrong = Array2::<f32>::zeros((4, d + 1));
        match router.route(&RouterInput::new(wrong.view()).with_token_ids(&ids[..4])) {
            Err(MoeError::Shape { .. }) => {}
            other => return Err(format!("{name}: wrong width gave {other:?}")),
        }
    }
    check_padding(router, d)?;
    if router.is_causal() {
        check_causal(router, d)?;
    }
    Ok(())
}

/// The suite's hidden states `[T, d]`, `N(0, 1)`, from stream `stream`.
fn suite_input(d: usize, stream: u64) -> Array2<f32> {
    SeqRng::new(0xC0FFEE, stream).normal_matrix(T, d, 1.0)
}

/// Checks padding on the suite's input, in eval and train mode: with every third token and the last two marked as
/// padding, no assignment (kept or dropped) names a padding token and [`Routing::n_real_tokens`] counts the others;
/// with every token padding, the plan is empty and counts no real token.
///
/// # Errors
/// A description of the first violation, naming the token.
pub fn check_padding(router: &dyn Router, d: usize) -> Result<(), String> {
    let name = router.name();
    let x = suite_input(d, 0);
    let ids: Vec<u32> = (0..T as u32).collect();
    let some: Vec<bool> = (0..T).map(|t| t % 3 == 1 || t + 2 >= T).collect();
    let all = vec![true; T];
    for padding in [&some, &all] {
        let n_real = padding.iter().filter(|&&p| !p).count();
        for mode in [Mode::Eval, Mode::Train { seed: 5 }] {
            let input = RouterInput::new(x.view())
                .with_token_ids(&ids)
                .with_padding(padding)
                .with_mode(mode);
            let plan = router
                .route(&input)
                .map_err(|e| format!("{name}: route with padding failed: {e}"))?;
            let on_padding = plan
                .slot_tokens()
                .iter()
                .copied()
                .chain(plan.dropped().iter().map(|a| a.token))
                .find(|&t| padding.get(t as usize).copied().unwrap_or(false));
            if let Some(t) = on_padding {
                return Err(format!(
                    "{name}: padding token {t} got an assignment ({mode:?}, {n_real} real tokens)"
                ));
            }
            if plan.n_real_tokens() != n_real {
                return Err(format!(
                    "{name}: n_real_tokens = {} with {n_real} non-padding tokens ({mode:?})",
                    plan.n_real_tokens()
                ));
            }
        }
    }
    Ok(())
}

/// Checks the causality a router claims, on the suite's input in eval and train mode: for several split points
/// `p`, replacing the hidden states and token ids of tokens `p..T` by others must leave the assignments (kept and
/// dropped: expert, weight bits, rank) of tokens `0..p` unchanged.
///
/// The token count stays the same, so a capacity computed from `T` (`ceil(T / E · cf)`) with first-come drops
/// passes, as it should: it never lets a later token displace an earlier one. Routing a prefix alone would
/// change such a capacity, so it is not the property checked.
///
/// # Errors
/// A description of the first split point where a later token changed an earlier token's routing.
pub fn check_causal(router: &dyn Router, d: usize) -> Result<(), String> {
    let name = router.name();
    let x = suite_input(d, 0);
    let other = suite_input(d, 1);
    let ids: Vec<u32> = (0..T as u32).collect();
    for p in [1, T / 4, T / 2, T - 1] {
        let mut y = x.clone();
        y.slice_mut(ndarray::s![p.., ..])
            .assign(&other.slice(ndarray::s![p.., ..]));
        // Later ids are reversed, so they stay below T (a vocabulary of T ids is enough).
        let y_ids: Vec<u32> = (0..T as u32)
            .map(|t| {
                if (t as usize) < p {
                    t
                } else {
                    T as u32 - 1 - t + p as u32
                }
            })
            .collect();
        for mode in [Mode::Eval, Mode::Train { seed: 7 }] {
            let route = |h: &Array2<f32>, ids: &[u32]| {
                router
                    .route(
                        &RouterInput::new(h.view())
                            .with_token_ids(ids)
                            .with_mode(mode),
                    )
                    .map(|r| decisions_before(&r, p))
                    .map_err(|e| format!("{name}: route failed in the causality check: {e}"))
            };
            let (a, b) = (route(&x, &ids)?, route(&y, &y_ids)?);
            if a != b {
                let first = a
                    .iter()
                    .zip(&b)
                    .find(|(u, v)| u != v)
                    .map_or_else(|| "a token".to_string(), |(u, _)| format!("token {}", u.0));
                return Err(format!(
                    "{name} claims to be causal, but changing tokens {p}.. changed the routing of {first} \
                     ({mode:?})"
                ));
            }
        }
    }
    Ok(())
}

/// The decisions about tokens `0..p`: `(token, expert, weight bits, rank, kept)`, sorted.
fn decisions_before(r: &Routing, p: usize) -> Vec<(u32, u32, u32, u16, bool)> {
    let mut out: Vec<(u32, u32, u32, u16, bool)> = Vec::new();
    for g in r.groups() {
        for (j, (&t, &w)) in g.tokens.iter().zip(g.weights).enumerate() {
            if (t as usize) < p {
                let rank = r.slot_ranks().get(g.slot_start + j).copied().unwrap_or(0);
                out.push((t, g.expert as u32, w.to_bits(), rank, true));
            }
        }
    }
    for a in r.dropped() {
        if (a.token as usize) < p {
            out.push((a.token, a.expert, a.weight.to_bits(), a.rank, false));
        }
    }
    out.sort_unstable();
    out
}

/// What [`check_registered`] covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridCheck {
    /// Option combinations enumerated.
    pub combinations: usize,
    /// Combinations the factory built (and that were checked); the others were refused with a typed error.
    pub built: usize,
    /// Built routers that say they are causal.
    pub causal: usize,
}

/// Checks registry entry `name` over every combination of its finite-valued options (enums and booleans, each
/// also unset) that `args` does not set ([`RouterEntry::option_grid`](crate::registry::RouterEntry::option_grid)):
/// for each combination the factory accepts, the entry's causality equals the built router's
/// [`Router::is_causal`], and the router passes [`check_router`] (padding, and causality where claimed,
/// included). Combinations the factory refuses with [`MoeError::InvalidConfig`] or [`MoeError::TopK`] are
/// skipped; `args` can set the options such combinations need (for example a capacity that one value requires).
///
/// # Errors
/// A description of the first disagreement or failure, naming the options; also when no combination builds.
pub fn check_registered(
    registry: &RouterRegistry,
    name: &str,
    args: &RouterArgs,
) -> Result<GridCheck, String> {
    let entry = registry
        .get(name)
        .ok_or_else(|| format!("{name} is not registered"))?;
    let grid = entry
        .option_grid(args)
        .map_err(|e| format!("{name}: {e}"))?;
    let mut check = GridCheck {
        combinations: grid.len(),
        built: 0,
        causal: 0,
    };
    for a in &grid {
        let opts = serde_json::Value::Object(a.options.clone());
        let router = match registry.create(name, a) {
            Ok(r) => r,
            Err(MoeError::InvalidConfig { .. } | MoeError::TopK { .. }) => continue,
            Err(e) => return Err(format!("{name} {opts}: {e}")),
        };
        let listed = entry
            .is_causal(a)
            .map_err(|e| format!("{name} {opts}: the registry cannot answer causality: {e}"))?;
        if listed != router.is_causal() {
            return Err(format!(
                "{name} {opts}: the registry says causal = {listed}, the router says {}",
                router.is_causal()
            ));
        }
        check_router(router.as_ref(), a.d_model).map_err(|e| format!("{opts}: {e}"))?;
        check.built += 1;
        check.causal += usize::from(listed);
    }
    if check.built == 0 {
        return Err(format!(
            "{name}: none of the {} option combinations built",
            check.combinations
        ));
    }
    Ok(check)
}

/// What [`check_options_take_effect`] went through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionAudit {
    /// Option combinations enumerated.
    pub combinations: usize,
    /// Combinations the factory accepted.
    pub built: usize,
    /// (option, combination of the others) lines on which at least two values built and were compared.
    pub compared: usize,
}

/// A plan's observable result as text: each token's (expert, weight, rank), the dropped assignments and the
/// auxiliary losses with their coefficients. Two plans with equal fingerprints route identically.
pub fn routing_fingerprint(r: &crate::routing::Routing) -> String {
    let mut dropped: Vec<(u32, u32)> = r.dropped().iter().map(|a| (a.token, a.expert)).collect();
    dropped.sort_unstable();
    format!("{:?} / {dropped:?} / {:?}", r.per_token(), r.aux_losses())
}

/// The option audit of registry entry `name` ("no silently ignored option"): over every combination of its
/// finite-valued options ([`RouterEntry::option_axes`](crate::registry::RouterEntry::option_axes), each also unset)
/// and of the `numeric` values given (each also unset), not counting the options `args` sets or `exempt` names,
/// each combination is built and observed with `observe` (which routes the inputs the caller chose and returns
/// their [`routing_fingerprint`]s, plus whatever else the options may change, such as the parameter names). Then
/// for each option and each combination of the others: when two or more of its values build (its explicit values;
/// for a numeric option also unset, the default), they must not all be observed the same, or the option is silently
/// ignored there and that combination should be refused. Refusals must be [`MoeError::InvalidConfig`] or
/// [`MoeError::TopK`]; `numeric` values should differ from their defaults.
///
/// # Errors
/// A description of the first option found ignored (naming the option, its values and the other options), of an
/// unexpected error, or of a grid over [`MAX_OPTION_GRID`](crate::registry::MAX_OPTION_GRID) combinations.
pub fn check_options_take_effect(
    registry: &RouterRegistry,
    name: &str,
    args: &RouterArgs,
    numeric: &[(&'static str, Vec<serde_json::Value>)],
    exempt: &[&str],
    observe: &dyn Fn(&dyn Router) -> Result<String, MoeError>,
) -> Result<OptionAudit, String> {
    let entry = registry
        .get(name)
        .ok_or_else(|| format!("{name} is not registered"))?;
    let mut axes: Vec<(&'static str, Vec<serde_json::Value>, bool)> = entry
        .option_axes(args)
        .into_iter()
        .map(|(n, v)| (n, v, false))
        .collect();
    axes.extend(
        numeric
            .iter()
            .filter(|(n, _)| !args.options.contains_key(*n))
            .map(|(n, v)| (*n, v.clone(), true)),
    );
    axes.retain(|(n, ..)| !exempt.contains(n));
    let size = axes
        .iter()
        .try_fold(1usize, |n, (_, v, _)| n.checked_mul(v.len() + 1))
        .filter(|&n| n <= crate::registry::MAX_OPTION_GRID)
        .ok_or_else(|| format!("{name}: the option grid is too large"))?;
    let combo = |mut i: usize| {
        let mut a = args.clone();
        for (n, values, _) in &axes {
            let digit = i % (values.len() + 1);
            i /= values.len() + 1;
            if let Some(v) = digit.checked_sub(1).and_then(|j| values.get(j)) {
                a.options.insert((*n).to_string(), v.clone());
            }
        }
        a
    };
    let mut seen: Vec<Option<String>> = Vec::with_capacity(size);
    for i in 0..size {
        let a = combo(i);
        let opts = serde_json::Value::Object(a.options.clone());
        seen.push(match registry.create(name, &a) {
            Ok(r) => Some(
                observe(r.as_ref()).map_err(|e| format!("{name} {opts}: built but failed: {e}"))?,
            ),
            Err(MoeError::InvalidConfig { .. } | MoeError::TopK { .. }) => None,
            Err(e) => return Err(format!("{name} {opts}: {e}")),
        });
    }
    let mut audit = OptionAudit {
        combinations: size,
        built: seen.iter().flatten().count(),
        compared: 0,
    };
    let mut stride = 1usize;
    for (n, values, numeric) in &axes {
        let radix = values.len() + 1;
        for i in (0..size).filter(|i| (i / stride).is_multiple_of(radix)) {
            let first = usize::from(!*numeric);
            let built: Vec<(usize, &String)> = (first..radix)
                .filter_map(|d| seen.get(i + d * stride)?.as_ref().map(|f| (d, f)))
                .collect();
            if built.len() < 2 {
                continue;
            }
            audit.compared += 1;
            if built.iter().all(|(_, f)| *f == built[0].1) {
                let shown: Vec<String> = built
                    .iter()
                    .map(|(d, _)| {
                        d.checked_sub(1)
                            .and_then(|j| values.get(j))
                            .map_or("unset".into(), |v| v.to_string())
                    })
                    .collect();
                let others = serde_json::Value::Object(combo(i).options);
                return Err(format!(
                    "{name}: option {n} is ignored with {others}: values {} all route the same and none is refused",
                    shown.join(", ")
                ));
            }
        }
        stride *= radix;
    }
    Ok(audit)
}

/// A router that returns the same plan for every input (of the right width): lets a backend test control exactly
/// which experts get which tokens, including experts with none. Its weights do not depend on the input, so its
/// backward is exact and trivial (`d_hidden = 0`, no parameters): layer gradient checks of the experts use it. It has no [`RouterSpec`](crate::router::RouterSpec),
/// so backends run it on the host path.
#[derive(Clone, Debug)]
pub struct FixedPlan {
    /// Experts `E`.
    pub n_experts: usize,
    /// Hidden width `d`.
    pub d_model: usize,
    /// The kept assignments returned for every input (tokens must be below the input's `T`).
    pub kept: Vec<crate::routing::Assignment>,
}

impl Router for FixedPlan {
    fn name(&self) -> &str {
        "fixed-plan"
    }
    fn n_experts(&self) -> usize {
        self.n_experts
    }
    fn d_model(&self) -> Option<usize> {
        Some(self.d_model)
    }
    fn route(&self, input: &RouterInput<'_>) -> Result<crate::routing::Routing, MoeError> {
        input.validate(Some(self.d_model))?;
        crate::routing::Routing::new(
            input.n_tokens(),
            self.n_experts,
            input.n_tokens(),
            self.kept.clone(),
            Vec::new(),
        )
    }
    fn backward(
        &self,
        grad: &crate::grad::RouterBackward<'_, '_>,
    ) -> Result<crate::grad::RouterGrads, MoeError> {
        grad.validate()?;
        Ok(crate::grad::RouterGrads {
            d_hidden: Array2::zeros(grad.input.hidden.dim()),
            params: Vec::new(),
        })
    }
}

/// For tests of a device backend: the opened backend `name`, or `None` after printing why it cannot run here.
/// When the environment variable `MOE_REQUIRE_GPU` equals `name`, a backend that cannot run fails the test
/// instead (CI sets it where the device is expected, so a missing one is not a silent skip).
///
/// # Panics
/// When `MOE_REQUIRE_GPU` names this backend and `opened` is an error.
pub fn backend_or_skip<B: Clone>(name: &str, opened: &Result<B, String>) -> Option<B> {
    match opened {
        Ok(b) => Some(b.clone()),
        Err(why) => {
            if std::env::var("MOE_REQUIRE_GPU").is_ok_and(|v| v == name) {
                panic!("MOE_REQUIRE_GPU={name} but the {name} backend is unavailable: {why}");
            }
            eprintln!("skipping: {name} backend unavailable: {why}");
            None
        }
    }
}
