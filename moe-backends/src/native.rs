//! What the device backends share: checking a forward's input and routing it on the host when the router has no
//! device spec, which top-k specs a device runs exactly as the host does, the row and tile offsets of a host plan,
//! and the plan of a natively routed forward, rebuilt on the host from the compact per-token results the routing
//! kernels write (expert ids, weights, choice ranks with a drop flag).

use moe_core::{
    Assignment, MoeError, MoeLayer, RouterInput, Routing, ScoreFn, TopKOrder, TopKSpec,
};

/// Expert id of an empty choice (a padding token's).
pub(crate) const NONE: u32 = u32::MAX;
/// Flag in a choice's info word: capacity dropped it.
pub(crate) const DROPPED: u32 = 0x1_0000;

/// The plan of the native routers from the read-back per-token results, with the read-back logits `[T, E]`
/// attached (checked finite) when the device kept them.
pub(crate) fn native_routing(
    t: usize,
    e: usize,
    k: usize,
    input: &RouterInput<'_>,
    experts: &[u32],
    weights: &[f32],
    info: &[u32],
    logits: Option<Vec<f32>>,
) -> Result<Routing, MoeError> {
    if experts.len() != t * k || weights.len() != t * k || info.len() != t * k {
        return Err(MoeError::Backend {
            backend: "device".into(),
            reason: "routing read-back has the wrong length".into(),
        });
    }
    let mut kept = Vec::with_capacity(t * k);
    let mut dropped = Vec::new();
    let mut real = 0usize;
    for tok in 0..t {
        if input.is_padding(tok) {
            continue;
        }
        real += 1;
        for p in tok * k..(tok + 1) * k {
            if experts[p] == NONE {
                continue;
            }
            let a = Assignment {
                token: tok as u32,
                expert: experts[p],
                weight: weights[p],
                rank: (info[p] & 0xffff) as u16,
            };
            if info[p] & DROPPED != 0 {
                dropped.push(a);
            } else {
                kept.push(a);
            }
        }
    }
    let mut routing = Routing::new(t, e, real, kept, dropped)?;
    if let Some(l) = logits {
        let l = ndarray::Array2::from_shape_vec((t, e), l).map_err(|err| MoeError::Backend {
            backend: "device".into(),
            reason: format!("logits read-back: {err}"),
        })?;
        moe_core::check_finite("router logits", l.view())?;
        routing.set_logits(l);
    }
    Ok(routing)
}

/// Checks `input`'s width against `layer`; on the host path (`native` false) routes it with the layer's router
/// and checks the plan's size, returning it.
///
/// # Errors
/// A wrong width, the router's own errors (NaN naming the token, bad padding), a plan of the wrong size; on the
/// native path the input checks of [`RouterInput::validate`].
pub(crate) fn check_or_route(
    layer: &MoeLayer,
    input: &RouterInput<'_>,
    native: bool,
) -> Result<Option<Routing>, MoeError> {
    if !native {
        return layer.route(input).map(Some);
    }
    layer.check_width(input)?;
    input.validate(Some(layer.d_model()))?;
    Ok(None)
}

/// Whether the device top-k kernels (which take `k ≤ max_k`) run `s` exactly as the host router does, for a layer
/// of `e` experts and width `d`.
pub(crate) fn topk_supported(s: &TopKSpec, e: usize, d: usize, max_k: usize) -> bool {
    let groups_ok = s.groups.is_none_or(|g| {
        g.n_group > 0
            && e.is_multiple_of(g.n_group)
            && g.topk_group >= 1
            && g.topk_group <= g.n_group
            && g.topk_group * (e / g.n_group) >= s.k
    });
    s.gate.dim() == (e, d)
        && s.k >= 1
        && s.k <= e.min(max_k)
        && s.gate_bias.as_ref().is_none_or(|b| b.len() == e)
        && s.correction_bias.as_ref().is_none_or(|b| b.len() == e)
        && s.scaling.is_finite()
        && groups_ok
        && !(s.order == TopKOrder::TopKThenSoftmax && s.score != ScoreFn::Softmax)
        && e <= u32::MAX as usize / 2
}

/// The row offsets (`[0..=E]`) and the offsets of row tiles of `bm` rows (`[E+1..=2E+1]`) of a plan's slots, in
/// the layout the grouped-product kernels read.
///
/// # Errors
/// [`MoeError::TooLarge`] when the slots or tiles do not fit in `u32`.
pub(crate) fn row_meta(routing: &Routing, bm: usize) -> Result<Vec<u32>, MoeError> {
    let e = routing.n_experts();
    let mut meta = vec![0u32; 2 * (e + 1)];
    let too_large = |v: usize| MoeError::TooLarge {
        what: "assignments of one device forward".into(),
        size: v as u128,
        limit: u32::MAX as u128,
    };
    let (mut rows, mut tiles) = (0usize, 0usize);
    for (i, &c) in routing.expert_counts().iter().enumerate() {
        rows += c;
        tiles += c.div_ceil(bm);
        meta[i + 1] = u32::try_from(rows).map_err(|_| too_large(rows))?;
        meta[e + 2 + i] = u32::try_from(tiles).map_err(|_| too_large(rows))?;
    }
    Ok(meta)
}
