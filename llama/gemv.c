/* Matrix-vector products for decoding on the CPU: y (M, N) = x (M, K) W^T for a few rows of x,
 * reading W once, at the memory's speed. llama/native.py compiles this file for the machine it runs
 * on (cc -O3 -march=native -fopenmp) and calls it through ctypes; without AVX-512 (F, BW, VNNI,
 * BF16) it compiles to nothing but native_supported() == 0, and PyTorch's kernels are used.
 *
 * Why: batch-1 decoding reads every weight once per token, so its speed is bytes over bandwidth.
 * PyTorch's CPU products for a short, wide left operand read weights at about half the machine's
 * bandwidth, and its int8/int4 kernels spend more time converting weights than reading them.
 *
 * How (each thread takes a contiguous range of output rows, so it reads one sequential stream):
 *   float32   16 products per fused multiply-add;
 *   bfloat16  x rounded to bfloat16 once, 32 products per AVX512-BF16 dot instruction;
 *   int8      the same bfloat16 x; 32 weights widened to bfloat16 (exact) per dot instruction, the
 *             row's scale applied to the float32 sum;
 *   int4      the same bfloat16 x; W packed two values a byte, (N, K / 2), each 64-column chunk in
 *             32 bytes: byte j holds column j in its low half and column j + 32 in its high half,
 *             widened to bfloat16 through a 16-entry table; value = (q - 8) * scale + zero per group
 *             of G columns, so a group adds scale * sum(q x) + (zero - 8 scale) * sum(x).
 * Every function takes its thread count (PyTorch's) and accumulates in float32. K % 32 == 0 (int4: K % 64 == 0).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512BF16__)
#include <immintrin.h>

int native_supported(void) { return 1; }

static inline float bf16_to_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* x (M, K) float32 -> bfloat16, 32 values a vector (rounded to nearest even, as PyTorch rounds). */
static __m512bh* to_bf16(const float* x, int64_t M, int64_t K) {
    __m512bh* xb = (__m512bh*)aligned_alloc(64, (M * K * 2 + 63) / 64 * 64);
    for (int64_t i = 0; i < M * K / 32; i++)
        xb[i] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + 32 * i + 16), _mm512_loadu_ps(x + 32 * i));
    return xb;
}

/* Each kernel computes one output row n for a tile of up to TILE rows of x at once, so that a
 * weight chunk is loaded (and widened) once for the whole tile; `tile` is a constant where it is
 * called, so the compiler keeps the accumulators in registers. */
#define TILE 8
#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define FOR_TILES(M, body)                                                                      \
    for (int64_t m0 = 0; m0 < (M); m0 += TILE) {                                                \
        switch ((M) - m0 < TILE ? (M) - m0 : TILE) {                                            \
            case 1: body(1); break;                                                             \
            case 2: body(2); break;                                                             \
            case 3: body(3); break;                                                             \
            case 4: body(4); break;                                                             \
            case 5: body(5); break;                                                             \
            case 6: body(6); break;                                                             \
            case 7: body(7); break;                                                             \
            default: body(8); break;                                                            \
        }                                                                                       \
    }

ALWAYS_INLINE void row_f32(const float* x, int64_t K, const float* wr, int64_t N, float* y, const int tile) {
    __m512 a[TILE], b[TILE];
    for (int j = 0; j < tile; j++) a[j] = b[j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __m512 w0 = _mm512_loadu_ps(wr + k), w1 = _mm512_loadu_ps(wr + k + 16);
        for (int j = 0; j < tile; j++) {
            a[j] = _mm512_fmadd_ps(_mm512_loadu_ps(x + j * K + k), w0, a[j]);
            b[j] = _mm512_fmadd_ps(_mm512_loadu_ps(x + j * K + k + 16), w1, b[j]);
        }
    }
    for (int j = 0; j < tile; j++) y[j * N] = _mm512_reduce_add_ps(_mm512_add_ps(a[j], b[j]));
}

void gemv_f32(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
#define F32(t) row_f32(x + m0 * K, K, w + n * K, N, y + m0 * N + n, t)
        FOR_TILES(M, F32)
    }
}

/* The bfloat16 kernels: xb (M, K / 32) vectors of x; `widen(wr, k)` gives columns k .. k+31 of
 * the row as bfloat16. */
#define ROW_BF16(name, type, widen)                                                             \
    ALWAYS_INLINE void name(const __m512bh* xb, int64_t K, const type* wr, float* y, int64_t N,  \
                            float scale, const int tile) {                                      \
        __m512 a[TILE], b[TILE];                                                                \
        for (int j = 0; j < tile; j++) a[j] = b[j] = _mm512_setzero_ps();                       \
        int64_t k = 0;                                                                          \
        for (; k + 64 <= K; k += 64) {                                                          \
            __m512bh w0 = widen(wr, k), w1 = widen(wr, k + 32);                                 \
            for (int j = 0; j < tile; j++) {                                                    \
                a[j] = _mm512_dpbf16_ps(a[j], xb[j * K / 32 + k / 32], w0);                     \
                b[j] = _mm512_dpbf16_ps(b[j], xb[j * K / 32 + k / 32 + 1], w1);                 \
            }                                                                                   \
        }                                                                                       \
        if (k < K) {                                                                            \
            __m512bh w0 = widen(wr, k);                                                         \
            for (int j = 0; j < tile; j++) a[j] = _mm512_dpbf16_ps(a[j], xb[j * K / 32 + k / 32], w0); \
        }                                                                                       \
        for (int j = 0; j < tile; j++) y[j * N] = _mm512_reduce_add_ps(_mm512_add_ps(a[j], b[j])) * scale; \
    }

