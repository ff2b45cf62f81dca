/* slimlm native CPU kernel: attention of one new token over a KV cache (decode), float32.
 *
 * q: (B, Hkv * g, D) contiguous (the g query heads of KV head h are rows h*g .. h*g+g-1);
 * k, v: rows of D contiguous floats, row s of head h of batch b at  base + b*sb + h*sh + s*D;
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
#include <stdlib.h>

#define GMAX 16       /* query heads per KV head handled (more: the caller falls back) */
#define CHUNK_MIN 64  /* fewest keys per chunk worth a thread */

static void unit(const float *q, const float *k, const float *v, int g, int s0, int s1, int D, float scale,
                 float *scores, float *m_out, float *l_out, float *acc) {
    const int n = s1 - s0;
    float m[GMAX];
    for (int j = 0; j < g; j++) m[j] = -INFINITY;
    for (int s = 0; s < n; s++) {
        const float *kr = k + (long)(s0 + s) * D;
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
        const float *vr = v + (long)(s0 + s) * D;
        for (int j = 0; j < g; j++) {
            const float p = scores[(long)j * n + s];
            float *a = acc + (long)j * D;
#pragma omp simd
            for (int i = 0; i < D; i++) a[i] += p * vr[i];
        }
    }
}

#if defined(__AVX512F__)
typedef float v16 __attribute__((vector_size(64), aligned(4)));
static inline float hsum(v16 a) {
    float s = 0.f;
    for (int i = 0; i < 16; i++) s += a[i];
    return s;
}
/* D = 16 * NV, g <= 4: the g query rows (pre-scaled) and their value sums stay in registers */
#define UNIT_V(NV)                                                                                                \
static void unit_v##NV(const float *q, const float *k, const float *v, int g, int s0, int s1, float scale,         \
                       float *scores, float *m_out, float *l_out, float *acc) {                                    \
    const int n = s1 - s0, D = 16 * NV;                                                                           \
    v16 qv[4][NV], a[4][NV];                                                                                       \
    float m[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};                                                     \
    for (int j = 0; j < 4; j++)                                                                                   \
        for (int c = 0; c < NV; c++) {                                                                            \
            qv[j][c] = j < g ? *(const v16 *)(q + j * D + 16 * c) * scale : (v16){0};                             \
            a[j][c] = (v16){0};                                                                                   \
        }                                                                                                         \
    for (int s = 0; s < n; s++) {                                                                                 \
        const float *kr = k + (long)(s0 + s) * D;                                                                 \
        v16 kv[NV];                                                                                               \
        for (int c = 0; c < NV; c++) kv[c] = *(const v16 *)(kr + 16 * c);                                          \
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
        const float *vr = v + (long)(s0 + s) * D;                                                                 \
        v16 vv[NV];                                                                                               \
        for (int c = 0; c < NV; c++) vv[c] = *(const v16 *)(vr + 16 * c);                                          \
        for (int j = 0; j < 4; j++) {                                                                             \
            if (j >= g) break;                                                                                    \
            const float p = scores[j * n + s];                                                                    \
            for (int c = 0; c < NV; c++) a[j][c] += p * vv[c];                                                    \
        }                                                                                                         \
    }                                                                                                             \
    for (int j = 0; j < g; j++)                                                                                   \
        for (int c = 0; c < NV; c++) *(v16 *)(acc + j * D + 16 * c) = a[j][c];                                    \
}
UNIT_V(4) /* D = 64 */
UNIT_V(8) /* D = 128 */
#define REGISTER_UNITS 1
#else /* AVX2: 64-byte vectors split badly there; the plain loops vectorize better */
#define REGISTER_UNITS 0
#endif

/* Returns 0, or -1 when g > GMAX or a buffer cannot be had (the caller then runs its own attention). */
int slimlm_attn_decode(const float *q, const float *k, const float *v, float *out, int B, int Hkv, int g, int S,
                       int D, long k_sb, long k_sh, long v_sb, long v_sh, float scale, int threads) {
    if (g > GMAX || S < 1) return -1;
    int chunks = 1;
    if (threads > 1 && S >= 2 * CHUNK_MIN) {
        chunks = threads;
        while (chunks > 1 && S / chunks < CHUNK_MIN) chunks--;
    }
    const int units = B * Hkv * chunks, per = (S + chunks - 1) / chunks;
    float *m = malloc(sizeof(float) * units * g * 2), *acc = malloc(sizeof(float) * units * g * D);
    float *scores = malloc(sizeof(float) * units * g * per);
    if (!m || !acc || !scores) {
        free(m), free(acc), free(scores);
        return -1;
    }
    float *l = m + units * g;
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
        const float *qu = q + ((long)b * Hkv * g + (long)h * g) * D, *ku = k + b * k_sb + h * k_sh;
        const float *vu = v + b * v_sb + h * v_sh;
        float *su = scores + (long)u * g * per, *au = acc + (long)u * g * D;
#if REGISTER_UNITS
        if (D == 64 && g <= 4) {
            unit_v4(qu, ku, vu, g, s0, s1, scale, su, m + u * g, l + u * g, au);
            continue;
        }
        if (D == 128 && g <= 4) {
            unit_v8(qu, ku, vu, g, s0, s1, scale, su, m + u * g, l + u * g, au);
            continue;
        }
#endif
        unit(qu, ku, vu, g, s0, s1, D, scale, su, m + u * g, l + u * g, au);
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
