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
 *   int8      x rounded to int16 once, per block of 128 columns with a float32 scale (more precise
 *             than bfloat16 there); 32 weights widened to int16 per VNNI dot instruction (vpdpwssd),
 *             summed exactly in int32 over a block, then scaled in float32 (the block's scale,
 *             then the row's);
 *   int4      the same int16 x; W packed two values a byte, (N, K / 2), each 64-column chunk in
 *             32 bytes: byte j holds column j in its low half and column j + 32 in its high half,
 *             widened to int16; value = (q - 8) * scale + zero per group of G columns, so a group
 *             adds scale * sum(q x) + (zero - 8 scale) * sum(x).
 * (Widening int8 to bfloat16 takes five instructions per 32 weights, to int16 one: with bfloat16 x
 * these two kernels were bound by arithmetic rather than by memory.)
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

/* Each kernel computes one output row n for a tile of up to TILE rows of x at once (WIDE_TILE for
 * the float kernels, which need fewer registers a row), so that a weight chunk is loaded (and
 * widened) once for the whole tile: up to 16 rows (a speculative verify pass, a batch) read the
 * weights once. `tile` is a constant where it is called, so the accumulators stay in registers. */
#define TILE 8
#define WIDE_TILE 16
#define ALWAYS_INLINE static inline __attribute__((always_inline))
/* `body(t)` for each tile of rows m0 .. m0+t-1 of M, tiles of up to LIMIT rows (TILE or WIDE_TILE). */
#define FOR_TILES_UP_TO(LIMIT, M, body)                                                         \
    for (int64_t m0 = 0; m0 < (M); m0 += (LIMIT)) {                                             \
        switch ((M) - m0 < (LIMIT) ? (M) - m0 : (LIMIT)) {                                      \
            case 1: body(1); break;                                                             \
            case 2: body(2); break;                                                             \
            case 3: body(3); break;                                                             \
            case 4: body(4); break;                                                             \
            case 5: body(5); break;                                                             \
            case 6: body(6); break;                                                             \
            case 7: body(7); break;                                                             \
            WIDE_CASES_##LIMIT(body)                                                            \
            default: body(LIMIT); break;                                                        \
        }                                                                                       \
    }
#define WIDE_CASES_TILE(body)
#define WIDE_CASES_WIDE_TILE(body)                                                              \
    case 8: body(8); break;                                                                     \
    case 9: body(9); break;                                                                     \
    case 10: body(10); break;                                                                   \
    case 11: body(11); break;                                                                   \
    case 12: body(12); break;                                                                   \
    case 13: body(13); break;                                                                   \
    case 14: body(14); break;                                                                   \
    case 15: body(15); break;
#define FOR_TILES(M, body) FOR_TILES_UP_TO(TILE, M, body)
#define FOR_WIDE_TILES(M, body) FOR_TILES_UP_TO(WIDE_TILE, M, body)

/* Two accumulators a row (alternate halves of each chunk: two dependency chains) where the tile
 * leaves registers for them, one beyond 8 rows. */
ALWAYS_INLINE void row_f32(const float* x, int64_t K, const float* wr, int64_t N, float* y, const int tile) {
    const int two = tile <= TILE;
    __m512 a[WIDE_TILE], b[WIDE_TILE];
    for (int j = 0; j < tile; j++) a[j] = b[j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __m512 w0 = _mm512_loadu_ps(wr + k), w1 = _mm512_loadu_ps(wr + k + 16);
        for (int j = 0; j < tile; j++) {
            a[j] = _mm512_fmadd_ps(_mm512_loadu_ps(x + j * K + k), w0, a[j]);
            if (two) b[j] = _mm512_fmadd_ps(_mm512_loadu_ps(x + j * K + k + 16), w1, b[j]);
            else a[j] = _mm512_fmadd_ps(_mm512_loadu_ps(x + j * K + k + 16), w1, a[j]);
        }
    }
    for (int j = 0; j < tile; j++) y[j * N] = _mm512_reduce_add_ps(_mm512_add_ps(a[j], b[j]));
}

void gemv_f32(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
#define F32(t) row_f32(x + m0 * K, K, w + n * K, N, y + m0 * N + n, t)
        FOR_WIDE_TILES(M, F32)
    }
}

/* The bfloat16 kernels: xb (M, K / 32) vectors of x; `widen(wr, k)` gives columns k .. k+31 of
 * the row as bfloat16. */
