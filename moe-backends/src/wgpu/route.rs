//! Routing on the device: which router specs run natively ([`Route`], chosen at upload or by `set_router`) and
//! the launches of one natively routed forward: the gate projection, then top-k (`route_topk`) or Switch top-1
//! with its capacity (`route_switch`, `switch_capacity`), writing each token's choices.

use ::wgpu as wg;
use ndarray::Array1;

use moe_core::{
    DropPolicy, MoeError, Router, RouterInput, RouterPath, RouterSpec, ScoreFn, SwitchSpec,
    TopKOrder, TopKSpec,
};

use super::MAX_NATIVE_K;
use super::device::{Ctx, bytes_of};
use super::execute::Encoder;
use super::gate::gate_projection;
use super::params::{SwitchParams, TopKParams};
use super::sort::Rows;
use crate::native::topk_supported;

/// How a layer routes on this backend: the router's device state.
#[derive(Debug)]
pub(super) enum Route {
    /// `router.route` on the host.
    Host,
    /// A native top-k spec.
    TopK {
        spec: TopKSpec,
        gate: wg::Buffer,
        gate_bias: Option<wg::Buffer>,
        corr: Option<wg::Buffer>,
    },
    /// A native Switch spec.
    Switch { spec: SwitchSpec, gate: wg::Buffer },
}

impl Route {
    /// The route of `router` for a layer of `e` experts and width `d`, its gate and biases uploaded.
    ///
    /// # Errors
    /// A device error while uploading the router's parameters.
    pub fn new(ctx: &Ctx, router: &dyn Router, e: usize, d: usize) -> Result<Self, MoeError> {
        let vec_buf = |name: &str, v: Option<&Array1<f32>>| {
            v.map(|v| ctx.storage_init(name, bytes_of(&v.to_vec())))
                .transpose()
        };
        let values = |a: &ndarray::Array2<f32>| a.iter().copied().collect::<Vec<f32>>();
        Ok(match router.spec() {
            Some(RouterSpec::TopK(s)) if topk_supported(&s, e, d, MAX_NATIVE_K) => Route::TopK {
                gate: ctx.storage_init("gate.weight", bytes_of(&values(&s.gate)))?,
                gate_bias: vec_buf("gate.bias", s.gate_bias.as_ref())?,
                corr: vec_buf("e_score_correction_bias", s.correction_bias.as_ref())?,
                spec: s,
            },
            Some(RouterSpec::Switch(s))
                if s.drop != DropPolicy::Random && s.gate.dim() == (e, d) =>
            {
                Route::Switch {
                    gate: ctx
                        .storage_init("router.classifier.weight", bytes_of(&values(&s.gate)))?,
                    spec: s,
                }
            }
            _ => Route::Host,
        })
    }

    /// Where the routing runs.
    pub fn path(&self) -> RouterPath {
        match self {
            Route::Host => RouterPath::Host,
            _ => RouterPath::Native,
        }
    }

    /// Choices per token on the native path (0 on the host path).
    pub fn k(&self) -> usize {
        match self {
            Route::TopK { spec, .. } => spec.k,
            Route::Switch { .. } => 1,
            Route::Host => 0,
        }
    }
}

/// The per-token results of the routing kernels (`T · k` each, token-major, ascending expert order per token),
/// and the router logits `[T, E]`.
pub(super) struct Choices {
    pub t: usize,
    pub k: usize,
    pub logits: wg::Buffer,
    /// Expert id, [`crate::native::NONE`] for a padding token.
    pub expert: wg::Buffer,
    pub weight: wg::Buffer,
    /// Choice rank, plus [`crate::native::DROPPED`].
    pub info: wg::Buffer,
}

