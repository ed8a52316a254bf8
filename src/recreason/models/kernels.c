/* Compiled kernels for bf16 decoding on CPU (recreason.models.kernels builds and loads them): the attention over a
 * shared prompt cache, and the llama family's RMS norm (at the end of this file).
 *
 * One decoding step's attention over a shared prompt cache, for bf16 models on CPU: what
 * recreason.models.registry.SharedPrefix.attend computes with some 25 torch operations a layer, in one pass.
 *
 * Every row r (a draw, or draws that agree) belongs to prompt owner[r]. Each of its query heads meets the prompt's
 * keys (kept once for all of the prompt's rows) and the row's own keys (its last prompt token and what it wrote),
 * one softmax over both, then the weighted sum of the matching values. The roundings are the torch path's: scores
 * rounded to bf16 after their dot product (and after the bias is added), the softmax in fp32, its weights rounded to
 * bf16, the weighted sums in fp32 (prompt part and own part apart, then added), the output rounded to bf16 once.
 * Only the order of the sums inside a dot product and the exponential's last bits differ from torch's kernels, so
 * an output can differ from the torch path's in its last bit (tested against it).
 *
 * Layouts (all contiguous; bf16 as uint16_t):
 *   q        [rows, kv_heads, group, dim] bf16; times pre_scale (rounded to bf16) before use: the scaling where it
 *            is a power of two, which scales exactly (else 1)
 *   keys_t   [prompts, kv_heads, dim, length] fp32: the prompt keys transposed, so a score is a sum of whole rows
 *   values   [prompts, kv_heads, length, dim] fp32
 *   bias     [prompts, length] fp32: 0 on the prompt's tokens, the bf16 minimum on padding
 *   own_k, own_v [rows, kv_heads, own, dim] bf16; own_bias [rows, own] fp32 or NULL
 *   out      [rows, kv_heads, group, dim] bf16
 * post_scale: multiplies the bf16 scores (rounded again) where the queries were not scaled; 1 skips it.
 * Work is split over (row, kv head) pairs with OpenMP: in the process that loaded torch the OpenMP runtime is
 * torch's own (the same libgomp.so.1), so this runs on torch's threads. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch's conversion (no NaNs here) */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* exp(x) to about 1 ulp of fp32 for x in [-87.3, 88.7], 0 below: arithmetic only, so the loop vectorizes. The
 * weights it feeds are rounded to bf16 (8 bits), far coarser than its error. */
static inline float exp_approx(float x) {
    const float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    float lo = x < -87.3f ? -87.3f : x;
    float c = lo > 88.7f ? 88.7f : lo;
    float n = floorf(c * log2e + 0.5f);
    float r = c - n * ln2_hi - n * ln2_lo;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, 4);
    return x < -87.3f ? 0.0f : p * scale;
}

#define LANES 16

static float dot_bf16(const float *a, const uint16_t *b, int dim) {
    float acc[LANES] = {0};
    int d = 0;
    for (; d + LANES <= dim; d += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[d + l] * bf16_to_f32(b[d + l]);
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += acc[l];
    for (; d < dim; d++) s += a[d] * bf16_to_f32(b[d]);
    return s;
}

#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* s[j] = sum over d of q[d] * keys_t[d][j], j < length: the sum in order of d for every j */
static void prompt_scores(const float *q, const float *keys_t, int dim, int length, float *s) {
    int j = 0;
#ifdef __AVX512F__
    for (; j < length; j += 128) { /* 128 scores in 8 registers while the keys stream past; masked at the end */
        __mmask16 m[8];
        for (int v = 0; v < 8; v++) {
            const int left = length - j - 16 * v;
            m[v] = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u);
        }
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (int d = 0; d < dim; d++) {
            const __m512 b = _mm512_set1_ps(q[d]);
            const float *k = keys_t + (size_t)d * length + j;
            a0 = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(m[0], k), a0);
            a1 = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(m[1], k + 16), a1);
            a2 = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(m[2], k + 32), a2);
            a3 = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(m[3], k + 48), a3);
            a4 = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(m[4], k + 64), a4);
            a5 = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(m[5], k + 80), a5);
            a6 = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(m[6], k + 96), a6);
            a7 = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(m[7], k + 112), a7);
        }
        _mm512_mask_storeu_ps(s + j, m[0], a0); _mm512_mask_storeu_ps(s + j + 16, m[1], a1);
        _mm512_mask_storeu_ps(s + j + 32, m[2], a2); _mm512_mask_storeu_ps(s + j + 48, m[3], a3);
        _mm512_mask_storeu_ps(s + j + 64, m[4], a4); _mm512_mask_storeu_ps(s + j + 80, m[5], a5);
        _mm512_mask_storeu_ps(s + j + 96, m[6], a6); _mm512_mask_storeu_ps(s + j + 112, m[7], a7);
    }
