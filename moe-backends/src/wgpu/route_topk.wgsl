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
// r_gscore[2 (t ng + g)]: group g's score (sum of its top-2 selection values), [.. + 1]: its key (their logits' sum).
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

// Whether (v, l, j) comes after (pv, pl, pj) in the exact-arithmetic selection order (kit::rank_cmp): descending
// selection value, then descending logit (distinct logits never tie through f32 saturation), then ascending index.
fn after(v: f32, l: f32, j: u32, pv: f32, pl: f32, pj: u32) -> bool {
    return v < pv || (v == pv && (l < pl || (l == pl && j > pj)));
}

// Whether (v, l) beats (bv, bl) for a later index (the scans run in ascending index, so equal pairs keep the first).
fn beats(v: f32, l: f32, bv: f32, bl: f32) -> bool {
    return v > bv || (v == bv && l > bl);
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
    // Group scores: the sum of the top-2 selection values of each contiguous group (ranked by value, logit, index),
    // and the sum of their logits as the group's tie-break key.
    let gsize = select(E, E / max(ng, 1u), ng > 0u);
    var thr_v = 0.0;
    var thr_l = 0.0;
    var thr_i = 0u;
    if (ng > 0u) {
        for (var g = 0u; g < ng; g++) {
            var b1 = -3.402823e38;
            var l1 = -3.402823e38;
            var b2 = -3.402823e38;
            var l2 = -3.402823e38;
            for (var j = g * gsize; j < (g + 1u) * gsize; j++) {
                let v = sel_value(base, j, score, order, m, s, has_corr);
                let l = r_logits[base + j];
                if (beats(v, l, b1, l1)) {
                    b2 = b1; l2 = l1; b1 = v; l1 = l;
                } else if (beats(v, l, b2, l2)) {
                    b2 = v; l2 = l;
                }
            }
            var gs = b1;
            var gl = l1;
            if (gsize > 1u) { gs = b1 + b2; gl = l1 + l2; }
            r_gscore[2u * (t * ng + g)] = gs;
            r_gscore[2u * (t * ng + g) + 1u] = gl;
        }
        // The tg-th best group (by score, key, lower group) is the threshold of the kept groups.
        var pv = 0.0;
        var pl = 0.0;
        var pj = NONE;
        for (var r = 0u; r < tg; r++) {
            var bv = 0.0;
            var bl = 0.0;
            var bj = NONE;
            for (var g = 0u; g < ng; g++) {
                let v = r_gscore[2u * (t * ng + g)];
                let l = r_gscore[2u * (t * ng + g) + 1u];
                if (pj != NONE && !after(v, l, g, pv, pl, pj)) { continue; }
                if (bj == NONE || beats(v, l, bv, bl)) { bv = v; bl = l; bj = g; }
            }
            pv = bv;
            pl = bl;
            pj = bj;
        }
        thr_v = pv;
        thr_l = pl;
        thr_i = pj;
    }
    // Top-k of the selection values over the kept groups, in selection order.
    var ids: array<u32, MAXK>;
    var ws: array<f32, MAXK>;
    var pv = 0.0;
    var pl = 0.0;
    var pj = NONE;
    for (var r = 0u; r < k; r++) {
        var bv = 0.0;
        var bl = 0.0;
        var bj = NONE;
        for (var j = 0u; j < E; j++) {
            if (ng > 0u) {
                let gi = j / gsize;
                let gv = r_gscore[2u * (t * ng + gi)];
                let gl = r_gscore[2u * (t * ng + gi) + 1u];
                if (after(gv, gl, gi, thr_v, thr_l, thr_i)) { continue; }
            }
            let v = sel_value(base, j, score, order, m, s, has_corr);
            let l = r_logits[base + j];
            if (pj != NONE && !after(v, l, j, pv, pl, pj)) { continue; }
            if (bj == NONE || beats(v, l, bv, bl)) { bv = v; bl = l; bj = j; }
        }
        ids[r] = bj;
        pv = bv;
        pl = bl;
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