/// Enqueues the native routing of `input` (`x`: its rows on the device, `all_rows`: one group of every token).
///
/// # Errors
/// A workspace over the binding limit; [`MoeError::Backend`] on the host route (a caller's bug).
pub(super) fn route_native(
    enc: &mut Encoder<'_>,
    route: &Route,
    input: &RouterInput<'_>,
    x: &wg::Buffer,
    all_rows: &Rows,
    e: usize,
) -> Result<Choices, MoeError> {
    let (t, d) = input.hidden.dim();
    let k = route.k();
    let n_assign = t * k;
    let logits = enc.storage("router_logits", (t * e * 4) as u64)?;
    let pad: Vec<u32> = (0..t).map(|i| u32::from(input.is_padding(i))).collect();
    let pad = enc.upload("padding", bytes_of(&pad))?;
    let c = Choices {
        t,
        k,
        logits,
        expert: enc.storage("a_expert", (n_assign * 4) as u64)?,
        weight: enc.storage("a_weight", (n_assign * 4) as u64)?,
        info: enc.storage("a_info", (n_assign * 4) as u64)?,
    };
    match route {
        Route::TopK {
            spec,
            gate,
            gate_bias,
            corr,
        } => {
            gate_projection(enc, x, all_rows, gate, gate_bias.as_ref(), &c.logits, e, d);
            topk(enc, spec, corr.as_ref(), &pad, &c, e)?;
        }
        Route::Switch { spec, gate } => {
            gate_projection(enc, x, all_rows, gate, None, &c.logits, e, d);
            switch(enc, spec, input, &pad, &c, e)?;
        }
        Route::Host => {
            return Err(super::device::err(
                "internal: native routing of a host route",
            ));
        }
    }
    Ok(c)
}

/// Enqueues `route_topk` over the logits.
fn topk(
    enc: &mut Encoder<'_>,
    spec: &TopKSpec,
    corr: Option<&wg::Buffer>,
    pad: &wg::Buffer,
    c: &Choices,
    e: usize,
) -> Result<(), MoeError> {
    let ng = spec.groups.map_or(0, |g| g.n_group);
    // Two f32 per (token, group): the group's score and its tie-break key.
    let gscore = enc.storage("group_scores", (c.t * ng.max(1) * 2 * 4) as u64)?;
    let params = TopKParams {
        t: c.t as u32,
        e: e as u32,
        k: c.k as u32,
        score: match spec.score {
            ScoreFn::Softmax => 0,
            ScoreFn::Sigmoid => 1,
            ScoreFn::SqrtSoftplus => 2,
        },
        order: u32::from(spec.order == TopKOrder::TopKThenSoftmax),
        renormalize: u32::from(spec.renormalize),
        scaling: spec.scaling,
        n_group: ng as u32,
        topk_group: spec.groups.map_or(0, |g| g.topk_group as u32),
        has_corr: u32::from(corr.is_some()),
    };
    let (rx, ry) = enc.grid((c.t as u32).div_ceil(64));
    let bufs = vec![
        (1, c.logits.clone()),
        (2, corr.unwrap_or(&enc.dummy).clone()),
        (3, pad.clone()),
        (4, c.expert.clone()),
        (5, c.weight.clone()),
        (6, c.info.clone()),
        (7, gscore),
    ];
    let p = enc.pipes();
    enc.push(&p.route_topk, &params, bufs, (rx, ry, 1));
    Ok(())
}

/// Enqueues `route_switch` and `switch_capacity` (capacity groups: each sequence, or the whole batch).
fn switch(
    enc: &mut Encoder<'_>,
    spec: &SwitchSpec,
    input: &RouterInput<'_>,
    pad: &wg::Buffer,
    c: &Choices,
    e: usize,
) -> Result<(), MoeError> {
    let t = c.t;
    let mut groups = vec![0u32; 2 * t];
    if spec.per_sequence {
        let mut start = 0usize;
        for len in input.sequences() {
            for i in start..start + len {
                groups[2 * i] = start as u32;
                groups[2 * i + 1] = (start + len) as u32;
            }
            start += len;
        }
    } else {
        for i in 0..t {
            groups[2 * i + 1] = t as u32;
        }
    }
    let groups = enc.upload("capacity_groups", bytes_of(&groups))?;
    let params = SwitchParams {
        t: t as u32,
        e: e as u32,
        capacity: spec.capacity.min(u32::MAX as usize) as u32,
        drop_by_weight: u32::from(spec.drop != DropPolicy::Position),
    };
    let (rx, ry) = enc.grid((t as u32).div_ceil(64));
    let p = enc.pipes();
    let choices = || {
        vec![
            (4, c.expert.clone()),
            (5, c.weight.clone()),
            (6, c.info.clone()),
        ]
    };
    let mut bufs = vec![(1, c.logits.clone()), (3, pad.clone())];
    bufs.extend(choices());
    enc.push(&p.route_switch, &params, bufs, (rx, ry, 1));
    // switch_capacity reads the logits too: equal f32 probabilities are ordered by the exact ones.
    let mut bufs = choices();
    bufs.push((1, c.logits.clone()));
    bufs.push((8, groups));
    enc.push(&p.switch_capacity, &params, bufs, (rx, ry, 1));
    Ok(())
}
