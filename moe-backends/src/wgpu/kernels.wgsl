// moe-rs wgpu backend: every compute kernel of one layer forward, f32 throughout.
//
// Each dispatch reads its scalar parameters from a 64-byte uniform block `P` (16 words; f32 values are stored as
// their bits). Entry points and what they compute:
//   gemm_single   grouped GEMM, one accumulator:   out[r, n] = act(A[row(r)] . W_e[:, n] + b_e[n])
//   gemm_dual     grouped GEMM, two accumulators:  SwiGLU act(gate) * up, or GPT-OSS's clamped, interleaved GLU
//   route_topk    token-choice top-k per token (softmax / sigmoid / sqrt-softplus, groups, correction bias)
//   route_switch  Switch top-1 per token (softmax, argmax, p_max)
//   switch_capacity  marks the assignments an expert cannot keep (capacity per group, by position or probability)
//   group_count / group_scan / group_scatter   counting sort of the kept assignments by expert (CSR + tile map)
//   shared_gate   sigmoid(x . g) per token (Qwen2-MoE's shared-expert gate)
//   combine       y[t] = scale * sum_{slots of t, ascending expert} w * out[slot] + gate * shared[t] + bias

struct Params { v: array<vec4<u32>, 4> };
@group(0) @binding(0) var<uniform> P: Params;

fn pu(i: u32) -> u32 { return P.v[i / 4u][i % 4u]; }
fn pf(i: u32) -> f32 { return bitcast<f32>(pu(i)); }

const NONE: u32 = 0xffffffffu;
const DROPPED: u32 = 0x10000u;

// ---------------------------------------------------------------------------------------------------------------
// Activations.

// Linear invocation id of a 64-wide 1-D kernel dispatched as an (x, y) grid of workgroups.
fn linear_id(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 64u;
}

fn sigmoid(x: f32) -> f32 { return 1.0 / (1.0 + exp(-x)); }

// tanh without inf/inf for large |y|.
fn tanh_safe(y: f32) -> f32 {
    let a = abs(y);
    let r = 1.0 - 2.0 / (exp(2.0 * a) + 1.0);
    return select(r, -r, y < 0.0);
}

// erf in f32: Maclaurin series below 0.5, Numerical Recipes' erfc Chebyshev fit (relative error < 1.2e-7)
// above; measured absolute error below 2e-7 over the real line in f32 arithmetic.
fn erf_f32(x: f32) -> f32 {
    let z = abs(x);
    if (z < 0.5) {
        let x2 = x * x;
        // 2/sqrt(pi) * (x - x^3/3 + x^5/10 - x^7/42 + x^9/216 - x^11/1320 + x^13/9360)
        var s = 1.0 / 9360.0;
        s = s * x2 * -1.0 + 1.0 / 1320.0;
        s = -(s * x2) + 1.0 / 216.0;
        s = -(s * x2) + 1.0 / 42.0;
        s = -(s * x2) + 1.0 / 10.0;
        s = -(s * x2) + 1.0 / 3.0;
        s = -(s * x2) + 1.0;
        return 1.1283791670955126 * x * s;
    }
    let t = 1.0 / (1.0 + 0.5 * z);
    var p = 0.17087277;
    p = t * p - 0.82215223;
    p = t * p + 1.48851587;
    p = t * p - 1.13520398;
    p = t * p + 0.27886807;
    p = t * p - 0.18628806;
    p = t * p + 0.09678418;
    p = t * p + 0.37409196;
    p = t * p + 1.00002368;
    p = t * p - 1.26551223;
    let r = 1.0 - t * exp(-z * z + p);
    return select(r, -r, x < 0.0);
}

fn activate(act: u32, v: f32) -> f32 {
    var r = v;
    if (act == 1u) {
        r = v / (1.0 + exp(-v));
    } else if (act == 2u) {
        r = max(v, 0.0);
    } else if (act == 3u) {
        r = 0.5 * v * (1.0 + erf_f32(v * 0.70710678118654752));
    } else if (act == 4u) {
        let c = 0.7978845608028654;
        r = 0.5 * v * (1.0 + tanh_safe(c * (v + 0.044715 * v * v * v)));
    }
    return r;
}

