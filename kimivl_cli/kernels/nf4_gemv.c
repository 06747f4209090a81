/* NF4 matrix-vector products on CPU, straight from the packed codes (no dequantised matrix).
 *
 * Layout as in kimivl_cli/quant/nf4.py: packed [N, K/2] uint8 (weight 2j in the high nibble,
 * 2j+1 in the low one), absmax [N, K/64] fp32. Reads 0.56 byte per weight against bf16's 2.
 * Built and loaded by kernels/native.py. Threads: OpenMP when built with -fopenmp (the process's
 * libgomp.so.1, torch's own, so its warm thread team and set_num_threads apply), else one thread.
 *
 * Entry points at the end of the file:
 * - `nf4_gemv`, exact fp32 for a few rows: the caller splits x into its even and odd elements so
 *   each byte's two codes meet contiguous activations. AVX2: 16 weights per step, the 16 levels
 *   looked up with two in-register permutes. Compute-bound (~0.6 ms per 1408x2048 matrix per core).
 * - `nf4_q8_gemv` (one row) and `nf4_moe_decode` (one token's routed experts in one call), for
 *   batch-1 decode: the activation is quantized once to int8 per 64-block (scale = block absmax
 *   / 127), the NF4 levels are int8 (round(127 L)), and a block's 64 products are summed exactly
 *   in integers, then scaled by absmax * x_scale / 127. AVX2: 64 weights per ~18 instructions
 *   (one byte shuffle looks up 32 levels; maddubs/madd multiply-accumulate), ~5x fewer than the
 *   fp32 loop, so memory-bound (~0.13 ms per 1408x2048 matrix per core).
 *   Error (the int8 rounding of levels and activations; bounded in tests/kernels/test_native.py):
 *   0.84% of the output norm for one product, ~1.7% for the MoE step (two roundings, three
 *   products), against ~10% and ~15% for NF4 itself.
 *
 * Without AVX2 both kernels fall back to portable scalar loops; the int8 one computes the same
 * integer block sums, so both builds agree to float rounding.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define BLOCK 64 /* NF4 block size: also the activation's int8 block */

/* Codes are read once per token, straight from DRAM: each row stream asks for the line this far
 * ahead (a few rows on) so the loads find it in cache. Measured on 2 AVX2 cores: a 240 MB int8
 * GEMV ~12 -> ~20 GB/s, full-size NF4 decode +5% (A/B in one process). Past the end of a matrix
 * the hint is harmless: prefetches never fault. */
#define PREFETCH_BYTES 4096

static const float L[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
  -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f,
  0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f,
  0.5626170039176941f, 0.7229568362236023f, 1.0f};

/* round(127 * L): |level| <= 127 keeps maddubs' pair sums (<= 2 * 127 * 127) inside int16. */
static const int8_t LQ[16] = {-127, -88, -67, -50, -36, -23, -12, 0, 10, 20, 31, 43, 56, 71, 92, 127};

/* ---------------------------------------------------------------- exact fp32 */

/* y[n] = sum_k L[code(n,k)] * absmax[n, k/64] * x[k] for rows n0..n1; xe/xo = x[0::2], x[1::2] (K/2 each). */
static void f32_rows(const float* xe, const float* xo, const uint8_t* packed, const float* absmax, float* y,
                     int64_t n0, int64_t n1, int64_t k) {
  const int64_t half = k / 2, blocks = k / BLOCK;
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* p = packed + n * half;
    const float* am = absmax + n * blocks;
#ifdef __AVX2__
    const __m256 lo_tab = _mm256_loadu_ps(L), hi_tab = _mm256_loadu_ps(L + 8);
    const __m256i fifteen = _mm256_set1_epi32(15);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
      __m256 s = _mm256_setzero_ps();
      for (int j = 0; j < 32; j += 8) { /* 8 bytes = 16 weights */
        const int64_t at = b * 32 + j;
        __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + at)));
        __m256i ch = _mm256_srli_epi32(bytes, 4), cl = _mm256_and_si256(bytes, fifteen);
        __m256 vh = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo_tab, ch), _mm256_permutevar8x32_ps(hi_tab, ch),
                                     _mm256_castsi256_ps(_mm256_slli_epi32(ch, 28)));
        __m256 vl = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo_tab, cl), _mm256_permutevar8x32_ps(hi_tab, cl),
                                     _mm256_castsi256_ps(_mm256_slli_epi32(cl, 28)));
        s = _mm256_fmadd_ps(vh, _mm256_loadu_ps(xe + at), s);
        s = _mm256_fmadd_ps(vl, _mm256_loadu_ps(xo + at), s);
      }
      acc = _mm256_fmadd_ps(s, _mm256_set1_ps(am[b]), acc);
    }
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_shuffle_ps(r, r, 1));
    y[n] = _mm_cvtss_f32(r);
