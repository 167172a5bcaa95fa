// moe-rs wgpu backend: what every kernel module starts with (constants, the 1-D launch index, activations).
// Each pipeline's module is this file followed by its kernel family's file(s), concatenated in `pipelines.rs`;
// every family declares its own parameter struct at @group(0) @binding(0) (mirrored by a #[repr(C)] struct in
// `params.rs`, checked by a test). Everything is f32.

const NONE: u32 = 0xffffffffu;
const DROPPED: u32 = 0x10000u;

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

// Activation codes (packed.rs): 0 identity, 1 SiLU, 2 ReLU, 3 exact GELU (erf), 4 GELU tanh.
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