#define ROW_BF16(name, type, widen)                                                             \
    ALWAYS_INLINE void name(const __m512bh* xb, int64_t K, const type* wr, float* y, int64_t N,  \
                            float scale, const int tile) {                                      \
        const int two = tile <= TILE;                                                           \
        __m512 a[WIDE_TILE], b[WIDE_TILE];                                                      \
        for (int j = 0; j < tile; j++) a[j] = b[j] = _mm512_setzero_ps();                       \
        int64_t k = 0;                                                                          \
        for (; k + 64 <= K; k += 64) {                                                          \
            __m512bh w0 = widen(wr, k), w1 = widen(wr, k + 32);                                 \
            for (int j = 0; j < tile; j++) {                                                    \
                a[j] = _mm512_dpbf16_ps(a[j], xb[j * K / 32 + k / 32], w0);                     \
                if (two) b[j] = _mm512_dpbf16_ps(b[j], xb[j * K / 32 + k / 32 + 1], w1);        \
                else a[j] = _mm512_dpbf16_ps(a[j], xb[j * K / 32 + k / 32 + 1], w1);            \
            }                                                                                   \
        }                                                                                       \
        if (k < K) {                                                                            \
            __m512bh w0 = widen(wr, k);                                                         \
            for (int j = 0; j < tile; j++) a[j] = _mm512_dpbf16_ps(a[j], xb[j * K / 32 + k / 32], w0); \
        }                                                                                       \
        for (int j = 0; j < tile; j++) y[j * N] = _mm512_reduce_add_ps(_mm512_add_ps(a[j], b[j])) * scale; \
    }

ALWAYS_INLINE __m512bh load_bf16(const uint16_t* w, int64_t k) { return (__m512bh)_mm512_loadu_si512(w + k); }

ROW_BF16(row_bf16, uint16_t, load_bf16)

void gemv_bf16(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* y, int threads) {
    __m512bh* xb = to_bf16(x, M, K);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
#define BF16(t) row_bf16(xb + m0 * K / 32, K, w + n * K, y + m0 * N + n, N, 1.0f, t)
        FOR_WIDE_TILES(M, BF16)
    }
    free(xb);
}

/* The integer kernels' activations: each row of x in blocks of XB columns (the last may be
 * shorter), a block as int16 q with one float32 scale s (max |x| / 32767 of the block), x ~ q s,
 * rounded to nearest. Products of int16 x and widened weights are summed exactly in int32 (32
 * products an instruction, vpdpwssd) over at most XB columns, then scaled and added in float32.
 * The error of rounding x, at most s / 2 a column, is below bfloat16's wherever an entry is above
 * 1/128 of its block's largest. */
#define XB 128
typedef struct {
    int16_t* q;  /* (M, K), 64-byte aligned */
    float* s;    /* (M, ceil(K / XB)) */
} XInt16;

static XInt16 to_int16(const float* x, int64_t M, int64_t K) {
    int64_t blocks = (K + XB - 1) / XB;
    XInt16 r = {(int16_t*)aligned_alloc(64, (M * K * 2 + 63) / 64 * 64), (float*)malloc(M * blocks * sizeof(float))};
    for (int64_t m = 0; m < M; m++) {
        for (int64_t b = 0; b < blocks; b++) {
            int64_t k0 = b * XB, k1 = k0 + XB < K ? k0 + XB : K;
            __m512 top = _mm512_setzero_ps();
            for (int64_t k = k0; k < k1; k += 16) top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_loadu_ps(x + m * K + k)));
            float big = _mm512_reduce_max_ps(top);
            r.s[m * blocks + b] = big / 32767;
            __m512 inv = _mm512_set1_ps(big > 0 ? 32767 / big : 0);
            for (int64_t k = k0; k < k1; k += 16) {
                __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + m * K + k), inv));  /* to nearest */
                _mm256_store_si256((__m256i*)(r.q + m * K + k), _mm512_cvtepi32_epi16(q));
            }
        }
    }
    return r;
}

ALWAYS_INLINE __m512i load_q(const int16_t* q, int64_t k) { return _mm512_load_si512(q + k); }

ALWAYS_INLINE void row_int8(const int16_t* xq, const float* xs, int64_t K, const int8_t* wr, float* y, int64_t N,
                            float scale, const int tile) {
    int64_t blocks = (K + XB - 1) / XB;
    __m512 t[TILE];
    for (int j = 0; j < tile; j++) t[j] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += XB) {
        int64_t k1 = k0 + XB < K ? k0 + XB : K;
        __m512i a[TILE], b[TILE];  /* two chains, alternate 32 columns */
        for (int j = 0; j < tile; j++) a[j] = b[j] = _mm512_setzero_si512();
        int64_t k = k0;
        for (; k + 64 <= k1; k += 64) {
            __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(wr + k)));
            __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(wr + k + 32)));
            for (int j = 0; j < tile; j++) {
                a[j] = _mm512_dpwssd_epi32(a[j], load_q(xq + j * K, k), w0);
                b[j] = _mm512_dpwssd_epi32(b[j], load_q(xq + j * K, k + 32), w1);
            }
        }
        if (k < k1) {
            __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(wr + k)));
            for (int j = 0; j < tile; j++) a[j] = _mm512_dpwssd_epi32(a[j], load_q(xq + j * K, k), w0);
        }
        for (int j = 0; j < tile; j++)
            t[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a[j], b[j])),
                                   _mm512_set1_ps(xs[j * blocks + k0 / XB]), t[j]);
    }
    for (int j = 0; j < tile; j++) y[j * N] = _mm512_reduce_add_ps(t[j]) * scale;
}

