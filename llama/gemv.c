/* Matrix-vector products for decoding on the CPU: y (M, N) = x (M, K) W^T for a few rows of x,
 * reading W once, at the memory's speed. llama/native.py compiles this file for the machine it runs
 * on (cc -O3 -march=native -fopenmp), and llama/ops.cpp and layer.c call it (kernels.h); without
 * AVX-512 (F, BW, VNNI:
 * Intel Cascade Lake, Ice Lake, Sapphire Rapids, AMD Zen 4 and later) it compiles to nothing but
 * native_supported() == 0, and PyTorch's kernels are used.
 *
 * Why: batch-1 decoding reads every weight once per token, so its speed is bytes over bandwidth.
 * PyTorch's CPU products for a short, wide left operand read weights at about half the machine's
 * bandwidth, and its int8/int4 kernels spend more time converting weights than reading them.
 *
 * How (each thread takes a contiguous range of output rows, so it reads one sequential stream):
 *   float32   16 products per fused multiply-add;
 *   bfloat16  x rounded to bfloat16 once, 32 products per AVX512-BF16 dot instruction (on a CPU
 *             without AVX512-BF16, such as Ice Lake: the weights widened to float32, 16 products
 *             per fused multiply-add of float32 x);
 *   int8      x rounded to int16 once, per block of 128 columns with a float32 scale (more precise
 *             than bfloat16 there); 32 weights widened to int16 per VNNI dot instruction (vpdpwssd),
 *             summed exactly in int32 over a block, then scaled in float32 (the block's scale,
 *             then the row's);
 *   int4      x rounded to 15-bit integers per block of 32 columns; W packed two values a byte,
 *             (N, K / 2), in a layout where a vector lane is a block of 32 columns (below), 64
 *             products per VNNI dot instruction (vpdpbusd, two a product: x as two bytes); value =
 *             (q - 8) * scale + zero per group of G columns, so a block adds scale * sum(q x) +
 *             (zero - 8 scale) * sum(x).
 * (Widening int8 to bfloat16 takes five instructions per 32 weights, to int16 one: with bfloat16 x
 * these two kernels were bound by arithmetic rather than by memory; so was int4 widened to int16.)
 * Every product accumulates in float32, and K % 32 == 0. `gemv_team` is called by each thread of
 * a team (kernels.h): each thread rounds x itself, into scratch memory of its own, then takes its
 * share of the rows of W.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>

int native_supported(void) { return 1; }

static inline float bf16_to_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Several rows of x (a speculative verify pass, a batch). The float and bfloat16 kernels take
 * blocks of 4 rows of W by 4 rows of x (`FOR_BLOCKS`): 16 accumulators, so that each loaded chunk
 * of W serves 4 rows of x and each chunk of x 4 rows of W (a load per two multiply-adds, where one
 * row of W at a time needs one per multiply-add). The int8 and int4 kernels, which need more
 * registers a row, compute one output row n for a tile of up to TILE rows of x at once, so that a
 * weight chunk is loaded (and widened) once for the whole tile. Block and tile sizes are
 * constants where they are called, so the accumulators stay in registers. */
#define TILE 8
#define ALWAYS_INLINE static inline __attribute__((always_inline))
/* `body(t)` for each tile of rows m0 .. m0+t-1 of M, tiles of up to TILE rows. */
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
            default: body(TILE); break;                                                         \
        }                                                                                       \
    }

/* `body(R, t)` for each block of rows n .. n+R-1 of W by rows m0 .. m0+t-1 of x: R = 4 (1 for the
 * last N % 4 rows), t up to 4. A thread's 4 rows of W stay in its L1 cache while it takes every
 * row of x; its first block (m0 == 0) reads them from memory, and asks for the next 4 rows so that
 * the later blocks' arithmetic overlaps their reading (4 rows of x then cost about what 1 does). */
#define FOR_X_BLOCKS(M, R, body)                                                                \
    for (int64_t m0 = 0; m0 < (M); m0 += 4) {                                                   \
        switch ((M) - m0 < 4 ? (M) - m0 : 4) {                                                  \
            case 1: body(R, 1); break;                                                          \
            case 2: body(R, 2); break;                                                          \
            case 3: body(R, 3); break;                                                          \
            default: body(R, 4); break;                                                         \
        }                                                                                       \
    }
