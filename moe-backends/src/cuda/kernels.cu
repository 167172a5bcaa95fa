// moe-rs CUDA kernels, compiled at run time by NVRTC for the GPU's architecture.
//
// Self-contained on purpose: no headers. bf16 and f16 values are bit patterns in `unsigned short`, converted with
// bit operations (bf16) or PTX `cvt` (f16), and the tensor-core products are PTX `mma.sync` (sm_80+), so the
// source compiles wherever NVRTC does, with no CUDA include directory.
//
// Layouts (all row-major):
// - expert weights, canonical form made at upload: up `[E, U, K]` with U = N (MLP) or 2N (gated: gate rows
//   [0, N), up rows [N, 2N)); down `[E, d, f]`; every product is `out = a . W_e^T`.
// - rows of a grouped product: slots grouped by expert. `meta[0..=E]` are row offsets; `meta[E+1..=2E+1]` are
//   offsets of row tiles of BM rows (a prefix sum of ceil(count / BM)). Block (x, y + z * gridDim.y) computes the
//   output columns [x * BN, +BN) of row tile y + z * gridDim.y, or returns when there are fewer tiles.
// - assignments of the native router: token-major, k per token, in ascending expert order within a token;
//   a_expert (NONE for padding), a_weight, a_info (choice rank, plus DROPPED).

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

#define NONE 0xffffffffu
#define DROPPED 0x10000u
#define BM 64
#define BN 64
#define MAXK 32
#define MAXG 64
#define CHUNK 256

// ---------------------------------------------------------------------------------------------------------------
// Numbers.

__device__ __forceinline__ float bf16_f32(u16 v) { return __uint_as_float(((u32)v) << 16); }

// Round to nearest even; NaN stays NaN.
__device__ __forceinline__ u16 f32_bf16(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)((x >> 16) | 0x40u);
    x += 0x7fffu + ((x >> 16) & 1u);
    return (u16)(x >> 16);
}

__device__ __forceinline__ float f16_f32(u16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}

__device__ __forceinline__ u16 f32_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Weight element types: storage type, widening, narrowing.
struct WF32 {
    typedef float T;
    static __device__ __forceinline__ float get(T v) { return v; }
};
struct WBF16 {
    typedef u16 T;
    static __device__ __forceinline__ float get(T v) { return bf16_f32(v); }
    static __device__ __forceinline__ u16 put(float f) { return f32_bf16(f); }
};
struct WF16 {
    typedef u16 T;
    static __device__ __forceinline__ float get(T v) { return f16_f32(v); }
    static __device__ __forceinline__ u16 put(float f) { return f32_f16(f); }
};

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

