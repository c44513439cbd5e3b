/* Decode attention over a paged KV cache, fused: each key and value is read once, straight from its block.
 *
 *   q       [B, Hq, D]         one query token per sequence
 *   k, v    [NB, bs, Hk, D]    the cache blocks of one layer
 *   tables  [B, W]             block ids of each sequence (row b uses its first ceil(lens[b] / bs))
 *   lens    [B]                keys each query attends to, itself included
 *   out     [B, Hq, D]
 *
 * out[b, i] = sum_t softmax_t(scale * q[b, i] . k[t]) v[t] over the sequence's tokens t (the last `window`
 * ones when window > 0). The G = Hq / Hk query heads sharing K/V head h are processed together, block by
 * block, with an online softmax: running max m, running sum s, running weighted sum acc, rescaled by
 * exp(m_old - m_new) whenever the max grows.
 *
 * The int8 variant reads codes c with a scale per (block, K/V head), ks/vs [NB, Hk]: k = c * ks, v = c * vs
 * (see kv_int8.py); the scales are applied once per block to the dot products and the softmax weights.
 * Both variants share one body, run by every thread of the caller's parallel region (its loop is an orphaned
 * `omp for`). The parallel region sits in each entry point so that the inlined body sees i8 as a constant and is
 * specialized per element type; a region inside the body would be outlined with i8 as a runtime value, and
 * the loads would no longer vectorize (measured 7x slower).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* Built with -ffast-math (finite math), so "minus infinity" is -FLT_MAX: exp(-FLT_MAX - x) is still 0.
 * q_stride is the distance between consecutive tokens' queries (the queries may be a slice of a wider row). */
static inline __attribute__((always_inline)) void
decode(const float *q, int64_t q_stride, const void *k, const void *v, const float *ks, const float *vs, int i8,
       const int64_t *tables, const int64_t *lens, int64_t B, int64_t Hq, int64_t Hk, int64_t D, int64_t bs,
       int64_t W, float scale, int64_t window, float *out)
{
#define LOAD(base, i) (i8 ? (float)((const int8_t *)(base))[i] : ((const float *)(base))[i])
    const int64_t G = Hq / Hk;
    const int64_t tok_stride = Hk * D;
    const int64_t blk_stride = bs * Hk * D;
    {
        float *qs = malloc(sizeof(float) * G * D);
        float *acc = malloc(sizeof(float) * G * D);
        float *p = malloc(sizeof(float) * bs);
        float *m = malloc(sizeof(float) * G);
        float *s = malloc(sizeof(float) * G);
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < B * Hk; ++item) {
            const int64_t b = item / Hk, h = item % Hk;
            const int64_t L = lens[b];
            const int64_t first = (window > 0 && L > window) ? L - window : 0;
            for (int64_t g = 0; g < G; ++g) {
                const float *qg = q + b * q_stride + (h * G + g) * D;
                for (int64_t d = 0; d < D; ++d) {
                    qs[g * D + d] = qg[d] * scale;
                    acc[g * D + d] = 0.0f;
                }
                m[g] = -FLT_MAX;
                s[g] = 0.0f;
            }
            for (int64_t j = first / bs; j * bs < L; ++j) {
                const int64_t block = tables[b * W + j];
                const int64_t base = block * blk_stride + h * D;
                const float k_scale = i8 ? ks[block * Hk + h] : 1.0f;
                const float v_scale = i8 ? vs[block * Hk + h] : 1.0f;
                const int64_t t0 = (j * bs < first) ? first - j * bs : 0;
                const int64_t t1 = (L - j * bs < bs) ? L - j * bs : bs;
                for (int64_t g = 0; g < G; ++g) {
                    const float *qg = qs + g * D;
                    float block_max = -FLT_MAX;
                    for (int64_t t = t0; t < t1; ++t) {
                        const int64_t kt = base + t * tok_stride;
                        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                        for (int64_t d = 0; d < D; ++d)
                            dot += qg[d] * LOAD(k, kt + d);
                        dot *= k_scale;
                        p[t] = dot;
                        block_max = dot > block_max ? dot : block_max;
                    }
                    const float new_max = block_max > m[g] ? block_max : m[g];
                    const float correction = expf(m[g] - new_max);
                    float *ag = acc + g * D;
                    float sum = s[g] * correction;
#pragma omp simd
                    for (int64_t d = 0; d < D; ++d)
                        ag[d] *= correction;
#pragma omp simd reduction(+ : sum)
                    for (int64_t t = t0; t < t1; ++t) {
                        p[t] = expf(p[t] - new_max);
                        sum += p[t];
                    }
                    for (int64_t t = t0; t < t1; ++t) {
                        const int64_t vt = base + t * tok_stride;
                        const float w = p[t] * v_scale;
#pragma omp simd
                        for (int64_t d = 0; d < D; ++d)
                            ag[d] += w * LOAD(v, vt + d);
                    }
                    s[g] = sum;
                    m[g] = new_max;
                }
            }
            for (int64_t g = 0; g < G; ++g) {
                float *og = out + (b * Hq + h * G + g) * D;
                const float inv = 1.0f / s[g];
                for (int64_t d = 0; d < D; ++d)
                    og[d] = acc[g * D + d] * inv;
            }
        }
        free(qs);
        free(acc);
        free(p);
        free(m);
        free(s);
    }
}
#undef LOAD

void dist_infer_paged_decode_f32(const float *q, int64_t q_stride, const float *k, const float *v,
                                 const int64_t *tables, const int64_t *lens, int64_t B, int64_t Hq, int64_t Hk,
                                 int64_t D, int64_t bs, int64_t W, float scale, int64_t window, float *out)
{
#pragma omp parallel
    decode(q, q_stride, k, v, NULL, NULL, 0, tables, lens, B, Hq, Hk, D, bs, W, scale, window, out);
}

void dist_infer_paged_decode_i8(const float *q, int64_t q_stride, const int8_t *k, const int8_t *v, const float *ks,
                                const float *vs, const int64_t *tables, const int64_t *lens, int64_t B, int64_t Hq,
                                int64_t Hk, int64_t D, int64_t bs, int64_t W, float scale, int64_t window, float *out)
{
#pragma omp parallel
    decode(q, q_stride, k, v, ks, vs, 1, tables, lens, B, Hq, Hk, D, bs, W, scale, window, out);
}
