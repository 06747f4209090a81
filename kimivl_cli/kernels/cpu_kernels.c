/* CPU kernels: NF4 and bf16 matrix products straight from the stored weights (no dequantised copy).
 *
 * One source, one build per instruction set (kernels/native.py compiles each variant the CPU can run
 * and picks one; `kimivl_variant()` says which path a build took):
 *   amx          avx512_bf16 + AMX tiles: grouped bf16 experts as TDPBF16PS on the weights in place
 *   avx512_bf16  avx512_vnni + vdpbf16ps: grouped bf16 experts sum bf16 pairs in one instruction
 *   avx512_vnni  AVX-512 BW/VL + VNNI: one vpdpbusd sums a 64-weight block (unsigned x times signed level)
 *   avx2         AVX2 + FMA: maddubs/madd pairs, the activation's sign moved onto the level
 *   neon_dotprod ARMv8.2 dot product: four sdot per block (Apple Silicon, Graviton 2+)
 *   scalar       portable loops computing the same integer sums
 *
 * NF4 layout as in kimivl_cli/quant/nf4.py: packed [N, K/2] uint8 (weight 2j in the high nibble, 2j+1
 * in the low one), absmax [N, K/64] fp32. Activations are quantized to int8 per 64-block (scale = block
 * absmax / 127, stored as its 32 even elements then its 32 odd ones: the order in which a block's 32
 * bytes hold their high and low codes), the 16 NF4 levels are int8 round(127 L), and a block's 64
 * products are summed exactly in integers, then scaled by absmax * x_scale / 127. Every variant computes
 * the same integer block sums, so all agree to float rounding (tests/kernels/test_native.py). Error of
 * the int8 rounding: < 1% of the output norm for one product, against ~10% for NF4 itself.
 *
 * bf16 weights (the bf16 model's decode) are widened to fp32 in registers: fp32 sums, fp32 out. Grouped
 * experts of many tokens (prefill) take bf16 activations where the build has bf16 dot products or AMX.
 *
 * Threads: OpenMP when built with -fopenmp (the process's libgomp.so.1, torch's own, so its warm thread
 * team and set_num_threads apply), else one thread. Each output element is computed whole by one thread,
 * so every thread count gives identical bits.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define KV_AVX512 1
#if defined(__AMX_BF16__)
#define VARIANT "amx"
#elif defined(__AVX512BF16__)
#define VARIANT "avx512_bf16"
#else
#define VARIANT "avx512_vnni"
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#define KV_AVX2 1
#define VARIANT "avx2"
#elif defined(__ARM_FEATURE_DOTPROD)
#define KV_NEON 1
#define VARIANT "neon_dotprod"
#else
#define VARIANT "scalar"
#endif

#define BLOCK 64 /* NF4 block size: also the activation's int8 block */
#define NR 4     /* weight rows per tile */
#define MR 4     /* activation rows per tile (NR x MR accumulators live in registers) */
#define ROW_CHUNK 64 /* activation rows kept hot while a thread sweeps its weight rows */

/* Codes are read once per token, straight from DRAM: each row stream asks for the line this far ahead
 * (a few rows on) so the loads find it in cache. Past the end of a matrix the hint is harmless. */
#define PREFETCH_BYTES 4096

/* Below this many multiply-adds a call stays on the calling thread (waking the team costs more). */
#define PARALLEL_MIN_WORK (1 << 18)

/* round(127 * L): |level| <= 127 keeps maddubs' pair sums (<= 2 * 127 * 127) inside int16. */
static const int8_t LQ[16] = {-127, -88, -67, -50, -36, -23, -12, 0, 10, 20, 31, 43, 56, 71, 92, 127};

static const float L[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
  -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f,
  0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f,
  0.5626170039176941f, 0.7229568362236023f, 1.0f};

const char* kimivl_variant(void) { return VARIANT; }

/* ---------------------------------------------------------------- activation quantization */

/* A quantized activation row of k values, in one buffer of qrow_bytes(k):
 *   int8 q[k]        per 64-block its 32 even elements then its 32 odd ones, q = round(x / s)
 *   float s[k/64]    block scales (block absmax / 127)
 *   float c[k/64]    128 * s * sum(q) per block: the AVX-512 build multiplies levels + 128 (unsigned, as
 *                    vpdpbusd wants) by q and subtracts this once per output, not once per block. */
static inline int64_t qrow_bytes(int64_t k) { return k + 2 * (k / BLOCK) * (int64_t)sizeof(float); }
static inline const float* qrow_scales(const int8_t* q, int64_t k) { return (const float*)(q + k); }

static void q8_quantize(const float* x, int8_t* q, int64_t k) {
  float* s = (float*)(q + k);
  float* c = s + k / BLOCK;
  for (int64_t b = 0; b < k / BLOCK; b++) {
    const float* xb = x + b * BLOCK;
    float amax = 0.0f;
    for (int j = 0; j < BLOCK; j++) amax = fabsf(xb[j]) > amax ? fabsf(xb[j]) : amax; /* fmaxf is a libm call */
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int8_t* qb = q + b * BLOCK;
    int32_t sum = 0;
    for (int j = 0; j < BLOCK / 2; j++) {
      qb[j] = (int8_t)lrintf(xb[2 * j] * inv);
      qb[BLOCK / 2 + j] = (int8_t)lrintf(xb[2 * j + 1] * inv);
      sum += qb[j] + qb[BLOCK / 2 + j];
    }
    s[b] = amax / 127.0f;
    c[b] = 128.0f * s[b] * (float)sum;
  }
}

/* ---------------------------------------------------------------- one weight block, per ISA */

/* decode(p): 32 code bytes -> the block's 64 levels in registers (shared by every activation row);
 * decode_q8(p): the same for a block of 64 int8 weights (stored evens then odds, like activations);
 * dot_fma(acc, w, xq, scale): acc + scale * (the block's integer sum against one activation block), the
 * sum kept as a vector of int32 parts; fsum: horizontal sum of a float accumulator. */