#define FOR_BLOCKS(N, M, body)                                                                  \
    _Pragma("omp for schedule(static)")                                                         \
    for (int64_t n0 = 0; n0 < (N); n0 += 4) {                                                   \
        if ((N) - n0 >= 4) {                                                                    \
            const int64_t n = n0;                                                               \
            FOR_X_BLOCKS(M, 4, body)                                                            \
        } else {                                                                                \
            for (int64_t n = n0; n < (N); n++) FOR_X_BLOCKS(M, 1, body)                         \
        }                                                                                       \
    }

/* Batch 1 (one row of x): each thread takes ROWS rows of W at once, ROWS streams read side by
 * side. On Intel's server cores a single stream per core reads at about two thirds of what four do
 * (the hardware prefetcher follows each stream within a page; MKL's float32 product reads several
 * rows at once too); AMD's Zen 4 reads a single stream at full speed, where it is measured best.
 * native.py sets ROWS by the CPU's vendor. `body(r)`: rows n .. n+r-1 of W, r <= ROWS. */
#ifndef ROWS
#define ROWS 1
#endif
#if ROWS > 4
#error "ROWS is at most 4"
#endif
#define FOR_ROW_GROUPS(N, body)                                                                 \
    _Pragma("omp for schedule(static)")                                                         \
    for (int64_t n = 0; n < (N); n += ROWS) {                                                   \
        switch ((N) - n < ROWS ? (N) - n : ROWS) {                                              \
            case 1: body(1); break;                                                             \
            case 2: body(2); break;                                                             \
            case 3: body(3); break;                                                             \
            default: body(ROWS); break;                                                         \
        }                                                                                       \
    }

/* Reading W from memory, each kernel asks for the bytes it will read next ahead of time (a software
 * prefetch of the same place AHEAD bytes or more further on: whole groups of ROWS rows on, so the
 * address is one the thread reads next), which the hardware's own prefetchers leave too late where
 * the arithmetic per byte is high. Study matrices on an Intel Xeon, 2 threads, weights cycling
 * through memory: int8 17.7 -> 29.7 GB/s, int4 22.0 -> 29.4, bfloat16 23.7 -> 26.2 (float32 29.4
 * either way). */
#define AHEAD 4096
/* The bytes from a row of W to the row the kernel asks for ahead: rows of `row_bytes` in groups of R. */
static inline int64_t ahead_bytes(int64_t row_bytes, int64_t R) {
    int64_t rows = (AHEAD + row_bytes - 1) / row_bytes;
    return (rows + R - 1) / R * R * row_bytes;
}
ALWAYS_INLINE void ask(const void* p) { _mm_prefetch((const char*)p, _MM_HINT_T0); }

/* Scratch memory for x as a kernel rounds it (up to 3 arrays a call): kept per calling thread and
 * grown to the largest call, so that a decode step's 50-odd products make no allocations (they
 * cost about a microsecond a call in malloc, calloc and free). 64-byte aligned; contents undefined. */
static __thread struct { void* p; size_t bytes; } scratch_held[3];
static void* scratch(int i, size_t bytes) {
    if (bytes > scratch_held[i].bytes) {
        free(scratch_held[i].p);
        scratch_held[i].bytes = (bytes + 4095) / 4096 * 4096;
        scratch_held[i].p = aligned_alloc(64, scratch_held[i].bytes);
    }
    return scratch_held[i].p;
}

/* The float kernels, for float32 weights and (without AVX512-BF16) bfloat16 ones: 16 products per
 * fused multiply-add of float32 x. Entries i .. i+15 of the weights as float32. */
ALWAYS_INLINE __m512 load_w(const void* w, int64_t i, const int bf16) {
    return bf16 ? load_bf16x16((const uint16_t*)w + i, 0xFFFF) : _mm512_loadu_ps((const float*)w + i);
}

/* 16 vectors to one whose lane i is the sum of v[i]'s lanes (three rounds of pairing: 45
 * instructions for 16 sums, against about 8 each summed apart). */
