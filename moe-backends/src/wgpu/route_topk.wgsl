// route_topk: token-choice top-k per token (softmax / sigmoid / sqrt-softplus scores, both orders,
// renormalisation, scaling, group-limited selection, correction bias), one invocation per token.

struct TopKParams {
    // Tokens T, experts E, choices per token k.
    t: u32,
    e: u32,
    k: u32,
    // 0 softmax, 1 sigmoid, 2 sqrt-softplus.
    score: u32,
    // 0 score then top-k, 1 top-k of the logits then softmax.
    order: u32,
    renormalize: u32,
    scaling: f32,
    // Groups of group-limited selection (0: none) and how many of them are kept.
    n_group: u32,
    topk_group: u32,
    // 1: add r_corr to the selection values.
    has_corr: u32,
};
@group(0) @binding(0) var<uniform> P: TopKParams;

@group(0) @binding(2) var<storage, read> r_corr: array<f32>;
@group(0) @binding(7) var<storage, read_write> r_gscore: array<f32>;

const MAXK: u32 = 32u;

fn softplus(x: f32) -> f32 {
    if (x > 20.0) { return x; }
    if (x < -20.0) { return exp(x); }
    // log1p(y) with Goldberg's correction: exact enough for small y.
    let y = exp(x);
    let u = 1.0 + y;
    if (u == 1.0) { return y; }
    return log(u) * y / (u - 1.0);
}

// Whether (v, j) comes after (pv, pj) in the selection order (descending value, then ascending index).
fn after(v: f32, j: u32, pv: f32, pj: u32) -> bool {
    return v < pv || (v == pv && j > pj);
}

fn score_value(l: f32, score: u32, m: f32, s: f32) -> f32 {
    var r: f32;
    if (score == 0u) {
        r = exp(l - m) / s;
    } else if (score == 1u) {
        r = sigmoid(l);
    } else {
        r = sqrt(softplus(l));
    }
    return r;
}

fn sel_value(base: u32, j: u32, score: u32, order: u32, m: f32, s: f32, has_corr: bool) -> f32 {
    let l = r_logits[base + j];
    var v = l;
    if (order == 0u) { v = score_value(l, score, m, s); }
    if (has_corr) { v += r_corr[j]; }
    return v;
}

@compute @workgroup_size(64, 1, 1)
fn route_topk(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = linear_id(gid, nwg);
    let T = P.t;
    if (t >= T) { return; }
    let E = P.e;
    let k = P.k;
    let score = P.score;
    let order = P.order;
    let ng = P.n_group;
    let tg = P.topk_group;
    let has_corr = P.has_corr == 1u;
    let base = t * E;
    if (r_pad[t] != 0u) {
        for (var r = 0u; r < k; r++) {
            a_expert[t * k + r] = NONE;
            a_weight[t * k + r] = 0.0;
            a_info[t * k + r] = r;
        }
        return;
    }
    // Softmax statistics of the row (score-then-top-k with softmax scores).
    var m = -3.402823e38;
    var s = 0.0;
    if (order == 0u && score == 0u) {
        m = r_logits[base];
        for (var j = 1u; j < E; j++) { m = max(m, r_logits[base + j]); }
        for (var j = 0u; j < E; j++) { s += exp(r_logits[base + j] - m); }
    }
    // Group scores: the sum of the top-2 selection values of each contiguous group.
    let gsize = select(E, E / max(ng, 1u), ng > 0u);
    var thr_v = 0.0;
    var thr_i = 0u;
    if (ng > 0u) {
        for (var g = 0u; g < ng; g++) {
            var b1 = -3.402823e38;
            var b2 = -3.402823e38;
            for (var j = g * gsize; j < (g + 1u) * gsize; j++) {
                let v = sel_value(base, j, score, order, m, s, has_corr);
                if (v > b1) { b2 = b1; b1 = v; } else if (v > b2) { b2 = v; }
            }
            var gs = b1;
            if (gsize > 1u) { gs = b1 + b2; }
            r_gscore[t * ng + g] = gs;
        }
        // The tg-th best group (ties to the lower group) is the threshold of the kept groups.
        var pv = 0.0;
        var pj = NONE;
        for (var r = 0u; r < tg; r++) {
            var bv = 0.0;
            var bj = NONE;
            for (var g = 0u; g < ng; g++) {
                let v = r_gscore[t * ng + g];
                if (pj != NONE && !after(v, g, pv, pj)) { continue; }
                if (bj == NONE || v > bv) { bv = v; bj = g; }
            }
            pv = bv;
            pj = bj;
        }
        thr_v = pv;
        thr_i = pj;
    }
    // Top-k of the selection values over the kept groups, in selection order.
    var ids: array<u32, MAXK>;
    var ws: array<f32, MAXK>;
    var pv = 0.0;
    var pj = NONE;
    for (var r = 0u; r < k; r++) {
        var bv = 0.0;
        var bj = NONE;
        for (var j = 0u; j < E; j++) {
            if (ng > 0u) {
                let gi = j / gsize;
                let gv = r_gscore[t * ng + gi];
                if (!(gv > thr_v || (gv == thr_v && gi <= thr_i))) { continue; }
            }
            let v = sel_value(base, j, score, order, m, s, has_corr);
            if (pj != NONE && !after(v, j, pv, pj)) { continue; }
            if (bj == NONE || v > bv) { bv = v; bj = j; }
        }
        ids[r] = bj;
        pv = bv;
        pj = bj;
    }
    // Weights.
    let scaling = P.scaling;
    if (order == 1u) {
        var mm = r_logits[base + ids[0]];
        for (var r = 1u; r < k; r++) { mm = max(mm, r_logits[base + ids[r]]); }
        var ss = 0.0;
        for (var r = 0u; r < k; r++) {
            ws[r] = exp(r_logits[base + ids[r]] - mm);
            ss += ws[r];
        }
        for (var r = 0u; r < k; r++) { ws[r] = ws[r] / ss * scaling; }
    } else {
        var sum = 0.0;
        for (var r = 0u; r < k; r++) {
            ws[r] = score_value(r_logits[base + ids[r]], score, m, s);
            sum += ws[r];
        }
        if (P.renormalize == 1u) {
            sum += 1e-20;
            for (var r = 0u; r < k; r++) { ws[r] /= sum; }
        }
        if (scaling != 1.0) {
            for (var r = 0u; r < k; r++) { ws[r] *= scaling; }
        }
    }
    // Store in ascending expert order.
    for (var r = 0u; r < k; r++) {
        var pos = 0u;
        for (var q = 0u; q < k; q++) { if (ids[q] < ids[r]) { pos++; } }
        a_expert[t * k + pos] = ids[r];
        a_weight[t * k + pos] = ws[r];
        a_info[t * k + pos] = r;
    }
}