#if KV_AVX512
#define LEVEL_BIAS 128 /* levels stored as level + 128, unsigned */
typedef __m512i wblock;  /* evens' levels in the low 256 bits, odds' in the high */
typedef __m512 facc;
static inline wblock decode(const uint8_t* p) {
  const __m256i tab = _mm256_xor_si256(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)LQ)),
                                       _mm256_set1_epi8((char)0x80)); /* level + 128 */
  const __m256i nibble = _mm256_set1_epi8(15);
  const __m256i bytes = _mm256_loadu_si256((const __m256i*)p);
  const __m256i hi = _mm256_shuffle_epi8(tab, _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble));
  const __m256i lo = _mm256_shuffle_epi8(tab, _mm256_and_si256(bytes, nibble));
  return _mm512_inserti64x4(_mm512_castsi256_si512(hi), lo, 1);
}
static inline wblock decode_q8(const int8_t* p) { /* 64 int8 weights, evens then odds */
  return _mm512_xor_si512(_mm512_loadu_si512((const void*)p), _mm512_set1_epi8((char)0x80));
}
static inline facc fzero(void) { return _mm512_setzero_ps(); }
static inline facc dot_fma(facc acc, const wblock* w, const int8_t* xq, const float* scale) {
  const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), *w, _mm512_loadu_si512((const void*)xq));
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(*scale), acc);
}
static inline float fsum(facc a) { return _mm512_reduce_add_ps(a); }
#elif KV_AVX2
#define LEVEL_BIAS 0
typedef struct {
  __m256i we, wo; /* evens' and odds' levels (their signs) */
  __m256i ae, ao; /* |levels|: maddubs takes unsigned x signed, so x takes the level's sign */
} wblock;
typedef __m256 facc;
static inline wblock decode(const uint8_t* p) {
  const __m256i tab = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)LQ));
  const __m256i nibble = _mm256_set1_epi8(15);
  const __m256i bytes = _mm256_loadu_si256((const __m256i*)p);
  wblock r;
  r.we = _mm256_shuffle_epi8(tab, _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble));
  r.wo = _mm256_shuffle_epi8(tab, _mm256_and_si256(bytes, nibble));
  r.ae = _mm256_sign_epi8(r.we, r.we);
  r.ao = _mm256_sign_epi8(r.wo, r.wo);
  return r;
}
static inline wblock decode_q8(const int8_t* p) {
  wblock r;
  r.we = _mm256_loadu_si256((const __m256i*)p);
  r.wo = _mm256_loadu_si256((const __m256i*)(p + 32));
  r.ae = _mm256_sign_epi8(r.we, r.we);
  r.ao = _mm256_sign_epi8(r.wo, r.wo);
  return r;
}
static inline facc fzero(void) { return _mm256_setzero_ps(); }
static inline facc dot_fma(facc acc, const wblock* w, const int8_t* xq, const float* scale) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i xe = _mm256_loadu_si256((const __m256i*)xq), xo = _mm256_loadu_si256((const __m256i*)(xq + 32));
  const __m256i pe = _mm256_maddubs_epi16(w->ae, _mm256_sign_epi8(xe, w->we));
  const __m256i po = _mm256_maddubs_epi16(w->ao, _mm256_sign_epi8(xo, w->wo));
  const __m256i d = _mm256_add_epi32(_mm256_madd_epi16(pe, ones), _mm256_madd_epi16(po, ones));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_broadcast_ss(scale), acc);
}
static inline float fsum(facc a) {
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  t = _mm_add_ps(t, _mm_movehl_ps(t, t));
  t = _mm_add_ss(t, _mm_shuffle_ps(t, t, 1));
  return _mm_cvtss_f32(t);
}
#elif KV_NEON
#define LEVEL_BIAS 0
typedef struct {
  int8x16_t e0, e1, o0, o1;
} wblock;
typedef float32x4_t facc;
static inline wblock decode(const uint8_t* p) {
  const int8x16_t tab = vld1q_s8(LQ);
  const uint8x16_t b0 = vld1q_u8(p), b1 = vld1q_u8(p + 16), nibble = vdupq_n_u8(15);
  wblock r;
  r.e0 = vqtbl1q_s8(tab, vshrq_n_u8(b0, 4));
  r.e1 = vqtbl1q_s8(tab, vshrq_n_u8(b1, 4));
  r.o0 = vqtbl1q_s8(tab, vandq_u8(b0, nibble));
  r.o1 = vqtbl1q_s8(tab, vandq_u8(b1, nibble));
  return r;
}
static inline wblock decode_q8(const int8_t* p) {
  wblock r;
  r.e0 = vld1q_s8(p), r.e1 = vld1q_s8(p + 16), r.o0 = vld1q_s8(p + 32), r.o1 = vld1q_s8(p + 48);
  return r;
}
static inline facc fzero(void) { return vdupq_n_f32(0.0f); }
static inline facc dot_fma(facc acc, const wblock* w, const int8_t* xq, const float* scale) {
  int32x4_t d = vdotq_s32(vdupq_n_s32(0), w->e0, vld1q_s8(xq));
  d = vdotq_s32(d, w->e1, vld1q_s8(xq + 16));
  d = vdotq_s32(d, w->o0, vld1q_s8(xq + 32));
  d = vdotq_s32(d, w->o1, vld1q_s8(xq + 48));
  return vfmaq_n_f32(acc, vcvtq_f32_s32(d), *scale);
}
static inline float fsum(facc a) { return vaddvq_f32(a); }
#else
#define LEVEL_BIAS 0
typedef struct {
  int8_t w[BLOCK]; /* evens then odds */
} wblock;
typedef float facc;
static inline wblock decode(const uint8_t* p) {
  wblock r;
  for (int j = 0; j < BLOCK / 2; j++) r.w[j] = LQ[p[j] >> 4], r.w[BLOCK / 2 + j] = LQ[p[j] & 15];
  return r;
}
static inline wblock decode_q8(const int8_t* p) {
  wblock r;
  memcpy(r.w, p, BLOCK);
  return r;
}
static inline facc fzero(void) { return 0.0f; }
static inline facc dot_fma(facc acc, const wblock* w, const int8_t* xq, const float* scale) {
  int32_t d = 0;
  for (int j = 0; j < BLOCK; j++) d += w->w[j] * xq[j];
  return acc + (float)d * *scale;
}
static inline float fsum(facc a) { return a; }
#endif

static inline void prefetch(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 3);
#endif
}

/* ---------------------------------------------------------------- NF4 x int8 tiles */

#define SCALE_BLOCKS 64 /* blocks whose nr x mr scales are computed ahead, per pass */

/* out[j * ldo + i] = (weight row i) . (activation row j) for nr weight rows and mr quantized activation
 * rows (nr, mr compile-time constants at each call, so the accumulators live in registers). The scales
 * absmax[i][b] * s[j][b] of SCALE_BLOCKS blocks are multiplied ahead, so the inner loop only broadcasts. */
enum { NF4 = 0, Q8 = 1 }; /* weight formats: NF4 codes (32 bytes a block) or int8 (64 bytes a block) */

static inline __attribute__((always_inline)) void tile(const int nr, const int mr, const int fmt, const uint8_t* const* p,
                                                       const float* const* am, const int8_t* const* xq,
                                                       int64_t k, float* out, int64_t ldo) {
  const int64_t blocks = k / BLOCK;
  facc acc[NR][MR];
  float scale[NR][MR][SCALE_BLOCKS];
  for (int i = 0; i < nr; i++)
    for (int j = 0; j < mr; j++) acc[i][j] = fzero();
  for (int64_t b0 = 0; b0 < blocks; b0 += SCALE_BLOCKS) {
    const int64_t b1 = b0 + SCALE_BLOCKS < blocks ? b0 + SCALE_BLOCKS : blocks;
    for (int j = 0; j < mr; j++) {
      const float* s = qrow_scales(xq[j], k);
      for (int i = 0; i < nr; i++)
        for (int64_t b = b0; b < b1; b++) scale[i][j][b - b0] = am[i][b] * s[b];
    }
    for (int64_t b = b0; b < b1; b++) {
      wblock w[NR];
      for (int i = 0; i < nr; i++) {
        const uint8_t* at = p[i] + b * (fmt == Q8 ? BLOCK : BLOCK / 2);
        prefetch(at + PREFETCH_BYTES);
        w[i] = fmt == Q8 ? decode_q8((const int8_t*)at) : decode(at);
      }
      for (int j = 0; j < mr; j++) {
        const int8_t* x = xq[j] + b * BLOCK;
        for (int i = 0; i < nr; i++) acc[i][j] = dot_fma(acc[i][j], &w[i], x, &scale[i][j][b - b0]);
      }
    }
  }
  for (int i = 0; i < nr; i++)
    for (int j = 0; j < mr; j++) {
      float r = fsum(acc[i][j]);
      if (LEVEL_BIAS) { /* remove the levels' +128: sum_b absmax[i][b] * c[j][b] */
        const float* c = qrow_scales(xq[j], k) + blocks;
        for (int64_t b = 0; b < blocks; b++) r -= am[i][b] * c[b];
      }
      out[j * ldo + i] = fmt == Q8 ? r : r * (1.0f / 127); /* NF4 levels are 127 L */
    }
}