ALWAYS_INLINE __m512 sum16(const __m512 v[16]) {
    __m512 b[8], c[4];
    for (int i = 0; i < 8; i++)  /* 128-bit lane: v[2i] in elements 0 and 2, v[2i+1] in 1 and 3 */
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {  /* 128-bit lane: element q a part of v[4i+q] */
        __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(b[2 * i]), _mm512_castps_pd(b[2 * i + 1]));
        __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(b[2 * i]), _mm512_castps_pd(b[2 * i + 1]));
        c[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
    }
    /* 128-bit lane g of the result: the four 128-bit lanes of c[g] added */
    __m512 e01 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x44), _mm512_shuffle_f32x4(c[0], c[1], 0xEE));
    __m512 e23 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x44), _mm512_shuffle_f32x4(c[2], c[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(e01, e23, 0x88), _mm512_shuffle_f32x4(e01, e23, 0xDD));
}

/* A block's sums: a[4 j + r] (row j of x, row n + r of W) into y[j N + n + r]. */
ALWAYS_INLINE void store_block(const __m512 a[16], float* y, int64_t n, int64_t N, const int R, const int t) {
    if (R == 4 && t == 4) {
        float s[16];
        _mm512_storeu_ps(s, sum16(a));
        for (int j = 0; j < 4; j++) memcpy(y + j * N + n, s + 4 * j, 4 * sizeof(float));
    } else {
        for (int j = 0; j < t; j++)
            for (int r = 0; r < R; r++) y[j * N + n + r] = _mm512_reduce_add_ps(a[4 * j + r]);
    }
}

/* Rows n .. n+R-1 of W times rows 0 .. t-1 of x (R, t <= 4; `next`: ask for the next R rows). */
ALWAYS_INLINE void block_float(const float* x, int64_t K, const void* w, int64_t n, int64_t N, float* y, const int R,
                               const int t, const int bf16, const int next) {
    __m512 a[16];
    for (int i = 0; i < 16; i++) a[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        __m512 xv[4];
        for (int j = 0; j < t; j++) xv[j] = _mm512_loadu_ps(x + j * K + k);
        for (int r = 0; r < R; r++) {
            __m512 wv = load_w(w, (n + r) * K + k, bf16);
            if (next) ask((const char*)w + ((n + R + r) * K + k) * (bf16 ? 2 : 4));
            for (int j = 0; j < t; j++) a[4 * j + r] = _mm512_fmadd_ps(xv[j], wv, a[4 * j + r]);
        }
    }
    store_block(a, y, n, N, R, t);
}

/* Batch 1: rows n .. n+R-1 of W times one row of x. */
ALWAYS_INLINE void rows_float(const float* x, int64_t K, const void* w, int64_t n, float* y, const int R,
                              const int bf16, int64_t ahead) {
    __m512 a[4], b[4];
    for (int r = 0; r < R; r++) a[r] = b[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
        for (int r = 0; r < R; r++) {
            a[r] = _mm512_fmadd_ps(x0, load_w(w, (n + r) * K + k, bf16), a[r]);
            b[r] = _mm512_fmadd_ps(x1, load_w(w, (n + r) * K + k + 16, bf16), b[r]);
            const char* later = (const char*)w + ((n + r) * K + k) * (bf16 ? 2 : 4) + ahead;
            ask(later);
            if (!bf16) ask(later + 64);
        }
    }
    for (int r = 0; r < R; r++) y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a[r], b[r]));
}

ALWAYS_INLINE void team_float(const float* x, int64_t M, int64_t K, const void* w, int64_t N, float* y,
                              const int bf16) {
    if (M == 1) {
        const int64_t ahead = ahead_bytes(K * (bf16 ? 2 : 4), ROWS);
#define FLOAT_ROWS(r) rows_float(x, K, w, n, y + n, r, bf16, ahead)
        FOR_ROW_GROUPS(N, FLOAT_ROWS)
        return;
    }
#define FLOAT(R, t) block_float(x + m0 * K, K, w, n, N, y + m0 * N, R, t, bf16, m0 == 0 && R == 4)
    FOR_BLOCKS(N, M, FLOAT)
}

#ifdef __AVX512BF16__
/* x (M, K) float32 -> bfloat16, 32 values a vector (rounded to nearest even, as PyTorch rounds). */
static __m512bh* to_bf16(const float* x, int64_t M, int64_t K) {
    __m512bh* xb = (__m512bh*)scratch(0, M * K * 2);
    for (int64_t i = 0; i < M * K / 32; i++)
        xb[i] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + 32 * i + 16), _mm512_loadu_ps(x + 32 * i));
    return xb;
}

