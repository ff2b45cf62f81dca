/* slimlm native CPU kernels: y (M, N) = x (M, K) @ W^T for grouped integer weights, float32 in and out.
 *
 * W (N, K) is stored as codes u with one scale s and one zero z per group of G inputs (g = k / G):
 *     w[n, k] = (u[n, k] - z[n, g]) * s[n, g]
 * and computed as  y[m, n] = sum_g s[n, g] * d[m, n, g],  d = sum_{k in g} (u[n, k] - z[n, g]) x[m, k].
 * u - z is a small integer, exact in float32, so a group sum has no cancellation term (a group of zero
 * weights adds exactly 0) and the error is float32 accumulation only. The d chains restart every group:
 * independent dependency chains that out-of-order execution overlaps.
 *
 * Code blocks (16 bytes each, rows of codes contiguous):
 *   bits 4 (3-bit codes too): 32 weights, byte j = u[j] | u[j + 16] << 4, so x is read in order;
 *   bits 8: 16 weights, one byte each; symmetric codes are stored signed (u - 128, as int8) and z = 0.
 * Scales and zeros are float32 (N, K / G) (converted once from the float16 the format stores: exact);
 * zero NULL means z = zc for every group (symmetric 3/4-bit: 2^(bits-1); symmetric 8-bit: 0).
 * G is a multiple of the block (32 or 16 weights) and divides K.
 *
 * AVX-512 turns a 4-bit code into (u - z) with one permute from a 16-entry table (iota - z per group);
 * AVX2 converts and subtracts. Up to MR rows of x share each decoded block.
 *
 * Threads: OpenMP over output rows, exactly `threads` of them (the caller passes torch's count; the library
 * resolves libgomp.so.1 to the copy torch already loaded, so one thread pool serves both).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "slimlm native kernels need AVX2 and FMA (or AVX-512)"
#endif

#define PAR_MIN_WORK 32768L /* below this many multiply-adds one thread does it (a fork costs more) */

#if defined(__AVX512F__)
#define ISA 512
#define VL 16
#define MR 8 /* rows of x that share one decoded weight block: 2 * MR accumulators in 32 registers */
typedef __m512 vf;
#define vzero _mm512_setzero_ps
#define vset1 _mm512_set1_ps
#define vload _mm512_loadu_ps
#define vfma _mm512_fmadd_ps
static inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
/* the per-group decoder state: 4-bit: the table (t - z) for t = 0..15; 8-bit: z broadcast */
static inline vf group_state(float z, const int bits) {
    const vf vz = vset1(z);
    if (bits == 4) return _mm512_sub_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), vz);
    return vz;
}
/* one 16-byte block -> 32 / bits * 4 weights (u - z) in w[] */
static inline void decode(const uint8_t *q, vf t, vf *w, const int bits, const int sym) {
    const __m128i b = _mm_loadu_si128((const __m128i *)q);
    if (bits == 4) { /* permutexvar reads the low 4 bits of each lane: the low nibble needs no mask */
        const __m512i v = _mm512_cvtepu8_epi32(b);
        w[0] = _mm512_permutexvar_ps(v, t);
        w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t);
    } else if (sym) {
        w[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    } else {
        w[0] = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)), t);
    }
}
#else
#define ISA 256
#define VL 8
#define MR 4 /* 2 * MR accumulators + 4 weights + state in 16 registers */
typedef __m256 vf;
#define vzero _mm256_setzero_ps
#define vset1 _mm256_set1_ps
#define vload _mm256_loadu_ps
#define vfma _mm256_fmadd_ps
static inline float vsum(vf a) {
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_movehdup_ps(t));
    return _mm_cvtss_f32(t);
}
static inline vf group_state(float z, const int bits) {
    (void)bits;
    return vset1(z);
}
static inline __m256 u8f(const uint8_t *q) { /* 8 bytes -> 8 floats, unsigned */
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q)));
}
static inline __m256 i8f(const uint8_t *q) { /* 8 bytes -> 8 floats, signed */
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q)));
}
/* 4-bit: bytes 0..7 hold u[0..7] (low nibbles) and u[16..23] (high); bytes 8..15 u[8..15] and u[24..31] */
static inline void decode(const uint8_t *q, vf z, vf *w, const int bits, const int sym) {
    if (bits == 4) {
        const __m256i m = _mm256_set1_epi32(0x0F);
        const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q));
        const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8)));
        w[0] = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(a, m)), z);
        w[1] = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, m)), z);
        w[2] = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)), z);
        w[3] = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), z);
    } else if (sym) {
        w[0] = i8f(q);
        w[1] = i8f(q + 8);
    } else {
        w[0] = _mm256_sub_ps(u8f(q), z);
        w[1] = _mm256_sub_ps(u8f(q + 8), z);
    }
}
#endif

struct problem {
    const uint8_t *codes;
    const float *scale, *zero;
    float zc;
    int N, K, G;
};