/* An nr x mr tile with run-time sizes (nr <= NR, mr <= MR): the compiled shapes, ragged edges row by row. */
static inline __attribute__((always_inline)) void tile_any(int nr, int mr, const int fmt, const uint8_t* const* p, const float* const* am, const int8_t* const* xq,
                     int64_t k, float* out, int64_t ldo) {
#define TILES(R)                                     \
  switch (mr) {                                      \
    case 4: tile(R, 4, fmt, p, am, xq, k, out, ldo); break;  \
    case 3: tile(R, 3, fmt, p, am, xq, k, out, ldo); break;  \
    case 2: tile(R, 2, fmt, p, am, xq, k, out, ldo); break;  \
    default: tile(R, 1, fmt, p, am, xq, k, out, ldo); break; \
  }
  if (nr == NR) {
    TILES(NR)
    return;
  }
  for (int i = 0; i < nr; i++, p++, am++, out++) TILES(1)
#undef TILES
}

/* Weight rows n0..n1 of one matrix (NF4, or int8 blocks with their scales in `absmax`) against m quantized
 * activation rows xq[j]: y[j * ldy + n - n0]. */
static inline __attribute__((always_inline)) void rows_fmt(const int fmt, const int8_t* const* xq, int64_t m,
                                                           const uint8_t* w, const float* absmax, int64_t n0,
                                                           int64_t n1, int64_t k, float* y, int64_t ldy) {
  const int64_t row_bytes = fmt == Q8 ? k : k / 2, blocks = k / BLOCK;
  for (int64_t j0 = 0; j0 < m; j0 += ROW_CHUNK) {
    const int64_t j1 = j0 + ROW_CHUNK < m ? j0 + ROW_CHUNK : m;
    for (int64_t n = n0; n < n1; n += NR) {
      const int nr = n1 - n >= NR ? NR : (int)(n1 - n);
      const uint8_t* p[NR];
      const float* am[NR];
      for (int i = 0; i < nr; i++) p[i] = w + (n + i) * row_bytes, am[i] = absmax + (n + i) * blocks;
      for (int64_t j = j0; j < j1; j += MR) {
        const int mr = j1 - j >= MR ? MR : (int)(j1 - j);
        tile_any(nr, mr, fmt, p, am, xq + j, k, y + j * ldy + (n - n0), ldy);
      }
    }
  }
}

static void q8_rows(const int8_t* const* xq, int64_t m, const uint8_t* packed, const float* absmax, int64_t n0,
                    int64_t n1, int64_t k, float* y, int64_t ldy) {
  rows_fmt(NF4, xq, m, packed, absmax, n0, n1, k, y, ldy);
}

static void q8q8_rows(const int8_t* const* xq, int64_t m, const int8_t* wq, const float* scale, int64_t n0,
                      int64_t n1, int64_t k, float* y, int64_t ldy) {
  rows_fmt(Q8, xq, m, (const uint8_t*)wq, scale, n0, n1, k, y, ldy);
}

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

/* ---------------------------------------------------------------- NF4 entry points */

/* y [m, n] = x [m, k] W^T, int8 activations; W NF4 (fmt NF4: packed, absmax) or int8 blocks (fmt Q8: weights
 * [n, k] stored like activations, per 64-block evens then odds, and scales [n, k/64]).
 * Returns -1 if out of memory, else 0. */
static int matmul(const int fmt, const float* x, const void* w, const float* scales, float* y, int64_t m, int64_t n,
                  int64_t k) {
  const int64_t qb = qrow_bytes(k);
  int8_t* q = malloc(m * qb);
  const int8_t** qp = malloc(m * sizeof(*qp));
  const int ok = q && qp;
  if (ok) {
#pragma omp parallel if (m * n * k >= PARALLEL_MIN_WORK)
    {
      int64_t lo, hi;
      share(m, 1, &lo, &hi);
      for (int64_t j = lo; j < hi; j++) q8_quantize(x + j * k, q + j * qb, k), qp[j] = q + j * qb;
#pragma omp barrier
      share(n, NR, &lo, &hi);
      if (fmt == Q8) q8q8_rows(qp, m, w, scales, lo, hi, k, y + lo, n);
      else q8_rows(qp, m, w, scales, lo, hi, k, y + lo, n);
    }
  }
  free(q), free(qp);
  return ok ? 0 : -1;
}

int nf4_q8_matmul(const float* x, const uint8_t* packed, const float* absmax, float* y, int64_t m, int64_t n,
                  int64_t k) {
  return matmul(NF4, x, packed, absmax, y, m, n, k);
}

int q8_q8_matmul(const float* x, const int8_t* wq, const float* scale, float* y, int64_t m, int64_t n, int64_t k) {
  return matmul(Q8, x, wq, scale, y, m, n, k);
}

/* 16 weights (8 code bytes, one absmax) -> fp32 out[0..15], in weight order. */
static inline void dequant16(const uint8_t* p, float a, float* out) {
#if KV_AVX512
  const __m128i dup = _mm_shuffle_epi8(_mm_loadl_epi64((const __m128i*)p),
                                       _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7));
  const __m512i shift = _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
  const __m512i codes = _mm512_and_si512(_mm512_srlv_epi32(_mm512_cvtepu8_epi32(dup), shift), _mm512_set1_epi32(15));
  _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_permutexvar_ps(codes, _mm512_loadu_ps(L)), _mm512_set1_ps(a)));
#else
  for (int j = 0; j < 8; j++) out[2 * j] = L[p[j] >> 4] * a, out[2 * j + 1] = L[p[j] & 15] * a;
#endif
}

/* Dequantise: out [n, k] as fp32 (bf16 = 0) or bf16 bits (bf16 = 1, round to nearest even). */
void nf4_dequantize(const uint8_t* packed, const float* absmax, void* out, int64_t n, int64_t k, int bf16) {
#pragma omp parallel if (n * k >= PARALLEL_MIN_WORK)
  {
    int64_t lo, hi;
    share(n, 1, &lo, &hi);
    float v[BLOCK];
    for (int64_t r = lo; r < hi; r++) {
      for (int64_t b = 0; b < k / BLOCK; b++) {
        const float a = absmax[r * (k / BLOCK) + b];
        const uint8_t* p = packed + r * (k / 2) + b * (BLOCK / 2);
        float* dst = bf16 ? v : (float*)out + r * k + b * BLOCK;
        for (int q = 0; q < BLOCK / 16; q++) dequant16(p + 8 * q, a, dst + 16 * q);
        if (bf16) {
          uint16_t* o = (uint16_t*)out + r * k + b * BLOCK;
          for (int j = 0; j < BLOCK; j++) {
            uint32_t u;
            memcpy(&u, &v[j], 4);
            o[j] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
          }
        }
      }
    }
  }
}

