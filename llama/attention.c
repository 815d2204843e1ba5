/* Attention of a few new tokens over the KV cache on the CPU (decoding, a speculative verify pass):
 * out = softmax(q K^T / sqrt(D)) V per query head, each query seeing cache positions 0 .. its own.
 * Compiled with gemv.c by llama/native.py; llama/attention.py decides when it serves.
 *
 * Why: with one or a few queries, PyTorch's CPU attention costs 30-50 microseconds a call at a
 * hundred cached positions (a tenth of a decode step of a small model, 12-30 calls a token) and
 * reads a long cache at about half the memory's bandwidth. This reads each cached key and value
 * once for all the query heads that share it (grouped-query attention) and all the new tokens.
 *
 * How: the work is split into units of (row, KV head, range of positions); a unit computes, for its
 * g * T queries (g query heads per KV head, T tokens), the scores of the positions each may see,
 * their maximum m, sum l of exp(score - m) and the exp-weighted sum of values; the units of one
 * (row, KV head) are then merged (flash-decoding's split of the positions, so that a few KV heads
 * still keep every thread busy on a long cache). A unit of 8 or more queries (several new tokens)
 * holds them in vector lanes (`unit_lanes`: no sums across lanes), fewer one at a time (`unit`).
 *
 * Layouts: q and out (B, T, H, D) float32, contiguous; K and V float32 or bfloat16, element
 * strides (row, head, position) given, D contiguous, S positions; last (B, T) int64: query t of
 * row b sees positions 0 .. min(last[b, t], S - 1). Head h reads KV head h / (H / Hkv). D % 16 == 0.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)  /* as gemv.c */
#include <immintrin.h>

/* 16 values of a cached key or value (float32 or bfloat16) as float32. */
static inline __m512 load16(const void* base, int64_t i, int bf16) {
    return bf16 ? load_bf16x16((const uint16_t*)base + i, 0xFFFF) : _mm512_loadu_ps((const float*)base + i);
}

typedef struct {
    const float* q;
    const void *k, *v;
    const int64_t* last;
    int64_t T, H, D, Hkv, g, bf16, sb, sh, ss;
} Problem;

/* One unit: queries of row b, KV head kh, positions s0 .. s1 - 1. Writes each query's m, l and
 * unnormalised sum of values (D) to m, l, acc. */