//!SECTION gemm
// Grouped GEMM. Rows are slots grouped by expert (CSR `meta[0..=E]`); row tiles of BM rows are numbered over all
// experts (`meta[E+1 ..= 2E+1]`, a prefix sum of ceil(count / BM)). A dispatch covers the experts [e0, e1) whose
// weights live in the bound chunk `w`; workgroup (x, y + z * ny) computes output columns [x * BN, +BN) of the
// chunk's y-th row tile, or exits when the chunk has fewer tiles.
//
// Params: 0 n (output columns), 1 k (reduction), 2 e0, 3 e1, 4 w_stride (elements per expert in `w`), 5 ldw
// (row length of W_e), 6 b_nt (1: W_e is [N, K], y = a . W^T; 0: W_e is [K, N], y = a . W), 7 act, 8 has_bias,
// 9 b_stride (bias elements per expert), 10 gather (row r reads A row idx[r]), 11 dual mode (0 SwiGLU halves,
// 1 GPT-OSS interleaved), 12 alpha, 13 limit, 14 E (total experts, for the meta layout).

const BM: u32 = 32u;
const BN: u32 = 32u;
const BK: u32 = 16u;

@group(0) @binding(1) var<storage, read> g_a: array<f32>;
@group(0) @binding(2) var<storage, read> g_idx: array<u32>;
@group(0) @binding(3) var<storage, read> g_meta: array<u32>;
@group(0) @binding(4) var<storage, read> g_w: array<f32>;
@group(0) @binding(5) var<storage, read> g_bias: array<f32>;
@group(0) @binding(6) var<storage, read_write> g_out: array<f32>;

var<workgroup> t_info: vec4<u32>;
var<workgroup> t_a: array<f32, 512>;   // BM x BK, row-major
var<workgroup> t_b: array<f32, 512>;   // BK x BN, row-major
var<workgroup> t_b2: array<f32, 512>;  // second operand of the dual kernels