/* Routed experts of m tokens, int8 activations: out [m, hidden] = sum_a route_w[t, a] * expert_e(x_t), e = idx[t, a].
 * gate/up packed [E, inter, hidden/2] (absmax [E, inter, hidden/64]), down packed [E, hidden, inter/2].
 * Tokens are grouped by expert; per active expert (in id order) the threads split gate/up rows
 * (h = silu(g) * u, fp32), then quantize h, then split down's rows and add them into their own output
 * columns (no two threads write one element; the sum order is fixed, so thread counts agree bit for bit).
 * Scratch O(m * (hidden + 3 * inter)). Returns -1 if out of memory, else 0. */
int nf4_moe(const float* x, const int64_t* idx, const float* route_w, int64_t m, int64_t top_k, int64_t n_experts,
            const uint8_t* gate_p, const float* gate_a, const uint8_t* up_p, const float* up_a, const uint8_t* down_p,
            const float* down_a, int64_t hidden, int64_t inter, float* out) {
  const int64_t pairs = m * top_k, hb = hidden / BLOCK, ib = inter / BLOCK;
  const int64_t xb = qrow_bytes(hidden), hrow = qrow_bytes(inter);
  int8_t* xq = malloc(m * xb);
  int64_t* first = calloc(n_experts + 1, sizeof(int64_t)); /* first[e]: expert e's first slot in `order` */
  int64_t* fill = malloc(n_experts * sizeof(int64_t));
  int64_t* order = malloc(pairs * sizeof(int64_t));
  float* gu = malloc(m * 2 * inter * sizeof(float)); /* one expert's rows: gate then up */
  int8_t* hq = malloc(m * hrow);
  float* y = malloc(m * hidden * sizeof(float));
  const int8_t** qp = malloc(m * sizeof(*qp));
  const int8_t** hqp = malloc(m * sizeof(*hqp));
  const int ok = xq && first && fill && order && gu && hq && y && qp && hqp;
  if (ok) {
    for (int64_t i = 0; i < pairs; i++) first[idx[i] + 1]++;
    for (int64_t e = 0; e < n_experts; e++) first[e + 1] += first[e];
    memcpy(fill, first, n_experts * sizeof(int64_t));
    for (int64_t i = 0; i < pairs; i++) order[fill[idx[i]]++] = i;
    memset(out, 0, m * hidden * sizeof(float));
    for (int64_t j = 0; j < m; j++) hqp[j] = hq + j * hrow;
#pragma omp parallel if (pairs * 3 * hidden * inter >= PARALLEL_MIN_WORK)
    {
      int64_t lo, hi;
      share(m, 1, &lo, &hi);
      for (int64_t t = lo; t < hi; t++) q8_quantize(x + t * hidden, xq + t * xb, hidden);
      for (int64_t e = 0; e < n_experts; e++) {
        const int64_t* slots = order + first[e];
        const int64_t c = first[e + 1] - first[e];
        if (c == 0) continue;
#pragma omp barrier
#pragma omp single
        for (int64_t j = 0; j < c; j++) qp[j] = xq + slots[j] / top_k * xb;
        share(inter, NR, &lo, &hi);
        q8_rows(qp, c, gate_p + e * inter * hidden / 2, gate_a + e * inter * hb, lo, hi, hidden, gu + lo, 2 * inter);
        q8_rows(qp, c, up_p + e * inter * hidden / 2, up_a + e * inter * hb, lo, hi, hidden, gu + inter + lo,
                2 * inter);
#pragma omp barrier
        share(c, 1, &lo, &hi);
        for (int64_t j = lo; j < hi; j++) {
          float* g = gu + j * 2 * inter;
          for (int64_t i = 0; i < inter; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * g[inter + i];
          q8_quantize(g, hq + j * hrow, inter);
        }
#pragma omp barrier
        share(hidden, NR, &lo, &hi);
        q8_rows(hqp, c, down_p + e * hidden * inter / 2, down_a + e * hidden * ib, lo, hi, inter, y + lo, hidden);
        for (int64_t j = 0; j < c; j++) {
          const float w = route_w[slots[j]];
          float* o = out + slots[j] / top_k * hidden;
          for (int64_t i = lo; i < hi; i++) o[i] += w * y[j * hidden + i];
        }
      }
    }
  }
  free(xq), free(first), free(fill), free(order), free(gu), free(hq), free(y), free(qp), free(hqp);
  return ok ? 0 : -1;
}

/* One token's routed experts (batch-1 decode): like nf4_moe with m = 1, but the threads split all experts'
 * gate/up blocks in one phase and down's rows in one more (two barriers per call, not three per expert). */
int nf4_moe_decode(const float* x, const int64_t* experts, const float* route_w, int64_t n_active,
                   const uint8_t* gate_p, const float* gate_a, const uint8_t* up_p, const float* up_a,
                   const uint8_t* down_p, const float* down_a, int64_t hidden, int64_t inter, float* out) {
  const int64_t hb = hidden / BLOCK, ib = inter / BLOCK, hrow = qrow_bytes(inter);
  int8_t* xq = malloc(qrow_bytes(hidden));
  int8_t* hq = malloc(n_active * hrow);
  float* h = malloc(n_active * inter * sizeof(float));
  const int ok = xq && hq && h;
  if (ok) {
    q8_quantize(x, xq, hidden);
#pragma omp parallel if (3 * n_active * hidden * inter >= PARALLEL_MIN_WORK)
    {
      int64_t lo, hi;
      const int8_t* qs[1] = {xq};
      float gu[2 * BLOCK];
      share(n_active * ib, 1, &lo, &hi); /* (expert, 64-row block) pairs */
      for (int64_t u = lo; u < hi; u++) {
        const int64_t a = u / ib, b = u % ib, row = experts[a] * inter + b * BLOCK;
        q8_rows(qs, 1, gate_p + row * (hidden / 2), gate_a + row * hb, 0, BLOCK, hidden, gu, 0);
        q8_rows(qs, 1, up_p + row * (hidden / 2), up_a + row * hb, 0, BLOCK, hidden, gu + BLOCK, 0);
        for (int j = 0; j < BLOCK; j++) h[a * inter + b * BLOCK + j] = gu[j] / (1.0f + expf(-gu[j])) * gu[BLOCK + j];
      }
#pragma omp barrier
      share(n_active, 1, &lo, &hi);
      for (int64_t a = lo; a < hi; a++) q8_quantize(h + a * inter, hq + a * hrow, inter);
#pragma omp barrier
      share(hidden, NR, &lo, &hi);
      float y[NR];
      for (int64_t n = lo; n < hi; n += NR) {
        const int nr = hi - n >= NR ? NR : (int)(hi - n);
        float acc[NR] = {0};
        for (int64_t a = 0; a < n_active; a++) {
          const int64_t row = experts[a] * hidden + n;
          const int8_t* hqa[1] = {hq + a * hrow};
          q8_rows(hqa, 1, down_p + row * (inter / 2), down_a + row * ib, 0, nr, inter, y, 0);
          for (int i = 0; i < nr; i++) acc[i] += route_w[a] * y[i];
        }
        for (int i = 0; i < nr; i++) out[n + i] = acc[i];
      }
    }
  }
  free(xq), free(hq), free(h);
  return ok ? 0 : -1;
}

/* ---------------------------------------------------------------- bf16 weights, fp32 activations */

/* bf16 bits -> fp32 vectors, fp32 accumulators */
#if KV_AVX512
#define BW 16
typedef __m512 bvec;
static inline bvec bload(const uint16_t* w) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)w)), 16));
}
static inline bvec fload(const float* w) { return _mm512_loadu_ps(w); }
static inline bvec bfma(bvec acc, bvec w, const float* x) { return _mm512_fmadd_ps(w, _mm512_loadu_ps(x), acc); }
static inline bvec bvzero(void) { return _mm512_setzero_ps(); }
static inline float bsum(bvec a) { return _mm512_reduce_add_ps(a); }
#elif KV_AVX2
#define BW 8
typedef __m256 bvec;
static inline bvec bload(const uint16_t* w) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)w)), 16));
}
static inline bvec fload(const float* w) { return _mm256_loadu_ps(w); }
static inline bvec bfma(bvec acc, bvec w, const float* x) { return _mm256_fmadd_ps(w, _mm256_loadu_ps(x), acc); }
static inline bvec bvzero(void) { return _mm256_setzero_ps(); }
static inline float bsum(bvec a) { return fsum(a); }
#elif KV_NEON
#define BW 4
typedef float32x4_t bvec;
static inline bvec bload(const uint16_t* w) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(w), 16)); }
static inline bvec fload(const float* w) { return vld1q_f32(w); }
static inline bvec bfma(bvec acc, bvec w, const float* x) { return vfmaq_f32(acc, w, vld1q_f32(x)); }
static inline bvec bvzero(void) { return vdupq_n_f32(0.0f); }
static inline float bsum(bvec a) { return vaddvq_f32(a); }
#else
#define BW 1
typedef float bvec;
static inline bvec bload(const uint16_t* w) {
  const uint32_t u = (uint32_t)w[0] << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static inline bvec fload(const float* w) { return w[0]; }
static inline bvec bfma(bvec acc, bvec w, const float* x) { return acc + w * x[0]; }
static inline bvec bvzero(void) { return 0.0f; }
static inline float bsum(bvec a) { return a; }
#endif

/* y[i] = (row i) . x for nr rows of bf16 (f32 = 0) or fp32 (f32 = 1) weights; two accumulators per row hide
 * the FMA latency. */
static inline __attribute__((always_inline)) void dense_tile(const int nr, const int f32, const void* const* w,
                                                             const float* x, int64_t k, float* y) {
  bvec a0[NR], a1[NR];
  for (int i = 0; i < nr; i++) a0[i] = bvzero(), a1[i] = bvzero();
  const int64_t ahead = PREFETCH_BYTES / (f32 ? 4 : 2);
  int64_t j = 0;
  for (; j + 2 * BW <= k; j += 2 * BW)
    for (int i = 0; i < nr; i++) {
      if (f32) {
        const float* r = (const float*)w[i] + j;
        prefetch(r + ahead);
        a0[i] = bfma(a0[i], fload(r), x + j);
        a1[i] = bfma(a1[i], fload(r + BW), x + j + BW);
      } else {
        const uint16_t* r = (const uint16_t*)w[i] + j;
        prefetch(r + ahead);
        a0[i] = bfma(a0[i], bload(r), x + j);
        a1[i] = bfma(a1[i], bload(r + BW), x + j + BW);
      }
    }
  for (int i = 0; i < nr; i++) {
    float s = bsum(a0[i]) + bsum(a1[i]);
    for (int64_t r = j; r < k; r++) {
      float f;
      if (f32) f = ((const float*)w[i])[r];
      else {
        const uint32_t u = (uint32_t)((const uint16_t*)w[i])[r] << 16;
        memcpy(&f, &u, 4);
      }
      s += f * x[r];
    }
    y[i] = s;
  }
}

/* y[n - n0] = (row n of w) . x for rows n0..n1 of bf16 (f32 = 0) or fp32 (f32 = 1) weights [*, k]. */
static void dense_rows(const int f32, const float* x, const void* w, int64_t n0, int64_t n1, int64_t k, float* y) {
  const int64_t row = k * (f32 ? 4 : 2);
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) {
    const void* p[NR];
    for (int i = 0; i < NR; i++) p[i] = (const char*)w + (n + i) * row;
    if (f32) dense_tile(NR, 1, p, x, k, y + (n - n0));
    else dense_tile(NR, 0, p, x, k, y + (n - n0));
  }
  for (; n < n1; n++) {
    const void* p = (const char*)w + n * row;
    if (f32) dense_tile(1, 1, &p, x, k, y + (n - n0));
    else dense_tile(1, 0, &p, x, k, y + (n - n0));
  }
}