/* Weight rows [n0, n1) against rows x[0..mr) (row stride K) into y[r * N + n]. mr, bits, sym: constants. */
static inline __attribute__((always_inline)) void rows_dot(const struct problem *p, const float *x, float *y,
                                                           int n0, int n1, const int mr, const int bits,
                                                           const int sym) {
    const int K = p->K, G = p->G, ng = K / G;
    const int blk = bits == 4 ? 32 : 16; /* weights per 16-byte block */
    const int nv = blk / VL;             /* vectors per block */
    const vf fixed = group_state(p->zc, bits);
    for (int n = n0; n < n1; n++) {
        const uint8_t *q = p->codes + (long)n * K * bits / 8;
        const float *s = p->scale + (long)n * ng, *z = p->zero ? p->zero + (long)n * ng : 0;
        vf acc[MR], d[MR], w[32 / VL];
#pragma GCC unroll 8
        for (int r = 0; r < mr; r++) acc[r] = vzero();
        for (int g = 0; g < ng; g++) {
            const vf t = z ? group_state(z[g], bits) : fixed;
            const uint8_t *qg = q + (long)g * G * bits / 8;
            const float *xg = x + (long)g * G;
#pragma GCC unroll 8
            for (int r = 0; r < mr; r++) d[r] = vzero();
            for (int b = 0; b < G; b += blk) {
                decode(qg + b * bits / 8, t, w, bits, sym);
#pragma GCC unroll 8
                for (int r = 0; r < mr; r++) {
#pragma GCC unroll 4
                    for (int j = 0; j < nv; j++) d[r] = vfma(w[j], vload(xg + (long)r * K + b + j * VL), d[r]);
                }
            }
            const vf vs = vset1(s[g]);
#pragma GCC unroll 8
            for (int r = 0; r < mr; r++) acc[r] = vfma(d[r], vs, acc[r]);
        }
#pragma GCC unroll 8
        for (int r = 0; r < mr; r++) y[(long)r * p->N + n] = vsum(acc[r]);
    }
}

typedef void (*rows_fn)(const struct problem *, const float *, float *, int, int);
#define ROWS(NAME, BITS, SYM, MR_)                                                                        \
    static void NAME##_##MR_(const struct problem *p, const float *x, float *y, int n0, int n1) {         \
        rows_dot(p, x, y, n0, n1, MR_, BITS, SYM);                                                        \
    }
#if MR == 8
#define ROWS_ALL(NAME, BITS, SYM)                                                                         \
    ROWS(NAME, BITS, SYM, 1) ROWS(NAME, BITS, SYM, 2) ROWS(NAME, BITS, SYM, 3) ROWS(NAME, BITS, SYM, 4)   \
    ROWS(NAME, BITS, SYM, 5) ROWS(NAME, BITS, SYM, 6) ROWS(NAME, BITS, SYM, 7) ROWS(NAME, BITS, SYM, 8)   \
    static const rows_fn NAME[MR + 1] = {0, NAME##_1, NAME##_2, NAME##_3, NAME##_4,                       \
                                         NAME##_5, NAME##_6, NAME##_7, NAME##_8};
#else
#define ROWS_ALL(NAME, BITS, SYM)                                                                         \
    ROWS(NAME, BITS, SYM, 1) ROWS(NAME, BITS, SYM, 2) ROWS(NAME, BITS, SYM, 3) ROWS(NAME, BITS, SYM, 4)   \
    static const rows_fn NAME[MR + 1] = {0, NAME##_1, NAME##_2, NAME##_3, NAME##_4};
#endif
ROWS_ALL(rows4, 4, 0)
ROWS_ALL(rows8, 8, 0)
ROWS_ALL(rows8s, 8, 1)

static int last_threads = 0; /* threads the last call ran on (tests read it) */

/* Each of nt threads takes one contiguous range of weight rows and runs every block of up to MR rows of x
   over it. */
static void run(const struct problem *p, const float *x, float *y, int M, const rows_fn *fns, int threads) {
    const int nt = ((long)M * p->N * p->K >= PAR_MIN_WORK && threads > 1) ? threads : 1;
    last_threads = 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const int n0 = (int)((long)p->N * t / T), n1 = (int)((long)p->N * (t + 1) / T);
        if (t == 0) last_threads = T;
        for (int m0 = 0; m0 < M; m0 += MR) {
            const int mr = M - m0 < MR ? M - m0 : MR;
            fns[mr](p, x + (long)m0 * p->K, y + (long)m0 * p->N, n0, n1);
        }
    }
}

/* codes: (N, K * bits / 8) bytes in the block layout above; scale, zero: (N, K / G) float32 (zero may be NULL).
   x: (M, K) float32, y: (M, N) float32, both contiguous. */
void slimlm_q4_matmul(const uint8_t *codes, const float *scale, const float *zero, float zc, const float *x,
                      float *y, int M, int N, int K, int G, int threads) {
    const struct problem p = {codes, scale, zero, zc, N, K, G};
    run(&p, x, y, M, rows4, threads);
}

/* 8-bit: zero NULL means symmetric codes stored signed (z = 0); zc is not read. */
void slimlm_q8_matmul(const uint8_t *codes, const float *scale, const float *zero, float zc, const float *x,
                      float *y, int M, int N, int K, int G, int threads) {
    const struct problem p = {codes, scale, zero, zc, N, K, G};
    run(&p, x, y, M, zero ? rows8 : rows8s, threads);
}

int slimlm_native_isa(void) { return ISA; }
int slimlm_native_last_threads(void) { return last_threads; }
int slimlm_native_omp_max_threads(void) { return omp_get_max_threads(); }
