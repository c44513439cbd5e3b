/* Weight-only quantized matmul on the CPU, y [M, N] = x [M, K] W~^T, with the activations quantized to int8 on
 * the fly (as llama.cpp does for its Q4_1 x Q8_1 and Q8_0 x Q8_0 dot products).
 *
 * Activations: each row of x is cut into blocks of 32 features; block b gets dx_b = max|x| / 127 and codes
 * a = round(x / dx_b) in [-127, 127], so x ~ dx_b * a. The kernels also take each int4 group's exact sum of x.
 *
 * int4 (w = q * d + m per output row n and group j of g input features, q in 0..15, d and m stored as fp16;
 * math.py's (q - z) * s is d = s, m = -z * s):
 *     y_n = sum_j [ d_nj * sum_{b in j} dx_b * sum_{k in b} a_k q_nk  +  m_nj * sum_{k in j} x_k ]
 *   codes [N, Kp / 2]: per block of 32 features 16 bytes, byte i = q[i] | q[i + 16] << 4 (GGUF's Q4 layout);
 *   dm [N, 2, Kp / g] fp16: the row's d of every group, then its m. Kp = K rounded up to g; padded features
 *   have x = 0.
 *
 * int8 (w = q * s_n, q in [-127, 127]):  y_n = s_n * sum_b dx_b * sum_{k in b} a_k q_nk
 *   codes [N, Kp] int8, Kp = K rounded up to 32 (padding codes 0); scale [N] fp32.
 *
 * The integer dot of one 32-feature block is exact in int32 (|a q| <= 127 * 127 * 32). Rows of W are split
 * between the caller's OpenMP threads (torch's pool: the same libgomp); each weight block is loaded once for
 * up to TILE rows of x. x86 with AVX2 (and AVX-VNNI / AVX512-VNNI where the compiler targets them), ARM NEON
 * with dot-product instructions, and a portable scalar path; the build (-march=native) picks one.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define QM_AVX2 1
#elif defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
#define QM_NEON 1
#endif

#define QBLOCK 32
#define TILE 4

static inline float fp16_to_f32(uint16_t h)
{
#if defined(QM_AVX2)
    return _cvtsh_ss(h);
#elif defined(QM_NEON)
    __fp16 v;
    memcpy(&v, &h, 2);
    return (float)v;
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: renormalize */
            int e = -1;
            uint32_t m = man;
            do {
                ++e;
                m <<= 1;
            } while (!(m & 0x400));
            bits = sign | (uint32_t)(127 - 15 - e) << 23 | (m & 0x3ff) << 13;
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | man << 13;
    } else {
        bits = sign | (exp + 127 - 15) << 23 | man << 13;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* One row of x [K] -> a [Kp] int8, dx [Kp / 32], and (int4) the sum of x over each group of g features. */
static void quantize_row(const float *x, int64_t K, int64_t Kp, int64_t g, int8_t *a, float *dx, float *gsum)
{
    const int64_t blocks = Kp / QBLOCK;
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t k0 = b * QBLOCK, k1 = k0 + QBLOCK < K ? k0 + QBLOCK : K;
        float amax = 0.0f, sum = 0.0f;
        for (int64_t k = k0; k < k1; ++k) {
            const float v = fabsf(x[k]);
            amax = v > amax ? v : amax;
            sum += x[k];
        }
        const float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        dx[b] = d;
        for (int64_t k = k0; k < k0 + QBLOCK; ++k)
            a[k] = k < k1 ? (int8_t)lrintf(x[k] * inv) : 0;
        if (gsum) {
            const int64_t j = k0 / g;
            gsum[j] = (k0 % g ? gsum[j] : 0.0f) + sum;
        }
    }
}