#else
    for (int i = 0; i < length; i++) s[i] = 0.0f;
    for (int d = 0; d < dim; d++)
        for (int i = 0; i < length; i++) s[i] += q[d] * keys_t[(size_t)d * length + i];
#endif
}

/* out[d] = sum over j of w[j] * values[j][d], in order of j (tokens with weight 0 add nothing and are skipped) */
static void prompt_weighted(const float *w, const float *values, int dim, int length, float *out) {
#ifdef __AVX512F__
    if (dim == 64) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int j = 0; j < length; j++) {
            if (w[j] == 0.0f) continue;
            const __m512 b = _mm512_set1_ps(w[j]);
            const float *v = values + (size_t)j * 64;
            a0 = _mm512_fmadd_ps(b, _mm512_loadu_ps(v), a0);
            a1 = _mm512_fmadd_ps(b, _mm512_loadu_ps(v + 16), a1);
            a2 = _mm512_fmadd_ps(b, _mm512_loadu_ps(v + 32), a2);
            a3 = _mm512_fmadd_ps(b, _mm512_loadu_ps(v + 48), a3);
        }
        _mm512_storeu_ps(out, a0); _mm512_storeu_ps(out + 16, a1);
        _mm512_storeu_ps(out + 32, a2); _mm512_storeu_ps(out + 48, a3);
        return;
    }
#endif
    for (int d = 0; d < dim; d++) out[d] = 0.0f;
    for (int j = 0; j < length; j++) {
        if (w[j] == 0.0f) continue;
        for (int d = 0; d < dim; d++) out[d] += w[j] * values[(size_t)j * dim + d];
    }
}

/* s[0..n) = bf16(softmax(s)) in fp32: the max, the exponentials, their sum (in LANES partial sums, then those in
 * order), each times the sum's reciprocal, rounded to bf16 */
static void softmax_to_bf16(float *s, int n) {
#ifdef __AVX512F__
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int j = 0; j < n; j += 16) {
        const __mmask16 m = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1u);
        top = _mm512_mask_max_ps(top, m, top, _mm512_maskz_loadu_ps(m, s + j));
    }
    const __m512 most = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f), hi = _mm512_set1_ps(0.693359375f),
                 lo = _mm512_set1_ps(-2.12194440e-4f), floor_x = _mm512_set1_ps(-87.3f);
    __m512 total = _mm512_setzero_ps();
    for (int j = 0; j < n; j += 16) {
        const __mmask16 m = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1u);
        const __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), most);
        const __m512 c = _mm512_max_ps(x, floor_x);
        const __m512 k = _mm512_roundscale_ps(_mm512_fmadd_ps(c, log2e, _mm512_set1_ps(0.5f)),
                                              _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        const __m512 r = _mm512_fnmadd_ps(k, lo, _mm512_fnmadd_ps(k, hi, c));
        __m512 p = _mm512_set1_ps(1.9875691500e-4f);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
        p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
        const __m512 scale = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23));
        const __mmask16 live = _mm512_mask_cmp_ps_mask(m, x, floor_x, _CMP_GE_OQ);
        const __m512 e = _mm512_maskz_mul_ps(live, p, scale);
        _mm512_mask_storeu_ps(s + j, m, e);
        total = _mm512_add_ps(total, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    for (int j = 0; j < n; j += 16) {
        const __mmask16 m = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1u);
        __m512i u = _mm512_castps_si512(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + j), inv));
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
        u = _mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u));
        _mm512_mask_storeu_ps(s + j, m, _mm512_castsi512_ps(u));
    }
#else
    float top = s[0];
    for (int j = 1; j < n; j++) top = s[j] > top ? s[j] : top;
    float sum = 0.0f;
    for (int j = 0; j < n; j++) {
        s[j] = exp_approx(s[j] - top);
        sum += s[j];
    }
    const float inv = 1.0f / sum;
    for (int j = 0; j < n; j++) s[j] = round_bf16(s[j] * inv);
#endif
}

#ifdef __AVX512BF16__
/* The same two sums with bf16 pairs (AVX-512 BF16): each instruction multiplies two bf16 pairs per lane exactly and
 * adds both products to the fp32 lane, half the instructions of the fp32 loops above. keys2 [dim/2][length] holds
 * (k[j][2i], k[j][2i+1]) per 32-bit word, qpairs[i] (q[2i], q[2i+1]); values2 [halves][dim] holds (v[2m][d],
 * v[2m+1][d]), wpairs[m] (w[2m], w[2m+1]) of the bf16 weights, a zero weight past an odd length. */