/* Rows n .. n+R-1 of W times rows 0 .. t-1 of x (R, t <= 4; `next`: ask for the next R rows); xb
 * (t, K / 32) vectors of x rounded to bfloat16, 32 columns per dot instruction. */
ALWAYS_INLINE void block_bf16(const __m512bh* xb, int64_t K, const uint16_t* w, int64_t n, int64_t N, float* y,
                              const int R, const int t, const int next) {
    __m512 a[16];
    for (int i = 0; i < 16; i++) a[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __m512bh xv[4];
        for (int j = 0; j < t; j++) xv[j] = xb[j * K / 32 + k / 32];
        for (int r = 0; r < R; r++) {
            __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (n + r) * K + k);
            if (next) ask(w + (n + R + r) * K + k);
            for (int j = 0; j < t; j++) a[4 * j + r] = _mm512_dpbf16_ps(a[4 * j + r], xv[j], wv);
        }
    }
    store_block(a, y, n, N, R, t);
}

/* Batch 1: rows 0 .. R-1 of W (row stride K) times one row of x; two accumulators a row
 * (alternate 32 columns: two dependency chains). */
ALWAYS_INLINE void rows_bf16(const __m512bh* xb, int64_t K, const uint16_t* wr, float* y, const int R,
                             int64_t ahead) {
    __m512 a[4], b[4];
    for (int r = 0; r < R; r++) a[r] = b[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64)
        for (int r = 0; r < R; r++) {
            a[r] = _mm512_dpbf16_ps(a[r], xb[k / 32], (__m512bh)_mm512_loadu_si512(wr + r * K + k));
            b[r] = _mm512_dpbf16_ps(b[r], xb[k / 32 + 1], (__m512bh)_mm512_loadu_si512(wr + r * K + k + 32));
            ask((const char*)(wr + r * K + k) + ahead);
            ask((const char*)(wr + r * K + k + 32) + ahead);
        }
    if (k < K)
        for (int r = 0; r < R; r++)
            a[r] = _mm512_dpbf16_ps(a[r], xb[k / 32], (__m512bh)_mm512_loadu_si512(wr + r * K + k));
    for (int r = 0; r < R; r++) y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a[r], b[r]));
}

static void team_bf16(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* y) {
    __m512bh* xb = to_bf16(x, M, K);
    if (M == 1) {
        const int64_t ahead = ahead_bytes(K * 2, ROWS);
#define BF16_ROWS(r) rows_bf16(xb, K, w + n * K, y + n, r, ahead)
        FOR_ROW_GROUPS(N, BF16_ROWS)
        return;
    }
#define BF16(R, t) block_bf16(xb + m0 * K / 32, K, w, n, N, y + m0 * N, R, t, m0 == 0 && R == 4)
    FOR_BLOCKS(N, M, BF16)
}
#else
static void team_bf16(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* y) {
    team_float(x, M, K, w, N, y, 1);
}
#endif

/* The int8 kernel's activations: each row of x in blocks of XB columns (the last may be
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
    XInt16 r = {(int16_t*)scratch(0, M * K * 2), (float*)scratch(1, M * blocks * sizeof(float))};
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

/* Batch 1: rows 0 .. R-1 of W (row stride K, scales sr) times one row of x. */
ALWAYS_INLINE void rows_int8(const int16_t* xq, const float* xs, int64_t K, const int8_t* wr, const uint16_t* sr,
                             float* y, const int R, int64_t ahead) {
    __m512 t[4];
    for (int r = 0; r < R; r++) t[r] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += XB) {
        int64_t k1 = k0 + XB < K ? k0 + XB : K;
        __m512i a[4];
        for (int r = 0; r < R; r++) a[r] = _mm512_setzero_si512();
        for (int64_t k = k0; k < k1; k += 32) {
            __m512i xv = load_q(xq, k);
            for (int r = 0; r < R; r++) {
                __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(wr + r * K + k)));
                if ((k & 63) == 0) ask(wr + r * K + k + ahead);
                a[r] = _mm512_dpwssd_epi32(a[r], xv, wv);
            }
        }
        for (int r = 0; r < R; r++)
            t[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r]), _mm512_set1_ps(xs[k0 / XB]), t[r]);
    }
    for (int r = 0; r < R; r++) y[r] = _mm512_reduce_add_ps(t[r]) * bf16_to_float(sr[r]);
}