ALWAYS_INLINE __m512bh load_bf16(const uint16_t* w, int64_t k) { return (__m512bh)_mm512_loadu_si512(w + k); }

/* 32 int8 weights as bfloat16 (exact: |w| <= 127 < 256). */
ALWAYS_INLINE __m512bh int8_as_bf16(const int8_t* w, int64_t k) {
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k))));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k + 16))));
    return _mm512_cvtne2ps_pbh(hi, lo);
}

ROW_BF16(row_bf16, uint16_t, load_bf16)
ROW_BF16(row_int8, int8_t, int8_as_bf16)

void gemv_bf16(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* y, int threads) {
    __m512bh* xb = to_bf16(x, M, K);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
#define BF16(t) row_bf16(xb + m0 * K / 32, K, w + n * K, y + m0 * N + n, N, 1.0f, t)
        FOR_TILES(M, BF16)
    }
    free(xb);
}

void gemv_int8(const float* x, int64_t M, int64_t K, const int8_t* w, const uint16_t* scales, int64_t N, float* y,
               int threads) {
    __m512bh* xb = to_bf16(x, M, K);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
#define INT8(t) row_int8(xb + m0 * K / 32, K, w + n * K, y + m0 * N + n, N, bf16_to_float(scales[n]), t)
        FOR_TILES(M, INT8)
    }
    free(xb);
}

ALWAYS_INLINE void row_int4(const __m512bh* xb, const float* xsum, int64_t K, const uint8_t* wr, const float* sr,
                            const float* cr, int64_t G, __m512i table, float* y, int64_t N, const int tile) {
    const __m512i low = _mm512_set1_epi16(15);
    __m512 a[TILE];
    for (int j = 0; j < tile; j++) a[j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 64) {
        __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(wr + k / 2)));
        __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(bytes, low), table);  /* k .. k+31 */
        __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), table);   /* k+32 .. k+63 */
        for (int j = 0; j < tile; j++) {
            const __m512bh* xj = xb + j * K / 32 + k / 32;
            __m512 first = _mm512_dpbf16_ps(_mm512_setzero_ps(), xj[0], lo);
            if (G >= 64) {
                a[j] = _mm512_fmadd_ps(_mm512_dpbf16_ps(first, xj[1], hi), _mm512_set1_ps(sr[k / G]), a[j]);
            } else {  /* groups of 32: the two halves have scales of their own */
                a[j] = _mm512_fmadd_ps(first, _mm512_set1_ps(sr[k / G]), a[j]);
                a[j] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), xj[1], hi), _mm512_set1_ps(sr[k / G + 1]), a[j]);
            }
        }
    }
    int64_t groups = K / G;
    for (int j = 0; j < tile; j++) {
        float t = _mm512_reduce_add_ps(a[j]);
        for (int64_t g = 0; g < groups; g++) t += cr[g] * xsum[j * groups + g];
        y[j * N] = t;
    }
}

void gemv_int4(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* scales, const uint16_t* zeros,
               int64_t G, int64_t N, float* y, int threads) {
    int64_t groups = K / G;
    __m512bh* xb = to_bf16(x, M, K);
    float* xsum = (float*)malloc(M * groups * sizeof(float));  /* of x as rounded: the product is of x as rounded */
    const uint16_t* xr = (const uint16_t*)xb;
    for (int64_t i = 0; i < M * groups; i++) {
        float t = 0;
        for (int64_t j = 0; j < G; j++) t += bf16_to_float(xr[i * G + j]);
        xsum[i] = t;
    }
    uint16_t codes[32];  /* bfloat16 of 0..15, twice: the table vpermw looks the values up in */
    for (int i = 0; i < 32; i++) {
        float f = (float)(i % 16);
        uint32_t u;
        memcpy(&u, &f, 4);
        codes[i] = (uint16_t)(u >> 16);
    }
    const __m512i table = _mm512_loadu_si512(codes);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        float s[K / 32], c[K / 32];  /* the row's scales, and what each group's sum of x adds */
        for (int64_t g = 0; g < groups; g++) {
            s[g] = bf16_to_float(scales[n * groups + g]);
            c[g] = bf16_to_float(zeros[n * groups + g]) - 8 * s[g];
        }
#define INT4(t) row_int4(xb + m0 * K / 32, xsum + m0 * groups, K, w + n * K / 2, s, c, G, table, y + m0 * N + n, N, t)
        FOR_TILES(M, INT4)
    }
    free(xb);
    free(xsum);
}

/* The int4 weight as bfloat16, (N, K): for products of many rows (a prompt), which PyTorch's
 * matrix products do better than a matrix-vector kernel. Each value rounded to nearest even. */
void dequantize_int4(const uint8_t* w, const uint16_t* scales, const uint16_t* zeros, int64_t G, int64_t N, int64_t K,
                     uint16_t* out, int threads) {
    int64_t groups = K / G;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t k = 0; k < K; k += 32) {
            const uint8_t* chunk = w + n * K / 2 + (k / 64) * 32;
            float s = bf16_to_float(scales[n * groups + k / G]), z = bf16_to_float(zeros[n * groups + k / G]);
            for (int j = 0; j < 32; j++) {
                uint8_t b = chunk[j];
                int q = k % 64 == 0 ? (b & 15) : (b >> 4);
                float v = ((float)q - 8) * s + z;
                uint32_t u;
                memcpy(&u, &v, 4);
                u += 0x7FFF + ((u >> 16) & 1);  /* round to nearest even (finite values) */
                out[n * K + k + j] = (uint16_t)(u >> 16);
            }
        }
    }
}

#else
int native_supported(void) { return 0; }
#endif
