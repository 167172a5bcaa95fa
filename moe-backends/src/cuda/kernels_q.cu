
// ---------------------------------------------------------------------------------------------------------------
// Packed low-precision expert weights (moe-core `quant`), compiled after kernels.cu in the same module.
//
// One expert's weight is `[R, K]`, row-major with the reduction axis K contiguous, exactly as moe-core's
// `PackedMatrix` holds it (and as the checkpoints ship it); the bank's experts follow each other every `w_stride`
// bytes, their scales every `s_stride` scale elements:
// - int8: one byte per value (two's complement), f32 scale per row `[R]`: W[r, c] = q * s[r].
// - fp8: one FP8 E4M3 byte per value, f32 scale per block of br x bc values `[ceil(R / br), ceil(K / bc)]`
//   (DeepSeek-V3's `weight_scale_inv`, any block shape): W[r, c] = E4M3(q) * s[r / br, c / bc].
// - mxfp4: two E2M1 codes per byte (column 2i in the LOW nibble of byte i), E8M0 code per 32 values `[R, K / 32]`
//   (GPT-OSS's `*_blocks` / `*_scales`): W[r, c] = E2M1(q) * 2^(s - 127).
// Every decode is the code's exact value times its scale with ONE f32 rounding (`__fmul_rn`, never contracted
// into an FMA), which is moe-core's `ExpertMatrix::decode_row` bit for bit. Activations stay f32 and the products
// accumulate in f32.
//
// First products of gated banks read two weight rows per output n: gate row n and up row N + n (SwiGLU: gate rows
// then up rows), or, with `il` set, gate row 2n and up row 2n + 1 (GPT-OSS's interleaved `gate_up_proj_blocks`,
// whose bias `gate_up_proj_bias` is interleaved the same way).

// The exact value of an E2M1 code (bit 3 the sign), by bits rather than a table (no divergent table reads):
// magnitudes 0, 0.5, then 2^((c >> 1) - 1) * (1 + (c & 1) / 2) for c = 2..7, i.e. transformers' FP4_VALUES and
// moe-core's E2M1_VALUES, -0 included.
__device__ __forceinline__ float e2m1_f32(u32 code) {
    const u32 c = code & 7u;
    const u32 mag = c < 2u ? c * 0x3f000000u : ((((c >> 1) + 126u) << 23) | ((c & 1u) << 22));
    return __uint_as_float(((code & 8u) << 28) | mag);
}

// The exact value of an FP8 E4M3 ("fn") code; NaN for 0x7f / 0xff (a validated matrix holds none).
__device__ __forceinline__ float fp8_e4m3_f32(u32 q) {
    if ((q & 0x7fu) == 0x7fu) return __uint_as_float(0x7fc00000u);
    const u32 e = (q >> 3) & 0xfu, m = q & 7u;
    if (e == 0) {
        const float v = (float)m * 0.001953125f;  // m * 2^-9, exact
        return (q & 0x80u) ? -v : v;
    }
    // 2^(e - 7) * (1 + m / 8): f32 biased exponent e - 7 + 127, mantissa m in its top 3 bits.
    return __uint_as_float(((q & 0x80u) << 24) | ((e + 120u) << 23) | (m << 20));
}

// 2^(s - 127) for an E8M0 code (code 0 is the f32 subnormal 2^-127); NaN for 255.
__device__ __forceinline__ float e8m0_f32(u32 s) {
    if (s == 255u) return __uint_as_float(0x7fc00000u);
    return s == 0u ? __uint_as_float(1u << 22) : __uint_as_float(s << 23);
}

typedef unsigned char u8;

// One expert's packed weight, as a decoder reads it.
struct QW {
    const u8* __restrict__ data;  // R rows of the format's row bytes
    const void* __restrict__ s;   // this expert's scales
    u32 K;                        // columns
    u32 br, bc, gc;               // fp8: block rows, block columns, blocks per block row (ceil(K / bc))
};

