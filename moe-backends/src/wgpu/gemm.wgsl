// Grouped GEMM over the canonical packed layout (packed.rs): every product is out = a . W_e^T with W_e row-major
// [rows, K]; a gated bank's W_e holds its N gate rows, then its N up rows. Rows of `a` are slots grouped by expert
// (CSR `meta[0..=E]`); row tiles of BM rows are numbered over all experts (`meta[E+1 ..= 2E+1]`, a prefix sum of
// ceil(count / BM)). A dispatch covers the experts [e0, e1) whose weights live in the bound chunk `w`; workgroup
// (x, y + z * ny) computes output columns [x * BN, +BN) of the chunk's y-th row tile, or exits when the chunk has
// fewer tiles.
//   gemm_single   out[r, n] = act(a[row(r)] . W_e[n] + b_e[n])
//   gemm_dual     mode 1 (gated):   out[r, n] = act(a . W_e[n]) * (a . W_e[N + n])
//                 mode 2 (GPT-OSS): g = min(a . W_e[n] + b_e[n], limit), u = clamp(a . W_e[N + n] + b_e[N + n]),
//                                   out[r, n] = (u + 1) * g * sigmoid(alpha * g)

struct GemmParams {
    // Output columns N.
    n: u32,
    // Reduction length K (the row length of W_e).
    k: u32,
    // The experts [e0, e1) of the bound weight chunk.
    e0: u32,
    e1: u32,
    // Elements per expert in `w`.
    w_stride: u32,
    // E, the experts of the row layout `meta`.
    n_experts: u32,
    // Activation code (common.wgsl).
    act: u32,
    // Epilogue of gemm_dual: 1 gated, 2 GPT-OSS.
    mode: u32,
    // 1: add `bias` (b_stride elements per expert).
    has_bias: u32,
    b_stride: u32,
    // 1: row r reads `a` row idx[r] (the routed experts); 0: row r itself.
    gather: u32,
    // GPT-OSS's GLU slope and clamp.
    alpha: f32,
    limit: f32,
};
@group(0) @binding(0) var<uniform> P: GemmParams;

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
var<workgroup> t_b2: array<f32, 512>;  // the up rows of gemm_dual

// (expert, first row, row end, valid) of this workgroup's row tile, identical for the whole workgroup.
fn tile_info(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> vec4<u32> {
    if (lid == 0u) {
        let e0 = P.e0;
        let e1 = P.e1;
        let tb = P.n_experts + 1u;
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
    let K = P.k;
    for (var j = 0u; j < 8u; j++) {
        let i = lid + j * 64u;
        let r = i / BK;
        let c = i % BK;
        let row = r0 + r;
        let kk = k0 + c;
        var v = 0.0;
        if (row < rend && kk < K) {
            var src = row;
            if (P.gather == 1u) { src = g_idx[row]; }
            v = g_a[src * K + kk];
        }
        t_a[i] = v;
    }
}

// Loads the B tile: BK x BN values of the W_e rows `row0 + n0 ..` (row0: 0 for the single or gate rows, N for
// the up rows), into t_b or (`up`) t_b2.
fn load_b(lid: u32, k0: u32, n0: u32, wbase: u32, row0: u32, up: bool) {
    let N = P.n;
    let K = P.k;
    for (var j = 0u; j < 8u; j++) {
        let i = lid + j * 64u;
        let n = i / BK;
        let c = i % BK;
        let col = n0 + n;
        let kk = k0 + c;
        var v = 0.0;
        if (col < N && kk < K) {
            v = g_w[wbase + (row0 + col) * K + kk];
        }
        if (up) { t_b2[c * BN + n] = v; } else { t_b[c * BN + n] = v; }
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
    let N = P.n;
    let K = P.k;
    let n0 = wid.x * BN;
    let wbase = (e - P.e0) * P.w_stride;
    let tx = l3.x;
    let ty = l3.y;
    var acc: array<f32, 16>;
    for (var k0 = 0u; k0 < K; k0 += BK) {
        load_a(lid, k0, r0, rend);
        load_b(lid, k0, n0, wbase, 0u, false);
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
    let act = P.act;
    let has_bias = P.has_bias;
    let bbase = e * P.b_stride;
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

// The gated epilogue of gemm_dual: gate accumulator g, up accumulator u, output column n of expert bias base bbase.
fn dual_epilogue(g0: f32, u0: f32, n: u32, bbase: u32) -> f32 {
    if (P.mode == 1u) {
        return activate(P.act, g0) * u0;
    }
    var g = g0;
    var u = u0;
    if (P.has_bias == 1u) {
        g += g_bias[bbase + n];
        u += g_bias[bbase + P.n + n];
    }
    let limit = P.limit;
    g = min(g, limit);
    u = clamp(u, -limit, limit);
    let glu = g / (1.0 + exp(-(g * P.alpha)));
    return (u + 1.0) * glu;
}

@compute @workgroup_size(8, 8, 1)
fn gemm_dual(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32, @builtin(local_invocation_id) l3: vec3<u32>) {
    let ti = tile_info(wid, nwg, lid);
    if (ti.w == 0u) { return; }
    let e = ti.x;
    let r0 = ti.y;
    let rend = ti.z;
    let N = P.n;
    let K = P.k;
    let n0 = wid.x * BN;
    let wbase = (e - P.e0) * P.w_stride;
    let tx = l3.x;
    let ty = l3.y;
    var acc: array<f32, 16>;
    var acc2: array<f32, 16>;
    for (var k0 = 0u; k0 < K; k0 += BK) {
        load_a(lid, k0, r0, rend);
        load_b(lid, k0, n0, wbase, 0u, false);
        load_b(lid, k0, n0, wbase, N, true);
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
    let bbase = e * P.b_stride;
    for (var i = 0u; i < 4u; i++) {
        let row = r0 + ty * 4u + i;
        if (row >= rend) { continue; }
        for (var j = 0u; j < 4u; j++) {
            let n = n0 + tx + 8u * j;
            if (n >= N) { continue; }
            g_out[row * N + n] = dual_epilogue(acc[i * 4u + j], acc2[i * 4u + j], n, bbase);
        }
    }
}
