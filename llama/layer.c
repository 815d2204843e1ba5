/* The decoder layers of the Transformer (llama/model.py's TransformerBlock) for a few new tokens on
 * the CPU, in one parallel region: decoding, and a speculative verify pass. Compiled with gemv.c
 * and attention.c by llama/native.py; llama/layer_step.py decides when it serves.
 *
 * Why: a decode step of a small model is a few milliseconds, and each of its ~50 products was a
 * parallel region of its own, with the layer's small operations (norms, rotations, cache writes,
 * residuals) run between them by one thread while the others waited: on the int4 study model, 2
 * threads, about a third of the compiled step, and more than half of the eager one (Python's 15
 * operators a layer). Here one team of threads runs every layer, waiting for one another only
 * where a result is needed whole: after each product, the rotations and the attention.
 *
 * The math is TransformerBlock's, in float32 (a bfloat16 cache is written rounded to nearest even,
 * as PyTorch's copy rounds); for a bfloat16 model (`rounded`: bfloat16 activations and norms) each
 * operator's result is rounded to bfloat16 where the blocks' bfloat16 tensors round it: the norm
 * before and after its weight, each product, each rotation, attention, each residual, the
 * activation and its product with `up`.
 *   x = rms_norm(h) * attention_norm;  q, k, v = x Wqkv^T;  q, k rotated (interleaved pairs);
 *   k, v written to the cache at each token's position;  h += attention(q, cache) Wo^T;
 *   x = rms_norm(h) * ffn_norm;  gate, up = x W13^T;  h += (silu(gate) up) W2^T.
 * Each thread keeps its own copy of h (and of each normalised x), computed alike by all, so that
 * the residuals and norms need no waiting; the products' outputs are shared. Layer i reads and
 * writes the caches k[i] and v[i], all laid out alike.
 *
 * After the last layer, h is normalised by the model's final norm. The rotary angles are computed
 * here, from each token's position (theta: the model's rope_theta).
 *
 * Layouts: h (B * T, dim), row b * T + t the token t of row b; caches as attention.c's (element
 * strides sb, sh, ss of row, head, position; S positions); last (B, T) int64: each token's
 * position, where it is written and the last it sees.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)  /* as gemv.c */

/* v rounded to bfloat16 where `rounded` (kernels.h's round_bf16), as float32. */
static inline __m512 round16(__m512 v, const int rounded) { return rounded ? round_bf16(v) : v; }

/* The same for one value. */
static inline float round1(float f, const int rounded) {
    if (!rounded) return f;
    uint32_t u;
    memcpy(&u, &f, 4);
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000u;
    memcpy(&f, &u, 4);
    return f;
}

/* 16 entries of a norm's weight: float32, or bfloat16 where `rounded`. */
static inline __m512 load_norm(const void* w, int64_t i, const int rounded) {
    return rounded ? load_bf16x16((const uint16_t*)w + i, 0xFFFF) : _mm512_loadu_ps((const float*)w + i);
}

/* out (M, dim) = x / sqrt(mean(x^2) + eps) * w, a row at a time (dim % 16 == 0). */
static void rms_norm(const float* x, const void* w, int64_t M, int64_t dim, float eps, float* out, const int rounded) {
    for (int64_t m = 0; m < M; m++) {
        const float* r = x + m * dim;
        __m512 s = _mm512_setzero_ps();
        for (int64_t i = 0; i < dim; i += 16) s = _mm512_fmadd_ps(_mm512_loadu_ps(r + i), _mm512_loadu_ps(r + i), s);
        const __m512 scale = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(s) / (float)dim + eps));
        for (int64_t i = 0; i < dim; i += 16) {
            const __m512 normed = round16(_mm512_mul_ps(_mm512_loadu_ps(r + i), scale), rounded);
            _mm512_storeu_ps(out + m * dim + i, round16(_mm512_mul_ps(normed, load_norm(w, i, rounded)), rounded));
        }
    }
}

/* h (n values, n % 16 == 0) += o, each rounded where `rounded`. */
static void add(float* h, const float* o, int64_t n, const int rounded) {
    for (int64_t i = 0; i < n; i += 16)
        _mm512_storeu_ps(h + i, round16(_mm512_add_ps(_mm512_loadu_ps(h + i), round16(_mm512_loadu_ps(o + i), rounded)),
                                        rounded));
}