// Decoders: `S` is the scale element type, `get` the value W[r, c].
struct QInt8 {
    typedef float S;
    static __device__ __forceinline__ float get(const QW& w, u32 r, u32 c) {
        const float s = ((const float*)w.s)[r];
        return __fmul_rn((float)(signed char)w.data[(u64)r * w.K + c], s);
    }
};
struct QFp8 {
    typedef float S;
    static __device__ __forceinline__ float get(const QW& w, u32 r, u32 c) {
        const float s = ((const float*)w.s)[(u64)(r / w.br) * w.gc + c / w.bc];
        return __fmul_rn(fp8_e4m3_f32(w.data[(u64)r * w.K + c]), s);
    }
};
struct QMxfp4 {
    typedef u8 S;
    static __device__ __forceinline__ float get(const QW& w, u32 r, u32 c) {
        const u32 byte = w.data[(u64)r * (w.K >> 1) + (c >> 1)];
        const u32 code = (c & 1u) ? (byte >> 4) : (byte & 15u);
        const u32 s = ((const u8*)w.s)[(u64)r * (w.K >> 5) + (c >> 5)];
        return __fmul_rn(e2m1_f32(code), e8m0_f32(s));
    }
};

// Expert e's weight.
template <class Q>
__device__ __forceinline__ QW q_expert(const u8* __restrict__ w, u64 w_stride, const void* __restrict__ scales,
                                       u64 s_stride, u32 e, u32 K, u32 br, u32 bc) {
    QW q;
    q.data = w + (u64)e * w_stride;
    q.s = (const typename Q::S*)scales + (u64)e * s_stride;
    q.K = K;
    q.br = br;
    q.bc = bc;
    q.gc = (K + bc - 1) / bc;
    return q;
}

// The epilogue with the biases of the row order at hand (`gr`, `ur`: the gate and up rows of output n).
template <int MODE>
__device__ __forceinline__ float q_epilogue(float g, float u, u32 n, u32 N, u32 gr, u32 ur, u32 act,
                                            const float* __restrict__ bias, u64 bbase, float alpha, float limit) {
    if (MODE == 0) return epilogue<0>(g, u, n, N, act, bias, bbase, alpha, limit);
    if (MODE == 2 && bias) {
        g += bias[bbase + gr];
        u += bias[bbase + ur];
    }
    return epilogue<MODE>(g, u, n, N, act, (const float*)0, 0, alpha, limit);
}

// f32 FMA tiles over packed weights, decoded as they are staged: 64 x 64 outputs per block of 256 threads, 4 x 4
// per thread, k steps of 16 (the tiling of `gemm_fma`, whose row tiles and grid it shares).
template <class Q, int MODE>
__device__ __forceinline__ void gemm_q(const float* __restrict__ a, const u32* __restrict__ idx,
                                       const u32* __restrict__ meta, u32 E, const u8* __restrict__ w, u64 w_stride,
                                       const void* __restrict__ scales, u64 s_stride, u32 br, u32 bc,
                                       const float* __restrict__ bias, u32 b_stride, float* __restrict__ out, u32 N,
                                       u32 K, u32 il, u32 act, float alpha, float limit) {
    __shared__ float As[16][BM + 4];
    __shared__ float Bs[16][BN + 4];
    __shared__ float Bs2[MODE ? 16 : 1][BN + 4];
    u32 e, r0, r1;
    if (!tile_of(meta, E, blockIdx.y + blockIdx.z * gridDim.y, e, r0, r1)) return;
    const u32 n0 = blockIdx.x * BN;
    const u32 tid = threadIdx.x;
    const u32 tx = tid & 15, ty = tid >> 4;
    const QW we = q_expert<Q>(w, w_stride, scales, s_stride, e, K, br, bc);
    const u32 lr = tid >> 2, lk = (tid & 3) * 4;
    const u32 arow = r0 + lr;
    const bool a_ok = arow < r1;
    const u64 asrc = a_ok ? (u64)(idx ? idx[arow] : arow) * K : 0;
    const u32 bn = n0 + lr;
    const bool b_ok = bn < N;
    const u32 grow = (MODE && il) ? 2 * bn : bn;
    const u32 urow = il ? 2 * bn + 1 : N + bn;
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
            Bs[lk + i][lr] = (b_ok && kin) ? Q::get(we, grow, k) : 0.0f;
            if (MODE) Bs2[lk + i][lr] = (b_ok && kin) ? Q::get(we, urow, k) : 0.0f;
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
            const u32 gr = il ? 2 * n : n, ur = il ? 2 * n + 1 : N + n;
            out[(u64)row * N + n] =
                q_epilogue<MODE>(acc[i][j], acc2[i][j], n, N, gr, ur, act, bias, bbase, alpha, limit);
        }
    }
}

