/* slimlm native CPU kernel: attention of one new token over a KV cache (decode); float32 queries and output,
 * keys and values stored as float32, float16 or bfloat16 (kv_type 0, 1, 2), widened to float32 as they are read.
 *
 * q: (B, Hkv * g, D) contiguous (the g query heads of KV head h are rows h*g .. h*g+g-1);
 * k, v: rows of D contiguous elements, row s of head h of batch b at  base + b*sb + h*sh + s*D (in elements);
 * out: (B, Hkv * g, D) contiguous.  For every query row:  out = softmax(scale * q k^T) v  over S keys.
 *
 * Each KV head's keys are read once for its g query heads (grouped-query attention), and the keys are
 * split into `chunks` ranges: each (b, h, chunk) unit keeps its own running max m, sum l and weighted
 * sum of values, and the units of one head are merged at the end (as flash-decoding does), so two
 * threads share a head's keys instead of idling on 3 heads. Scores live in a per-unit buffer: two passes
 * over the range (scores and max, then exp and values); K and V are each read once.
 *
 * With AVX-512, D = 64 or 128 and g <= 4 run a unit whose query rows and value sums stay in vector registers
 * (GCC vector extensions); other shapes and AVX2 run plain loops the compiler vectorizes.
 */
/* Reassociation (fast-math) lets the dot products and the exp loop vectorize; the result differs from
   torch's attention by float32 rounding only (~2e-7 relative here), as any other summation order would. */
#pragma GCC optimize("fast-math")
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define GMAX 16       /* query heads per KV head handled (more: the caller falls back) */
#define CHUNK_MIN 64  /* fewest keys per chunk worth a thread */

enum { KV_F32 = 0, KV_F16 = 1, KV_BF16 = 2 };

/* Row `row` of D elements of type kt as float32: the row itself, or widened into tmp. */
static inline const float *widen(const void *base, long row, int D, int kt, float *tmp) {
    if (kt == KV_F32) return (const float *)base + row * D;
    if (kt == KV_F16) {
        const _Float16 *h = (const _Float16 *)base + row * D;
        for (int i = 0; i < D; i++) tmp[i] = (float)h[i];
    } else {
        const uint16_t *h = (const uint16_t *)base + row * D;
        for (int i = 0; i < D; i++) {
            const uint32_t u = (uint32_t)h[i] << 16;
            memcpy(tmp + i, &u, sizeof u);
        }
    }
    return tmp;
}

static void unit(const float *q, const void *k, const void *v, int kt, int g, int s0, int s1, int D, float scale,
                 float *scores, float *m_out, float *l_out, float *acc) {
    const int n = s1 - s0;
    float m[GMAX], tmp[D];
    for (int j = 0; j < g; j++) m[j] = -INFINITY;
    for (int s = 0; s < n; s++) {
        const float *kr = widen(k, s0 + s, D, kt, tmp);
        for (int j = 0; j < g; j++) {
            const float *qr = q + (long)j * D;
            float d = 0.f;
#pragma omp simd reduction(+ : d)
            for (int i = 0; i < D; i++) d += qr[i] * kr[i];
            d *= scale;
            scores[(long)j * n + s] = d;
            if (d > m[j]) m[j] = d;
        }
    }
    for (int j = 0; j < g; j++) {
        float l = 0.f, *sj = scores + (long)j * n;
        for (int s = 0; s < n; s++) {
            sj[s] = expf(sj[s] - m[j]);
            l += sj[s];
        }
        m_out[j] = m[j];
        l_out[j] = l;
        for (int i = 0; i < D; i++) acc[(long)j * D + i] = 0.f;
    }
    for (int s = 0; s < n; s++) {
        const float *vr = widen(v, s0 + s, D, kt, tmp);
        for (int j = 0; j < g; j++) {
            const float p = scores[(long)j * n + s];
            float *a = acc + (long)j * D;
#pragma omp simd
            for (int i = 0; i < D; i++) a[i] += p * vr[i];
        }
    }
}

/* a register unit: (q, k, v, g, s0, s1, scale, scores, m, l, acc) */
typedef void (*unit_fn)(const float *, const void *, const void *, int, int, int, float, float *, float *, float *,
                        float *);

#if defined(__AVX512F__)
typedef float v16 __attribute__((vector_size(64), aligned(4)));
static inline float hsum(v16 a) {
    float s = 0.f;
    for (int i = 0; i < 16; i++) s += a[i];
    return s;
}
/* 16 elements from p as float32 */
#define LD_F32(p) (*(const v16 *)(p))
#define LD_F16(p) ((v16)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p))))
#define LD_BF16(p) \
    ((v16)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16)))
/* The sums of 16 vectors, one per lane (lane t: the sum of d[t]): a transpose-and-add in four halvings, 46
   shuffles and adds where 16 separate horizontal sums take ~128. */
