//! The router conformance suite (feature `testing`): checks any [`Router`] against the contract, so plugin authors
//! test their router the same way the built-ins are tested.

use ndarray::Array2;

use crate::error::MoeError;
use crate::rng::SeqRng;
use crate::router::{Mode, Router, RouterInput};

/// Runs the conformance checks on `router` with hidden width `d` and returns the first failure as text:
/// - every assignment names a real token and expert, with a finite weight `>= 0` (checked by [`Routing::new`](crate::routing::Routing::new));
/// - the same input and seed give the identical plan, in eval and in train mode;
/// - `T = 0` gives an empty plan;
/// - a NaN in the input gives [`MoeError::NonFinite`] naming the token;
/// - a wrong width gives [`MoeError::Shape`] (when the router has a fixed width).
///
/// Token ids `0..T` are supplied so that hash-style routers can be checked too.
///
/// # Errors
/// A description of the first violated property.
pub fn check_router(router: &dyn Router, d: usize) -> Result<(), String> {
    let t = 64usize;
    let mut rng = SeqRng::new(0xC0FFEE, 0);
    let x: Array2<f32> = rng.normal_matrix(t, d, 1.0);
    let ids: Vec<u32> = (0..t as u32).collect();
    for mode in [Mode::Eval, Mode::Train { seed: 3 }] {
        let input = RouterInput::new(x.view())
            .with_token_ids(&ids)
            .with_mode(mode);
        let a = router
            .route(&input)
            .map_err(|e| format!("{}: route failed: {e}", router.name()))?;
        let b = router
            .route(&input)
            .map_err(|e| format!("{}: second route failed: {e}", router.name()))?;
        if a != b {
            return Err(format!(
                "{}: the same input and mode {mode:?} gave different plans",
                router.name()
            ));
        }
        if a.n_tokens() != t || a.n_experts() != router.n_experts() {
            return Err(format!(
                "{}: plan has T = {}, E = {}",
                router.name(),
                a.n_tokens(),
                a.n_experts()
            ));
        }
    }
    let empty = Array2::<f32>::zeros((0, d));
    let r = router
        .route(&RouterInput::new(empty.view()).with_token_ids(&[]))
        .map_err(|e| format!("{}: T = 0 failed: {e}", router.name()))?;
    if r.n_slots() != 0 {
        return Err(format!(
            "{}: T = 0 gave {} assignments",
            router.name(),
            r.n_slots()
        ));
    }
    let mut bad = x.clone();
    bad[[5, 0]] = f32::NAN;
    match router.route(&RouterInput::new(bad.view()).with_token_ids(&ids)) {
        Err(MoeError::NonFinite { token: 5, .. }) => {}
        other => return Err(format!("{}: NaN at token 5 gave {other:?}", router.name())),
    }
    if router.d_model().is_some() {
        let wrong = Array2::<f32>::zeros((4, d + 1));
        match router.route(&RouterInput::new(wrong.view()).with_token_ids(&ids[..4])) {
            Err(MoeError::Shape { .. }) => {}
            other => return Err(format!("{}: wrong width gave {other:?}", router.name())),
        }
    }
    Ok(())
}

/// A router that returns the same plan for every input (of the right width): lets a backend test control exactly
/// which experts get which tokens, including experts with none. It has no [`RouterSpec`](crate::router::RouterSpec),
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
