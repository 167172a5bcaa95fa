// Counting sort of the kept assignments by expert. group_count and group_scatter run one workgroup per expert
// over all assignments in index order, so each expert's slots come out in ascending token order (deterministic,
// no atomics on the slot order); group_scan makes the row and row-tile offsets between them.

struct GroupParams {
    // Assignments (T * k), experts E, choices per token k.
    n_assign: u32,
    e: u32,
    k: u32,
    // Rows per GEMM tile (BM of gemm.wgsl).
    bm: u32,
};
@group(0) @binding(0) var<uniform> P: GroupParams;

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
    let E = P.e;
    if (e >= E) { return; }
    let n = P.n_assign;
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
    let E = P.e;
    let bm = P.bm;
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
    let E = P.e;
    if (e >= E) { return; }
    let n = P.n_assign;
    let k = P.k;
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