// Activation codes: 0 identity, 1 SiLU, 2 ReLU, 3 exact GELU (erf), 4 GELU tanh.
__device__ __forceinline__ float activate(u32 act, float v) {
    switch (act) {
    case 1: return v / (1.0f + expf(-v));
    case 2: return fmaxf(v, 0.0f);
    case 3: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case 4: return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    default: return v;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Grouped products.

// The expert and row range [r0, r1) of row tile `tile`; false past the last tile.
__device__ __forceinline__ bool tile_of(const u32* __restrict__ meta, u32 E, u32 tile, u32& e, u32& r0, u32& r1) {
    const u32* toff = meta + E + 1;
    if (tile >= toff[E]) return false;
    u32 lo = 0, hi = E;  // toff[lo] <= tile < toff[hi]
    while (hi - lo > 1) {
        u32 mid = (lo + hi) >> 1;
        if (toff[mid] <= tile) lo = mid; else hi = mid;
    }
    e = lo;
    r0 = meta[e] + (tile - toff[e]) * BM;
    r1 = meta[e + 1];
    return true;
}

// Product modes: 0 single (`act(a . W^T + bias)`), 1 gated (`act(g) * u`), 2 GPT-OSS gated
// (`(clamp(u + bu) + 1) * glu(min(g + bg, limit))`). Gated products read gate rows n and up rows N + n.
template <int MODE>
__device__ __forceinline__ float epilogue(float g, float u, u32 n, u32 N, u32 act, const float* __restrict__ bias,
                                          u64 bbase, float alpha, float limit) {
    if (MODE == 0) {
        if (bias) g += bias[bbase + n];
        return activate(act, g);
    } else if (MODE == 1) {
        return activate(act, g) * u;
    } else {
        if (bias) {
            g += bias[bbase + n];
            u += bias[bbase + N + n];
        }
        g = fminf(g, limit);
        u = fminf(fmaxf(u, -limit), limit);
        return (u + 1.0f) * (g / (1.0f + expf(-(g * alpha))));
    }
}

// f32 FMA tiles (any weight type): 64 x 64 outputs per block of 256 threads, 4 x 4 per thread, k steps of 16.
template <class W, int MODE>
__device__ __forceinline__ void gemm_fma(const float* __restrict__ a, const u32* __restrict__ idx,
                                         const u32* __restrict__ meta, u32 E, const typename W::T* __restrict__ w,
                                         u64 w_stride, const float* __restrict__ bias, u32 b_stride,
                                         float* __restrict__ out, u32 N, u32 K, u32 act, float alpha, float limit) {
    __shared__ float As[16][BM + 4];
    __shared__ float Bs[16][BN + 4];
    __shared__ float Bs2[MODE ? 16 : 1][BN + 4];
    u32 e, r0, r1;
    if (!tile_of(meta, E, blockIdx.y + blockIdx.z * gridDim.y, e, r0, r1)) return;
    const u32 n0 = blockIdx.x * BN;
    const u32 tid = threadIdx.x;
    const u32 tx = tid & 15, ty = tid >> 4;
    const typename W::T* __restrict__ we = w + (u64)e * w_stride;
    const u32 lr = tid >> 2, lk = (tid & 3) * 4;
    const u32 arow = r0 + lr;
    const bool a_ok = arow < r1;
    const u64 asrc = a_ok ? (u64)(idx ? idx[arow] : arow) * K : 0;
    const u32 brow = n0 + lr;
    const bool b_ok = brow < N;
    float acc[4][4], acc2[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) { acc[i][j] = 0.0f; acc2[i][j] = 0.0f; }
    for (u32 k0 = 0; k0 < K; k0 += 16) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const u32 k = k0 + lk + i;
            const bool kin = k < K;
            As[lk + i][lr] = (a_ok && kin) ? a[asrc + k] : 0.0f;
            Bs[lk + i][lr] = (b_ok && kin) ? W::get(we[(u64)brow * K + k]) : 0.0f;
            if (MODE) Bs2[lk + i][lr] = (b_ok && kin) ? W::get(we[(u64)(brow + N) * K + k]) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int c = 0; c < 16; c++) {
            float av[4], bv[4], bv2[4];
#pragma unroll
            for (int i = 0; i < 4; i++) av[i] = As[c][ty * 4 + i];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                bv[j] = Bs[c][tx + 16 * j];
                bv2[j] = MODE ? Bs2[c][tx + 16 * j] : 0.0f;
            }
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
                    if (MODE) acc2[i][j] = fmaf(av[i], bv2[j], acc2[i][j]);
                }
        }
        __syncthreads();
    }
    const u64 bbase = (u64)e * b_stride;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const u32 row = r0 + ty * 4 + i;
        if (row >= r1) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const u32 n = n0 + tx + 16 * j;
            if (n >= N) continue;
            out[(u64)row * N + n] = epilogue<MODE>(acc[i][j], acc2[i][j], n, N, act, bias, bbase, alpha, limit);
        }
    }
}

// Tensor-core tiles for 16-bit weights (sm_80+): 64 x 64 outputs per block of 128 threads (4 warps of 32 x 32),
// k steps of 32, `mma.sync.m16n8k16` with f32 accumulators. Activations are rounded to the weights' type when
// they are staged in shared memory, as a bf16 / f16 model does.
#define TBK 32
#define SROW 40  // shared row length in u16: TBK + 8, so the fragment reads hit 32 distinct banks