#if defined(QM_AVX2)
static inline float hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* sum over pairs of u8 x s8 products, as 8 int32 lanes */
static inline __m256i dot_u8s8(__m256i u, __m256i s)
{
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
#endif

/* int4: rows [n0, n1) of W against rows [m0, m0 + tm) of the quantized x. Always inlined with a constant tm
 * (TILE or 1), so that the accumulators live in registers. */
static inline __attribute__((always_inline)) void q4_rows(const uint8_t *codes, const uint16_t *dm, int64_t Kp, int64_t g, const int8_t *a,
                           const float *dx, const float *gsum, int64_t m0, int64_t tm, int64_t n0, int64_t n1,
                           int64_t N, float *y)
{
    const int64_t blocks = Kp / QBLOCK, groups = Kp / g, per_group = g / QBLOCK;
    const int shift = per_group == 1 ? 0 : per_group == 2 ? 1 : 2; /* block b lies in group b >> shift */
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t *qrow = codes + n * (Kp / 2);
        const uint16_t *drow = dm + n * groups * 2, *mrow = drow + groups;
        float mterm[TILE] = {0};
#if defined(QM_AVX2)
        /* Two accumulators per row of x, for alternate blocks: one would wait on the previous FMA's latency. */
        __m256 acc0[TILE], acc1[TILE];
        for (int64_t r = 0; r < tm; ++r)
            acc0[r] = acc1[r] = _mm256_setzero_ps();
        const __m128i low = _mm_set1_epi8(0x0f);
        int64_t b = 0;
        for (; b + 2 <= blocks; b += 2) {
            const float d0 = fp16_to_f32(drow[b >> shift]), d1 = fp16_to_f32(drow[(b + 1) >> shift]);
            const __m128i p0 = _mm_loadu_si128((const __m128i *)(qrow + b * 16));
            const __m128i p1 = _mm_loadu_si128((const __m128i *)(qrow + b * 16 + 16));
            const __m256i q0 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(p0, 4), low), _mm_and_si128(p0, low));
            const __m256i q1 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(p1, 4), low), _mm_and_si128(p1, low));
            for (int64_t r = 0; r < tm; ++r) {
                const int64_t row = m0 + r;
                const int8_t *ar = a + row * Kp + b * QBLOCK;
                const __m256 s0 = _mm256_cvtepi32_ps(dot_u8s8(q0, _mm256_loadu_si256((const __m256i *)ar)));
                const __m256 s1 = _mm256_cvtepi32_ps(dot_u8s8(q1, _mm256_loadu_si256((const __m256i *)(ar + QBLOCK))));
                acc0[r] = _mm256_fmadd_ps(s0, _mm256_set1_ps(d0 * dx[row * blocks + b]), acc0[r]);
                acc1[r] = _mm256_fmadd_ps(s1, _mm256_set1_ps(d1 * dx[row * blocks + b + 1]), acc1[r]);
            }
        }
        if (b < blocks) {
            const float d0 = fp16_to_f32(drow[b >> shift]);
            const __m128i p0 = _mm_loadu_si128((const __m128i *)(qrow + b * 16));
            const __m256i q0 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(p0, 4), low), _mm_and_si128(p0, low));
            for (int64_t r = 0; r < tm; ++r) {
                const int64_t row = m0 + r;
                const __m256 s0 = _mm256_cvtepi32_ps(
                    dot_u8s8(q0, _mm256_loadu_si256((const __m256i *)(a + row * Kp + b * QBLOCK))));
                acc0[r] = _mm256_fmadd_ps(s0, _mm256_set1_ps(d0 * dx[row * blocks + b]), acc0[r]);
            }
        }
        /* the m terms: a dot product of the row's m with the groups' sums of x */
        __m256 macc[TILE];
        for (int64_t r = 0; r < tm; ++r)
            macc[r] = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 8 <= groups; j += 8) {
            const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mrow + j)));
            for (int64_t r = 0; r < tm; ++r)
                macc[r] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(gsum + (m0 + r) * groups + j), macc[r]);
        }
        for (; j < groups; ++j)
            for (int64_t r = 0; r < tm; ++r)
                mterm[r] += fp16_to_f32(mrow[j]) * gsum[(m0 + r) * groups + j];
        for (int64_t r = 0; r < tm; ++r)
            y[(m0 + r) * N + n] = hsum256(_mm256_add_ps(acc0[r], acc1[r])) + hsum256(macc[r]) + mterm[r];
#elif defined(QM_NEON)
        float32x4_t acc[TILE];
        for (int64_t r = 0; r < tm; ++r)
            acc[r] = vdupq_n_f32(0.0f);
        const uint8x16_t low = vdupq_n_u8(0x0f);
        for (int64_t j = 0; j < groups; ++j) {
            const float d = fp16_to_f32(drow[j]), m = fp16_to_f32(mrow[j]);
            for (int64_t r = 0; r < tm; ++r)
                mterm[r] += m * gsum[(m0 + r) * groups + j];
            for (int64_t s = 0; s < per_group; ++s) {
                const int64_t b = j * per_group + s;
                const uint8x16_t packed = vld1q_u8(qrow + b * 16);
                const int8x16_t ql = vreinterpretq_s8_u8(vandq_u8(packed, low));
                const int8x16_t qh = vreinterpretq_s8_u8(vshrq_n_u8(packed, 4));
                for (int64_t r = 0; r < tm; ++r) {
                    const int64_t row = m0 + r;
                    const int8_t *ar = a + row * Kp + b * QBLOCK;
                    int32x4_t p = vdotq_s32(vdupq_n_s32(0), ql, vld1q_s8(ar));
                    p = vdotq_s32(p, qh, vld1q_s8(ar + 16));
                    acc[r] = vmlaq_n_f32(acc[r], vcvtq_f32_s32(p), d * dx[row * blocks + b]);
                }
            }
        }
        for (int64_t r = 0; r < tm; ++r)
            y[(m0 + r) * N + n] = vaddvq_f32(acc[r]) + mterm[r];