static void bf16_rows(const float* x, const uint16_t* w, int64_t n0, int64_t n1, int64_t k, float* y) {
  dense_rows(0, x, w, n0, n1, k, y);
}

/* y [n] = W x for bf16 W [n, k] and fp32 x [k]. */
void bf16_matvec(const float* x, const uint16_t* w, float* y, int64_t n, int64_t k) {
#pragma omp parallel if (n * k >= PARALLEL_MIN_WORK)
  {
    int64_t lo, hi;
    share(n, NR, &lo, &hi);
    bf16_rows(x, w, lo, hi, k, y + lo);
  }
}

/* One token's routed experts with bf16 weights (gate/up [E, inter, hidden], down [E, hidden, inter]), fp32 math:
 * out [hidden] = sum_a route_w[a] * down_e(silu(gate_e x) * up_e x). Scratch n_active * inter floats.
 * Returns -1 if out of memory, else 0. */
int bf16_moe_decode(const float* x, const int64_t* experts, const float* route_w, int64_t n_active,
                    const uint16_t* gate, const uint16_t* up, const uint16_t* down, int64_t hidden, int64_t inter,
                    float* out) {
  float* h = malloc(n_active * inter * sizeof(float));
  if (h == NULL) return -1;
  const int64_t tiles = (inter + NR - 1) / NR;
#pragma omp parallel if (3 * n_active * hidden * inter >= PARALLEL_MIN_WORK)
  {
    int64_t lo, hi;
    share(n_active * tiles, 1, &lo, &hi); /* (expert, NR-row tile) pairs */
    float g[NR], u[NR];
    for (int64_t t = lo; t < hi; t++) {
      const int64_t a = t / tiles, i = t % tiles * NR, i1 = i + NR < inter ? i + NR : inter;
      bf16_rows(x, gate + experts[a] * inter * hidden, i, i1, hidden, g);
      bf16_rows(x, up + experts[a] * inter * hidden, i, i1, hidden, u);
      for (int64_t j = i; j < i1; j++) h[a * inter + j] = g[j - i] / (1.0f + expf(-g[j - i])) * u[j - i];
    }
#pragma omp barrier
    share(hidden, NR, &lo, &hi);
    float y[NR];
    for (int64_t n = lo; n < hi; n += NR) {
      const int64_t n1 = n + NR < hi ? n + NR : hi;
      float acc[NR] = {0};
      for (int64_t a = 0; a < n_active; a++) {
        bf16_rows(h + a * inter, down + experts[a] * hidden * inter, n, n1, inter, y);
        for (int64_t j = n; j < n1; j++) acc[j - n] += route_w[a] * y[j - n];
      }
      for (int64_t j = n; j < n1; j++) out[j] = acc[j - n];
    }
  }
  free(h);
  return 0;
}

/* ---------------------------------------------------------------- bf16 weights, many activation rows */

/* Activation rows per bf16 tile: NR x BMR accumulators plus NR weight vectors stay in registers
 * (32 vector registers with AVX-512, 16 with AVX2 and NEON). With AVX512_BF16 the activations are bf16 too
 * and one vdpbf16ps sums 32 products into 16 fp32 lanes (no widening); elsewhere they are fp32. */
