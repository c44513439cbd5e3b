/* One Llama-style decoder layer's decode step in two calls, for single-token queries on the CPU, fp32
 * activations and natively quantized (int4 / int8) projections -- what runs per layer per token without a
 * round trip through Python and PyTorch between its dozen small ops.
 *
 * Attention half, dist_infer_decoder_attn, for T tokens (one per sequence, b = t):
 *   r'  = x + r                     (r' = x in a stage's first layer, r = NULL)
 *   h   = w1 * r' / sqrt(mean(r'^2) + eps)
 *   qkv = h Wqkv~^T + b_qkv          [T, (Hq + 2 Hk) D]: q heads, then k heads, then v heads
 *   q, k <- RoPE(q, k): x_i cos_i - x_{i+D/2} sin_i, x_{i+D/2} cos_{i+D/2} + x_i sin_{i+D/2}  (i < D/2)
 *   cache[slot_t] <- k_t, v_t
 *   a   = paged decode attention of q_t over the sequence's cached keys (paged_decode.c)
 *   o   = a Wo~^T (+ b_o when given: the caller passes it only where no tensor-parallel sum follows)
 * MLP half, dist_infer_decoder_mlp, given o (summed over tensor-parallel ranks by the caller):
 *   r'' = o + r';  h = w2 * r'' / rms(r'');  [g, u] = h Wgu~^T (+ b_gu);  out = (silu(g) * u) Wdown~^T (+ b_down)
 *
 * The projections are quant_matmul.c's kernels (int8 activations times the codes), the norms rms_norm.c's, the
 * attention paged_decode.c's, SiLU * up silu_mul.c's: this file only strings them together, so each piece is
 * the one tested alone, and the module path (which runs the same pieces) computes the same bits.
 * cos / sin are the step's rows of the RoPE tables, [T, D]. The caches are [NB, bs, Hk, D] fp32.
 */
#include "paged_decode.c"
#include "quant_matmul.c"
#include "rms_norm.c"
#include "silu_mul.c"

typedef struct {
    int64_t kind; /* 1: int4 (scales = fp16 d and m, [N, 2, K / group]); 2: int8 (scales = fp32 [N]) */
    const void *codes;
    const void *scales;
    const float *bias; /* [N] or NULL */
    int64_t N, K, group;
} dl_linear;

typedef struct {
    const float *ln1, *ln2; /* [H] */
    float eps1, eps2;
    dl_linear qkv, o, gate_up, down;
    int64_t H, Hq, Hk, D, I; /* hidden size, query heads, K/V heads, head size, MLP width (this rank's) */
    float scale;
    int64_t window; /* sliding window, 0 for none */
    float *k_cache, *v_cache;
    int64_t block_size;
} dl_layer;

typedef struct {
    int64_t T;
    const float *cos, *sin;    /* [T, D] */
    const int64_t *slots;      /* [T] */
    const int64_t *tables;     /* [T, W] */
    int64_t W;
    const int64_t *lens;       /* [T] */
    int64_t nthreads;
} dl_step;

static int linear(const dl_linear *w, const float *x, int64_t M, int64_t nthreads, float *y)
{
    const int rc = w->kind == 1 ? dist_infer_q4_matmul(x, M, w->K, w->codes, w->scales, w->N, w->group, nthreads, y)
                                : dist_infer_q8_matmul(x, M, w->K, w->codes, w->scales, w->N, nthreads, y);
    if (rc || !w->bias)
        return rc;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < w->N; ++n)
            y[m * w->N + n] += w->bias[n];
    return 0;
}

/* Rotates the q and k heads of each token's qkv row in place, then copies its k and v heads to its cache slot.
 * Products and sums are rounded separately, as PyTorch's x * cos + rotate_half(x) * sin rounds them (no fused
 * multiply-add), so that both paths write the same keys. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
static void rope_and_store(const dl_layer *L, const dl_step *S, float *qkv)
{
    const int64_t D = L->D, half = D / 2, width = (L->Hq + 2 * L->Hk) * D, kv = L->Hk * D;
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
    for (int64_t t = 0; t < S->T; ++t) {
        float *row = qkv + t * width;
        const float *c = S->cos + t * D, *s = S->sin + t * D;
        for (int64_t head = 0; head < L->Hq + L->Hk; ++head) {
            float *x = row + head * D;
            for (int64_t i = 0; i < half; ++i) {
                const float x1 = x[i], x2 = x[i + half];
                x[i] = x1 * c[i] - x2 * s[i];
                x[i + half] = x2 * c[i + half] + x1 * s[i + half];
            }
        }
        const int64_t slot = S->slots[t];
        memcpy(L->k_cache + slot * kv, row + L->Hq * D, sizeof(float) * kv);
        memcpy(L->v_cache + slot * kv, row + (L->Hq + L->Hk) * D, sizeof(float) * kv);
    }
}

/* x, r [T, H] (r may be NULL) -> r_out = x + r, o [T, H]. Returns nonzero when a buffer cannot be allocated. */
int dist_infer_decoder_attn(const dl_layer *L, const dl_step *S, const float *x, const float *r, float *r_out,
                            float *o)
{
    const int64_t T = S->T, H = L->H, D = L->D, width = (L->Hq + 2 * L->Hk) * D;
    float *h = malloc(sizeof(float) * T * H);
    float *qkv = malloc(sizeof(float) * T * width);
    float *a = malloc(sizeof(float) * T * L->Hq * D);
    int rc = !h || !qkv || !a;
    if (!rc) {
        if (!r) /* the stage's first layer: the residual stream starts as its input */
            memcpy(r_out, x, sizeof(float) * T * H);
        dist_infer_add_rms_norm_f32(r ? x : r_out, r, L->ln1, T, H, L->eps1, S->nthreads, r ? r_out : NULL, h);
        rc = linear(&L->qkv, h, T, S->nthreads, qkv);
    }
    if (!rc) {
        rope_and_store(L, S, qkv);
        dist_infer_paged_decode_f32(qkv, width, L->k_cache, L->v_cache, S->tables, S->lens, T, L->Hq, L->Hk, D,
                                    L->block_size, S->W, L->scale, L->window, a);
        rc = linear(&L->o, a, T, S->nthreads, o);
    }
    free(h), free(qkv), free(a);
    return rc;
}

/* o, r [T, H] -> r_out = o + r, out [T, H]. */
int dist_infer_decoder_mlp(const dl_layer *L, const dl_step *S, const float *o, const float *r, float *r_out,
                           float *out)
{
    const int64_t T = S->T, H = L->H, I = L->I;
    float *h = malloc(sizeof(float) * T * H);
    float *gu = malloc(sizeof(float) * T * 2 * I);
    float *act = malloc(sizeof(float) * T * I);
    int rc = !h || !gu || !act;
    if (!rc) {
        dist_infer_add_rms_norm_f32(o, r, L->ln2, T, H, L->eps2, S->nthreads, r_out, h);
        rc = linear(&L->gate_up, h, T, S->nthreads, gu);
    }
    if (!rc) {
        dist_infer_silu_mul_f32(gu, T, I, S->nthreads, act);
        rc = linear(&L->down, act, T, S->nthreads, out);
    }
    free(h), free(gu), free(act);
    return rc;
}