static void team_int8(const float* x, int64_t M, int64_t K, const int8_t* w, const uint16_t* scales, int64_t N,
                      float* y) {
    XInt16 xi = to_int16(x, M, K);
    int64_t blocks = (K + XB - 1) / XB;
    if (M == 1 && ROWS > 1) {
        const int64_t ahead = ahead_bytes(K, ROWS);
#define INT8_ROWS(r) rows_int8(xi.q, xi.s, K, w + n * K, scales + n, y + n, r, ahead)
        FOR_ROW_GROUPS(N, INT8_ROWS)
        return;
    }
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
#define INT8(t) row_int8(xi.q + m0 * K, xi.s + m0 * blocks, K, w + n * K, y + m0 * N + n, N, bf16_to_float(scales[n]), t)
        FOR_TILES(M, INT8)
    }
}

/* int4. A row's K columns are blocks of 32 (a block lies in one group of G columns, G a multiple
 * of 32), taken 16 blocks (a "superblock": 512 columns, 256 bytes) at a time, the last superblock
 * holding the m = 1..16 blocks left. A superblock is 4 vectors of 4m bytes: in vector p, bytes
 * 4i .. 4i+3 hold columns 8p .. 8p+3 of its block i in their low halves and 8p+4 .. 8p+7 in their
 * high halves. So a 512-bit lane is a block: one vpdpbusd (64 products of unsigned by signed
 * 8-bit values, summed by fours into int32 lanes) adds 4 columns of each of 16 blocks, 8 of them a
 * whole superblock, and each block's sum is then scaled in float32 by its own lane of scales.
 *
 * x is rounded per block of 32 columns to integers q of up to 15 bits (scale max |x| / 32512, to
 * nearest), each held as two signed bytes, q = 256 h + l (h in -127..127, l in -128..127), so that
 * q w = 256 h w + l w is two vpdpbusd of 8-bit operands: as precise as int16 x, in twice the dot
 * instructions of int8 x (whose coarser rounding, a 254th of a block's largest entry, changed a
 * real model's greedy answers) but a quarter of widening the weights to int16. Laid out to match
 * the weights: per superblock 8 vectors v, each h then l, 64 bytes each, holding columns 4v ..
 * 4v+3 of block i in bytes 4i .. 4i+3 (lanes past m hold whatever the scratch memory held: the
 * weights there load as zeros). */
#define LANES 16
#define X_STEP 32512  /* 127 * 256: h stays within a signed byte */
typedef struct {
    int8_t* q;   /* (M, supers, 8, 2, 64), 64-byte aligned */
    float* s;    /* (M, supers * LANES): each block's scale; 0 past the last block */
    float* sum;  /* (M, supers * LANES): each block's sum of x as rounded (its scale times its sum of q) */
} XSplit;

static XSplit to_split_blocks(const float* x, int64_t M, int64_t K) {
    const int64_t blocks = K / 32, supers = (blocks + LANES - 1) / LANES, lanes = supers * LANES;
    XSplit r = {(int8_t*)scratch(0, M * supers * 1024), (float*)scratch(1, M * lanes * sizeof(float)),
                (float*)scratch(2, M * lanes * sizeof(float))};
    /* lanes past the last block: no weights there (loaded as zeros), but their scales must be 0 */
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = blocks; b < lanes; b++) r.s[m * lanes + b] = r.sum[m * lanes + b] = 0;
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < blocks; b++) {
            const float* xb = x + m * K + b * 32;
            __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
            float big = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            __m512 inv = _mm512_set1_ps(big > 0 ? X_STEP / big : 0);
            __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
            r.s[m * lanes + b] = big / X_STEP;
            r.sum[m * lanes + b] = big / X_STEP * (float)(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
            const __m512i round = _mm512_set1_epi32(128);
            __m512i h0 = _mm512_srai_epi32(_mm512_add_epi32(q0, round), 8);
            __m512i h1 = _mm512_srai_epi32(_mm512_add_epi32(q1, round), 8);
            __m512i l0 = _mm512_sub_epi32(q0, _mm512_slli_epi32(h0, 8));
            __m512i l1 = _mm512_sub_epi32(q1, _mm512_slli_epi32(h1, 8));
            int8_t h[32], l[32];
            _mm_storeu_si128((__m128i*)h, _mm512_cvtepi32_epi8(h0));
            _mm_storeu_si128((__m128i*)(h + 16), _mm512_cvtepi32_epi8(h1));
            _mm_storeu_si128((__m128i*)l, _mm512_cvtepi32_epi8(l0));
            _mm_storeu_si128((__m128i*)(l + 16), _mm512_cvtepi32_epi8(l1));
            int8_t* lane = r.q + (m * supers + b / LANES) * 1024 + (b % LANES) * 4;
            for (int v = 0; v < 8; v++) {
                memcpy(lane + v * 128, h + 4 * v, 4);
                memcpy(lane + v * 128 + 64, l + 4 * v, 4);
            }
        }
    return r;
}