static void prompt_scores_pairs(const uint32_t *qpairs, const uint32_t *keys2, int halves, int length, float *s) {
    for (int j = 0; j < length; j += 128) {
        __mmask16 m[8];
        for (int v = 0; v < 8; v++) {
            const int left = length - j - 16 * v;
            m[v] = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u);
        }
        __m512 a[8];
        for (int v = 0; v < 8; v++) a[v] = _mm512_setzero_ps();
        for (int i = 0; i < halves; i++) {
            const __m512bh b = (__m512bh)_mm512_set1_epi32((int)qpairs[i]);
            const uint32_t *k = keys2 + (size_t)i * length + j;
            for (int v = 0; v < 8; v++)
                a[v] = _mm512_dpbf16_ps(a[v], (__m512bh)_mm512_maskz_loadu_epi32(m[v], k + 16 * v), b);
        }
        for (int v = 0; v < 8; v++) _mm512_mask_storeu_ps(s + j + 16 * v, m[v], a[v]);
    }
}

static void prompt_weighted_pairs(const uint32_t *wpairs, const uint32_t *values2, int dim, int halves, float *out) {
    if (dim == 64) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int i = 0; i < halves; i++) {
            if (wpairs[i] == 0) continue;
            const __m512bh b = (__m512bh)_mm512_set1_epi32((int)wpairs[i]);
            const uint32_t *v = values2 + (size_t)i * 64;
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(v), b);
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(v + 16), b);
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(v + 32), b);
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(v + 48), b);
        }
        _mm512_storeu_ps(out, a0); _mm512_storeu_ps(out + 16, a1);
        _mm512_storeu_ps(out + 32, a2); _mm512_storeu_ps(out + 48, a3);
        return;
    }
    for (int d = 0; d < dim; d += 16) {
        const int n = dim - d < 16 ? dim - d : 16;
        const __mmask16 m = (__mmask16)((1u << n) - 1u);
        __m512 a = _mm512_setzero_ps();
        for (int i = 0; i < halves; i++)
            if (wpairs[i])
                a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_maskz_loadu_epi32(m, values2 + (size_t)i * dim + d),
                                     (__m512bh)_mm512_set1_epi32((int)wpairs[i]));
        _mm512_mask_storeu_ps(out + d, m, a);
    }
}
#endif