/* One head's D values rotated by the angles' cos and sin (D / 2): pairs (x[2i], x[2i+1]). */
static void rotate(const float* x, const float* cos, const float* sin, int64_t D, float* out, const int rounded) {
    for (int64_t i = 0; i < D / 2; i++) {
        const float x0 = round1(x[2 * i], rounded), x1 = round1(x[2 * i + 1], rounded);
        out[2 * i] = round1(x0 * cos[i] - x1 * sin[i], rounded);
        out[2 * i + 1] = round1(x0 * sin[i] + x1 * cos[i], rounded);
    }
}

/* D float32 values (rounded to bfloat16 first where `rounded`) into a cache slot, as float32 or
 * bfloat16 (rounded to nearest even). */
static void store(void* slot, const float* x, int64_t D, int bf16, const int rounded) {
    for (int64_t i = 0; i < D; i++) {
        const float f = round1(x[i], rounded || bf16);
        if (bf16) {
            uint32_t u;
            memcpy(&u, &f, 4);
            ((uint16_t*)slot)[i] = (uint16_t)(u >> 16);
        } else {
            ((float*)slot)[i] = f;
        }
    }
}

/* 16 values of silu(gate) = gate / (1 + exp(-gate)). */
static inline __m512 silu(__m512 gate) {
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(gate)));  /* exp(-|gate|) */
    const __mmask16 negative = _mm512_cmp_ps_mask(gate, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 one = _mm512_set1_ps(1.0f);
    /* sigmoid(gate): 1 / (1 + e) where gate >= 0, e / (1 + e) below */
    const __m512 sigmoid = _mm512_div_ps(_mm512_mask_blend_ps(negative, one, e), _mm512_add_ps(one, e));
    return _mm512_mul_ps(gate, sigmoid);
}

/* Floats of each part of the work memory, rounded up to whole cache lines. */
static int64_t lines(int64_t floats) { return (floats + 15) / 16 * 16; }

/* The work memory the team shares for layer L: its products' outputs, the rotated queries, attention's. */
static int64_t shared_work(const Layer* L, int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t D, int threads) {
    const int64_t M = B * T, dim = L->wo.n, F = L->w2.k;
    return lines(M * L->qkv.n) + 2 * lines(M * H * D) + lines(M * dim) + lines(M * 2 * F) + lines(M * F)
           + lines(attend_work(B, T, H, Hkv, D, threads));
}

/* Each thread's own work memory: its h and x (M, dim), its cos and sin (M, D / 2). */
static int64_t own_work(int64_t M, int64_t dim, int64_t D) { return 2 * lines(M * dim) + 2 * lines(M * D / 2); }

int64_t layers_work(const Layer* layers, int64_t n_layers, int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t D,
                    int threads) {
    int64_t most = 0;
    for (int64_t i = 0; i < n_layers; i++) {
        const int64_t w = shared_work(&layers[i], B, T, H, Hkv, D, threads);
        most = w > most ? w : most;
    }
    return most + threads * own_work(B * T, layers[0].wo.n, D);
}

/* cos and sin (M, D / 2) of the rotary angles of each token's position: position / theta^(2i / D),
 * computed in double precision (as llama/model.py's rotary_cos_sin, which see), then rounded to float32. */
static void rotary(const int64_t* positions, int64_t M, int64_t D, double theta, float* cos_out, float* sin_out) {
    for (int64_t i = 0; i < D / 2; i++) {
        const double inv_freq = 1.0 / pow(theta, (double)(2 * i) / (double)D);
        for (int64_t m = 0; m < M; m++) {
            const double angle = (double)positions[m] * inv_freq;
            cos_out[m * D / 2 + i] = (float)cos(angle);
            sin_out[m * D / 2 + i] = (float)sin(angle);
        }
    }
}