// (expert, first row, row end, valid) of this workgroup's row tile, identical for the whole workgroup.
fn tile_info(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> vec4<u32> {
    if (lid == 0u) {
        let e0 = pu(2u);
        let e1 = pu(3u);
        let tb = pu(14u) + 1u;
        let g = g_meta[tb + e0] + wid.y + wid.z * nwg.y;
        var info = vec4<u32>(0u, 0u, 0u, 0u);
        if (g < g_meta[tb + e1]) {
            var lo = e0;
            var hi = e1;
            loop {
                if (hi - lo <= 1u) { break; }
                let mid = (lo + hi) / 2u;
                if (g_meta[tb + mid] <= g) { lo = mid; } else { hi = mid; }
            }
            info = vec4<u32>(lo, g_meta[lo] + (g - g_meta[tb + lo]) * BM, g_meta[lo + 1u], 1u);
        }
        t_info = info;
    }
    return workgroupUniformLoad(&t_info);
}

fn load_a(lid: u32, k0: u32, r0: u32, rend: u32) {
    let K = pu(1u);
    let gather = pu(10u);
    for (var j = 0u; j < 8u; j++) {
        let i = lid + j * 64u;
        let r = i / BK;
        let c = i % BK;
        let row = r0 + r;
        let kk = k0 + c;
        var v = 0.0;
        if (row < rend && kk < K) {
            var src = row;
            if (gather == 1u) { src = g_idx[row]; }
            v = g_a[src * K + kk];
        }
        t_a[i] = v;
    }
}

// W_e element for logical output column `col` (already mapped to the weight's column / row) and reduction index kk.
fn w_at(wbase: u32, col: u32, kk: u32) -> f32 {
    if (pu(6u) == 1u) {
        return g_w[wbase + col * pu(5u) + kk];
    }
    return g_w[wbase + kk * pu(5u) + col];
}

// Loads the B tile: BK x BN values of columns n0.. (`which` 0: plain / gate, 1: up).
fn load_b(lid: u32, k0: u32, n0: u32, wbase: u32, which: u32) {
    let N = pu(0u);
    let K = pu(1u);
    let nt = pu(6u) == 1u;
    let mode = pu(11u);
    for (var j = 0u; j < 8u; j++) {
        let i = lid + j * 64u;
        var n: u32;
        var c: u32;
        if (nt) { n = i / BK; c = i % BK; } else { c = i / BN; n = i % BN; }
        let col = n0 + n;
        let kk = k0 + c;
        var v = 0.0;
        if (col < N && kk < K) {
            var wc = col;
            if (which == 1u) {
                if (mode == 0u) { wc = N + col; } else { wc = 2u * col + 1u; }
            } else if (which == 2u) {
                wc = 2u * col;
            }
            v = w_at(wbase, wc, kk);
        }
        if (which == 1u) { t_b2[c * BN + n] = v; } else { t_b[c * BN + n] = v; }
    }
}

@compute @workgroup_size(8, 8, 1)
fn gemm_single(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32, @builtin(local_invocation_id) l3: vec3<u32>) {
    let ti = tile_info(wid, nwg, lid);
    if (ti.w == 0u) { return; }
    let e = ti.x;
    let r0 = ti.y;
    let rend = ti.z;
    let N = pu(0u);
    let K = pu(1u);
    let n0 = wid.x * BN;
    let wbase = (e - pu(2u)) * pu(4u);
    let tx = l3.x;
    let ty = l3.y;
    var acc: array<f32, 16>;
    for (var k0 = 0u; k0 < K; k0 += BK) {
        load_a(lid, k0, r0, rend);
        load_b(lid, k0, n0, wbase, 0u);
        workgroupBarrier();
        for (var c = 0u; c < BK; c++) {
            var av: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) { av[i] = t_a[(ty * 4u + i) * BK + c]; }
            for (var j = 0u; j < 4u; j++) {
                let b = t_b[c * BN + tx + 8u * j];
                for (var i = 0u; i < 4u; i++) { acc[i * 4u + j] += av[i] * b; }
            }
        }
        workgroupBarrier();
    }
    let act = pu(7u);
    let has_bias = pu(8u);
    let bbase = e * pu(9u);
    for (var i = 0u; i < 4u; i++) {
        let row = r0 + ty * 4u + i;
        if (row >= rend) { continue; }
        for (var j = 0u; j < 4u; j++) {
            let n = n0 + tx + 8u * j;
            if (n >= N) { continue; }
            var v = acc[i * 4u + j];
            if (has_bias == 1u) { v += g_bias[bbase + n]; }
            g_out[row * N + n] = activate(act, v);
        }
    }
}

