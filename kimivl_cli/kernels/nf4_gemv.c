/* NF4 matrix-vector product on CPU, straight from the packed codes (no dequantised matrix).
 *
 * Layout as in kimivl_cli/quant/nf4.py: packed [N, K/2] uint8 (weight 2j in the high nibble,
 * 2j+1 in the low one), absmax [N, K/64] fp32. The caller splits x into its even and odd
 * elements, so each byte's two codes meet contiguous activations. AVX2: 16 weights per step,
 * the 16 levels looked up with two in-register permutes; else a portable scalar loop. Reads
 * 0.56 byte per weight against bf16's 2. Built and loaded by kernels/native.py.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
static const float L[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
  -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f,
  0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f,
  0.5626170039176941f, 0.7229568362236023f, 1.0f};

/* y[n] = sum_k L[code(n,k)] * absmax[n, k/64] * x[k] for rows n0..n1; xe/xo = x[0::2], x[1::2] (K/2 each). */
void nf4_gemv_rows(const float* xe, const float* xo, const uint8_t* packed, const float* absmax, float* y,
                   int64_t n0, int64_t n1, int64_t k) {
  const int64_t half = k / 2, blocks = k / 64;
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* p = packed + n * half;
    const float* am = absmax + n * blocks;
#ifdef __AVX2__
    const __m256 lo_tab = _mm256_loadu_ps(L), hi_tab = _mm256_loadu_ps(L + 8);
    const __m256i fifteen = _mm256_set1_epi32(15);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
      __m256 s = _mm256_setzero_ps();
      for (int j = 0; j < 32; j += 8) {  /* 8 bytes = 16 weights */
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