#if KV_AVX512
#define BMR 4
#else
#define BMR 2
#endif
#if KV_AVX512 && defined(__AVX512BF16__)
#define BF16_DOT 1
typedef uint16_t bact; /* bf16 bits */
#else
typedef float bact;
#endif

static inline float bf16_value(uint16_t b) {
  const uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline float act_value(bact a) {
#if BF16_DOT
  return bf16_value(a);
#else
  return a;
#endif
}

/* n fp32 values -> activations (bf16: round to nearest even, as torch) */
static void to_act(const float* v, bact* out, int64_t n) {
#if BF16_DOT
  for (int64_t i = 0; i < n; i++) {
    uint32_t u;
    memcpy(&u, &v[i], 4);
    out[i] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
#else
  memcpy(out, v, n * sizeof(float));
#endif
}

/* out[j * ldo + i] = (bf16 weight row i) . (activation row j) for nr weight rows and mr activation rows:
 * each weight vector is loaded once and used for all mr rows (the rows stay in cache, the weights stream). */
static inline __attribute__((always_inline)) void bf16_tile(const int nr, const int mr, const uint16_t* const* w,
                                                            const bact* const* x, int64_t k, float* out,
                                                            int64_t ldo) {
#if BF16_DOT
  enum { STEP = 32 };
  __m512 acc[NR][BMR];
  for (int i = 0; i < nr; i++)
    for (int j = 0; j < mr; j++) acc[i][j] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + STEP <= k; c += STEP) {
    __m512bh wv[NR];
    for (int i = 0; i < nr; i++) {
      prefetch(w[i] + c + PREFETCH_BYTES / 2);
      wv[i] = (__m512bh)_mm512_loadu_si512(w[i] + c);
    }
    for (int j = 0; j < mr; j++) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x[j] + c);
      for (int i = 0; i < nr; i++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv[i], xv);
    }
  }
#define ACC_SUM(a) _mm512_reduce_add_ps(a)
#else
  enum { STEP = BW };
  bvec acc[NR][BMR];
  for (int i = 0; i < nr; i++)
    for (int j = 0; j < mr; j++) acc[i][j] = bvzero();
  int64_t c = 0;
  for (; c + STEP <= k; c += STEP) {
    bvec wv[NR];
    for (int i = 0; i < nr; i++) {
      prefetch(w[i] + c + PREFETCH_BYTES / 2);
      wv[i] = bload(w[i] + c);
    }
    for (int j = 0; j < mr; j++)
      for (int i = 0; i < nr; i++) acc[i][j] = bfma(acc[i][j], wv[i], x[j] + c);
  }
#define ACC_SUM(a) bsum(a)
#endif
  for (int i = 0; i < nr; i++)
    for (int j = 0; j < mr; j++) {
      float s = ACC_SUM(acc[i][j]);
      for (int64_t r = c; r < k; r++) s += bf16_value(w[i][r]) * act_value(x[j][r]);
      out[j * ldo + i] = s;
    }
#undef ACC_SUM
}

/* y[j * ldy + n - n0] = (row n of bf16 w [*, k]) . x[j] for rows n0..n1 and m activation rows. */
static void bf16_rows_many(const bact* const* x, int64_t m, const uint16_t* w, int64_t n0, int64_t n1, int64_t k,
                           float* y, int64_t ldy) {
  for (int64_t j0 = 0; j0 < m; j0 += ROW_CHUNK) {
    const int64_t j1 = j0 + ROW_CHUNK < m ? j0 + ROW_CHUNK : m;
    for (int64_t n = n0; n < n1; n += NR) {
      const int nr = n1 - n >= NR ? NR : (int)(n1 - n);
      const uint16_t* p[NR];
      for (int i = 0; i < nr; i++) p[i] = w + (n + i) * k;
      for (int64_t j = j0; j < j1; j += BMR) {
        const int mr = j1 - j >= BMR ? BMR : (int)(j1 - j);
        float* o = y + j * ldy + (n - n0);
        if (nr == NR && mr == BMR) bf16_tile(NR, BMR, p, x + j, k, o, ldy);
        else
          for (int i = 0; i < nr; i++)
            for (int jj = 0; jj < mr; jj++) bf16_tile(1, 1, p + i, x + j + jj, k, o + jj * ldy + i, ldy);
      }
    }
  }
}

/* AMX (Sapphire Rapids on): one TDPBF16PS multiplies a 16 x 32 bf16 weight block, loaded straight from the
 * row-major [n, k] matrix (no repacking), by 32 k x 16 activation rows held as bf16 pairs ("VNNI": for each
 * pair of k, the 16 rows' two values side by side) into 16 x 16 fp32 sums. Compute then costs a few percent
 * of reading the weights, at any row count. Linux grants the tile registers per process on request. */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && BF16_DOT
#define KV_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#define AMX_ROWS 16   /* weight rows (and activation rows) per tile */
#define AMX_CHUNKS 4  /* activation tiles per weight block: tmm0-3 sums, tmm4 weights, tmm5 activations */

static int amx_permitted(void) {
  static int state; /* 0 unknown, 1 granted, -1 refused */
  if (state == 0) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0 ? 1 : -1;
  return state == 1;
}

static void amx_configure(void) {
  struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } cfg = {.palette = 1};
  for (int t = 0; t < 6; t++) cfg.rows[t] = AMX_ROWS, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
}

/* rows[j] (bf16 [k], j < c) -> vnni [ceil(c/16)][k/2][16] pairs of k, zero past row c */
static void amx_pack(const bact* const* rows, int64_t c, int64_t k, uint32_t* vnni) {
  const int64_t chunks = (c + AMX_ROWS - 1) / AMX_ROWS;
  for (int64_t q = 0; q < chunks; q++)
    for (int64_t j = 0; j < AMX_ROWS; j++) {
      uint32_t* dst = vnni + q * (k / 2) * AMX_ROWS + j;
      if (q * AMX_ROWS + j < c) {
        const uint32_t* src = (const uint32_t*)rows[q * AMX_ROWS + j];
        for (int64_t r = 0; r < k / 2; r++) dst[r * AMX_ROWS] = src[r];
      } else
        for (int64_t r = 0; r < k / 2; r++) dst[r * AMX_ROWS] = 0;
    }
}

/* y[j * ldy + i] = (row i of the 16-row bf16 block w, row stride k) . (activation row j) for the c rows in
 * `vnni`: up to AMX_CHUNKS activation tiles per pass over the block, sums stored transposed. */
#define AMX_DOT(T)                                                                   \
  case T + 1:                                                                        \
    _tile_loadd(5, vnni + ((q0 + T) * (k / 2) + kk / 2) * AMX_ROWS, 4 * AMX_ROWS); \
    _tile_dpbf16ps(T, 4, 5);
