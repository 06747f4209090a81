/* One decode step of the whole language model in one call (batch 1, one token): `kimivl_decode`.
 *
 * Part of cpu_kernels.c's translation unit (included at its end): it uses that file's per-ISA products
 * (q8_rows for NF4 and int8-block weights, dense_rows for bf16 and fp32 ones) and adds the small steps
 * between them (RMSNorm, RoPE, the latent cache write, absorbed MLA attention, the sigmoid router, SiLU),
 * so a token costs one call instead of thousands of torch ops. llama.cpp runs its step the same way: one
 * graph of C nodes on a thread team. The model's torch code (model/language.py) is the reference; the
 * engine builds the description below from the loaded modules (engine/cpu_decode.py).
 *
 * Threads: one OpenMP team for the whole step; phases split rows (or heads, cache slots, experts) and
 * meet at barriers. Every output element is computed by one thread in a fixed order, so the result does
 * not depend on the thread count. Activations are fp32 and, in a bf16 model (act_bf16), rounded to bf16
 * where the torch step rounds them (norm outputs, each linear's and sublayer's output, RoPE), so both
 * steps compute the same values up to the order of fp32 sums; the residual stream stays fp32 as there.
 * Activations are quantized to int8 per 64-block where an NF4 or int8-block weight reads them, exactly as
 * the single products do. The cache row is stored in the cache's dtype.
 */

enum { WF_NF4 = 0, WF_Q8 = 1, WF_BF16 = 2, WF_F32 = 3 }; /* weight formats */

typedef struct {    /* y = W x, W [n, k] */
  int64_t fmt, n, k;
  const void* w;      /* NF4 packed [n, k/2] | int8 blocks [n, k] | bf16 [n, k] | fp32 [n, k] */
  const float* scale; /* NF4 absmax | int8-block scales [n, k/64]; unused for bf16 and fp32 */
} kv_linear;

typedef struct {
  const float *attn_norm, *q_a_norm, *kv_a_norm, *mlp_norm; /* fp32; q_a_norm NULL without a q LoRA */
  kv_linear q_a, q, kv_a, kv_b, o;                           /* q_a.n == 0: q reads the normed input */
  const float *router, *router_bias;                         /* [E, D], [E] fp32; NULL: a dense layer */
  kv_linear gate, up, down;          /* routed experts, stacked: [E*I, D], [E*I, D], [E*D, I] */
  kv_linear mlp_gate, mlp_up, mlp_down; /* the dense MLP, or the shared experts (n == 0: none) */
} kv_layer;

typedef struct {
  int64_t n_layers, hidden, heads, nope, rope, v, rank, vocab;
  int64_t experts, top_k, n_group, topk_group, norm_topk;
  int64_t embed_fmt, cache_fmt; /* WF_BF16 | WF_F32 */
  int64_t act_bf16;             /* 1: round activations to bf16 where the torch step does */
  float eps, q_a_eps, kv_a_eps, final_eps, attn_scale, rope_mscale, route_scale;
  float dropped_group_score; /* kernels/routing.DROPPED_GROUP_SCORE: what dropped groups' experts compete with */
  const void* embed;      /* [vocab, D] */
  const float* inv_freq;  /* [rope / 2] */
  const float* final_norm;
  kv_linear head;
  const kv_layer* layers;
} kv_model;

/* ---------------------------------------------------------------- small vector steps */

#if KV_AVX512
static inline __m512 vexp16(__m512 x) { /* e^x, ~2 ulp: 2^(x log2 e) = 2^n 2^f, |f| <= 1/2 */
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147180559945309f));
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#define VEXP_W 16
static inline void vexp_block(float* v) { _mm512_storeu_ps(v, vexp16(_mm512_loadu_ps(v))); }
#elif KV_AVX2
static inline __m256 vexp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-88.0f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.693147180559945309f));
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#define VEXP_W 8
static inline void vexp_block(float* v) { _mm256_storeu_ps(v, vexp8(_mm256_loadu_ps(v))); }
#else
#define VEXP_W 1
static inline void vexp_block(float* v) { *v = expf(*v); }
#endif

/* v[i] = e^v[i] */
static void vexp(float* v, int64_t n) {
  int64_t i = 0;
  for (; i + VEXP_W <= n; i += VEXP_W) vexp_block(v + i);
  for (; i < n; i++) v[i] = expf(v[i]);
}