static inline v16 sum16(const v16 *d) {
    __m512 c[8], e[4], f[2];
    for (int i = 0; i < 8; i++) { /* lanes 0-7: halves of d[2i], 8-15: of d[2i+1] */
        const __m512 a = (__m512)d[2 * i], b = (__m512)d[2 * i + 1];
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    }
    for (int i = 0; i < 4; i++) /* 128-bit block k: 4 partial sums of d[4i + k] */
        e[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++) /* block k: 2 partials of d[8i + k], 2 of d[8i + 4 + k] */
        f[i] = _mm512_add_ps(_mm512_shuffle_ps(e[2 * i], e[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(e[2 * i], e[2 * i + 1], 0xEE));
    /* lane 4k + m: the sum of d[4m + k]; put it in lane 4m + k */
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(f[0], f[1], 0x88), _mm512_shuffle_ps(f[0], f[1], 0xDD));
    const __m512i idx = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    return (v16)_mm512_permutexvar_ps(idx, r);
}
static inline float hmax(v16 a) {
    float x = a[0];
    for (int i = 1; i < 16; i++) x = a[i] > x ? a[i] : x;
    return x;
}
/* D = 16 * NV, g <= 4, elements of type T read through LD: the g query rows (pre-scaled) and their value sums
   stay in registers; scores of 16 keys at a time are summed together (sum16), the rest one by one */
#define UNIT_V(NAME, NV, T, LD)                                                                                   \
static void NAME(const float *q, const T *k, const T *v, int g, int s0, int s1, float scale, float *scores,       \
                 float *m_out, float *l_out, float *acc) {                                                        \
    const int n = s1 - s0, D = 16 * NV, n16 = n & ~15;                                                            \
    v16 qv[4][NV], a[4][NV];                                                                                       \
    float m[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};                                                     \
    for (int j = 0; j < 4; j++)                                                                                   \
        for (int c = 0; c < NV; c++) {                                                                            \
            qv[j][c] = j < g ? *(const v16 *)(q + j * D + 16 * c) * scale : (v16){0};                             \
            a[j][c] = (v16){0};                                                                                   \
        }                                                                                                         \
    for (int s = 0; s < n16; s += 16) {                                                                           \
        const T *kb = k + (long)(s0 + s) * D;                                                                     \
        for (int j = 0; j < g; j++) {                                                                             \
            v16 d[16];                                                                                            \
            for (int t = 0; t < 16; t++) {                                                                        \
                d[t] = qv[j][0] * LD(kb + t * D);                                                                 \
                for (int c = 1; c < NV; c++) d[t] += qv[j][c] * LD(kb + t * D + 16 * c);                          \
            }                                                                                                     \
            const v16 x = sum16(d);                                                                               \
            *(v16 *)(scores + j * n + s) = x;                                                                     \
            const float mx = hmax(x);                                                                             \
            if (mx > m[j]) m[j] = mx;                                                                             \
        }                                                                                                         \
    }                                                                                                             \
    for (int s = n16; s < n; s++) {                                                                               \
        const T *kr = k + (long)(s0 + s) * D;                                                                     \
        v16 kv[NV];                                                                                               \
        for (int c = 0; c < NV; c++) kv[c] = LD(kr + 16 * c);                                                     \
        for (int j = 0; j < 4; j++) {                                                                             \
            if (j >= g) break;                                                                                    \
            v16 d = qv[j][0] * kv[0];                                                                             \
            for (int c = 1; c < NV; c++) d += qv[j][c] * kv[c];                                                   \
            const float x = hsum(d);                                                                              \
            scores[j * n + s] = x;                                                                                \
            if (x > m[j]) m[j] = x;                                                                               \
        }                                                                                                         \
    }                                                                                                             \
    for (int j = 0; j < g; j++) {                                                                                 \
        float l = 0.f, *sj = scores + j * n;                                                                      \
        const float mj = m[j];                                                                                    \
        _Pragma("omp simd reduction(+ : l)")                                                                      \
        for (int s = 0; s < n; s++) {                                                                             \
            sj[s] = expf(sj[s] - mj);                                                                             \
            l += sj[s];                                                                                           \
        }                                                                                                         \
        m_out[j] = mj;                                                                                            \
        l_out[j] = l;                                                                                             \
    }                                                                                                             \
    for (int s = 0; s < n; s++) {                                                                                 \
        const T *vr = v + (long)(s0 + s) * D;                                                                     \
        v16 vv[NV];                                                                                               \
        for (int c = 0; c < NV; c++) vv[c] = LD(vr + 16 * c);                                                     \
        for (int j = 0; j < 4; j++) {                                                                             \
            if (j >= g) break;                                                                                    \
            const float p = scores[j * n + s];                                                                    \
            for (int c = 0; c < NV; c++) a[j][c] += p * vv[c];                                                    \
        }                                                                                                         \
    }                                                                                                             \
    for (int j = 0; j < g; j++)                                                                                   \
        for (int c = 0; c < NV; c++) *(v16 *)(acc + j * D + 16 * c) = a[j][c];                                    \
}
UNIT_V(unit_v4_f32, 4, float, LD_F32)     /* D = 64 */
UNIT_V(unit_v8_f32, 8, float, LD_F32)     /* D = 128 */
UNIT_V(unit_v4_f16, 4, uint16_t, LD_F16)
UNIT_V(unit_v8_f16, 8, uint16_t, LD_F16)
UNIT_V(unit_v4_bf16, 4, uint16_t, LD_BF16)
UNIT_V(unit_v8_bf16, 8, uint16_t, LD_BF16)

/* The register unit for (D, g, kt), or 0 where the plain loops run. */
static unit_fn register_unit(int D, int g, int kt) {
    if (g > 4 || (D != 64 && D != 128)) return 0;
    static const unit_fn table[3][2] = {{(unit_fn)unit_v4_f32, (unit_fn)unit_v8_f32},
                                        {(unit_fn)unit_v4_f16, (unit_fn)unit_v8_f16},
                                        {(unit_fn)unit_v4_bf16, (unit_fn)unit_v8_bf16}};
    return table[kt][D == 128];
}
#else /* AVX2: 64-byte vectors split badly there; the plain loops vectorize better */
static unit_fn register_unit(int D, int g, int kt) { return 0; }
#endif

/* Returns 0, or -1 when g > GMAX, kt is unknown or a buffer cannot be had (the caller then runs its own
   attention). Strides are in elements. */
int slimlm_attn_decode(const float *q, const void *k, const void *v, int kt, float *out, int B, int Hkv, int g,
                       int S, int D, long k_sb, long k_sh, long v_sb, long v_sh, float scale, int threads) {
    if (g > GMAX || S < 1 || kt < KV_F32 || kt > KV_BF16) return -1;
    int chunks = 1;
    if (threads > 1 && S >= 2 * CHUNK_MIN) {
        chunks = threads;
        while (chunks > 1 && S / chunks < CHUNK_MIN) chunks--;
    }
    const int units = B * Hkv * chunks, per = (S + chunks - 1) / chunks;
    const long esz = kt == KV_F32 ? 4 : 2;
    float *m = malloc(sizeof(float) * units * g * 2), *acc = malloc(sizeof(float) * units * g * D);
    float *scores = malloc(sizeof(float) * units * g * per);
    if (!m || !acc || !scores) {
        free(m), free(acc), free(scores);
        return -1;
    }
    float *l = m + units * g;
    const unit_fn fast = register_unit(D, g, kt);
    const int nt = (threads > 1 && units > 1) ? threads : 1;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int u = 0; u < units; u++) {
        const int c = u % chunks, h = (u / chunks) % Hkv, b = u / (chunks * Hkv);
        const int s0 = c * per, s1 = s0 + per < S ? s0 + per : S;
        if (s0 >= s1) {
            for (int j = 0; j < g; j++) m[u * g + j] = -INFINITY, l[u * g + j] = 0.f;
            for (int i = 0; i < g * D; i++) acc[(long)u * g * D + i] = 0.f;
            continue;
        }
        const float *qu = q + ((long)b * Hkv * g + (long)h * g) * D;
        const char *ku = (const char *)k + (b * k_sb + h * k_sh) * esz;
        const char *vu = (const char *)v + (b * v_sb + h * v_sh) * esz;
        float *su = scores + (long)u * g * per, *au = acc + (long)u * g * D;
        if (fast) {
            fast(qu, ku, vu, g, s0, s1, scale, su, m + u * g, l + u * g, au);
            continue;
        }
        unit(qu, ku, vu, kt, g, s0, s1, D, scale, su, m + u * g, l + u * g, au);
    }
    for (int bh = 0; bh < B * Hkv; bh++) { /* merge the chunks of each head */
        for (int j = 0; j < g; j++) {
            float mx = -INFINITY, sum = 0.f;
            for (int c = 0; c < chunks; c++) mx = fmaxf(mx, m[(bh * chunks + c) * g + j]);
            float *o = out + ((long)bh * g + j) * D;
            for (int i = 0; i < D; i++) o[i] = 0.f;
            for (int c = 0; c < chunks; c++) {
                const int u = bh * chunks + c;
                if (l[u * g + j] == 0.f) continue;
                const float w = expf(m[u * g + j] - mx);
                sum += w * l[u * g + j];
                const float *a = acc + ((long)u * g + j) * D;
                for (int i = 0; i < D; i++) o[i] += w * a[i];
            }
            for (int i = 0; i < D; i++) o[i] /= sum;
        }
    }
    free(m), free(acc), free(scores);
    return 0;
}
