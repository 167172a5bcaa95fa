// Switch top-1 routing: route_switch picks each token's expert (softmax, argmax, p_max); switch_capacity then
// marks the assignments an expert cannot keep (capacity per group, by position or probability).

struct SwitchParams {
    // Tokens T and experts E.
    t: u32,
    e: u32,
    // Assignments an expert keeps per capacity group.
    capacity: u32,
    // 0: drop by position (the later tokens); 1: by probability (batch-prioritised when the group is the batch).
    drop_by_weight: u32,
};
@group(0) @binding(0) var<uniform> P: SwitchParams;

// r_groups[2t], r_groups[2t + 1]: the [start, end) of token t's capacity group.
@group(0) @binding(8) var<storage, read> r_groups: array<u32>;

@compute @workgroup_size(64, 1, 1)
fn route_switch(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = linear_id(gid, nwg);
    let T = P.t;
    if (t >= T) { return; }
    let E = P.e;
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
    // Argmax by the exact-arithmetic order (kit::rank_cmp): probability, then the logit, then the lower index.
    var best = -1.0;
    var bl = 0.0;
    var bj = 0u;
    for (var j = 0u; j < E; j++) {
        let l = r_logits[base + j];
        let p = exp(l - m) / s;
        if (p > best || (p == best && l > bl)) { best = p; bl = l; bj = j; }
    }
    a_expert[t] = bj;
    a_weight[t] = best;
}

// Σ_{j != e} e^{l_j - l_e} of token t's row, in index order (as the CPU router): p_max = 1 / (1 + rest) exactly, so
// a smaller rest is the larger probability where the f32 probabilities tie (saturation).
fn rest_of(t: u32, e: u32) -> f32 {
    let E = P.e;
    let m = r_logits[t * E + e];
    var r = 0.0;
    for (var j = 0u; j < E; j++) {
        if (j != e) { r += exp(r_logits[t * E + j] - m); }
    }
    return r;
}

@compute @workgroup_size(64, 1, 1)
fn switch_capacity(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = linear_id(gid, nwg);
    let T = P.t;
    if (t >= T) { return; }
    let e = a_expert[t];
    if (e == NONE) { return; }
    let cap = P.capacity;
    let by_weight = P.drop_by_weight == 1u;
    let w = a_weight[t];
    let gs = r_groups[2u * t];
    var ge = t;
    if (by_weight) { ge = r_groups[2u * t + 1u]; }
    var ahead = 0u;
    for (var q = gs; q < ge; q++) {
        if (q == t || a_expert[q] != e) { continue; }
        let wq = a_weight[q];
        if (!by_weight) {
            ahead++;
        } else if (wq > w) {
            ahead++;
        } else if (wq == w) {
            // Equal f32 probabilities: the smaller rest, then the lower token (the CPU router's order).
            let rq = rest_of(q, e);
            let rt = rest_of(t, e);
            if (rq < rt || (rq == rt && q < t)) { ahead++; }
        }
    }
    if (ahead >= cap) { a_info[t] = a_info[t] | DROPPED; }
}