/* g[i] = silu(g[i]) * u[i] */
static void silu_mul(float* g, const float* u, int64_t n) {
  float e[64];
  for (int64_t i0 = 0; i0 < n; i0 += 64) {
    const int64_t c = n - i0 < 64 ? n - i0 : 64;
    for (int64_t i = 0; i < c; i++) e[i] = -g[i0 + i];
    vexp(e, c);
    for (int64_t i = 0; i < c; i++) g[i0 + i] = g[i0 + i] / (1.0f + e[i]) * u[i0 + i];
  }
}

static float dot(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
  return s;
}

static inline float bf16_to_f32(uint16_t b) {
  const uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch */
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* f rounded to bf16 when rnd (a bf16 model's activation), else f */
static inline float act(int64_t rnd, float f) { return rnd ? bf16_to_f32(f32_to_bf16(f)) : f; }

static void act_round(int64_t rnd, float* v, int64_t n) {
  if (rnd)
    for (int64_t i = 0; i < n; i++) v[i] = act(1, v[i]);
}

/* out = w * (x / rms(x)), fp32 math; with rnd the normed x and the product are rounded to bf16 (RMSNorm's
 * order in model/language.py). out may be x. */
static void rmsnorm(const float* x, const float* w, float eps, int64_t n, int64_t rnd, float* out) {
  const float r = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
  for (int64_t i = 0; i < n; i++) out[i] = act(rnd, w[i] * act(rnd, x[i] * r));
}

/* n values of a bf16 (fmt WF_BF16) or fp32 array -> fp32 */
static void load_f32(int64_t fmt, const void* src, int64_t n, float* out) {
  if (fmt == WF_F32) {
    memcpy(out, src, n * sizeof(float));
    return;
  }
  const uint16_t* s = src;
  for (int64_t i = 0; i < n; i++) out[i] = bf16_to_f32(s[i]);
}

/* Pairs (x[2j], x[2j+1]) rotated by angle j, written de-interleaved [evens | odds] (model/language.apply_rope). */
static void rope(const float* x, const float* cs, const float* sn, int64_t d, float* out) {
  for (int64_t j = 0; j < d / 2; j++) {
    const float a = x[2 * j], b = x[2 * j + 1];
    out[j] = a * cs[j] - b * sn[j];
    out[d / 2 + j] = b * cs[j] + a * sn[j];
  }
}

/* ---------------------------------------------------------------- linears by format */

/* y[i - n0] = (row row0 + i of L) . x for i in [n0, n1); x as fp32 and, for NF4 / int8 blocks, int8 blocks */
static void lin_rows(const kv_linear* L, int64_t row0, const float* x, const int8_t* xq, int64_t n0, int64_t n1,
                     float* y) {
  if (n0 >= n1) return;
  const int64_t k = L->k;
  switch (L->fmt) {
    case WF_NF4:
      q8_rows(&xq, 1, (const uint8_t*)L->w + row0 * (k / 2), L->scale + row0 * (k / BLOCK), n0, n1, k, y, 0);
      break;
    case WF_Q8:
      q8q8_rows(&xq, 1, (const int8_t*)L->w + row0 * k, L->scale + row0 * (k / BLOCK), n0, n1, k, y, 0);
      break;
    case WF_BF16:
      dense_rows(0, x, (const uint16_t*)L->w + row0 * k, n0, n1, k, y);
      break;
    default:
      dense_rows(1, x, (const float*)L->w + row0 * k, n0, n1, k, y);
  }
}

static inline int quantized(const kv_linear* L) { return L->n > 0 && (L->fmt == WF_NF4 || L->fmt == WF_Q8); }

/* Row r of L (NF4, bf16 or fp32) as fp32: the absorbed attention reads kv_b by rows. */
static void row_f32(const kv_linear* L, int64_t r, float* out) {
  const int64_t k = L->k;
  switch (L->fmt) {
    case WF_NF4: {
      const uint8_t* p = (const uint8_t*)L->w + r * (k / 2);
      const float* a = L->scale + r * (k / BLOCK);
      for (int64_t q = 0; q < k / 16; q++) dequant16(p + 8 * q, a[q / 4], out + 16 * q);
      break;
    }
    default:
      load_f32(L->fmt, (const char*)L->w + r * k * (L->fmt == WF_BF16 ? 2 : 4), k, out);
  }
}

/* The rows [lo, hi) of this thread's share of `count` linears laid end to end, all reading x. */
static void cat_rows(const kv_linear* const* L, float* const* y, int count, const float* x, const int8_t* xq) {
  int64_t total = 0, lo, hi, base = 0;
  for (int i = 0; i < count; i++) total += L[i]->n;
  share(total, NR, &lo, &hi);
  for (int i = 0; i < count; i++) {
    const int64_t a = lo > base ? lo : base, b = hi < base + L[i]->n ? hi : base + L[i]->n;
    if (a < b) lin_rows(L[i], 0, x, xq, a - base, b - base, y[i] + (a - base));
    base += L[i]->n;
  }
}

/* ---------------------------------------------------------------- the step */

typedef struct { /* scratch of one step, shared by the team */
  float *x, *xn, *qa, *q, *kva, *qcat, *scores, *olat, *attn, *y, *h, *logit_e;
  int8_t *xq, *qaq, *attnq, *hq;
  int64_t chosen[64];
  float route[64];
} kv_work;

/* The router (model/language.Router): sigmoid scores, bias-corrected group-limited top-k, weights from the
 * unbiased scores. Runs on one thread (E x D multiply-adds). */
static void route(const kv_model* m, const kv_layer* L, const float* xn, kv_work* w) {
  const int64_t E = m->experts, D = m->hidden;
  float* s = w->logit_e;  /* [E] sigmoid scores, then [E] biased choice values */
  float* c = s + E;
  for (int64_t e = 0; e < E; e++) {
    s[e] = 1.0f / (1.0f + expf(-dot(L->router + e * D, xn, D)));
    c[e] = s[e] + L->router_bias[e];
  }
  if (m->n_group > 1) { /* keep the topk_group groups with the best sums of their two best choices */
    const int64_t per = E / m->n_group;
    float gs[64];
    for (int64_t g = 0; g < m->n_group; g++) {
      float b1 = -INFINITY, b2 = -INFINITY;
      for (int64_t e = g * per; e < (g + 1) * per; e++)
        if (c[e] > b1) b2 = b1, b1 = c[e];
        else if (c[e] > b2) b2 = c[e];
      gs[g] = b1 + b2;
    }
    int keep[64] = {0};
    for (int64_t t = 0; t < m->topk_group; t++) {
      int64_t best = -1;
      for (int64_t g = 0; g < m->n_group; g++)
        if (!keep[g] && (best < 0 || gs[g] > gs[best])) best = g;
      keep[best] = 1;
    }
    for (int64_t e = 0; e < E; e++)
      if (!keep[e / per]) c[e] = m->dropped_group_score;
  }
  unsigned char taken[E];
  memset(taken, 0, E);
  float total = 0.0f;
  for (int64_t t = 0; t < m->top_k; t++) { /* the k largest choice values; ties to the lower id */
    int64_t best = -1;
    for (int64_t e = 0; e < E; e++)
      if (!taken[e] && (best < 0 || c[e] > c[best])) best = e;
    taken[best] = 1;
    w->chosen[t] = best;
    w->route[t] = s[best];
    total += s[best];
  }
  for (int64_t t = 0; t < m->top_k; t++) {
    if (m->top_k > 1 && m->norm_topk) w->route[t] /= total + 1e-20f;
    w->route[t] *= m->route_scale;
  }
}

/* Attention sublayer: x += o_proj(absorbed MLA over the cache with this token's row written at `pos`). */
static void attention(const kv_model* m, const kv_layer* L, int64_t pos, void* cache_layer, const float* cs,
                      const float* sn, kv_work* w) {
  const int64_t D = m->hidden, H = m->heads, Dn = m->nope, Dr = m->rope, Dv = m->v, R = m->rank, W = R + Dr;
  const int64_t qw = Dn + Dr, kv_len = pos + 1, rnd = m->act_bf16;
  int64_t lo, hi;
#pragma omp single
  {
    rmsnorm(w->x, L->attn_norm, m->eps, D, rnd, w->xn);
    if (quantized(&L->q) || quantized(&L->q_a) || quantized(&L->kv_a)) q8_quantize(w->xn, w->xq, D);
  }
  if (L->q_a.n) {
    const kv_linear* first[2] = {&L->q_a, &L->kv_a};
    float* out[2] = {w->qa, w->kva};
    cat_rows(first, out, 2, w->xn, w->xq);
#pragma omp barrier
#pragma omp single
    {
      act_round(rnd, w->qa, L->q_a.n);
      rmsnorm(w->qa, L->q_a_norm, m->q_a_eps, L->q_a.n, rnd, w->qa);
      if (quantized(&L->q)) q8_quantize(w->qa, w->qaq, L->q_a.n);
    }
    const kv_linear* second[1] = {&L->q};
    float* qout[1] = {w->q};
    cat_rows(second, qout, 1, w->qa, w->qaq);
  } else {
    const kv_linear* both[2] = {&L->q, &L->kv_a};
    float* out[2] = {w->q, w->kva};
    cat_rows(both, out, 2, w->xn, w->xq);
  }
#pragma omp barrier
  /* the cache row [norm(latent) | rope(k_pe)]; per head [q_nope W_uk | rope(q_pe)] */
#pragma omp single nowait
  {
    float row[W];
    act_round(rnd, w->kva, W);
    rmsnorm(w->kva, L->kv_a_norm, m->kv_a_eps, R, rnd, row);
    rope(w->kva + R, cs, sn, Dr, row + R);
    act_round(rnd, row + R, Dr);
    if (m->cache_fmt == WF_F32) memcpy((float*)cache_layer + pos * W, row, W * sizeof(float));
    else
      for (int64_t i = 0; i < W; i++) ((uint16_t*)cache_layer)[pos * W + i] = f32_to_bf16(row[i]);
  }
  share(H, 1, &lo, &hi);
  for (int64_t h = lo; h < hi; h++) {
    float* qc = w->qcat + h * W;
    float* qh = w->q + h * qw;
    float wrow[R];
    act_round(rnd, qh, qw);
    memset(qc, 0, R * sizeof(float));
    for (int64_t d = 0; d < Dn; d++) { /* q_lat = sum_d q_nope[d] * kv_b[h (Dn + Dv) + d] */
      row_f32(&L->kv_b, h * (Dn + Dv) + d, wrow);
      const float a = qh[d];
#pragma omp simd
      for (int64_t r = 0; r < R; r++) qc[r] += a * wrow[r];
    }
    rope(qh + Dn, cs, sn, Dr, qc + R);
    act_round(rnd, qc + R, Dr);
  }
#pragma omp barrier
  /* scores [H, kv_len] over the cache rows, split by slot */
  share(kv_len, 1, &lo, &hi);
  for (int64_t l = lo; l < hi; l++) {
    float row[W];
    load_f32(m->cache_fmt, (const char*)cache_layer + l * W * (m->cache_fmt == WF_F32 ? 4 : 2), W, row);
    for (int64_t h = 0; h < H; h++) w->scores[h * kv_len + l] = dot(w->qcat + h * W, row, W) * m->attn_scale;
  }
#pragma omp barrier
  share(H, 1, &lo, &hi);
  for (int64_t h = lo; h < hi; h++) { /* softmax */
    float* s = w->scores + h * kv_len;
    float mx = -INFINITY, total = 0.0f;
    for (int64_t l = 0; l < kv_len; l++) mx = s[l] > mx ? s[l] : mx;
    for (int64_t l = 0; l < kv_len; l++) s[l] -= mx;
    vexp(s, kv_len);
    for (int64_t l = 0; l < kv_len; l++) total += s[l];
    for (int64_t l = 0; l < kv_len; l++) s[l] /= total;
  }
#pragma omp barrier
  /* o_lat [H, R] = p . latents, split by latent dims (each thread reads its columns of every row) */
  share(R, 16, &lo, &hi);
  if (lo < hi) {
    float acc[H * (hi - lo)];
    memset(acc, 0, sizeof(acc));
    float row[hi - lo];
    for (int64_t l = 0; l < kv_len; l++) {
      load_f32(m->cache_fmt, (const char*)cache_layer + (l * W + lo) * (m->cache_fmt == WF_F32 ? 4 : 2), hi - lo, row);
      for (int64_t h = 0; h < H; h++) {
        const float p = w->scores[h * kv_len + l];
        float* a = acc + h * (hi - lo);
#pragma omp simd
        for (int64_t r = 0; r < hi - lo; r++) a[r] += p * row[r];
      }
    }
    for (int64_t h = 0; h < H; h++) memcpy(w->olat + h * R + lo, acc + h * (hi - lo), (hi - lo) * sizeof(float));
  }
#pragma omp barrier
  /* attn [H, Dv]: o_lat[h] . kv_b[h (Dn + Dv) + Dn + v], split by (head, v) rows; fp32 products (an int8 o_lat
   * would cost ~1% of the output per layer, the reference multiplies in fp32) */
  share(H * Dv, NR, &lo, &hi);
  for (int64_t r = lo; r < hi; r++) {
    const int64_t h = r / Dv;
    float wrow[R];
    row_f32(&L->kv_b, h * (Dn + Dv) + Dn + r % Dv, wrow);
    w->attn[r] = act(rnd, dot(wrow, w->olat + h * R, R));
  }
#pragma omp barrier
#pragma omp single
  if (quantized(&L->o)) q8_quantize(w->attn, w->attnq, H * Dv);
  share(D, NR, &lo, &hi);
  lin_rows(&L->o, 0, w->attn, w->attnq, lo, hi, w->y + lo);
  for (int64_t i = lo; i < hi; i++) w->x[i] += act(rnd, w->y[i]);
#pragma omp barrier
}

/* MLP sublayer: x += routed experts (weighted) + the dense MLP or shared experts. */
static void mlp(const kv_model* m, const kv_layer* L, kv_work* w) {
  const int64_t D = m->hidden, A = L->router ? m->top_k : 0, I = L->gate.n / (m->experts ? m->experts : 1);
  const int64_t Is = L->mlp_gate.n, hi_row = A * I + Is;
  const int64_t ib = I ? qrow_bytes(I) : 0, rnd = m->act_bf16;
  int64_t lo, hi;
#pragma omp single
  {
    rmsnorm(w->x, L->mlp_norm, m->eps, D, rnd, w->xn);
    if (quantized(&L->mlp_gate) || (A && quantized(&L->gate))) q8_quantize(w->xn, w->xq, D);
    if (A) route(m, L, w->xn, w);
  }
  /* gate/up rows of the active experts, then the dense/shared ones: h [A * I + Is] = silu(g) * u */
  share(hi_row, NR, &lo, &hi);
  for (int64_t r0 = lo; r0 < hi;) {
    const int seg = r0 < A * I ? (int)(r0 / I) : -1; /* expert slot, or -1: the dense/shared MLP */
    const int64_t seg0 = seg >= 0 ? seg * I : A * I, seg1 = seg >= 0 ? seg0 + I : hi_row;
    int64_t r1 = r0 + 64 < seg1 ? r0 + 64 : seg1;
    r1 = r1 < hi ? r1 : hi;
    float g[64], u[64];
    const kv_linear* G = seg >= 0 ? &L->gate : &L->mlp_gate;
    const kv_linear* U = seg >= 0 ? &L->up : &L->mlp_up;
    const int64_t base = seg >= 0 ? w->chosen[seg] * I : 0;
    lin_rows(G, base, w->xn, w->xq, r0 - seg0, r1 - seg0, g);
    lin_rows(U, base, w->xn, w->xq, r0 - seg0, r1 - seg0, u);
    silu_mul(g, u, r1 - r0);
    memcpy(w->h + r0, g, (r1 - r0) * sizeof(float));
    r0 = r1;
  }
#pragma omp barrier
  const int down_q = (A && quantized(&L->down)) || quantized(&L->mlp_down);
  if (down_q) {
    share(A + 1, 1, &lo, &hi);
    for (int64_t a = lo; a < hi; a++) {
      if (a < A) q8_quantize(w->h + a * I, w->hq + a * ib, I);
      else if (Is) q8_quantize(w->h + A * I, w->hq + A * ib, Is);
    }
#pragma omp barrier
  }
  /* x += routed (weighted, fp32 sum) + dense/shared; with rnd each part and their sum rounded like MoE.forward */
  share(D, NR, &lo, &hi);
  if (lo < hi) {
    float acc[hi - lo], y[hi - lo];
    memset(acc, 0, sizeof(acc));
    for (int64_t a = 0; a < A; a++) {
      lin_rows(&L->down, w->chosen[a] * D, w->h + a * I, w->hq + a * ib, lo, hi, y);
      for (int64_t i = 0; i < hi - lo; i++) acc[i] += w->route[a] * y[i];
    }
    if (Is) lin_rows(&L->mlp_down, 0, w->h + A * I, w->hq + A * ib, lo, hi, y);
    for (int64_t i = 0; i < hi - lo; i++) {
      const float routed = A ? act(rnd, acc[i]) : 0.0f;
      w->x[lo + i] += Is ? act(rnd, routed + act(rnd, y[i])) : routed;
    }
  }
#pragma omp barrier
}

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* One token at position `pos` (attending to cache slots [0, pos]) -> logits [vocab] fp32; writes the token's
 * cache rows: cache [layers][slots][rank + rope] (layer_stride elements apart), in m->cache_fmt.
 * Returns -1 if out of memory, -2 if the model is outside what this step supports, else 0. */
int kimivl_decode(const kv_model* m, int64_t token, int64_t pos, void* cache, int64_t layer_stride, float* logits) {
  const int64_t D = m->hidden, H = m->heads, R = m->rank, W = R + m->rope, kv_len = pos + 1;
  if (m->top_k > 64 || m->n_group > 64 || m->rope % 2) return -2;
  int64_t qa_n = 0, q_n = 0, inter = 0, ffn = 0;
  for (int64_t i = 0; i < m->n_layers; i++) {
    const kv_layer* L = &m->layers[i];
    qa_n = max64(qa_n, L->q_a.n);
    q_n = max64(q_n, L->q.n);
    inter = max64(inter, L->router ? m->top_k * (L->gate.n / m->experts) + L->mlp_gate.n : L->mlp_gate.n);
    ffn = max64(ffn, max64(L->mlp_gate.n, L->router ? L->gate.n / m->experts : 0));
  }
  const int64_t floats = 3 * D + qa_n + q_n + W + H * W + H * kv_len + H * R + H * m->v + inter + 2 * m->experts;
  const int64_t xb = qrow_bytes(max64(D, 64)), ab = qrow_bytes(max64(H * m->v, 64));
  const int64_t bytes = xb + ab + qrow_bytes(max64(qa_n, 64)) + (m->top_k + 1) * qrow_bytes(max64(ffn, 64));
  float* f = malloc(floats * sizeof(float));
  int8_t* b = malloc(bytes);
  if (f == NULL || b == NULL) {
    free(f), free(b);
    return -1;
  }
  kv_work w;
  w.x = f, w.xn = w.x + D, w.y = w.xn + D, w.qa = w.y + D, w.q = w.qa + qa_n, w.kva = w.q + q_n;
  w.qcat = w.kva + W, w.scores = w.qcat + H * W, w.olat = w.scores + H * kv_len, w.attn = w.olat + H * R;
  w.h = w.attn + H * m->v, w.logit_e = w.h + inter;
  w.xq = b, w.attnq = w.xq + xb, w.qaq = w.attnq + ab, w.hq = w.qaq + qrow_bytes(max64(qa_n, 64));
  float cs[m->rope / 2], sn[m->rope / 2];
  for (int64_t j = 0; j < m->rope / 2; j++) {
    const float a = (float)pos * m->inv_freq[j];
    cs[j] = cosf(a) * m->rope_mscale, sn[j] = sinf(a) * m->rope_mscale;
  }
  load_f32(m->embed_fmt, (const char*)m->embed + token * D * (m->embed_fmt == WF_F32 ? 4 : 2), D, w.x);
  const int64_t esize = m->cache_fmt == WF_F32 ? 4 : 2;
#pragma omp parallel
  {
    for (int64_t i = 0; i < m->n_layers; i++) {
      attention(m, &m->layers[i], pos, (char*)cache + i * layer_stride * esize, cs, sn, &w);
      mlp(m, &m->layers[i], &w);
    }
#pragma omp single
    {
      rmsnorm(w.x, m->final_norm, m->final_eps, D, m->act_bf16, w.xn);
      if (quantized(&m->head)) q8_quantize(w.xn, w.xq, D);
    }
    int64_t lo, hi;
    share(m->vocab, NR, &lo, &hi);
    lin_rows(&m->head, 0, w.xn, w.xq, lo, hi, logits + lo);
  }
  free(f), free(b);
  return 0;
}