#else
        float acc[TILE] = {0};
        for (int64_t j = 0; j < groups; ++j) {
            const float d = fp16_to_f32(drow[j]), m = fp16_to_f32(mrow[j]);
            for (int64_t r = 0; r < tm; ++r)
                mterm[r] += m * gsum[(m0 + r) * groups + j];
            for (int64_t s = 0; s < per_group; ++s) {
                const int64_t b = j * per_group + s;
                const uint8_t *qb = qrow + b * 16;
                for (int64_t r = 0; r < tm; ++r) {
                    const int64_t row = m0 + r;
                    const int8_t *ar = a + row * Kp + b * QBLOCK;
                    int32_t dot = 0;
                    for (int i = 0; i < 16; ++i)
                        dot += (qb[i] & 0x0f) * ar[i] + (qb[i] >> 4) * ar[i + 16];
                    acc[r] += d * dx[row * blocks + b] * (float)dot;
                }
            }
        }
        for (int64_t r = 0; r < tm; ++r)
            y[(m0 + r) * N + n] = acc[r] + mterm[r];
#endif
    }
}

/* int8: rows [n0, n1) of W against rows [m0, m0 + tm) of the quantized x (inlined like q4_rows). */
static inline __attribute__((always_inline)) void q8_rows(const int8_t *codes, const float *scale, int64_t Kp, const int8_t *a, const float *dx,
                           int64_t m0, int64_t tm, int64_t n0, int64_t n1, int64_t N, float *y)
{
    const int64_t blocks = Kp / QBLOCK;
    for (int64_t n = n0; n < n1; ++n) {
        const int8_t *qrow = codes + n * Kp;
#if defined(QM_AVX2)
        __m256 acc0[TILE], acc1[TILE]; /* alternate blocks, as in q4_rows */
        for (int64_t r = 0; r < tm; ++r)
            acc0[r] = acc1[r] = _mm256_setzero_ps();
        int64_t b = 0;
        for (; b + 2 <= blocks; b += 2) {
            const __m256i q0 = _mm256_loadu_si256((const __m256i *)(qrow + b * QBLOCK));
            const __m256i q1 = _mm256_loadu_si256((const __m256i *)(qrow + b * QBLOCK + QBLOCK));
            const __m256i u0 = _mm256_sign_epi8(q0, q0), u1 = _mm256_sign_epi8(q1, q1); /* |q|; the sign moves to a */
            for (int64_t r = 0; r < tm; ++r) {
                const int64_t row = m0 + r;
                const int8_t *ar = a + row * Kp + b * QBLOCK;
                const __m256i a0 = _mm256_loadu_si256((const __m256i *)ar);
                const __m256i a1 = _mm256_loadu_si256((const __m256i *)(ar + QBLOCK));
                const __m256 s0 = _mm256_cvtepi32_ps(dot_u8s8(u0, _mm256_sign_epi8(a0, q0)));
                const __m256 s1 = _mm256_cvtepi32_ps(dot_u8s8(u1, _mm256_sign_epi8(a1, q1)));
                acc0[r] = _mm256_fmadd_ps(s0, _mm256_set1_ps(dx[row * blocks + b]), acc0[r]);
                acc1[r] = _mm256_fmadd_ps(s1, _mm256_set1_ps(dx[row * blocks + b + 1]), acc1[r]);
            }
        }
        if (b < blocks) {
            const __m256i q0 = _mm256_loadu_si256((const __m256i *)(qrow + b * QBLOCK));
            const __m256i u0 = _mm256_sign_epi8(q0, q0);
            for (int64_t r = 0; r < tm; ++r) {
                const int64_t row = m0 + r;
                const __m256i a0 = _mm256_loadu_si256((const __m256i *)(a + row * Kp + b * QBLOCK));
                const __m256 s0 = _mm256_cvtepi32_ps(dot_u8s8(u0, _mm256_sign_epi8(a0, q0)));
                acc0[r] = _mm256_fmadd_ps(s0, _mm256_set1_ps(dx[row * blocks + b]), acc0[r]);
            }
        }
        for (int64_t r = 0; r < tm; ++r)
            y[(m0 + r) * N + n] = hsum256(_mm256_add_ps(acc0[r], acc1[r])) * scale[n];
#elif defined(QM_NEON)
        float32x4_t acc[TILE];
        for (int64_t r = 0; r < tm; ++r)
            acc[r] = vdupq_n_f32(0.0f);
        for (int64_t b = 0; b < blocks; ++b) {
            const int8x16_t q0 = vld1q_s8(qrow + b * QBLOCK), q1 = vld1q_s8(qrow + b * QBLOCK + 16);
            for (int64_t r = 0; r < tm; ++r) {
                const int64_t row = m0 + r;
                const int8_t *ar = a + row * Kp + b * QBLOCK;
                int32x4_t p = vdotq_s32(vdupq_n_s32(0), q0, vld1q_s8(ar));
                p = vdotq_s32(p, q1, vld1q_s8(ar + 16));
                acc[r] = vmlaq_n_f32(acc[r], vcvtq_f32_s32(p), dx[row * blocks + b]);
            }
        }
        for (int64_t r = 0; r < tm; ++r)
            y[(m0 + r) * N + n] = vaddvq_f32(acc[r]) * scale[n];
#else
        float acc[TILE] = {0};
        for (int64_t b = 0; b < blocks; ++b) {
            const int8_t *qb = qrow + b * QBLOCK;
            for (int64_t r = 0; r < tm; ++r) {
                const int64_t row = m0 + r;
                const int8_t *ar = a + row * Kp + b * QBLOCK;
                int32_t dot = 0;
                for (int i = 0; i < QBLOCK; ++i)
                    dot += qb[i] * ar[i];
                acc[r] += dx[row * blocks + b] * (float)dot;
            }
        }
        for (int64_t r = 0; r < tm; ++r)
            y[(m0 + r) * N + n] = acc[r] * scale[n];
#endif
    }
}