#else
    float acc = 0.0f;
    for (int64_t b = 0; b < blocks; b++) {
      float s = 0.0f;
      for (int64_t j = b * 32; j < b * 32 + 32; j++) s += L[p[j] >> 4] * xe[j] + L[p[j] & 15] * xo[j];
      acc += s * am[b];
    }
    y[n] = acc;
#endif
  }
}

/* ---------------------------------------------------------------- int8 dot */

/* x [k] fp32 -> q [k] int8, s [k/64]: per 64-block, its 32 even elements then its 32 odd ones
 * (the order in which a block's 32 bytes hold their high and low codes), q = round(x / s). */
static void q8_quantize(const float* x, int8_t* q, float* s, int64_t k) {
  for (int64_t b = 0; b < k / BLOCK; b++) {
    const float* xb = x + b * BLOCK;
    float amax = 0.0f;
    for (int j = 0; j < BLOCK; j++) amax = fmaxf(amax, fabsf(xb[j]));
    const float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    s[b] = scale;
    for (int j = 0; j < BLOCK / 2; j++) {
      q[b * BLOCK + j] = (int8_t)lrintf(xb[2 * j] * inv);
      q[b * BLOCK + BLOCK / 2 + j] = (int8_t)lrintf(xb[2 * j + 1] * inv);
    }
  }
}

/* R <= 4 rows at once (R a small constant at each call, so the loops unroll into registers): out[i] = row i . x_i,
 * the sum over blocks of absmax[b] * s[b] / 127 * (integer dot of the block's int8 levels and q).
 * Rows share the code-to-level constants and interleave their independent chains. */
static inline void dot_rows(const int r, const uint8_t* const* p, const float* const* am, const int8_t* const* q,
                            const float* const* s, int64_t blocks, float* out) {
#ifdef __AVX2__
  const __m256i tab = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)LQ));
  const __m256i nibble = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  __m256 acc[4];
  for (int i = 0; i < r; i++) acc[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; b++) {
    for (int i = 0; i < r; i++) {
      _mm_prefetch((const char*)(p[i] + b * 32 + PREFETCH_BYTES), _MM_HINT_T0);
      const __m256i bytes = _mm256_loadu_si256((const __m256i*)(p[i] + b * 32)); /* 64 codes */
      const __m256i we = _mm256_shuffle_epi8(tab, _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble));
      const __m256i wo = _mm256_shuffle_epi8(tab, _mm256_and_si256(bytes, nibble));
      const __m256i xe = _mm256_loadu_si256((const __m256i*)(q[i] + b * BLOCK));
      const __m256i xo = _mm256_loadu_si256((const __m256i*)(q[i] + b * BLOCK + 32));
      /* maddubs takes unsigned x signed: |w| times x with w's sign moved onto x */
      const __m256i pe = _mm256_maddubs_epi16(_mm256_sign_epi8(we, we), _mm256_sign_epi8(xe, we));
      const __m256i po = _mm256_maddubs_epi16(_mm256_sign_epi8(wo, wo), _mm256_sign_epi8(xo, wo));
      const __m256i sum = _mm256_add_epi32(_mm256_madd_epi16(pe, ones), _mm256_madd_epi16(po, ones));
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(am[i][b] * s[i][b]), acc[i]);
    }
  }
  for (int i = 0; i < r; i++) {
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(acc[i]), _mm256_extractf128_ps(acc[i], 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_shuffle_ps(t, t, 1));
    out[i] = _mm_cvtss_f32(t) * (1.0f / 127);
  }
#else
  for (int i = 0; i < r; i++) {
    float acc = 0.0f;
    for (int64_t b = 0; b < blocks; b++) {
      int32_t sum = 0;
      for (int j = 0; j < 32; j++) {
        const uint8_t c = p[i][b * 32 + j];
        sum += LQ[c >> 4] * q[i][b * BLOCK + j] + LQ[c & 15] * q[i][b * BLOCK + 32 + j];
      }
      acc += (float)sum * (am[i][b] * s[i][b]);
    }
    out[i] = acc * (1.0f / 127);
  }