template <class W> struct Mma;
template <> struct Mma<WBF16> {
    static __device__ __forceinline__ void run(float* c, const u32* a, u32 b0, u32 b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};
template <> struct Mma<WF16> {
    static __device__ __forceinline__ void run(float* c, const u32* a, u32 b0, u32 b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

__device__ __forceinline__ u32 ld2(const u16* p) { return *reinterpret_cast<const u32*>(p); }

template <class W, int MODE>
__device__ __forceinline__ void gemm_mma(const float* __restrict__ a, const u32* __restrict__ idx,
                                         const u32* __restrict__ meta, u32 E, const u16* __restrict__ w,
                                         u64 w_stride, const float* __restrict__ bias, u32 b_stride,
                                         float* __restrict__ out, u32 N, u32 K, u32 act, float alpha, float limit) {
    __shared__ __align__(16) u16 As[BM][SROW];
    __shared__ __align__(16) u16 Bs[(MODE ? 2 : 1) * BN][SROW];
    u32 e, r0, r1;
    if (!tile_of(meta, E, blockIdx.y + blockIdx.z * gridDim.y, e, r0, r1)) return;
    const u32 n0 = blockIdx.x * BN;
    const u32 tid = threadIdx.x;
    const u32 warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    const u32 wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
    const u16* __restrict__ we = w + (u64)e * w_stride;
    // Staging: thread -> row lr, 16 consecutive k from kh.
    const u32 lr = tid >> 1, kh = (tid & 1) * 16;
    const u32 arow = r0 + lr;
    const bool a_ok = arow < r1;
    const float* __restrict__ asrc = a + (a_ok ? (u64)(idx ? idx[arow] : arow) * K : 0);
    const bool b_ok = n0 + lr < N;
    const u16* __restrict__ bsrc = we + (b_ok ? (u64)(n0 + lr) * K : 0);
    const u16* __restrict__ bsrc2 = we + (b_ok ? (u64)(N + n0 + lr) * K : 0);
    const bool vec = (K & 7u) == 0;
    float acc[2][4][4], acc2[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) { acc[i][j][q] = 0.0f; acc2[i][j][q] = 0.0f; }
    for (u32 k0 = 0; k0 < K; k0 += TBK) {
        const u32 kb = k0 + kh;
        if (vec && kb + 16 <= K) {
            u32 pk[8];
            if (a_ok) {
                const float4* p = reinterpret_cast<const float4*>(asrc + kb);
#pragma unroll
                for (int v = 0; v < 4; v++) {
                    float4 f = p[v];
                    pk[2 * v] = (u32)W::put(f.x) | ((u32)W::put(f.y) << 16);
                    pk[2 * v + 1] = (u32)W::put(f.z) | ((u32)W::put(f.w) << 16);
                }
            } else {
#pragma unroll
                for (int v = 0; v < 8; v++) pk[v] = 0;
            }
            uint4* dst = reinterpret_cast<uint4*>(&As[lr][kh]);
            dst[0] = make_uint4(pk[0], pk[1], pk[2], pk[3]);
            dst[1] = make_uint4(pk[4], pk[5], pk[6], pk[7]);
            const uint4 z = make_uint4(0, 0, 0, 0);
            const uint4* pb = reinterpret_cast<const uint4*>(bsrc + kb);
            uint4* db = reinterpret_cast<uint4*>(&Bs[lr][kh]);
            db[0] = b_ok ? pb[0] : z;
            db[1] = b_ok ? pb[1] : z;
            if (MODE) {
                const uint4* pb2 = reinterpret_cast<const uint4*>(bsrc2 + kb);
                uint4* db2 = reinterpret_cast<uint4*>(&Bs[BN + lr][kh]);
                db2[0] = b_ok ? pb2[0] : z;
                db2[1] = b_ok ? pb2[1] : z;
            }
        } else {
#pragma unroll
            for (int i = 0; i < 16; i++) {
                const u32 k = kb + i;
                const bool kin = k < K;
                As[lr][kh + i] = (a_ok && kin) ? W::put(asrc[k]) : (u16)0;
                Bs[lr][kh + i] = (b_ok && kin) ? bsrc[k] : (u16)0;
                if (MODE) Bs[BN + lr][kh + i] = (b_ok && kin) ? bsrc2[k] : (u16)0;
            }
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TBK; kk += 16) {
            u32 af[2][4];
#pragma unroll
            for (int mi = 0; mi < 2; mi++) {
                const u32 r = wm + mi * 16 + g;
                af[mi][0] = ld2(&As[r][kk + 2 * t4]);
                af[mi][1] = ld2(&As[r + 8][kk + 2 * t4]);
                af[mi][2] = ld2(&As[r][kk + 2 * t4 + 8]);
                af[mi][3] = ld2(&As[r + 8][kk + 2 * t4 + 8]);
            }
#pragma unroll
            for (int ni = 0; ni < 4; ni++) {
                const u32 c = wn + ni * 8 + g;
                const u32 b0 = ld2(&Bs[c][kk + 2 * t4]);
                const u32 b1 = ld2(&Bs[c][kk + 2 * t4 + 8]);
#pragma unroll
                for (int mi = 0; mi < 2; mi++) Mma<W>::run(acc[mi][ni], af[mi], b0, b1);
                if (MODE) {
                    const u32 c0 = ld2(&Bs[BN + c][kk + 2 * t4]);
                    const u32 c1 = ld2(&Bs[BN + c][kk + 2 * t4 + 8]);
#pragma unroll
                    for (int mi = 0; mi < 2; mi++) Mma<W>::run(acc2[mi][ni], af[mi], c0, c1);
                }
            }
        }
        __syncthreads();
    }
    const u64 bbase = (u64)e * b_stride;
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int ni = 0; ni < 4; ni++)
#pragma unroll
            for (int q = 0; q < 4; q++) {
                const u32 row = r0 + wm + mi * 16 + g + (q >= 2 ? 8 : 0);
                const u32 n = n0 + wn + ni * 8 + 2 * t4 + (q & 1);
                if (row >= r1 || n >= N) continue;
                out[(u64)row * N + n] =
                    epilogue<MODE>(acc[mi][ni][q], acc2[mi][ni][q], n, N, act, bias, bbase, alpha, limit);
            }
}

#define GEMM_ARGS                                                                                                \
    const float *__restrict__ a, const u32 *__restrict__ idx, const u32 *__restrict__ meta, u32 E,            \
        const void *__restrict__ w, u64 w_stride, const float *__restrict__ bias, u32 b_stride,                 \
        float *__restrict__ out, u32 N, u32 K, u32 act, float alpha, float limit
#define GEMM_PASS a, idx, meta, E, w, w_stride, bias, b_stride, out, N, K, act, alpha, limit

#define FMA_KERNEL(name, W, MODE)                                                                                \
    extern "C" __global__ void __launch_bounds__(256) name(GEMM_ARGS) {                                        \
        gemm_fma<W, MODE>(a, idx, meta, E, (const W::T*)w, w_stride, bias, b_stride, out, N, K, act, alpha,   \
                          limit);                                                                               \
    }
#define MMA_KERNEL(name, W, MODE)                                                                                \
    extern "C" __global__ void __launch_bounds__(128) name(GEMM_ARGS) {                                        \
        gemm_mma<W, MODE>(a, idx, meta, E, (const u16*)w, w_stride, bias, b_stride, out, N, K, act, alpha,    \
                          limit);                                                                               \
    }

FMA_KERNEL(gemm_fma_f32_0, WF32, 0)
FMA_KERNEL(gemm_fma_f32_1, WF32, 1)
FMA_KERNEL(gemm_fma_f32_2, WF32, 2)
FMA_KERNEL(gemm_fma_bf16_0, WBF16, 0)
FMA_KERNEL(gemm_fma_bf16_1, WBF16, 1)
FMA_KERNEL(gemm_fma_bf16_2, WBF16, 2)
FMA_KERNEL(gemm_fma_f16_0, WF16, 0)
FMA_KERNEL(gemm_fma_f16_1, WF16, 1)
FMA_KERNEL(gemm_fma_f16_2, WF16, 2)
#if __CUDA_ARCH__ >= 800
MMA_KERNEL(gemm_mma_bf16_0, WBF16, 0)
MMA_KERNEL(gemm_mma_bf16_1, WBF16, 1)
MMA_KERNEL(gemm_mma_bf16_2, WBF16, 2)
MMA_KERNEL(gemm_mma_f16_0, WF16, 0)
MMA_KERNEL(gemm_mma_f16_1, WF16, 1)
MMA_KERNEL(gemm_mma_f16_2, WF16, 2)
#endif

// ---------------------------------------------------------------------------------------------------------------
// Routing: token-choice top-k, one thread per token. Selection values are written once per token to `sel`
// ([T, E] scratch), then k passes pick the best remaining in the exact-arithmetic order of the CPU router
// (kit::rank_cmp): descending value, then descending logit (distinct logits never tie through f32 saturation), then
// the lower index.

__device__ __forceinline__ float softplusf_(float x) {
    if (x > 20.0f) return x;
    if (x < -20.0f) return expf(x);
    return log1pf(expf(x));
}

__device__ __forceinline__ float score_value(float l, u32 score, float m, float s) {
    if (score == 0) return expf(l - m) / s;
    if (score == 1) return sigmoidf_(l);
    return sqrtf(softplusf_(l));
}

// Whether (v, l, j) comes after (pv, pl, pj) in the selection order.
__device__ __forceinline__ bool after(float v, float l, u32 j, float pv, float pl, u32 pj) {
    return v < pv || (v == pv && (l < pl || (l == pl && j > pj)));
}

// Whether (v, l) beats (bv, bl) for a later index (scans run in ascending index: equal pairs keep the first).
__device__ __forceinline__ bool beats(float v, float l, float bv, float bl) { return v > bv || (v == bv && l > bl); }

// score: 0 softmax, 1 sigmoid, 2 sqrt-softplus. order: 0 score then top-k, 1 top-k of logits then softmax.
extern "C" __global__ void route_topk(const float* __restrict__ logits, const float* __restrict__ corr,
                                      const u32* __restrict__ pad, float* __restrict__ sel, u32 T, u32 E, u32 k,
                                      u32 score, u32 order, u32 renorm, float scaling, u32 ng, u32 tg,
                                      u32* __restrict__ a_expert, float* __restrict__ a_weight,
                                      u32* __restrict__ a_info) {
    const u32 t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const u64 base = (u64)t * E;
    const u64 ab = (u64)t * k;
    if (pad && pad[t]) {
        for (u32 r = 0; r < k; r++) {
            a_expert[ab + r] = NONE;
            a_weight[ab + r] = 0.0f;
            a_info[ab + r] = r;
        }
        return;
    }
    float m = -3.402823e38f, s = 0.0f;
    if (order == 0 && score == 0) {
        m = logits[base];
        for (u32 j = 1; j < E; j++) m = fmaxf(m, logits[base + j]);
        for (u32 j = 0; j < E; j++) s += expf(logits[base + j] - m);
    }
    for (u32 j = 0; j < E; j++) {
        const float l = logits[base + j];
        float v = order == 0 ? score_value(l, score, m, s) : l;
        if (corr) v += corr[j];
        sel[base + j] = v;
    }
    // Group-limited selection: a group's score is the sum of its top-2 selection values (ranked as above), its key
    // the sum of their logits; the tg best groups by (score, key, lower group) are eligible.
    const u32 gsize = ng > 0 ? E / ng : E;
    float gsc[MAXG];
    float gkey[MAXG];
    float thr_v = 0.0f, thr_l = 0.0f;
    u32 thr_i = 0;
    if (ng > 0) {
        for (u32 gi = 0; gi < ng; gi++) {
            float b1 = -3.402823e38f, l1 = -3.402823e38f, b2 = -3.402823e38f, l2 = -3.402823e38f;
            for (u32 j = gi * gsize; j < (gi + 1) * gsize; j++) {
                const float v = sel[base + j];
                const float l = logits[base + j];
                if (beats(v, l, b1, l1)) {
                    b2 = b1; l2 = l1; b1 = v; l1 = l;
                } else if (beats(v, l, b2, l2)) {
                    b2 = v; l2 = l;
                }
            }
            gsc[gi] = gsize > 1 ? b1 + b2 : b1;
            gkey[gi] = gsize > 1 ? l1 + l2 : l1;
        }
        float pv = 0.0f, pl = 0.0f;
        u32 pj = NONE;
        for (u32 r = 0; r < tg; r++) {
            float bv = 0.0f, bl = 0.0f;
            u32 bj = NONE;
            for (u32 gi = 0; gi < ng; gi++) {
                const float v = gsc[gi], l = gkey[gi];
                if (pj != NONE && !after(v, l, gi, pv, pl, pj)) continue;
                if (bj == NONE || beats(v, l, bv, bl)) { bv = v; bl = l; bj = gi; }
            }
            pv = bv;
            pl = bl;
            pj = bj;
        }
        thr_v = pv;
        thr_l = pl;
        thr_i = pj;
    }
    u32 ids[MAXK];
    float ws[MAXK];
    float pv = 0.0f, pl = 0.0f;
    u32 pj = NONE;
    for (u32 r = 0; r < k; r++) {
        float bv = 0.0f, bl = 0.0f;
        u32 bj = NONE;
        for (u32 j = 0; j < E; j++) {
            if (ng > 0) {
                const u32 gi = j / gsize;
                if (after(gsc[gi], gkey[gi], gi, thr_v, thr_l, thr_i)) continue;
            }
            const float v = sel[base + j];
            const float l = logits[base + j];
            if (pj != NONE && !after(v, l, j, pv, pl, pj)) continue;
            if (bj == NONE || beats(v, l, bv, bl)) { bv = v; bl = l; bj = j; }
        }
        ids[r] = bj;
        pv = bv;
        pl = bl;
        pj = bj;
    }
    if (order == 1) {
        float mm = logits[base + ids[0]];
        for (u32 r = 1; r < k; r++) mm = fmaxf(mm, logits[base + ids[r]]);
        float ss = 0.0f;
        for (u32 r = 0; r < k; r++) {
            ws[r] = expf(logits[base + ids[r]] - mm);
            ss += ws[r];
        }
        for (u32 r = 0; r < k; r++) ws[r] = ws[r] / ss * scaling;
    } else {
        float sum = 0.0f;
        for (u32 r = 0; r < k; r++) {
            ws[r] = score_value(logits[base + ids[r]], score, m, s);
            sum += ws[r];
        }
        if (renorm) {
            sum += 1e-20f;
            for (u32 r = 0; r < k; r++) ws[r] /= sum;
        }
        if (scaling != 1.0f)
            for (u32 r = 0; r < k; r++) ws[r] *= scaling;
    }
    for (u32 r = 0; r < k; r++) {
        u32 pos = 0;
        for (u32 q = 0; q < k; q++) pos += ids[q] < ids[r] ? 1u : 0u;
        a_expert[ab + pos] = ids[r];
        a_weight[ab + pos] = ws[r];
        a_info[ab + pos] = r;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Grouping by expert: a stable counting sort over chunks of CHUNK assignments, so each expert's rows are in
// ascending token order and no atomics decide an order.

__device__ __forceinline__ bool kept(const u32* __restrict__ ex, const u32* __restrict__ info, u32 i) {
    return ex[i] != NONE && (info[i] & DROPPED) == 0;
}

// counts[c * E + e] = kept assignments of expert e in chunk c. Dynamic shared memory: E words.
extern "C" __global__ void __launch_bounds__(CHUNK) group_count(const u32* __restrict__ ex,
                                                                const u32* __restrict__ info, u32 n, u32 E,
                                                                u32* __restrict__ counts) {
    extern __shared__ u32 hist[];
    for (u32 e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
    __syncthreads();
    const u32 i = blockIdx.x * CHUNK + threadIdx.x;
    if (i < n && kept(ex, info, i)) atomicAdd(&hist[ex[i]], 1u);
    __syncthreads();
    for (u32 e = threadIdx.x; e < E; e += blockDim.x) counts[(u64)blockIdx.x * E + e] = hist[e];
}

// One block of 256 threads: meta = row offsets and row-tile offsets (see the top of this file); counts become
// each chunk's first slot per expert.
extern "C" __global__ void __launch_bounds__(256) group_scan(u32* __restrict__ counts, u32 chunks, u32 E,
                                                             u32* __restrict__ meta) {
    __shared__ u32 rows[256], tiles[256];
    const u32 per = (E + 255) / 256;
    const u32 lo = min(threadIdx.x * per, E), hi = min(lo + per, E);
    u32 rsum = 0, tsum = 0;
    for (u32 e = lo; e < hi; e++) {
        u32 c = 0;
        for (u32 ch = 0; ch < chunks; ch++) c += counts[(u64)ch * E + e];
        meta[e] = c;  // total, for now
        rsum += c;
        tsum += (c + BM - 1) / BM;
    }
    rows[threadIdx.x] = rsum;
    tiles[threadIdx.x] = tsum;
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 ra = 0, ta = 0;
        for (u32 i = 0; i < 256; i++) {
            const u32 r = rows[i], q = tiles[i];
            rows[i] = ra;
            tiles[i] = ta;
            ra += r;
            ta += q;
        }
        meta[E] = ra;
        meta[2 * E + 1] = ta;
    }
    __syncthreads();
    u32 ra = rows[threadIdx.x], ta = tiles[threadIdx.x];
    for (u32 e = lo; e < hi; e++) {
        const u32 c = meta[e];
        meta[e] = ra;
        meta[E + 1 + e] = ta;
        u32 at = ra;
        for (u32 ch = 0; ch < chunks; ch++) {
            const u32 v = counts[(u64)ch * E + e];
            counts[(u64)ch * E + e] = at;
            at += v;
        }
        ra += c;
        ta += (c + BM - 1) / BM;
    }
}

// Slot of each kept assignment: its chunk's first slot for the expert plus the kept assignments of the same
// expert before it in the chunk. assign_slot[i] = slot + 1 (0: not kept).
extern "C" __global__ void __launch_bounds__(CHUNK) group_scatter(const u32* __restrict__ ex,
                                                                  const u32* __restrict__ info,
                                                                  const float* __restrict__ weight, u32 n, u32 k,
                                                                  u32 E, const u32* __restrict__ firsts,
                                                                  u32* __restrict__ slot_token,
                                                                  float* __restrict__ slot_weight,
                                                                  u32* __restrict__ assign_slot) {
    __shared__ u32 se[CHUNK];
    const u32 i0 = blockIdx.x * CHUNK;
    const u32 i = i0 + threadIdx.x;
    se[threadIdx.x] = (i < n && kept(ex, info, i)) ? ex[i] : NONE;
    __syncthreads();
    if (i >= n) return;
    const u32 e = se[threadIdx.x];
    if (e == NONE) {
        assign_slot[i] = 0;
        return;
    }
    u32 rank = 0;
    for (u32 j = 0; j < threadIdx.x; j++) rank += se[j] == e ? 1u : 0u;
    const u32 slot = firsts[(u64)blockIdx.x * E + e] + rank;
    slot_token[slot] = i / k;
    slot_weight[slot] = weight[i];
    assign_slot[i] = slot + 1;
}

// ---------------------------------------------------------------------------------------------------------------
// Shared-expert gate and combine.

// out[t] = sigmoid(x[t] . g): one warp per token.
extern "C" __global__ void shared_gate(const float* __restrict__ x, const float* __restrict__ g, u32 T, u32 d,
                                       float* __restrict__ out) {
    const u32 t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const u32 lane = threadIdx.x & 31;
    if (t >= T) return;
    float s = 0.0f;
    for (u32 j = lane; j < d; j += 32) s = fmaf(x[(u64)t * d + j], g[j], s);
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) out[t] = sigmoidf_(s);
}

// y[t, c] = scale * sum_p w[s_p] * out[s_p, c] (+ shared, times its gate) (+ bias[c]), over token t's slots in
// ascending expert order. Token t's slot entries (slot + 1, 0: none) are [t * fk, +fk), or off[t]..off[t+1]
// when fk = 0. shared: 0 none, 1 added, 2 added times sg[t].
extern "C" __global__ void combine(const float* __restrict__ out, const float* __restrict__ w,
                                   const u32* __restrict__ slots, const u32* __restrict__ off, u32 fk, u32 T, u32 d,
                                   float scale, u32 shared, const float* __restrict__ sh,
                                   const float* __restrict__ sg, const float* __restrict__ bias,
                                   float* __restrict__ y) {
    const u64 id = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (id >= (u64)T * d) return;
    const u32 t = (u32)(id / d), c = (u32)(id % d);
    u32 lo = t * fk, hi = lo + fk;
    if (fk == 0) { lo = off[t]; hi = off[t + 1]; }
    float acc = 0.0f;
    for (u32 p = lo; p < hi; p++) {
        const u32 s1 = slots[p];
        if (s1 == 0) continue;
        const u32 s = s1 - 1;
        acc += w[s] * out[(u64)s * d + c];
    }
    if (scale != 1.0f) acc *= scale;
    if (shared == 1) acc += sh[id];
    if (shared == 2) acc += sg[t] * sh[id];
    if (bias) acc += bias[c];
    y[id] = acc;
}