/* 1 where this build takes its prompt operands as bf16 pairs (pairs = 1 below), 0 where only as fp32 */
int recreason_prefix_attention_pairs(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

int recreason_prefix_attention(int rows, int kv_heads, int group, int dim, int prompts, int length, int own,
                               int pairs, const uint16_t *q, const int64_t *owner, const void *keys_t, const void *values,
                               const float *bias, const uint16_t *own_k, const uint16_t *own_v,
                               const float *own_bias, float pre_scale, float post_scale, uint16_t *out) {
    const int span = length + own;
    const int halves = (length + 1) / 2;
    int failed = 0;
#ifndef __AVX512BF16__
    if (pairs) return 3;
#endif
    if (pairs && dim % 2) return 3;
#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * (size_t)group * span);
        float *qf = malloc(sizeof(float) * (size_t)group * dim);
        float *acc = malloc(sizeof(float) * (size_t)group * dim * 2);
        uint32_t *qpairs = malloc(sizeof(uint32_t) * (size_t)group * (dim / 2 + 1));
        uint32_t *wpairs = malloc(sizeof(uint32_t) * (size_t)group * (halves + 1));
        if (!scores || !qf || !acc || !qpairs || !wpairs) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (long item = 0; item < (long)rows * kv_heads; item++) {
                const int r = (int)(item / kv_heads), h = (int)(item % kv_heads);
                const int64_t p = owner[r];
                if (p < 0 || p >= prompts) {
#pragma omp atomic write
                    failed = 2;
                    continue;
                }
                const uint16_t *qr = q + ((size_t)r * kv_heads + h) * group * dim;
                const size_t head = (size_t)p * kv_heads + h;
                const float *kt = (const float *)keys_t + head * dim * length;  /* fp32 operands (pairs = 0) */
                const float *pv = (const float *)values + head * length * dim;
                const float *pb = bias + (size_t)p * length;
                const uint16_t *ok = own_k + ((size_t)r * kv_heads + h) * own * dim;
                const uint16_t *ov = own_v + ((size_t)r * kv_heads + h) * own * dim;
                for (int g = 0; g < group; g++)
                    for (int d = 0; d < dim; d++) qf[g * dim + d] = round_bf16(bf16_to_f32(qr[g * dim + d]) * pre_scale);
                for (int g = 0; g < group; g++)  /* the prompt part: keys shared by the prompt's rows */
                    if (pairs) {
#ifdef __AVX512BF16__
                        uint32_t *qp = qpairs + (size_t)g * (dim / 2 + 1);
                        for (int i = 0; i < dim / 2; i++)
                            qp[i] = (uint32_t)f32_to_bf16(qf[g * dim + 2 * i])
                                    | (uint32_t)f32_to_bf16(qf[g * dim + 2 * i + 1]) << 16;
                        prompt_scores_pairs(qp, (const uint32_t *)keys_t + head * (dim / 2) * length, dim / 2, length,
                                            scores + (size_t)g * span);
#endif
                    } else
                        prompt_scores(qf + (size_t)g * dim, kt, dim, length, scores + (size_t)g * span);
                for (int g = 0; g < group; g++) {
                    float *s = scores + (size_t)g * span;
                    if (post_scale != 1.0f)
                        for (int j = 0; j < length; j++) s[j] = round_bf16(round_bf16(round_bf16(s[j]) * post_scale) + pb[j]);
                    else
                        for (int j = 0; j < length; j++) s[j] = round_bf16(round_bf16(s[j]) + pb[j]);
                    for (int t = 0; t < own; t++) {
                        float v = round_bf16(dot_bf16(qf + (size_t)g * dim, ok + (size_t)t * dim, dim));
                        if (post_scale != 1.0f) v = round_bf16(v * post_scale);
                        if (own_bias) v = round_bf16(v + round_bf16(own_bias[(size_t)r * own + t]));
                        s[length + t] = v;
                    }
                    softmax_to_bf16(s, span);
                }
                /* the weighted sums, prompt and own parts apart */
                for (int i = 0; i < group * dim; i++) acc[group * dim + i] = 0.0f;
                for (int g = 0; g < group; g++)
                    if (pairs) {
#ifdef __AVX512BF16__
                        const float *w = scores + (size_t)g * span;
                        uint32_t *wp = wpairs + (size_t)g * (halves + 1);
                        for (int i = 0; i < halves; i++)
                            wp[i] = (uint32_t)f32_to_bf16(w[2 * i])
                                    | (2 * i + 1 < length ? (uint32_t)f32_to_bf16(w[2 * i + 1]) << 16 : 0u);
                        prompt_weighted_pairs(wp, (const uint32_t *)values + head * halves * dim, dim, halves,
                                              acc + (size_t)g * dim);
#endif
                    } else
                        prompt_weighted(scores + (size_t)g * span, pv, dim, length, acc + (size_t)g * dim);
                for (int g = 0; g < group; g++) {
                    float *a = acc + (size_t)g * dim, *b = acc + (size_t)(group + g) * dim;
                    for (int t = 0; t < own; t++) {
                        const float w = scores[(size_t)g * span + length + t];
                        const uint16_t *vt = ov + (size_t)t * dim;
                        for (int d = 0; d < dim; d++) b[d] += w * bf16_to_f32(vt[d]);
                    }
                    uint16_t *o = out + (((size_t)r * kv_heads + h) * group + g) * dim;
                    for (int d = 0; d < dim; d++) o[d] = f32_to_bf16(a[d] + b[d]);
                }
            }
        }
        free(scores);
        free(qf);
        free(acc);
        free(qpairs);
        free(wpairs);
    }
    return failed;
}

/* A llama RMS norm of bf16 rows, as transformers' LlamaRMSNorm computes it: each row in fp32, the mean of its
 * squares, times 1/sqrt(mean + eps), rounded to bf16, then times the bf16 weight and rounded again. Only the order
 * of the sum of squares differs from torch's reduction. x and out [rows, dim] bf16 (out may be x); weight [dim]. */
int recreason_rms_norm(int rows, int dim, const uint16_t *x, const uint16_t *weight, float eps, uint16_t *out) {
#pragma omp parallel for schedule(static) if ((long)rows * dim >= 65536)
    for (int r = 0; r < rows; r++) {
        const uint16_t *xr = x + (size_t)r * dim;
        uint16_t *o = out + (size_t)r * dim;
        float acc[LANES] = {0};
        int d = 0;
        for (; d + LANES <= dim; d += LANES)
            for (int l = 0; l < LANES; l++) {
                const float f = bf16_to_f32(xr[d + l]);
                acc[l] += f * f;
            }
        float s = 0.0f;
        for (int l = 0; l < LANES; l++) s += acc[l];
        for (; d < dim; d++) s += bf16_to_f32(xr[d]) * bf16_to_f32(xr[d]);
        const float inv = 1.0f / sqrtf(s / (float)dim + eps);
        for (d = 0; d < dim; d++) o[d] = f32_to_bf16(bf16_to_f32(weight[d]) * round_bf16(bf16_to_f32(xr[d]) * inv));
    }
    return 0;
}