#endif
}

/* y[n] = (NF4 row n) . x for rows n0..n1, x given as q8_quantize's (q, s); four rows per pass. */
static void q8_rows(const int8_t* q, const float* s, const uint8_t* packed, const float* absmax, float* y,
                    int64_t n0, int64_t n1, int64_t k) {
  const int64_t row_bytes = k / 2, blocks = k / BLOCK;
  const int8_t* qs[4] = {q, q, q, q};
  const float* ss[4] = {s, s, s, s};
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const uint8_t* p[4] = {packed + n * row_bytes, packed + (n + 1) * row_bytes, packed + (n + 2) * row_bytes,
                           packed + (n + 3) * row_bytes};
    const float* am[4] = {absmax + n * blocks, absmax + (n + 1) * blocks, absmax + (n + 2) * blocks,
                          absmax + (n + 3) * blocks};
    dot_rows(4, p, am, qs, ss, blocks, y + n);
  }
  for (; n < n1; n++) {
    const uint8_t* p = packed + n * row_bytes;
    const float* am = absmax + n * blocks;
    dot_rows(1, &p, &am, qs, ss, blocks, y + n);
  }
}

/* MoE decode, first half, for one token and its `n_active` experts (ids in `experts`), over the
 * intermediate rows of 64-blocks b0..b1: h = silu(gate x) * up x, written quantized (hq [n_active, inter]
 * int8, hs [n_active, inter/64]) as the down projection's activation. Stacked weights: gate/up packed
 * [E, inter, hidden/2], absmax [E, inter, hidden/64]. Blocks are independent, so threads split b0..b1. */
static void moe_up_blocks(const int8_t* xq, const float* xs, const int64_t* experts, int64_t n_active,
                          const uint8_t* gate_p, const float* gate_a, const uint8_t* up_p, const float* up_a,
                          int64_t hidden, int64_t inter, int64_t b0, int64_t b1, int8_t* hq, float* hs) {
  const int64_t row_bytes = hidden / 2, row_blocks = hidden / BLOCK;
  const int8_t* qs[2] = {xq, xq};
  const float* ss[2] = {xs, xs};
  float h[BLOCK];
  for (int64_t a = 0; a < n_active; a++) {
    const int64_t e = experts[a];
    for (int64_t b = b0; b < b1; b++) {
      for (int j = 0; j < BLOCK; j++) {
        const int64_t row = e * inter + b * BLOCK + j;
        const uint8_t* p[2] = {gate_p + row * row_bytes, up_p + row * row_bytes};
        const float* am[2] = {gate_a + row * row_blocks, up_a + row * row_blocks};
        float gu[2];
        dot_rows(2, p, am, qs, ss, row_blocks, gu);
        h[j] = gu[0] / (1.0f + expf(-gu[0])) * gu[1];
      }
      q8_quantize(h, hq + a * inter + b * BLOCK, hs + a * (inter / BLOCK) + b, BLOCK);
    }
  }
}

/* MoE decode, second half, over output rows n0..n1: out[n] = sum_a route_w[a] * (down[experts[a]] row n) . h_a.
 * down packed [E, hidden, inter/2], absmax [E, hidden, inter/64]. */
static void moe_down_rows(const int8_t* hq, const float* hs, const int64_t* experts, const float* route_w,
                          int64_t n_active, const uint8_t* down_p, const float* down_a, int64_t hidden,
                          int64_t inter, int64_t n0, int64_t n1, float* out) {
  const int64_t row_bytes = inter / 2, row_blocks = inter / BLOCK;
  for (int64_t n = n0; n < n1; n++) {
    float acc = 0.0f;
    for (int64_t a = 0; a < n_active; a += 2) { /* experts in pairs */
      const int r = a + 1 < n_active ? 2 : 1;
      const uint8_t* p[2];
      const float *am[2], *ss[2];
      const int8_t* qs[2];
      float y[2];
      for (int i = 0; i < r; i++) {
        const int64_t row = experts[a + i] * hidden + n;
        p[i] = down_p + row * row_bytes, am[i] = down_a + row * row_blocks;
        qs[i] = hq + (a + i) * inter, ss[i] = hs + (a + i) * row_blocks;
      }
      if (r == 2) {
        dot_rows(2, p, am, qs, ss, row_blocks, y);
        acc += route_w[a] * y[0] + route_w[a + 1] * y[1];
      } else {
        dot_rows(1, p, am, qs, ss, row_blocks, y);
        acc += route_w[a] * y[0];
      }
    }
    out[n] = acc;
  }
}