/* Rows of W are handed out in chunks of ROWS_PER_TASK; each task runs every tile of x's rows over its chunk,
 * so a chunk's weights stay in cache while the x tiles pass over them. */
#define ROWS_PER_TASK 16

static int quantize_input(const float *x, int64_t M, int64_t K, int64_t Kp, int64_t g, int64_t nthreads,
                          int8_t **a, float **dx, float **gsum)
{
    *a = malloc((size_t)(M * Kp));
    *dx = malloc(sizeof(float) * (size_t)(M * (Kp / QBLOCK)));
    *gsum = g ? malloc(sizeof(float) * (size_t)(M * (Kp / g))) : NULL;
    if (!*a || !*dx || (g && !*gsum))
        return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M > 1)
    for (int64_t m = 0; m < M; ++m)
        quantize_row(x + m * K, K, Kp, g ? g : QBLOCK, *a + m * Kp, *dx + m * (Kp / QBLOCK),
                     g ? *gsum + m * (Kp / g) : NULL);
    return 0;
}

/* Both entry points: quantize x, then hand out chunks of W's rows; each chunk runs full tiles of x's rows, then
 * the rest one at a time, so that q4_rows / q8_rows are inlined with a constant tm. */
static inline __attribute__((always_inline)) int run(int q4, const float *x, int64_t M, int64_t K, int64_t Kp,
                                                     int64_t g, const void *codes, const void *scales, int64_t N,
                                                     int64_t nthreads, float *y)
{
    int8_t *a;
    float *dx, *gsum;
    if (quantize_input(x, M, K, Kp, q4 ? g : 0, nthreads, &a, &dx, &gsum)) {
        free(a), free(dx), free(gsum);
        return -1;
    }
    const int64_t tasks = (N + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
        const int64_t n0 = t * ROWS_PER_TASK, n1 = n0 + ROWS_PER_TASK < N ? n0 + ROWS_PER_TASK : N;
        int64_t m0 = 0;
        for (; m0 + TILE <= M; m0 += TILE) {
            if (q4)
                q4_rows(codes, scales, Kp, g, a, dx, gsum, m0, TILE, n0, n1, N, y);
            else
                q8_rows(codes, scales, Kp, a, dx, m0, TILE, n0, n1, N, y);
        }
        for (; m0 < M; ++m0) {
            if (q4)
                q4_rows(codes, scales, Kp, g, a, dx, gsum, m0, 1, n0, n1, N, y);
            else
                q8_rows(codes, scales, Kp, a, dx, m0, 1, n0, n1, N, y);
        }
    }
    free(a), free(dx), free(gsum);
    return 0;
}

int dist_infer_q4_matmul(const float *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *dm, int64_t N,
                         int64_t g, int64_t nthreads, float *y)
{
    return run(1, x, M, K, (K + g - 1) / g * g, g, codes, dm, N, nthreads, y);
}

int dist_infer_q8_matmul(const float *x, int64_t M, int64_t K, const int8_t *codes, const float *scale, int64_t N,
                         int64_t nthreads, float *y)
{
    return run(0, x, M, K, (K + QBLOCK - 1) / QBLOCK * QBLOCK, 0, codes, scale, N, nthreads, y);
}
