/* SwiGLU's gate: out[t, i] = silu(g[t, i]) * u[t, i] with [g, u] = gu[t] (rows of 2I), silu(g) = g / (1 + e^-g).
 *
 * In PyTorch this is a chunk, a silu and a multiply, three ops with a fixed cost each for a few microseconds of
 * work at decode sizes. The module path (activation.py) and the fused decoder layer (decoder_layer.c) both run
 * this one, so the two compute the same bits.
 */
#include <math.h>
#include <stdint.h>

void dist_infer_silu_mul_f32(const float *gu, int64_t T, int64_t I, int64_t nthreads, float *out)
{
#pragma omp parallel for num_threads(nthreads) schedule(static) if (T * I >= 65536)
    for (int64_t t = 0; t < T; ++t) {
        const float *g = gu + t * 2 * I, *u = g + I;
        float *o = out + t * I;
#pragma omp simd
        for (int64_t i = 0; i < I; ++i)
            o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}