static void unit(const Problem* p, int64_t b, int64_t kh, int64_t s0, int64_t s1, float* m, float* l, float* acc) {
    const int64_t nq = p->g * p->T, D = p->D, len = s1 - s0, elt = p->bf16 ? 2 : 4;
    const float scale = 1.0f / sqrtf((float)D);
    float* sc = (float*)malloc((size_t)(nq * (len + 16)) * sizeof(float));  /* scores, a row per query */
    int64_t* seen = (int64_t*)malloc((size_t)nq * sizeof(int64_t));            /* positions it sees here */
    for (int64_t i = 0; i < nq; i++) {
        int64_t t = i / p->g, last = p->last[b * p->T + t];
        seen[i] = last < s0 ? 0 : (last + 1 < s1 ? last + 1 : s1) - s0;
    }
    const char* kbase = (const char*)p->k + (b * p->sb + kh * p->sh) * elt;
    const char* vbase = (const char*)p->v + (b * p->sb + kh * p->sh) * elt;
    for (int64_t s = 0; s < len; s++) {
        const void* krow = kbase + (s0 + s) * p->ss * elt;
        for (int64_t i = 0; i < nq; i++) {
            if (s >= seen[i]) continue;
            int64_t t = i / p->g, h = kh * p->g + i % p->g;
            const float* qi = p->q + (b * p->T + t) * p->H * D + h * D;
            __m512 d = _mm512_setzero_ps();
            for (int64_t e = 0; e < D; e += 16) d = _mm512_fmadd_ps(_mm512_loadu_ps(qi + e), load16(krow, e, p->bf16), d);
            sc[i * (len + 16) + s] = _mm512_reduce_add_ps(d) * scale;
        }
    }
    for (int64_t i = 0; i < nq; i++) {
        float* row = sc + i * (len + 16);
        int64_t n = seen[i];
        __m512 top = _mm512_set1_ps(-INFINITY);
        for (int64_t s = 0; s < n; s += 16) {
            __mmask16 k = n - s >= 16 ? 0xFFFF : (__mmask16)((1u << (n - s)) - 1);
            top = _mm512_mask_max_ps(top, k, top, _mm512_maskz_loadu_ps(k, row + s));
        }
        float mx = n ? _mm512_reduce_max_ps(top) : -INFINITY;
        __m512 sum = _mm512_setzero_ps(), mv = _mm512_set1_ps(mx);
        for (int64_t s = 0; s < n; s += 16) {
            __mmask16 k = n - s >= 16 ? 0xFFFF : (__mmask16)((1u << (n - s)) - 1);
            __m512 e = _mm512_maskz_mov_ps(k, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, row + s), mv)));
            _mm512_mask_storeu_ps(row + s, k, e);
            sum = _mm512_add_ps(sum, e);
        }
        m[i] = mx;
        l[i] = _mm512_reduce_add_ps(sum);
        memset(acc + i * D, 0, (size_t)D * sizeof(float));
    }
    for (int64_t s = 0; s < len; s++) {
        const void* vrow = vbase + (s0 + s) * p->ss * elt;
        for (int64_t e = 0; e < D; e += 16) {
            __m512 ve = load16(vrow, e, p->bf16);
            for (int64_t i = 0; i < nq; i++) {
                if (s >= seen[i]) continue;
                __m512 a = _mm512_loadu_ps(acc + i * D + e);
                _mm512_storeu_ps(acc + i * D + e, _mm512_fmadd_ps(_mm512_set1_ps(sc[i * (len + 16) + s]), ve, a));
            }
        }
    }
    free(sc);
    free(seen);
}

/* Most query vectors `unit_lanes` takes (256 queries a KV head: 16 new tokens of 16 heads each). */
#define MAX_VECTORS 16
#define LANES_FROM 8  /* fewest queries a KV head for which unit_lanes serves (4 tokens of 3 heads: 2x `unit`) */

/* `unit` for many queries (several new tokens): the queries in vector lanes, 16 a vector, so that a
 * score is 16 queries times one key (a broadcast entry of the key per multiply-add) and needs no
 * sum across lanes, and the softmax and the weighted sum of values run on vectors of 16 queries;
 * each key and value is read once per vector. Same outputs as `unit`. */