static void amx_block(const uint32_t* vnni, int64_t c, const uint16_t* w, int64_t k, float* y, int64_t ldy) {
  const int64_t chunks = (c + AMX_ROWS - 1) / AMX_ROWS;
  float sums[AMX_ROWS * AMX_ROWS];
  for (int64_t q0 = 0; q0 < chunks; q0 += AMX_CHUNKS) {
    const int nq = chunks - q0 < AMX_CHUNKS ? (int)(chunks - q0) : AMX_CHUNKS;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t kk = 0; kk < k; kk += 32) {
      _tile_loadd(4, w + kk, 2 * k);
      switch (nq) { /* tile numbers are immediates; the cases fall through from the last chunk down */
        AMX_DOT(3)
        AMX_DOT(2)
        AMX_DOT(1)
        AMX_DOT(0)
      }
    }
    for (int q = 0; q < nq; q++) {
      switch (q) {
        case 0: _tile_stored(0, sums, 4 * AMX_ROWS); break;
        case 1: _tile_stored(1, sums, 4 * AMX_ROWS); break;
        case 2: _tile_stored(2, sums, 4 * AMX_ROWS); break;
        default: _tile_stored(3, sums, 4 * AMX_ROWS); break;
      }
      const int64_t j0 = (q0 + q) * AMX_ROWS, j1 = j0 + AMX_ROWS < c ? j0 + AMX_ROWS : c;
      for (int64_t j = j0; j < j1; j++)
        for (int i = 0; i < AMX_ROWS; i++) y[j * ldy + i] = sums[i * AMX_ROWS + j - j0];
    }
  }
}
#undef AMX_DOT
#endif

/* One expert matrix [n, k]: bf16 rows, or NF4 codes (packed [n, k/2], absmax [n, k/64]) that are dequantised
 * to bf16 a block of WBLOCK rows at a time (into cache, never the whole matrix). */
typedef struct {
  const uint16_t* bf16;
  const uint8_t* packed;
  const float* absmax;
} wsrc;
#define WBLOCK 16

/* rows [n, k] of NF4 -> bf16 (level * absmax in fp32, rounded to nearest even: as nf4_dequantize) */
static void nf4_to_bf16(const uint8_t* packed, const float* absmax, int64_t n, int64_t k, uint16_t* out) {
  for (int64_t r = 0; r < n; r++)
    for (int64_t b = 0; b < k / BLOCK; b++) {
      const uint8_t* p = packed + r * (k / 2) + b * (BLOCK / 2);
      uint16_t* o = out + r * k + b * BLOCK;
#if BF16_DOT /* the block's 16 levels * absmax rounded to bf16 once, then one word permute per 32 weights */
      const __m512i lut = _mm512_castsi256_si512(
          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(L), _mm512_set1_ps(absmax[r * (k / BLOCK) + b]))));
      for (int half = 0; half < 2; half++) { /* 16 code bytes -> 32 words: high nibble first, then low */
        const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + 16 * half)));
        const __m512i low = _mm512_slli_epi32(_mm512_and_si512(c, _mm512_set1_epi32(15)), 16);
        const __m512i codes = _mm512_or_si512(_mm512_srli_epi32(c, 4), low);
        _mm512_storeu_si512(o + 32 * half, _mm512_permutexvar_epi16(codes, lut));
      }
#else
      float v[BLOCK];
      for (int q = 0; q < BLOCK / 16; q++) dequant16(p + 8 * q, absmax[r * (k / BLOCK) + b], v + 16 * q);
      for (int j = 0; j < BLOCK; j++) {
        uint32_t u;
        memcpy(&u, &v[j], 4);
        o[j] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
      }
#endif
    }
}

/* One expert's product for c activation rows, weight rows n0..n1: AMX tiles from the pairs `vnni` where `amx`
 * (n0, n1 multiples of WBLOCK), else dot tiles. wbuf: WBLOCK * k bf16 for NF4 blocks. */
static void expert_rows(int amx, const bact* const* x, const uint32_t* vnni, int64_t c, const wsrc* w, int64_t n0,
                        int64_t n1, int64_t k, float* y, int64_t ldy, uint16_t* wbuf) {
  (void)amx, (void)vnni;
  for (int64_t n = n0; n < n1; n += WBLOCK) {
    const int64_t nb = n1 - n < WBLOCK ? n1 - n : WBLOCK;
    const uint16_t* block = w->bf16 ? w->bf16 + n * k : wbuf;
    if (!w->bf16) nf4_to_bf16(w->packed + n * (k / 2), w->absmax + n * (k / BLOCK), nb, k, wbuf);
#if KV_AMX
    if (amx) {
      amx_block(vnni, c, block, k, y + n - n0, ldy);
      continue;
    }
#endif
    bf16_rows_many(x, c, block, 0, nb, k, y + n - n0, ldy);
  }
}

/* One thread's scratch for one expert of up to `rows` pairs: gu [rows, 2 inter] fp32 (gate then up; down's
 * output after), h [rows, inter], xp/hp [rows] row pointers, vnni pairs for AMX. */
typedef struct {
  float* gu;
  bact* h;
  const bact** xp;
  const bact** hp;
  uint32_t* vnni;
  uint16_t* wbuf;
} expert_scratch;

static int scratch_alloc(expert_scratch* s, int amx, int64_t rows, int64_t hidden, int64_t inter) {
  const int64_t padded = (rows + 15) / 16 * 16, width = hidden > inter ? hidden : inter;
  const int64_t gu_floats = rows * (2 * inter > hidden ? 2 * inter : hidden);
  s->gu = malloc(gu_floats * sizeof(float));
  s->h = malloc(rows * inter * sizeof(bact));
  s->xp = malloc(rows * sizeof(*s->xp));
  s->hp = malloc(rows * sizeof(*s->hp));
  s->vnni = amx ? malloc(padded * width * 2) : NULL;
  s->wbuf = malloc(WBLOCK * width * sizeof(uint16_t));
  return s->gu && s->h && s->xp && s->hp && (s->vnni || !amx) && s->wbuf;
}

static void scratch_free(expert_scratch* s) {
  free(s->gu), free(s->h), free(s->xp), free(s->hp), free(s->vnni), free(s->wbuf);
}