/* Superblock s (m blocks) of a row's scales and zeros sr, zr, a lane (block) each: its scales, and
 * cz = zero - 8 scale. */
ALWAYS_INLINE void super_scales(const uint16_t* sr, const uint16_t* zr, int64_t s, int64_t m, int gshift, __m512* sc,
                                __m512* cz) {
    const __m512i to_group = _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                               gshift - 5);  /* lane -> its group within the superblock */
    const int64_t g0 = (s * LANES * 32) >> gshift, groups = (m * 32) >> gshift;
    const __mmask16 gm = (__mmask16)((1u << groups) - 1);
    __m512 scale = load_bf16x16(sr + g0, gm), zero = load_bf16x16(zr + g0, gm);
    if (gshift > 5) {
        scale = _mm512_permutexvar_ps(to_group, scale);
        zero = _mm512_permutexvar_ps(to_group, zero);
    }
    *sc = scale;
    *cz = _mm512_fnmadd_ps(_mm512_set1_ps(8), scale, zero);
}

/* t plus a superblock's products of one row of W and one row of x: per block, scale * (x's scale *
 * q) + cz * (x's block sum), q = 256 (ah + bh) + (al + bl), the sums of the high and low bytes of
 * x against the low and high halves of the weights' bytes. */
ALWAYS_INLINE __m512 add_super(__m512 t, __m512i ah, __m512i al, __m512i bh, __m512i bl, __m512 sc, __m512 cz,
                               const float* xs, const float* xsum) {
    const __m512i q = _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(ah, bh), 8), _mm512_add_epi32(al, bl));
    t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), _mm512_mul_ps(sc, _mm512_loadu_ps(xs)), t);
    return _mm512_fmadd_ps(cz, _mm512_loadu_ps(xsum), t);
}

/* Row n of an int4 weight: for each row j of the tile, the sum over blocks of
 * scale * (x's scale * sum(q_w q_x)) + (zero - 8 scale) * (x's block sum). Up to 4 rows keep the
 * low and high halves' sums apart (four dependency chains a row). */
ALWAYS_INLINE void row_int4(const XSplit* xi, int64_t K, const uint8_t* wr, const uint16_t* sr, const uint16_t* zr,
                            int gshift, float* y, int64_t N, const int tile, int64_t ahead) {
    const int64_t blocks = K / 32, supers = (blocks + LANES - 1) / LANES, lanes = supers * LANES;
    const int four = tile <= 4;
    const __m512i nibble = _mm512_set1_epi8(15);
    __m512 t[TILE];
    for (int j = 0; j < tile; j++) t[j] = _mm512_setzero_ps();
    for (int64_t s = 0; s < supers; s++) {
        const int64_t m = blocks - s * LANES < LANES ? blocks - s * LANES : LANES;
        const uint8_t* ws = wr + s * 256;
        const __mmask64 bytes = m == LANES ? ~(__mmask64)0 : (((__mmask64)1 << (4 * m)) - 1);
        __m512i ah[TILE], al[TILE], bh[TILE], bl[TILE];
        for (int j = 0; j < tile; j++) ah[j] = al[j] = bh[j] = bl[j] = _mm512_setzero_si512();
        for (int p = 0; p < 4; p++) {
            __m512i w = _mm512_maskz_loadu_epi8(bytes, ws + p * 4 * m);
            ask(ws + p * 4 * m + ahead);
            __m512i lo = _mm512_and_si512(w, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), nibble);
            for (int j = 0; j < tile; j++) {
                const int8_t* xv = xi->q + (j * supers + s) * 1024 + p * 256;
                ah[j] = _mm512_dpbusd_epi32(ah[j], lo, _mm512_load_si512(xv));
                al[j] = _mm512_dpbusd_epi32(al[j], lo, _mm512_load_si512(xv + 64));
                if (four) {
                    bh[j] = _mm512_dpbusd_epi32(bh[j], hi, _mm512_load_si512(xv + 128));
                    bl[j] = _mm512_dpbusd_epi32(bl[j], hi, _mm512_load_si512(xv + 192));
                } else {
                    ah[j] = _mm512_dpbusd_epi32(ah[j], hi, _mm512_load_si512(xv + 128));
                    al[j] = _mm512_dpbusd_epi32(al[j], hi, _mm512_load_si512(xv + 192));
                }
            }
        }
        __m512 sc, cz;
        super_scales(sr, zr, s, m, gshift, &sc, &cz);
        for (int j = 0; j < tile; j++)
            t[j] = add_super(t[j], ah[j], al[j], bh[j], bl[j], sc, cz, xi->s + j * lanes + s * LANES,
                             xi->sum + j * lanes + s * LANES);
    }
    for (int j = 0; j < tile; j++) y[j * N] = _mm512_reduce_add_ps(t[j]);
}