void gemv_int8(const float* x, int64_t M, int64_t K, const int8_t* w, const uint16_t* scales, int64_t N, float* y,
               int threads) {
    XInt16 xi = to_int16(x, M, K);
    int64_t blocks = (K + XB - 1) / XB;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
#define INT8(t) row_int8(xi.q + m0 * K, xi.s + m0 * blocks, K, w + n * K, y + m0 * N + n, N, bf16_to_float(scales[n]), t)
        FOR_TILES(M, INT8)
    }
    free(xi.q);
    free(xi.s);
}

/* 16 bfloat16 values (fewer under mask m; the rest 0) as float32. */
ALWAYS_INLINE __m512 load_bf16x16(const uint16_t* p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* What a row's zeros add: sum over groups of (zero - 8 scale) * (the group's sum of x). */
ALWAYS_INLINE float zero_term(const uint16_t* sr, const uint16_t* zr, const float* xsum, int64_t groups) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
        __mmask16 m = groups - g >= 16 ? 0xFFFF : (__mmask16)((1u << (groups - g)) - 1);
        __m512 c = _mm512_fnmadd_ps(_mm512_set1_ps(8), load_bf16x16(sr + g, m), load_bf16x16(zr + g, m));
        acc = _mm512_fmadd_ps(c, _mm512_maskz_loadu_ps(m, xsum + g), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* int4: per 64-column chunk, the 32 bytes widened to int16 give columns k .. k+31 (low halves) and
 * k+32 .. k+63 (high halves) as 0..15; a group's sum of q x is exact in int32 over a unit of
 * min(G, XB) columns (within one group and one block of x), then scaled by the group's scale times
 * the block's. G is a power of two, 2^gshift. */
ALWAYS_INLINE void row_int4(const int16_t* xq, const float* xs, const float* xsum, int64_t K, const uint8_t* wr,
                            const uint16_t* sr, const uint16_t* zr, int64_t G, int gshift, float* y, int64_t N,
                            const int tile) {
    const __m512i low = _mm512_set1_epi16(15);
    const int64_t blocks = (K + XB - 1) / XB, unit_mask = (G < XB ? G : XB) - 1, groups = K >> gshift;
    __m512 t[TILE];
    __m512i a[TILE], b[TILE];
    for (int j = 0; j < tile; j++) {
        t[j] = _mm512_setzero_ps();
        a[j] = b[j] = _mm512_setzero_si512();
    }
    for (int64_t k = 0; k < K; k += 64) {
        __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(wr + k / 2)));
        __m512i lo = _mm512_and_si512(bytes, low), hi = _mm512_srli_epi16(bytes, 4);
        for (int j = 0; j < tile; j++) {
            a[j] = _mm512_dpwssd_epi32(a[j], load_q(xq + j * K, k), lo);
            b[j] = _mm512_dpwssd_epi32(b[j], load_q(xq + j * K, k + 32), hi);
        }
        if (G == 32) {  /* the two halves are groups of their own */
            float s0 = bf16_to_float(sr[k >> 5]), s1 = bf16_to_float(sr[(k >> 5) + 1]);
            for (int j = 0; j < tile; j++) {
                float sx = xs[j * blocks + k / XB];
                t[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[j]), _mm512_set1_ps(s0 * sx), t[j]);
                t[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(b[j]), _mm512_set1_ps(s1 * sx), t[j]);
                a[j] = b[j] = _mm512_setzero_si512();
            }
        } else if (((k + 64) & unit_mask) == 0) {
            float sw = bf16_to_float(sr[k >> gshift]);
            for (int j = 0; j < tile; j++) {
                __m512 f = _mm512_set1_ps(sw * xs[j * blocks + k / XB]);
                t[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a[j], b[j])), f, t[j]);
                a[j] = b[j] = _mm512_setzero_si512();
            }
        }
    }
    for (int j = 0; j < tile; j++) y[j * N] = _mm512_reduce_add_ps(t[j]) + zero_term(sr, zr, xsum + j * groups, groups);
}

void gemv_int4(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* scales, const uint16_t* zeros,
               int64_t G, int64_t N, float* y, int threads) {
    int64_t groups = K / G, blocks = (K + XB - 1) / XB;
    int gshift = __builtin_ctzll((unsigned long long)G);
    XInt16 xi = to_int16(x, M, K);
    float* xsum = (float*)malloc(M * groups * sizeof(float));  /* of x as rounded: the product is of x as rounded */
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < groups; g++) {
            float t = 0;
            for (int64_t k = g * G; k < (g + 1) * G; k++) t += xi.q[m * K + k] * xi.s[m * blocks + k / XB];
            xsum[m * groups + g] = t;
        }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
#define INT4(t) row_int4(xi.q + m0 * K, xi.s + m0 * blocks, xsum + m0 * groups, K, w + n * K / 2, scales + n * groups, \
                         zeros + n * groups, G, gshift, y + m0 * N + n, N, t)
        FOR_TILES(M, INT4)
    }
    free(xi.q);
    free(xi.s);
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