/* Expert e on its c (token, slot) pairs: y[slot] = down_e(silu(gate_e x_t) * up_e x_t), t = slot / top_k. */
static void grouped_expert(int amx, const expert_scratch* s, const bact* xa, const int64_t* slots, int64_t c,
                           int64_t top_k, const wsrc* gate, const wsrc* up, const wsrc* down, int64_t hidden,
                           int64_t inter, float* y) {
  for (int64_t j = 0; j < c; j++) s->xp[j] = xa + slots[j] / top_k * hidden, s->hp[j] = s->h + j * inter;
#if KV_AMX
  if (amx) amx_pack(s->xp, c, hidden, s->vnni);
#endif
  expert_rows(amx, s->xp, s->vnni, c, gate, 0, inter, hidden, s->gu, 2 * inter, s->wbuf);
  expert_rows(amx, s->xp, s->vnni, c, up, 0, inter, hidden, s->gu + inter, 2 * inter, s->wbuf);
  for (int64_t j = 0; j < c; j++) {
    float* g = s->gu + j * 2 * inter;
    for (int64_t i = 0; i < inter; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * g[inter + i];
    to_act(g, s->h + j * inter, inter);
  }
#if KV_AMX
  if (amx) amx_pack(s->hp, c, inter, s->vnni);
#endif
  expert_rows(amx, s->hp, s->vnni, c, down, 0, hidden, inter, s->gu, hidden, s->wbuf);
  for (int64_t j = 0; j < c; j++) memcpy(y + slots[j] * hidden, s->gu + j * hidden, hidden * sizeof(float));
}

/* Routed experts of m tokens with stacked bf16 or NF4 weights (gate/up [E, inter, hidden], down [E, hidden, inter];
 * NF4 dequantised to bf16 16 rows at a time), fp32 sums: out [m, hidden] = sum_a route_w[t, a] * down_e(silu(gate_e x_t) * up_e x_t), e = idx[t, a]. Pairs are
 * grouped by expert and the threads take whole experts (no barrier per expert: a descheduled thread holds
 * no one up), each expert's weights read once; then each token sums its top_k rows in slot order, so every
 * thread count gives the same bits. With BF16_DOT x and h are rounded to bf16 (as a bf16 model's own GEMMs
 * take them). Scratch O(m * top_k * hidden). Returns -1 if out of memory, else 0. */
static int grouped_moe(const float* x, const int64_t* idx, const float* route_w, int64_t m, int64_t top_k,
                       int64_t n_experts, const wsrc* stacks, int64_t hidden, int64_t inter, float* out) {
  const int64_t pairs = m * top_k;
#if KV_AMX
  const int amx = hidden % 32 == 0 && inter % 32 == 0 && amx_permitted();
#else
  const int amx = 0;
#endif
  int64_t* first = calloc(n_experts + 1, sizeof(int64_t)); /* first[e]: expert e's first slot in `order` */
  int64_t* fill = malloc(n_experts * sizeof(int64_t));
  int64_t* order = malloc(pairs * sizeof(int64_t));
  bact* xa = malloc(m * hidden * sizeof(bact));
  float* y = malloc(pairs * hidden * sizeof(float)); /* row i: pair i's expert output */
  int ok = first && fill && order && xa && y;
  if (ok) {
    int64_t most = 0;
    for (int64_t i = 0; i < pairs; i++) first[idx[i] + 1]++;
    for (int64_t e = 0; e < n_experts; e++) most = first[e + 1] > most ? first[e + 1] : most, first[e + 1] += first[e];
    memcpy(fill, first, n_experts * sizeof(int64_t));
    for (int64_t i = 0; i < pairs; i++) order[fill[idx[i]]++] = i;
#pragma omp parallel if (pairs * 3 * hidden * inter >= PARALLEL_MIN_WORK)
    {
      int64_t lo, hi;
      expert_scratch s;
      const int mine = scratch_alloc(&s, amx, most, hidden, inter);
#pragma omp atomic
      ok &= mine;
#if KV_AMX
      if (amx) amx_configure();
#endif
      share(m, 1, &lo, &hi);
      for (int64_t t = lo; t < hi; t++) to_act(x + t * hidden, xa + t * hidden, hidden);
#pragma omp barrier
      if (ok) {
#pragma omp for schedule(dynamic, 1)
        for (int64_t e = 0; e < n_experts; e++)
          if (first[e + 1] > first[e])
          {
            wsrc w[3];
            for (int p = 0; p < 3; p++) { /* expert e's gate, up ([inter, hidden]), down ([hidden, inter]) */
              const int64_t at = e * inter * hidden;
              w[p] = stacks[p].bf16 ? (wsrc){stacks[p].bf16 + at, NULL, NULL}
                                    : (wsrc){NULL, stacks[p].packed + at / 2, stacks[p].absmax + at / BLOCK};
            }
            grouped_expert(amx, &s, xa, order + first[e], first[e + 1] - first[e], top_k, &w[0], &w[1], &w[2], hidden,
                           inter, y);
          }
#pragma omp for
        for (int64_t t = 0; t < m; t++) {
          float* o = out + t * hidden;
          memset(o, 0, hidden * sizeof(float));
          for (int64_t a = 0; a < top_k; a++) {
            const float w = route_w[t * top_k + a], *r = y + (t * top_k + a) * hidden;
            for (int64_t i = 0; i < hidden; i++) o[i] += w * r[i];
          }
        }
      }
#if KV_AMX
      if (amx) _tile_release();
#endif
      scratch_free(&s);
    }
  }
  free(first), free(fill), free(order), free(xa), free(y);
  return ok ? 0 : -1;
}

int bf16_moe(const float* x, const int64_t* idx, const float* route_w, int64_t m, int64_t top_k, int64_t n_experts,
             const uint16_t* gate, const uint16_t* up, const uint16_t* down, int64_t hidden, int64_t inter,
             float* out) {
  const wsrc stacks[3] = {{gate, NULL, NULL}, {up, NULL, NULL}, {down, NULL, NULL}};
  return grouped_moe(x, idx, route_w, m, top_k, n_experts, stacks, hidden, inter, out);
}

/* nf4_moe's contract, but each expert's NF4 weights dequantised to bf16 16 rows at a time and multiplied like
 * bf16_moe's (AMX tiles where the build has them): exact products of the dequantised weights. */
int nf4_bf16_moe(const float* x, const int64_t* idx, const float* route_w, int64_t m, int64_t top_k,
                 int64_t n_experts, const uint8_t* gate_p, const float* gate_a, const uint8_t* up_p,
                 const float* up_a, const uint8_t* down_p, const float* down_a, int64_t hidden, int64_t inter,
                 float* out) {
  const wsrc stacks[3] = {{NULL, gate_p, gate_a}, {NULL, up_p, up_a}, {NULL, down_p, down_a}};
  return grouped_moe(x, idx, route_w, m, top_k, n_experts, stacks, hidden, inter, out);
}

/* y [m, n] = x [m, k] W^T for NF4 W (packed [n, k/2], absmax [n, k/64]), each block of WBLOCK weight rows
 * dequantised to bf16 in cache and multiplied by all m rows (AMX tiles where the build has them and n, k allow,
 * else dot tiles): the many-row NF4 product without a dequantised matrix in memory. The threads split the
 * weight rows; each output element is one thread's, so thread counts agree bit for bit. x is rounded to bf16
 * where the build multiplies bf16. Returns -1 if out of memory, else 0. */
int nf4_bf16_matmul(const float* x, const uint8_t* packed, const float* absmax, float* y, int64_t m, int64_t n,
                    int64_t k) {
#if KV_AMX
  const int amx = n % WBLOCK == 0 && k % 32 == 0 && amx_permitted();
#else
  const int amx = 0;
#endif
  const wsrc w = {NULL, packed, absmax};
  bact* xa = malloc(m * k * sizeof(bact));
  const bact** xp = malloc(m * sizeof(*xp));
  uint32_t* vnni = amx ? malloc((m + 15) / 16 * 16 * k * 2) : NULL;
  int ok = xa && xp && (vnni || !amx);
  if (ok) {
#pragma omp parallel if (m * n * k >= PARALLEL_MIN_WORK)
    {
      int64_t lo, hi;
      uint16_t* wbuf = malloc(WBLOCK * k * sizeof(uint16_t));
#pragma omp atomic
      ok &= wbuf != NULL;
      share(m, 1, &lo, &hi);
      for (int64_t j = lo; j < hi; j++) to_act(x + j * k, xa + j * k, k), xp[j] = xa + j * k;
#pragma omp barrier
#if KV_AMX
      if (amx) {
#pragma omp single
        amx_pack(xp, m, k, vnni);
        amx_configure();
      }
#endif
      share(n, WBLOCK, &lo, &hi);
      if (ok && lo < hi) expert_rows(amx, xp, vnni, m, &w, lo, hi, k, y + lo, n, wbuf);
#if KV_AMX
      if (amx) _tile_release();
#endif
      free(wbuf);
    }
  }
  free(xa), free(xp), free(vnni);
  return ok ? 0 : -1;
}

#include "cpu_decode.c" /* the whole-model decode step, built on the kernels above */