/* Batch 1: rows 0 .. R-1 of an int4 weight (row stride K / 2 bytes, `groups` scales and zeros a
 * row) times one row of x, side by side: R streams and 4 R dependency chains (row_int4 has 4). */
ALWAYS_INLINE void rows_int4(const XSplit* xi, int64_t K, const uint8_t* wr, const uint16_t* sr, const uint16_t* zr,
                             int64_t groups, int gshift, float* y, const int R, int64_t ahead) {
    const int64_t blocks = K / 32, supers = (blocks + LANES - 1) / LANES;
    const __m512i nibble = _mm512_set1_epi8(15);
    __m512 t[4];
    for (int r = 0; r < R; r++) t[r] = _mm512_setzero_ps();
    for (int64_t s = 0; s < supers; s++) {
        const int64_t m = blocks - s * LANES < LANES ? blocks - s * LANES : LANES;
        const __mmask64 bytes = m == LANES ? ~(__mmask64)0 : (((__mmask64)1 << (4 * m)) - 1);
        __m512i ah[4], al[4], bh[4], bl[4];
        for (int r = 0; r < R; r++) ah[r] = al[r] = bh[r] = bl[r] = _mm512_setzero_si512();
        for (int p = 0; p < 4; p++) {
            const int8_t* xv = xi->q + s * 1024 + p * 256;
            const __m512i x0 = _mm512_load_si512(xv), x1 = _mm512_load_si512(xv + 64);
            const __m512i x2 = _mm512_load_si512(xv + 128), x3 = _mm512_load_si512(xv + 192);
            for (int r = 0; r < R; r++) {
                const uint8_t* ws = wr + r * K / 2 + s * 256 + p * 4 * m;
                __m512i w = _mm512_maskz_loadu_epi8(bytes, ws);
                ask(ws + ahead);
                __m512i lo = _mm512_and_si512(w, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), nibble);
                ah[r] = _mm512_dpbusd_epi32(ah[r], lo, x0);
                al[r] = _mm512_dpbusd_epi32(al[r], lo, x1);
                bh[r] = _mm512_dpbusd_epi32(bh[r], hi, x2);
                bl[r] = _mm512_dpbusd_epi32(bl[r], hi, x3);
            }
        }
        for (int r = 0; r < R; r++) {
            __m512 sc, cz;
            super_scales(sr + r * groups, zr + r * groups, s, m, gshift, &sc, &cz);
            t[r] = add_super(t[r], ah[r], al[r], bh[r], bl[r], sc, cz, xi->s + s * LANES, xi->sum + s * LANES);
        }
    }
    for (int r = 0; r < R; r++) y[r] = _mm512_reduce_add_ps(t[r]);
}

