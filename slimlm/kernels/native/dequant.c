/* slimlm native CPU kernels: grouped integer codes -> the float32 weight (N, K), for prefill GEMMs.
 *
 *     w[n, k] = (u[n, k] - z[n, g]) * s[n, g],  g = k / G
 *
 * computed as exactly that: u - z is a small integer (exact in float32) and the product rounds once, so the
 * result equals torch's `(u - z) * s` in float32 bit for bit (no fused multiply-add can apply).
 * Quantized prefill dequantizes each weight once per call and runs a float32 GEMM; torch's elementwise
 * form makes four full-size float32 passes (unpack, widen, subtract, scale), this one writes the output once.
 *
 * Layouts of `codes` (rows of codes contiguous, K * bits / 8 bytes each):
 *   LAYOUT_BLOCK4: gemv.c's blocks of 32 codes in 16 bytes, byte j = u[j] | u[j + 16] << 4
 *   LAYOUT_PAIRS4: the portable form, byte j = u[2j] | u[2j + 1] << 4
 *   LAYOUT_U8:     one unsigned byte per code
 *   LAYOUT_S8:     one signed byte per code (symmetric 8-bit, stored u - 128), z = 0
 * Scales and zeros are float32 (N, K / G); zero NULL means z = zc for every group.
 * Threads: OpenMP over rows, `threads` of them (torch's count, torch's libgomp: see gemv.c).
 */
#include <omp.h>
#include <stdint.h>

enum { LAYOUT_BLOCK4 = 0, LAYOUT_PAIRS4 = 1, LAYOUT_U8 = 2, LAYOUT_S8 = 3 };

#define DQ_PAR_MIN 65536L /* below this many weights one thread does it */

/* One group of G codes starting at byte q (G a multiple of 32 for 4-bit layouts) into out[0..G). */
static inline __attribute__((always_inline)) void group(const uint8_t *q, float z, float s, float *out, int G,
                                                        int layout) {
    if (layout == LAYOUT_BLOCK4) {
        for (int b = 0; b < G; b += 32, q += 16) {
            for (int j = 0; j < 16; j++) out[b + j] = ((float)(q[j] & 15) - z) * s;
            for (int j = 0; j < 16; j++) out[b + 16 + j] = ((float)(q[j] >> 4) - z) * s;
        }
    } else if (layout == LAYOUT_PAIRS4) {
        for (int j = 0; j < G / 2; j++) {
            out[2 * j] = ((float)(q[j] & 15) - z) * s;
            out[2 * j + 1] = ((float)(q[j] >> 4) - z) * s;
        }
    } else if (layout == LAYOUT_U8) {
        for (int j = 0; j < G; j++) out[j] = ((float)q[j] - z) * s;
    } else {
        const int8_t *p = (const int8_t *)q;
        for (int j = 0; j < G; j++) out[j] = ((float)p[j] - z) * s;
    }
}

/* Rows [0, N) of one layout (a constant in each caller below, so each loop is compiled for its layout). */
static inline __attribute__((always_inline)) void dequant_rows(const uint8_t *codes, const float *scale,
                                                               const float *zero, float zc, float *out, int N,
                                                               int K, int G, const int layout, int nt) {
    const int ng = K / G;
    const long row_bytes = (long)K * (layout <= LAYOUT_PAIRS4 ? 4 : 8) / 8, group_bytes = row_bytes / ng;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int n = 0; n < N; n++) {
        const uint8_t *q = codes + n * row_bytes;
        const float *s = scale + (long)n * ng, *z = zero ? zero + (long)n * ng : 0;
        float *o = out + (long)n * K;
        for (int g = 0; g < ng; g++) group(q + g * group_bytes, z ? z[g] : zc, s[g], o + (long)g * G, G, layout);
    }
}

/* codes in `layout` (above); scale, zero: (N, K / G) float32 (zero may be NULL: z = zc); out: (N, K) float32. */
void slimlm_dequant(const uint8_t *codes, const float *scale, const float *zero, float zc, float *out, int N,
                    int K, int G, int layout, int threads) {
    const int nt = ((long)N * K >= DQ_PAR_MIN && threads > 1) ? threads : 1;
    switch (layout) {
    case LAYOUT_BLOCK4: dequant_rows(codes, scale, zero, zc, out, N, K, G, LAYOUT_BLOCK4, nt); break;
    case LAYOUT_PAIRS4: dequant_rows(codes, scale, zero, zc, out, N, K, G, LAYOUT_PAIRS4, nt); break;
    case LAYOUT_U8: dequant_rows(codes, scale, zero, zc, out, N, K, G, LAYOUT_U8, nt); break;
    default: dequant_rows(codes, scale, zero, zc, out, N, K, G, LAYOUT_S8, nt); break;
    }
}