static void unit_lanes(const Problem* p, int64_t b, int64_t kh, int64_t s0, int64_t s1, float* m, float* l,
                       float* acc) {  /* a query that sees none of the positions: m -inf, l 0 */
    const int64_t nq = p->g * p->T, D = p->D, nv = (nq + 15) / 16, w = nv * 16, elt = p->bf16 ? 2 : 4;
    const float scale = 1.0f / sqrtf((float)D);
    int64_t reach = 0;  /* positions (from s0) some query here sees: the row's own, all written */
    __m512i seen[MAX_VECTORS];
    int32_t seen_lane[MAX_VECTORS * 16] = {0};
    float* qt = (float*)calloc((size_t)(D * w), sizeof(float));  /* q^T scaled: qt[e w + i] */
    for (int64_t i = 0; i < nq; i++) {
        int64_t t = i / p->g, h = kh * p->g + i % p->g, last = p->last[b * p->T + t];
        int64_t n = last < s0 ? 0 : (last + 1 < s1 ? last + 1 : s1) - s0;
        seen_lane[i] = (int32_t)n;
        reach = n > reach ? n : reach;
        const float* qi = p->q + (b * p->T + t) * p->H * D + h * D;
        for (int64_t e = 0; e < D; e++) qt[e * w + i] = qi[e] * scale;
    }
    for (int64_t j = 0; j < nv; j++) seen[j] = _mm512_loadu_si512(seen_lane + 16 * j);
    /* the unit's keys and values as float32 rows of D (views of the cache when it is float32) */
    const char* kbase = (const char*)p->k + (b * p->sb + kh * p->sh + s0 * p->ss) * elt;
    const char* vbase = (const char*)p->v + (b * p->sb + kh * p->sh + s0 * p->ss) * elt;
    float* wide = NULL;
    const float *keys = (const float*)kbase, *values = (const float*)vbase;
    int64_t stride = p->ss;
    if (p->bf16) {
        wide = (float*)malloc((size_t)(2 * reach * D + 1) * sizeof(float));
        for (int64_t s = 0; s < reach; s++)
            for (int64_t e = 0; e < D; e += 16) {
                _mm512_storeu_ps(wide + s * D + e, load16(kbase + s * p->ss * 2, e, 1));
                _mm512_storeu_ps(wide + (reach + s) * D + e, load16(vbase + s * p->ss * 2, e, 1));
            }
        keys = wide, values = wide + reach * D, stride = D;
    }
    float* sc = (float*)malloc((size_t)(reach * w + 1) * sizeof(float));  /* scores, then weights: sc[s w + i] */
    __m512 top[MAX_VECTORS], sum[MAX_VECTORS];
    for (int64_t j = 0; j < nv; j++) top[j] = _mm512_set1_ps(-INFINITY), sum[j] = _mm512_setzero_ps();
    for (int64_t s = 0; s < reach; s++) {
        const float* k = keys + s * stride;
        for (int64_t j = 0; j < nv; j++) {
            __m512 d0 = _mm512_setzero_ps(), d1 = _mm512_setzero_ps();  /* two dependency chains */
            for (int64_t e = 0; e < D; e += 2) {
                d0 = _mm512_fmadd_ps(_mm512_set1_ps(k[e]), _mm512_loadu_ps(qt + e * w + 16 * j), d0);
                d1 = _mm512_fmadd_ps(_mm512_set1_ps(k[e + 1]), _mm512_loadu_ps(qt + (e + 1) * w + 16 * j), d1);
            }
            __mmask16 sees = _mm512_cmplt_epi32_mask(_mm512_set1_epi32((int32_t)s), seen[j]);
            __m512 score = _mm512_mask_blend_ps(sees, _mm512_set1_ps(-INFINITY), _mm512_add_ps(d0, d1));
            _mm512_storeu_ps(sc + s * w + 16 * j, score);
            top[j] = _mm512_max_ps(top[j], score);
        }
    }
    for (int64_t s = 0; s < reach; s++)
        for (int64_t j = 0; j < nv; j++) {
            __mmask16 sees = _mm512_cmplt_epi32_mask(_mm512_set1_epi32((int32_t)s), seen[j]);
            __m512 score = _mm512_loadu_ps(sc + s * w + 16 * j);
            __m512 e = _mm512_maskz_mov_ps(sees, exp_nonpositive(_mm512_sub_ps(score, top[j])));
            _mm512_storeu_ps(sc + s * w + 16 * j, e);
            sum[j] = _mm512_add_ps(sum[j], e);
        }
    for (int64_t j = 0; j < nv; j++) {
        float mx[16], lx[16];
        _mm512_storeu_ps(mx, top[j]);
        _mm512_storeu_ps(lx, sum[j]);
        for (int64_t i = 16 * j; i < nq && i < 16 * j + 16; i++) m[i] = mx[i - 16 * j], l[i] = lx[i - 16 * j];
        for (int64_t e0 = 0; e0 < D; e0 += 16) {  /* 16 entries of the values at a time: o[c] = sum_s p_s v_s[e0 + c] */
            __m512 o[16];
            for (int c = 0; c < 16; c++) o[c] = _mm512_setzero_ps();
            for (int64_t s = 0; s < reach; s++) {
                __m512 pw = _mm512_loadu_ps(sc + s * w + 16 * j);
                const float* v = values + s * stride + e0;
                for (int c = 0; c < 16; c++) o[c] = _mm512_fmadd_ps(_mm512_set1_ps(v[c]), pw, o[c]);
            }
            for (int c = 0; c < 16; c++) {
                float lane[16];
                _mm512_storeu_ps(lane, o[c]);
                for (int64_t i = 16 * j; i < nq && i < 16 * j + 16; i++) acc[i * D + e0 + c] = lane[i - 16 * j];
            }
        }
    }
    free(qt);
    free(sc);
    free(wide);
}