static void team_int4(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* scales,
                      const uint16_t* zeros, int64_t G, int64_t N, float* y) {
    const int64_t groups = K / G, supers = (K / 32 + LANES - 1) / LANES, lanes = supers * LANES;
    const int gshift = __builtin_ctzll((unsigned long long)G);
    XSplit xi = to_split_blocks(x, M, K);
    if (M == 1 && ROWS > 1) {
        const int64_t ahead = ahead_bytes(K / 2, ROWS);
#define INT4_ROWS(r) rows_int4(&xi, K, w + n * K / 2, scales + n * groups, zeros + n * groups, groups, gshift, y + n, r, ahead)
        FOR_ROW_GROUPS(N, INT4_ROWS)
        return;
    }
    const int64_t ahead = ahead_bytes(K / 2, 1);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
#define INT4(t)                                                                                                    \
    do {                                                                                                           \
        XSplit rows = {xi.q + m0 * supers * 1024, xi.s + m0 * lanes, xi.sum + m0 * lanes};                           \
        row_int4(&rows, K, w + n * K / 2, scales + n * groups, zeros + n * groups, gshift, y + m0 * N + n, N, t,  \
                 ahead);                                                                                           \
    } while (0)
        FOR_TILES(M, INT4)
    }
}

void gemv_team(const Weight* w, const float* x, int64_t M, float* y) {
    switch (w->kind) {
        case WEIGHT_F32: team_float(x, M, w->k, w->data, w->n, y, 0); break;
        case WEIGHT_BF16: team_bf16(x, M, w->k, w->data, w->n, y); break;
        case WEIGHT_INT8: team_int8(x, M, w->k, w->data, w->scales, w->n, y); break;
        default: team_int4(x, M, w->k, w->data, w->scales, w->zeros, w->group_size, w->n, y); break;
    }
}

void gemv(const Weight* w, const float* x, int64_t M, float* y, int threads) {
#pragma omp parallel num_threads(threads)
    gemv_team(w, x, M, y);
}

/* 16 float32 values as bfloat16, rounded to nearest even (finite values), stored at o. */
ALWAYS_INLINE void store_bf16x16(uint16_t* o, __m512 v) {
    const __m512i u = _mm512_castps_si512(round_bf16(v));
    _mm256_storeu_si256((__m256i*)o, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}

/* 16 values, (q - 8) * s + z of q in v, stored at o as float32 or as bfloat16. */
ALWAYS_INLINE void store_values(void* o, __m128i v, __m512 s, __m512 z, const int f32) {
    __m512i q = _mm512_sub_epi32(_mm512_cvtepu8_epi32(v), _mm512_set1_epi32(8));
    __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), s, z);
    if (f32) _mm512_storeu_ps(o, f);
    else store_bf16x16(o, f);
}

/* The int4 weight as float32 (f32) or bfloat16 (rounded to nearest even), (N, K): for products of
 * many rows (a prompt), which PyTorch's matrix products do better than a matrix-vector kernel. */
void dequantize_int4(const uint8_t* w, const uint16_t* scales, const uint16_t* zeros, int64_t G, int64_t N, int64_t K,
                     void* out, int f32, int threads) {
    const int64_t groups = K / G, blocks = K / 32;
    const __m128i nibble = _mm_set1_epi8(15);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t b0 = 0; b0 < blocks; b0 += LANES) {
            const int64_t m = blocks - b0 < LANES ? blocks - b0 : LANES;
            const uint8_t* sb = w + n * K / 2 + b0 * 16;  /* the superblock: 16 bytes a block */
            for (int64_t i = 0; i < m; i++) {
                const int64_t b = b0 + i, g = n * groups + b * 32 / G;
                const __m512 s = _mm512_set1_ps(bf16_to_float(scales[g])), z = _mm512_set1_ps(bf16_to_float(zeros[g]));
                uint32_t words[4];  /* the block's 4 bytes in each of the 4 vectors */
                for (int p = 0; p < 4; p++) memcpy(words + p, sb + p * 4 * m + i * 4, 4);
                __m128i v = _mm_loadu_si128((const __m128i*)words);
                __m128i lo = _mm_and_si128(v, nibble), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nibble);
                /* columns 8p .. 8p+3 are vector p's low halves, 8p+4 .. 8p+7 its high halves */
                __m128i first = _mm_unpacklo_epi32(lo, hi), second = _mm_unpackhi_epi32(lo, hi);
                char* o = (char*)out + (n * K + b * 32) * (f32 ? 4 : 2);
                store_values(o, first, s, z, f32);
                store_values(o + 16 * (f32 ? 4 : 2), second, s, z, f32);
            }
        }
    }
}

#else
int native_supported(void) { return 0; }
#endif
