// shared_gate: out[t] = sigmoid(x[t] . g), Qwen2-MoE's shared-expert gate, one invocation per token.

struct SharedGateParams {
    // Tokens T and width d.
    t: u32,
    d: u32,
};
@group(0) @binding(0) var<uniform> P: SharedGateParams;

@group(0) @binding(1) var<storage, read> h_x: array<f32>;
@group(0) @binding(2) var<storage, read> h_g: array<f32>;
@group(0) @binding(3) var<storage, read_write> h_out: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn shared_gate(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = linear_id(gid, nwg);
    let T = P.t;
    if (t >= T) { return; }
    let d = P.d;
    var l = 0.0;
    for (var j = 0u; j < d; j++) { l += h_x[t * d + j] * h_g[j]; }
    h_out[t] = sigmoid(l);
}