#define QGEMM_ARGS                                                                                               \
    const float *__restrict__ a, const u32 *__restrict__ idx, const u32 *__restrict__ meta, u32 E,            \
        const u8 *__restrict__ w, u64 w_stride, const void *__restrict__ scales, u64 s_stride, u32 br, u32 bc,  \
        const float *__restrict__ bias, u32 b_stride, float *__restrict__ out, u32 N, u32 K, u32 il, u32 act,   \
        float alpha, float limit

#define Q_KERNEL(name, Q, MODE)                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) name(QGEMM_ARGS) {                                       \
        gemm_q<Q, MODE>(a, idx, meta, E, w, w_stride, scales, s_stride, br, bc, bias, b_stride, out, N, K, il,  \
                        act, alpha, limit);                                                                     \
    }

Q_KERNEL(gemm_q_int8_0, QInt8, 0)
Q_KERNEL(gemm_q_int8_1, QInt8, 1)
Q_KERNEL(gemm_q_int8_2, QInt8, 2)
Q_KERNEL(gemm_q_fp8_0, QFp8, 0)
Q_KERNEL(gemm_q_fp8_1, QFp8, 1)
Q_KERNEL(gemm_q_fp8_2, QFp8, 2)
Q_KERNEL(gemm_q_mxfp4_0, QMxfp4, 0)
Q_KERNEL(gemm_q_mxfp4_1, QMxfp4, 1)
Q_KERNEL(gemm_q_mxfp4_2, QMxfp4, 2)

// The decoded matrix `out [E, R, K]` (f32), each value as the products stage it: the check that the device decode
// is moe-core's bit for bit. Grid-stride over E * R * K values.
template <class Q>
__device__ __forceinline__ void decode_q(const u8* __restrict__ w, u64 w_stride, const void* __restrict__ scales,
                                         u64 s_stride, u32 E, u32 R, u32 K, u32 br, u32 bc,
                                         float* __restrict__ out) {
    const u64 total = (u64)E * R * K;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const u32 c = (u32)(i % K), r = (u32)(i / K % R), e = (u32)(i / ((u64)K * R));
        out[i] = Q::get(q_expert<Q>(w, w_stride, scales, s_stride, e, K, br, bc), r, c);
    }
}

#define DECODE_ARGS                                                                                              \
    const u8 *__restrict__ w, u64 w_stride, const void *__restrict__ scales, u64 s_stride, u32 E, u32 R, u32 K, \
        u32 br, u32 bc, float *__restrict__ out
#define DECODE_KERNEL(name, Q)                                                                                   \
    extern "C" __global__ void name(DECODE_ARGS) { decode_q<Q>(w, w_stride, scales, s_stride, E, R, K, br, bc, out); }

DECODE_KERNEL(decode_q_int8, QInt8)
DECODE_KERNEL(decode_q_fp8, QFp8)
DECODE_KERNEL(decode_q_mxfp4, QMxfp4)