/* How attend_team splits its work: units of (row, KV head, range of `per` positions), enough to
 * keep every thread of the team busy, each at least 64 positions. */
static int64_t splits_for(int64_t B, int64_t Hkv, int64_t span, int team) {
    int64_t splits = (2 * team + B * Hkv - 1) / (B * Hkv), most = (span + 63) / 64;
    splits = splits < most ? splits : most;
    return splits < 1 ? 1 : splits;
}

int64_t attend_work(int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t D, int team) {
    const int64_t splits = splits_for(B, Hkv, INT64_MAX / 2, team);  /* the most, on the longest span */
    return B * Hkv * splits * (H / Hkv) * T * (D + 2);  /* m and l a query a unit, and its D sums */
}

void attend_team(const float* q, int64_t B, int64_t T, int64_t H, int64_t D, const void* k, const void* v, int bf16,
                 int64_t Hkv, int64_t S, int64_t sb, int64_t sh, int64_t ss, const int64_t* last, float* out,
                 float* work) {
    Problem p = {q, k, v, last, T, H, D, Hkv, H / Hkv, bf16, sb, sh, ss};
    int64_t span = 0;  /* positions any query sees */
    for (int64_t i = 0; i < B * T; i++) span = last[i] + 1 > span ? last[i] + 1 : span;
    span = span < S ? span : S;
    const int64_t splits = splits_for(B, Hkv, span, omp_get_num_threads());
    const int64_t per = (span + splits - 1) / splits, nq = p.g * T, units = B * Hkv * splits;
    float *m = work, *l = work + units * nq, *acc = work + 2 * units * nq;
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; u++) {
        int64_t b = u / (Hkv * splits), kh = u / splits % Hkv, s0 = u % splits * per;
        int64_t s1 = s0 + per < span ? s0 + per : span;
        if (nq >= LANES_FROM && nq <= 16 * MAX_VECTORS)
            unit_lanes(&p, b, kh, s0, s1 > s0 ? s1 : s0, m + u * nq, l + u * nq, acc + u * nq * D);
        else
            unit(&p, b, kh, s0, s1 > s0 ? s1 : s0, m + u * nq, l + u * nq, acc + u * nq * D);
    }
    /* each (row, KV head)'s units merged */
#pragma omp for schedule(static)
    for (int64_t bk = 0; bk < B * Hkv; bk++) {
        const int64_t b = bk / Hkv, kh = bk % Hkv, u0 = bk * splits;
        for (int64_t i = 0; i < nq; i++) {
            int64_t t = i / p.g, h = kh * p.g + i % p.g;
            float mx = -INFINITY, total = 0;
            for (int64_t s = 0; s < splits; s++) mx = m[(u0 + s) * nq + i] > mx ? m[(u0 + s) * nq + i] : mx;
            float* o = out + (b * T + t) * H * D + h * D;
            memset(o, 0, (size_t)D * sizeof(float));
            for (int64_t s = 0; s < splits; s++) {
                int64_t j = (u0 + s) * nq + i;
                if (l[j] == 0) continue;  /* this query sees none of the unit's positions */
                float f = expf(m[j] - mx);
                total += l[j] * f;
                for (int64_t e = 0; e < D; e++) o[e] += acc[j * D + e] * f;
            }
            for (int64_t e = 0; e < D; e++) o[e] /= total;
        }
    }
}

void attend(const float* q, int64_t B, int64_t T, int64_t H, int64_t D, const void* k, const void* v, int bf16,
            int64_t Hkv, int64_t S, int64_t sb, int64_t sh, int64_t ss, const int64_t* last, float* out, int threads) {
    float* work = (float*)malloc((size_t)attend_work(B, T, H, Hkv, D, threads) * sizeof(float));
#pragma omp parallel num_threads(threads)
    attend_team(q, B, T, H, D, k, v, bf16, Hkv, S, sb, sh, ss, last, out, work);
    free(work);
}

#endif
