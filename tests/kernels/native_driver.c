/* Runs the CPU kernels of one build on inputs from a file, for builds this machine cannot load (an aarch64
 * cross build under qemu-user): tests/kernels/test_native.py writes the inputs, compiles this driver with
 * kimivl_cli/kernels/cpu_kernels.c for the target, runs it and compares the outputs with the host's.
 *
 *   driver IN OUT     IN: int64 m, n, k, e, h, i, a, then the arrays read below, in order; OUT: the results.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

const char* kimivl_variant(void);
int nf4_q8_matmul(const float*, const uint8_t*, const float*, float*, int64_t, int64_t, int64_t);
int q8_q8_matmul(const float*, const int8_t*, const float*, float*, int64_t, int64_t, int64_t);
void nf4_dequantize(const uint8_t*, const float*, void*, int64_t, int64_t, int);
int nf4_moe(const float*, const int64_t*, const float*, int64_t, int64_t, int64_t, const uint8_t*, const float*,
            const uint8_t*, const float*, const uint8_t*, const float*, int64_t, int64_t, float*);
int nf4_moe_decode(const float*, const int64_t*, const float*, int64_t, const uint8_t*, const float*, const uint8_t*,
                   const float*, const uint8_t*, const float*, int64_t, int64_t, float*);
void bf16_matvec(const float*, const uint16_t*, float*, int64_t, int64_t);
int bf16_moe_decode(const float*, const int64_t*, const float*, int64_t, const uint16_t*, const uint16_t*,
                    const uint16_t*, int64_t, int64_t, float*);
int bf16_moe(const float*, const int64_t*, const float*, int64_t, int64_t, int64_t, const uint16_t*, const uint16_t*,
             const uint16_t*, int64_t, int64_t, float*);
int nf4_bf16_moe(const float*, const int64_t*, const float*, int64_t, int64_t, int64_t, const uint8_t*, const float*,
                 const uint8_t*, const float*, const uint8_t*, const float*, int64_t, int64_t, float*);
int nf4_bf16_matmul(const float*, const uint8_t*, const float*, float*, int64_t, int64_t, int64_t);

static FILE* in;

static void* take(size_t bytes) {
  void* p = malloc(bytes);
  if (p == NULL || fread(p, 1, bytes, in) != bytes) exit(3);
  return p;
}

static void put(FILE* out, const void* p, size_t bytes) {
  if (fwrite(p, 1, bytes, out) != bytes) exit(4);
}

int main(int argc, char** argv) {
  if (argc != 3 || (in = fopen(argv[1], "rb")) == NULL) return 2;
  const int64_t* dims = take(7 * sizeof(int64_t));
  const int64_t m = dims[0], n = dims[1], k = dims[2], e = dims[3], h = dims[4], i = dims[5], a = dims[6];
  const float* x = take(m * k * 4);
  const uint8_t* packed = take(n * k / 2);
  const float* absmax = take(n * k / 64 * 4);
  const int8_t* wq = take(n * k);
  const float* wscale = take(n * k / 64 * 4);
  const uint16_t* wb = take(n * k * 2);
  const float* xm = take(m * h * 4);
  const int64_t* idx = take(m * a * 8);
  const float* rw = take(m * a * 4);
  const uint8_t* gp = take(e * i * h / 2);
  const float* ga = take(e * i * h / 64 * 4);
  const uint8_t* up = take(e * i * h / 2);
  const float* ua = take(e * i * h / 64 * 4);
  const uint8_t* dp = take(e * h * i / 2);
  const float* da = take(e * h * i / 64 * 4);
  const uint16_t* gb = take(e * i * h * 2);
  const uint16_t* ub = take(e * i * h * 2);
  const uint16_t* db = take(e * h * i * 2);
  FILE* out = fopen(argv[2], "wb");
  if (out == NULL) return 2;
  float* y = malloc((m * n > m * h ? m * n : m * h) * 4);
  float* w = malloc(n * k * 4);
  if (y == NULL || w == NULL) return 3;
  const char* variant = kimivl_variant();
  fprintf(out, "%-16s", variant);
  if (nf4_q8_matmul(x, packed, absmax, y, m, n, k)) return 5;
  put(out, y, m * n * 4);
  if (q8_q8_matmul(x, wq, wscale, y, m, n, k)) return 5;
  put(out, y, m * n * 4);
  nf4_dequantize(packed, absmax, w, n, k, 0);
  put(out, w, n * k * 4);
  bf16_matvec(x, wb, y, n, k);
  put(out, y, n * 4);
  if (nf4_moe(xm, idx, rw, m, a, e, gp, ga, up, ua, dp, da, h, i, y)) return 5;
  put(out, y, m * h * 4);
  if (nf4_moe_decode(xm, idx, rw, a, gp, ga, up, ua, dp, da, h, i, y)) return 5;
  put(out, y, h * 4);
  if (bf16_moe_decode(xm, idx, rw, a, gb, ub, db, h, i, y)) return 5;
  put(out, y, h * 4);
  if (bf16_moe(xm, idx, rw, m, a, e, gb, ub, db, h, i, y)) return 5;
  put(out, y, m * h * 4);
  if (nf4_bf16_moe(xm, idx, rw, m, a, e, gp, ga, up, ua, dp, da, h, i, y)) return 5;
  put(out, y, m * h * 4);
  if (nf4_bf16_matmul(x, packed, absmax, y, m, n, k)) return 5;
  put(out, y, m * n * 4);
  return fclose(out) == 0 ? 0 : 4;
}