/* ---------------------------------------------------------------- entry points (threaded) */

/* Below this many weights a product stays on the calling thread (waking the team costs more). */
#define PARALLEL_MIN_WEIGHTS (1 << 18)

/* This thread's share [lo, hi) of [0, n): contiguous, inner edges at multiples of `unit`. */
static void share(int64_t n, int64_t unit, int64_t* lo, int64_t* hi) {
#ifdef _OPENMP
  const int64_t t = omp_get_thread_num(), threads = omp_get_num_threads();
#else
  const int64_t t = 0, threads = 1;
#endif
  const int64_t per = ((n + unit - 1) / unit + threads - 1) / threads * unit;
  *lo = t * per < n ? t * per : n;
  *hi = (t + 1) * per < n ? (t + 1) * per : n;
}

/* Exact: y [t, n] = x W^T for t rows given as xe/xo [t, k/2] (even and odd elements). */
void nf4_gemv(const float* xe, const float* xo, const uint8_t* packed, const float* absmax, float* y, int64_t t,
              int64_t n, int64_t k) {
#pragma omp parallel if (n * k >= PARALLEL_MIN_WEIGHTS)
  {
    int64_t lo, hi;
    share(n, 1, &lo, &hi);
    for (int64_t r = 0; r < t; r++) f32_rows(xe + r * (k / 2), xo + r * (k / 2), packed, absmax, y + r * n, lo, hi, k);
  }
}

/* int8 activations: y [n] = x W^T for one row x [k]. Returns -1 if out of memory, else 0. */
int nf4_q8_gemv(const float* x, const uint8_t* packed, const float* absmax, float* y, int64_t n, int64_t k) {
  int8_t* q = malloc(k);
  float* s = malloc(k / BLOCK * sizeof(float));
  if (q == NULL || s == NULL) {
    free(q), free(s);
    return -1;
  }
  q8_quantize(x, q, s, k);
#pragma omp parallel if (n * k >= PARALLEL_MIN_WEIGHTS)
  {
    int64_t lo, hi;
    share(n, 4, &lo, &hi);
    q8_rows(q, s, packed, absmax, y, lo, hi, k);
  }
  free(q), free(s);
  return 0;
}

/* One token's routed experts, int8 activations: out [hidden] = sum_a route_w[a] * down_e(silu(gate_e x) * up_e x)
 * with e = experts[a], a < n_active. Threads split the intermediate blocks, meet at a barrier (h complete),
 * then split the output rows. Scratch: n_active * inter bytes. Returns -1 if out of memory, else 0. */
int nf4_moe_decode(const float* x, const int64_t* experts, const float* route_w, int64_t n_active,
                   const uint8_t* gate_p, const float* gate_a, const uint8_t* up_p, const float* up_a,
                   const uint8_t* down_p, const float* down_a, int64_t hidden, int64_t inter, float* out) {
  int8_t* xq = malloc(hidden);
  float* xs = malloc(hidden / BLOCK * sizeof(float));
  int8_t* hq = malloc(n_active * inter);
  float* hs = malloc(n_active * (inter / BLOCK) * sizeof(float));
  const int ok = xq && xs && hq && hs;
  if (ok) {
    q8_quantize(x, xq, xs, hidden);
#pragma omp parallel if (3 * n_active * hidden * inter >= PARALLEL_MIN_WEIGHTS)
    {
      int64_t lo, hi;
      share(inter / BLOCK, 1, &lo, &hi);
      moe_up_blocks(xq, xs, experts, n_active, gate_p, gate_a, up_p, up_a, hidden, inter, lo, hi, hq, hs);
#pragma omp barrier
      share(hidden, 4, &lo, &hi);
      moe_down_rows(hq, hs, experts, route_w, n_active, down_p, down_a, hidden, inter, lo, hi, out);
    }
  }
  free(xq), free(xs), free(hq), free(hs);
  return ok ? 0 : -1;
}