@compute @workgroup_size(8, 8, 1)
fn gemm_dual(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32, @builtin(local_invocation_id) l3: vec3<u32>) {
    let ti = tile_info(wid, nwg, lid);
    if (ti.w == 0u) { return; }
    let e = ti.x;
    let r0 = ti.y;
    let rend = ti.z;
    let N = pu(0u);
    let K = pu(1u);
    let mode = pu(11u);
    let n0 = wid.x * BN;
    let wbase = (e - pu(2u)) * pu(4u);
    let tx = l3.x;
    let ty = l3.y;
    var acc: array<f32, 16>;
    var acc2: array<f32, 16>;
    for (var k0 = 0u; k0 < K; k0 += BK) {
        load_a(lid, k0, r0, rend);
        load_b(lid, k0, n0, wbase, select(0u, 2u, mode == 1u));
        load_b(lid, k0, n0, wbase, 1u);
        workgroupBarrier();
        for (var c = 0u; c < BK; c++) {
            var av: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) { av[i] = t_a[(ty * 4u + i) * BK + c]; }
            for (var j = 0u; j < 4u; j++) {
                let b = t_b[c * BN + tx + 8u * j];
                let b2 = t_b2[c * BN + tx + 8u * j];
                for (var i = 0u; i < 4u; i++) {
                    acc[i * 4u + j] += av[i] * b;
                    acc2[i * 4u + j] += av[i] * b2;
                }
            }
        }
        workgroupBarrier();
    }
    let act = pu(7u);
    let has_bias = pu(8u);
    let bbase = e * pu(9u);
    let alpha = pf(12u);
    let limit = pf(13u);
    for (var i = 0u; i < 4u; i++) {
        let row = r0 + ty * 4u + i;
        if (row >= rend) { continue; }
        for (var j = 0u; j < 4u; j++) {
            let n = n0 + tx + 8u * j;
            if (n >= N) { continue; }
            var g = acc[i * 4u + j];
            var u = acc2[i * 4u + j];
            var h: f32;
            if (mode == 0u) {
                h = activate(act, g) * u;
            } else {
                if (has_bias == 1u) {
                    g += g_bias[bbase + 2u * n];
                    u += g_bias[bbase + 2u * n + 1u];
                }
                g = min(g, limit);
                u = clamp(u, -limit, limit);
                let glu = g / (1.0 + exp(-(g * alpha)));
                h = (u + 1.0) * glu;
            }
            g_out[row * N + n] = h;
        }
    }
}

//!SECTION route
// Routing. Assignments are token-major, k per token: a_expert (NONE for padding), a_weight, a_info (choice rank,
// plus DROPPED when capacity dropped it). Within a token the k assignments are stored in ascending expert order,
// the combine order.
//
// route_topk params: 0 T, 1 E, 2 k, 3 score (0 softmax, 1 sigmoid, 2 sqrt_softplus), 4 order (0 score then top-k,
// 1 top-k of logits then softmax), 5 renormalize, 6 scaling (f32), 7 n_group (0: none), 8 topk_group, 9 has_corr.

@group(0) @binding(1) var<storage, read> r_logits: array<f32>;
@group(0) @binding(2) var<storage, read> r_corr: array<f32>;
@group(0) @binding(3) var<storage, read> r_pad: array<u32>;
@group(0) @binding(4) var<storage, read_write> a_expert: array<u32>;
@group(0) @binding(5) var<storage, read_write> a_weight: array<f32>;
@group(0) @binding(6) var<storage, read_write> a_info: array<u32>;
@group(0) @binding(7) var<storage, read_write> r_gscore: array<f32>;
@group(0) @binding(8) var<storage, read> r_groups: array<u32>;

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