/* Layer L of h's tokens, run by each thread of the team: hp and x are the thread's own. */
static void layer_team(const Layer* L, float* hp, float* x, int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t D,
                       const float* cos, const float* sin, void* k, void* v, int bf16, int64_t S, int64_t sb,
                       int64_t sh, int64_t ss, const int64_t* last, float* work, const int rounded) {
    const int64_t M = B * T, dim = L->wo.n, F = L->w2.k, g = H / Hkv, width = L->qkv.n, elt = bf16 ? 2 : 4;
    /* shared (shared_work): the products' outputs, the rotated queries, attention's own work */
    float* qkv = work;
    float* q = qkv + lines(M * width);
    float* att = q + lines(M * H * D);
    float* o = att + lines(M * H * D);
    float* gate_up = o + lines(M * dim);
    float* act = gate_up + lines(M * 2 * F);
    float* attention_work = act + lines(M * F);
    rms_norm(hp, L->attention_norm, M, dim, L->eps, x, rounded);
    gemv_team(&L->qkv, x, M, qkv);
    /* a unit: token m's KV head kh (its key rotated and written, its value written) and the
     * query heads that read it (rotated into q) */
#pragma omp for schedule(static)
    for (int64_t u = 0; u < M * Hkv; u++) {
        const int64_t m = u / Hkv, kh = u % Hkv, b = m / T, pos = last[m];
        float* row = qkv + m * width;
        const float *c = cos + m * D / 2, *s = sin + m * D / 2;
        for (int64_t head = kh * g; head < (kh + 1) * g; head++)
            rotate(row + head * D, c, s, D, q + (m * H + head) * D, rounded);
        float* key = row + (H + kh) * D;
        rotate(key, c, s, D, key, rounded);
        const int64_t slot = (b * sb + kh * sh + pos * ss) * elt;
        store((char*)k + slot, key, D, bf16, rounded);
        store((char*)v + slot, row + (H + Hkv + kh) * D, D, bf16, rounded);
    }
    attend_team(q, B, T, H, D, k, v, bf16, Hkv, S, sb, sh, ss, last, att, attention_work);
    if (rounded) {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < M * H * D; i += 16) _mm512_storeu_ps(att + i, round16(_mm512_loadu_ps(att + i), 1));
    }
    gemv_team(&L->wo, att, M, o);
    add(hp, o, M * dim, rounded);
    rms_norm(hp, L->ffn_norm, M, dim, L->eps, x, rounded);
    gemv_team(&L->w13, x, M, gate_up);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < M * F / 16; c++) {
        const int64_t m = c / (F / 16), f = c % (F / 16) * 16;
        const float* gu = gate_up + m * 2 * F;
        const __m512 gate = round16(_mm512_loadu_ps(gu + f), rounded), up = round16(_mm512_loadu_ps(gu + F + f), rounded);
        _mm512_storeu_ps(act + m * F + f, round16(_mm512_mul_ps(round16(silu(gate), rounded), up), rounded));
    }
    gemv_team(&L->w2, act, M, o);
    add(hp, o, M * dim, rounded);
}

void decode_layers(float* h, const Layer* layers, int64_t n_layers, const void* final_norm, double theta, int64_t B,
                   int64_t T, int64_t H, int64_t Hkv, int64_t D, void* const* k, void* const* v, int bf16, int64_t S,
                   int64_t sb, int64_t sh, int64_t ss, const int64_t* last, int rounded, float* work, int threads) {
    const int64_t M = B * T, dim = layers[0].wo.n;
    float* own = work + layers_work(layers, n_layers, B, T, H, Hkv, D, threads) - threads * own_work(M, dim, D);
#pragma omp parallel num_threads(threads)
    {
        float* hp = own + omp_get_thread_num() * own_work(M, dim, D);  /* this thread's h, x, cos and sin */
        float* x = hp + lines(M * dim);
        float* cos = x + lines(M * dim);
        float* sin = cos + lines(M * D / 2);
        memcpy(hp, h, (size_t)(M * dim) * sizeof(float));
        rotary(last, M, D, theta, cos, sin);
        for (int64_t i = 0; i < n_layers; i++)
            layer_team(&layers[i], hp, x, B, T, H, Hkv, D, cos, sin, k[i], v[i], bf16, S, sb, sh, ss, last, work,
                       rounded);
#pragma omp single nowait
        rms_norm(hp, final_norm, M, dim, layers[0].eps, h, rounded);
    }
}

#endif
