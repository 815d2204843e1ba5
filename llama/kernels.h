/* What the project's CPU kernels (gemv.c, attention.c, layer.c) offer one another and ops.cpp.
 *
 * Each kernel comes in two forms: `name(..., threads)` runs it on a team of `threads` threads of
 * its own; `name_team(...)` is called by every thread of a team the caller already runs (an
 * OpenMP parallel region), which share the work and wait for one another at its end. So a
 * decoder layer (layer.c) runs its products, rotations and attention in one parallel region,
 * with a barrier between them, rather than starting and joining the threads for each. Called
 * outside a parallel region, a `_team` function runs on the calling thread alone.
 */
#ifndef LLAMA_KERNELS_H
#define LLAMA_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { WEIGHT_F32, WEIGHT_BF16, WEIGHT_INT8, WEIGHT_INT4 };

/* A weight matrix W (n, k) in one of the kernels' layouts (gemv.c says which). */
typedef struct {
    int kind;                /* WEIGHT_* */
    const void* data;        /* float32, bfloat16 bits or int8 (n, k); int4: gemv.c's packed layout (n, k / 2) */
    const uint16_t* scales;  /* bfloat16: int8 one a row (n); int4 one a group of group_size columns (n, k / G) */
    const uint16_t* zeros;   /* int4: (n, k / G) bfloat16 */
    int64_t n, k, group_size;
} Weight;

int native_supported(void);

/* y (M, n) = x (M, k) W^T, float32, rows of x and y contiguous. */
void gemv(const Weight* w, const float* x, int64_t M, float* y, int threads);
void gemv_team(const Weight* w, const float* x, int64_t M, float* y);

/* Attention of q (B, T, H, D) over a KV cache (attention.c says how); `work` holds
 * attend_work(B, T, H, Hkv, D, team) floats, team the threads that run it. */
int64_t attend_work(int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t D, int team);
void attend(const float* q, int64_t B, int64_t T, int64_t H, int64_t D, const void* k, const void* v, int bf16,
            int64_t Hkv, int64_t S, int64_t sb, int64_t sh, int64_t ss, const int64_t* last, float* out, int threads);
void attend_team(const float* q, int64_t B, int64_t T, int64_t H, int64_t D, const void* k, const void* v, int bf16,
                 int64_t Hkv, int64_t S, int64_t sb, int64_t sh, int64_t ss, const int64_t* last, float* out,
                 float* work);

/* One decoder layer of the Transformer (layer.c): its norms' weights and eps, and its
 * projections (wq, wk, wv stacked by rows into qkv; w1, w3 into w13). */
typedef struct {
    const void* attention_norm;  /* float32, or bfloat16 where decode_layers' `rounded` */
    const void* ffn_norm;
    float eps;
    Weight qkv, wo, w13, w2;
} Layer;

/* h (B * T, dim) float32 after n_layers layers and the final norm (its weight final_norm), for T
 * new tokens of each of B rows at positions `last` (B, T), layer i reading and writing the KV
 * caches k[i] and v[i] (layer.c says how); theta: the rotary angles' base; `rounded`: a bfloat16
 * model (activations rounded to bfloat16 as its tensors are, bfloat16 norms); `work` holds
 * layers_work(...) floats, for a team of up to `threads`. */
int64_t layers_work(const Layer* layers, int64_t n_layers, int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t D,
                    int threads);
void decode_layers(float* h, const Layer* layers, int64_t n_layers, const void* final_norm, double theta, int64_t B,
                   int64_t T, int64_t H, int64_t Hkv, int64_t D, void* const* k, void* const* v, int bf16, int64_t S,
                   int64_t sb, int64_t sh, int64_t ss, const int64_t* last, int rounded, float* work, int threads);

void dequantize_int4(const uint8_t* w, const uint16_t* scales, const uint16_t* zeros, int64_t G, int64_t N, int64_t K,
                     void* out, int f32, int threads);

#ifdef __cplusplus
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)  /* the C files' kernels (not ops.cpp) */
#include <immintrin.h>

/* 16 bfloat16 values (fewer under mask m; the rest 0) as float32 (exact: the top half of a float32). */
static inline __m512 load_bf16x16(const uint16_t* p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* 16 float32 values rounded to bfloat16 (to nearest even, as PyTorch rounds finite values), as
 * float32: the low 16 bits of each are 0. */
static inline __m512 round_bf16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000)));
}

/* exp(x) for x <= 0 (to float32's rounding: range reduction to r in [-ln2/2, ln2/2], a degree-6
 * polynomial, times 2^n); below -87 it is 0 or about 1e-38, which a sum of exps >= 1 ignores. */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

#endif
