/* RMSNorm with the residual add in front, fp32, one pass over each row:
 *
 *   r' = x + r            (r' = x when there is no residual)
 *   y  = w * r' / sqrt(mean(r'^2) + eps)
 *
 *   x, r, r', y [T, H] contiguous rows; w [H].
 *
 * PyTorch runs this as two ops with a fixed cost of tens of microseconds each on a small CPU, paid twice per
 * layer per step; at decode sizes (T of a few rows) the work itself is a few hundred nanoseconds. Rows are split
 * between the caller's OpenMP threads only when there are enough of them to pay for waking the threads.
 */
#include <math.h>
#include <stdint.h>

void dist_infer_add_rms_norm_f32(const float *x, const float *r, const float *w, int64_t T, int64_t H, float eps,
                                 int64_t nthreads, float *r_out, float *y)
{
#pragma omp parallel for num_threads(nthreads) schedule(static) if (T * H >= 65536)
    for (int64_t t = 0; t < T; ++t) {
        const float *xt = x + t * H;
        float *rt = r_out ? r_out + t * H : 0;
        float *yt = y + t * H;
        float ss = 0.0f;
        if (r) {
            const float *in = r + t * H;
#pragma omp simd reduction(+ : ss)
            for (int64_t h = 0; h < H; ++h) {
                const float v = xt[h] + in[h];
                rt[h] = v;
                ss += v * v;
            }
        } else {
#pragma omp simd reduction(+ : ss)
            for (int64_t h = 0; h < H; ++h)
                ss += xt[h] * xt[h];
        }
        const float *src = r ? rt : xt;
        const float inv = 1.0f / sqrtf(ss / (float)H + eps);
#pragma omp simd
        for (int64_t h = 0; h < H; ++h)
            yt[h] = w[h] * (src[h] * inv);
    }
}