@compute @workgroup_size(64, 1, 1)
fn route_topk(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = linear_id(gid, nwg);
    let T = pu(0u);
    if (t >= T) { return; }
    let E = pu(1u);
    let k = pu(2u);
    let score = pu(3u);
    let order = pu(4u);
    let ng = pu(7u);
    let tg = pu(8u);
    let has_corr = pu(9u) == 1u;
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
    let scaling = pf(6u);
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
        if (pu(5u) == 1u) {
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

// route_switch params: 0 T, 1 E.
@compute @workgroup_size(64, 1, 1)
fn route_switch(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = linear_id(gid, nwg);
    let T = pu(0u);
    if (t >= T) { return; }
    let E = pu(1u);
    let base = t * E;
    a_info[t] = 0u;
    if (r_pad[t] != 0u) {
        a_expert[t] = NONE;
        a_weight[t] = 0.0;
        return;
    }
    var m = r_logits[base];
    for (var j = 1u; j < E; j++) { m = max(m, r_logits[base + j]); }
    var s = 0.0;
    for (var j = 0u; j < E; j++) { s += exp(r_logits[base + j] - m); }
    var best = -1.0;
    var bj = 0u;
    for (var j = 0u; j < E; j++) {
        let p = exp(r_logits[base + j] - m) / s;
        if (p > best) { best = p; bj = j; }
    }
    a_expert[t] = bj;
    a_weight[t] = best;
}

// switch_capacity params: 0 T, 10 capacity, 11 drop (0 position, 1 probability / batch-prioritised).
// r_groups[2t], r_groups[2t + 1]: the [start, end) of token t's capacity group.
@compute @workgroup_size(64, 1, 1)
fn switch_capacity(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = linear_id(gid, nwg);
    let T = pu(0u);
    if (t >= T) { return; }
    let e = a_expert[t];
    if (e == NONE) { return; }
    let cap = pu(10u);
    let w = a_weight[t];
    let gs = r_groups[2u * t];
    var ge = t;
    if (pu(11u) == 1u) { ge = r_groups[2u * t + 1u]; }
    var ahead = 0u;
    for (var q = gs; q < ge; q++) {
        if (q == t || a_expert[q] != e) { continue; }
        let wq = a_weight[q];
        if (q < t) {
            if (wq >= w || pu(11u) == 0u) { ahead++; }
        } else if (wq > w) {
            ahead++;
        }
    }
    if (ahead >= cap) { a_info[t] = a_info[t] | DROPPED; }
}

//!SECTION group
// Counting sort of the kept assignments by expert. group_count and group_scatter run one workgroup per expert
// over all assignments in index order, so each expert's slots come out in ascending token order (deterministic,
// no atomics on the slot order). Params: 0 n_assign (T * k), 1 E, 2 k, 3 BM (rows per GEMM tile).

@group(0) @binding(1) var<storage, read> s_expert: array<u32>;
@group(0) @binding(2) var<storage, read> s_info: array<u32>;
@group(0) @binding(3) var<storage, read> s_weight: array<f32>;
@group(0) @binding(4) var<storage, read_write> s_counts: array<u32>;
@group(0) @binding(5) var<storage, read_write> s_meta: array<u32>;
@group(0) @binding(6) var<storage, read_write> s_slot_token: array<u32>;
@group(0) @binding(7) var<storage, read_write> s_slot_weight: array<f32>;
@group(0) @binding(8) var<storage, read_write> s_assign_slot: array<u32>;

var<workgroup> w_count: atomic<u32>;
var<workgroup> w_flags: array<u32, 256>;
var<workgroup> w_sums: array<u32, 256>;
var<workgroup> w_tiles: array<u32, 256>;

fn kept(i: u32, e: u32) -> bool {
    return s_expert[i] == e && (s_info[i] & DROPPED) == 0u;
}

@compute @workgroup_size(256, 1, 1)
fn group_count(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let e = wid.x + wid.y * nwg.x;
    let E = pu(1u);
    if (e >= E) { return; }
    let n = pu(0u);
    var c = 0u;
    for (var i = lid; i < n; i += 256u) {
        if (kept(i, e)) { c++; }
    }
    atomicAdd(&w_count, c);
    workgroupBarrier();
    if (lid == 0u) { s_counts[e] = atomicLoad(&w_count); }
}

// One workgroup: meta[0..=E] = exclusive prefix sum of counts (row offsets), meta[E+1..=2E+1] = prefix sum of
// ceil(count / BM) (row-tile offsets).
@compute @workgroup_size(256, 1, 1)
fn group_scan(@builtin(local_invocation_index) lid: u32) {
    let E = pu(1u);
    let bm = pu(3u);
    let chunk = (E + 255u) / 256u;
    let lo = min(lid * chunk, E);
    let hi = min(lo + chunk, E);
    var c = 0u;
    var tl = 0u;
    for (var j = lo; j < hi; j++) {
        c += s_counts[j];
        tl += (s_counts[j] + bm - 1u) / bm;
    }
    w_sums[lid] = c;
    w_tiles[lid] = tl;
    workgroupBarrier();
    if (lid == 0u) {
        var a = 0u;
        var b = 0u;
        for (var i = 0u; i < 256u; i++) {
            let x = w_sums[i];
            let y = w_tiles[i];
            w_sums[i] = a;
            w_tiles[i] = b;
            a += x;
            b += y;
        }
        s_meta[E] = a;
        s_meta[2u * E + 1u] = b;
    }
    workgroupBarrier();
    var a = w_sums[lid];
    var b = w_tiles[lid];
    for (var j = lo; j < hi; j++) {
        s_meta[j] = a;
        s_meta[E + 1u + j] = b;
        a += s_counts[j];
        b += (s_counts[j] + bm - 1u) / bm;
    }
}

@compute @workgroup_size(256, 1, 1)
fn group_scatter(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let e = wid.x + wid.y * nwg.x;
    let E = pu(1u);
    if (e >= E) { return; }
    let n = pu(0u);
    let k = pu(2u);
    var base = s_meta[e];
    for (var b0 = 0u; b0 < n; b0 += 256u) {
        let i = b0 + lid;
        var f = 0u;
        if (i < n) {
            if (kept(i, e)) { f = 1u; }
        }
        w_flags[lid] = f;
        workgroupBarrier();
        for (var off = 1u; off < 256u; off *= 2u) {
            var v = w_flags[lid];
            if (lid >= off) { v += w_flags[lid - off]; }
            workgroupBarrier();
            w_flags[lid] = v;
            workgroupBarrier();
        }
        if (f == 1u) {
            let slot = base + w_flags[lid] - 1u;
            s_slot_token[slot] = i / k;
            s_slot_weight[slot] = s_weight[i];
            s_assign_slot[i] = slot + 1u;
        }
        let total = w_flags[255];
        workgroupBarrier();
        base += total;
    }
}

//!SECTION shared_gate
// shared_gate params: 0 T, 1 d. out[t] = sigmoid(x[t] . g).

@group(0) @binding(1) var<storage, read> h_x: array<f32>;
@group(0) @binding(2) var<storage, read> h_g: array<f32>;
@group(0) @binding(3) var<storage, read_write> h_out: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn shared_gate(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = linear_id(gid, nwg);
    let T = pu(0u);
    if (t >= T) { return; }
    let d = pu(1u);
    var l = 0.0;
    for (var j = 0u; j < d; j++) { l += h_x[t * d + j] * h_g[j]; }
    h_out[t] = sigmoid(l);
}

//!SECTION combine
// combine params: 0 T, 1 d, 2 fixed_k (token t's entries are [t*k, t*k+k); 0: c_off[t]..c_off[t+1]), 3 scale (f32),
// 4 shared (0 none, 1 added, 2 added times c_sg[t]), 5 has_bias. c_slot entries are slot + 1 (0: no slot), in
// ascending expert order within a token.

@group(0) @binding(1) var<storage, read> c_out: array<f32>;
@group(0) @binding(2) var<storage, read> c_w: array<f32>;
@group(0) @binding(3) var<storage, read> c_slot: array<u32>;
@group(0) @binding(4) var<storage, read> c_off: array<u32>;
@group(0) @binding(5) var<storage, read> c_shared: array<f32>;
@group(0) @binding(6) var<storage, read> c_sg: array<f32>;
@group(0) @binding(7) var<storage, read> c_bias: array<f32>;
@group(0) @binding(8) var<storage, read_write> c_y: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn combine(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = linear_id(gid, nwg);
    let T = pu(0u);
    let d = pu(1u);
    if (id >= T * d) { return; }
    let t = id / d;
    let c = id % d;
    let fk = pu(2u);
    var lo = t * fk;
    var hi = lo + fk;
    if (fk == 0u) { lo = c_off[t]; hi = c_off[t + 1u]; }
    var acc = 0.0;
    for (var p = lo; p < hi; p++) {
        let s1 = c_slot[p];
        if (s1 == 0u) { continue; }
        let s = s1 - 1u;
        acc += c_w[s] * c_out[s * d + c];
    }
    let scale = pf(3u);
    if (scale != 1.0) { acc *= scale; }
    let sh = pu(4u);
    if (sh == 1u) { acc += c_shared[t * d + c]; }
    if (sh == 2u) { acc += c_sg[t] * c_shared[t * d + c]; }
    if (pu(5u) == 1u) { acc += c_bias[c]; }
    c_y[id] = acc;
}
