// combine: y[t] = scale * sum_{slots of t, ascending expert} w * out[slot] + gate * shared[t] + bias, one
// invocation per output value. c_slot entries are slot + 1 (0: no slot), in ascending expert order within a token.

struct CombineParams {
    // Tokens T and width d.
    t: u32,
    d: u32,
    // Token t's entries are [t * fixed_k, +fixed_k) (native routing); 0: c_off[t] .. c_off[t + 1] (a host plan).
    fixed_k: u32,
    // The routed part's scale.
    scale: f32,
    // 0 no shared experts, 1 added, 2 added times c_sg[t].
    shared_mode: u32,
    // 1: add c_bias.
    has_bias: u32,
};
@group(0) @binding(0) var<uniform> P: CombineParams;

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
    let T = P.t;
    let d = P.d;
    if (id >= T * d) { return; }
    let t = id / d;
    let c = id % d;
    let fk = P.fixed_k;
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
    let scale = P.scale;
    if (scale != 1.0) { acc *= scale; }
    let sh = P.shared_mode;
    if (sh == 1u) { acc += c_shared[t * d + c]; }
    if (sh == 2u) { acc += c_sg[t] * c_shared[t * d + c]; }
    if (P.has_bias == 1u) { acc += c_bias[c]; }
    c_y[id] = acc;
}
