// GPU figures against the device's own measured ceilings, in one run (scripts/gpu-check.sh):
//   HBM bandwidth       a large device-to-device copy (bytes read + written) — the memory ceiling
//   BF16 GEMM peak      cuBLAS 8192^3 — the matrix ceiling
//   GEMMs               DeepSeek-V3 projection shapes, as a fraction of that peak
//   MLA decode          absorbed attention over the paged BF16 latent cache (128 heads, 576
//                       values/token), as a fraction of the HBM ceiling (FlashMLA reaches ~80%+
//                       on H800 at long contexts)
// Timed with CUDA events after warm-up; median of 20 runs; inputs random (never zeros) and
// rotated where they would fit in L2. Prints a markdown table. Exits 1 without a GPU.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <random>
#include <vector>

#include "common/kernels/cuda/cuda_ops.h"

namespace {

#define CHECK_CUDA(expr)                                                              \
  do {                                                                                \
    cudaError_t e_ = (expr);                                                          \
    if (e_ != cudaSuccess) {                                                          \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

void CheckOk(const absl::Status& s) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    std::exit(1);
  }
}

// Median milliseconds of `fn` over `reps` runs after `warm` runs, timed with events.
double MedianMs(const std::function<void(int)>& fn, int warm = 3, int reps = 20) {
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  for (int i = 0; i < warm; ++i) fn(i);
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    CHECK_CUDA(cudaEventRecord(a));
    fn(i);
    CHECK_CUDA(cudaEventRecord(b));
    CHECK_CUDA(cudaEventSynchronize(b));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  CHECK_CUDA(cudaGetLastError());
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Random bf16 in device memory (filled on the device from random fp32).
__nv_bfloat16* RandomBf16(size_t n, std::mt19937& rng, float scale) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> host(std::min<size_t>(n, 1 << 24));
  for (float& v : host) v = d(rng);
  float* staging;
  __nv_bfloat16* out;
  CHECK_CUDA(cudaMalloc(&staging, host.size() * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&out, n * sizeof(__nv_bfloat16)));
  CHECK_CUDA(cudaMemcpy(staging, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice));
  for (size_t off = 0; off < n; off += host.size()) {
    CheckOk(splitmoe::kernels::cuda::ToBf16Device(
        staging, static_cast<int64_t>(std::min(host.size(), n - off)), out + off, nullptr));
  }
  CHECK_CUDA(cudaFree(staging));
  return out;
}

}  // namespace

int main() {
  using namespace splitmoe::kernels::cuda;
  absl::StatusOr<int> n = DeviceCount();
  if (!n.ok() || *n == 0) {
    std::fprintf(stderr, "no CUDA device: nothing to measure\n");
    return 1;
  }
  std::printf("device: %s\n", DeviceName(0)->c_str());
  std::mt19937 rng(1);

  // HBM ceiling: 4 GiB device-to-device copy, bytes read + written.
  const size_t copy_bytes = size_t{4} << 30;
  void *src, *dst;
  CHECK_CUDA(cudaMalloc(&src, copy_bytes));
  CHECK_CUDA(cudaMalloc(&dst, copy_bytes));
  CHECK_CUDA(cudaMemset(src, 0x5A, copy_bytes));
  const double copy_ms =
      MedianMs([&](int) { CHECK_CUDA(cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice)); });
  const double hbm_gbs = 2.0 * copy_bytes / (copy_ms * 1e-3) / 1e9;
  CHECK_CUDA(cudaFree(src));
  CHECK_CUDA(cudaFree(dst));

  cublasHandle_t blas;
  if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) return 1;
  auto gemm_tflops = [&](int64_t m, int64_t k, int64_t nn) {
    // Enough weight copies that they do not all sit in L2 (50 MB) between runs.
    const int copies = std::max<int64_t>(1, std::min<int64_t>(8, (256ll << 20) / (nn * k * 2) + 1));
    std::vector<__nv_bfloat16*> ws;
    for (int i = 0; i < copies; ++i) ws.push_back(RandomBf16(nn * k, rng, 0.02f));
    __nv_bfloat16* x = RandomBf16(m * k, rng, 1.0f);
    float* y;
    CHECK_CUDA(cudaMalloc(&y, m * nn * sizeof(float)));
    const double ms =
        MedianMs([&](int i) { CheckOk(GemmBf16(blas, x, m, k, ws[i % copies], nn, y)); });
    for (auto* w : ws) CHECK_CUDA(cudaFree(w));
    CHECK_CUDA(cudaFree(x));
    CHECK_CUDA(cudaFree(y));
    return 2.0 * m * k * nn / (ms * 1e-3) / 1e12;
  };
  const double peak = gemm_tflops(8192, 8192, 8192);

  std::printf("\n| measurement | figure | fraction of ceiling |\n|---|---|---|\n");
  std::printf("| HBM copy (ceiling) | %.0f GB/s | 1.00 |\n", hbm_gbs);
  std::printf("| cuBLAS BF16 GEMM 8192^3 (ceiling) | %.1f TFLOP/s | 1.00 |\n", peak);
  struct Shape {
    const char* what;
    int64_t m, k, n;
  };
  for (const Shape& s : std::vector<Shape>{{"q_b_proj, decode batch 64", 64, 1536, 24576},
                                           {"o_proj, decode batch 64", 64, 16384, 7168},
                                           {"dense up+gate, prefill 4096", 4096, 7168, 36864},
                                           {"expert gate_up, 256 tokens", 256, 7168, 4096}}) {
    const double tf = gemm_tflops(s.m, s.k, s.n);
    std::printf("| GEMM %s (%ldx%ldx%ld) | %.1f TFLOP/s | %.2f |\n", s.what, static_cast<long>(s.m),
                static_cast<long>(s.k), static_cast<long>(s.n), tf, tf / peak);
  }

  // MLA decode: every sequence at the same context; bytes = the cache rows read once.
  int sms = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  for (int batch : {32, 128}) {
    for (int ctx : {1024, 4096, 16384}) {
      MlaShape s;
      s.batch = batch;
      s.heads = 128;
      s.block_tokens = 64;
      s.max_blocks = (ctx + 63) / 64;
      // Enough CTAs for two waves: batch x 16 head groups x splits.
      s.splits = std::max(1, std::min(64, 2 * sms / (batch * 16) + 1));
      const int64_t blocks = static_cast<int64_t>(batch) * s.max_blocks;
      __nv_bfloat16* cache = RandomBf16(blocks * 64 * 576, rng, 1.0f);
      std::vector<int32_t> table(blocks), lens(batch, ctx);
      for (int64_t i = 0; i < blocks; ++i) table[i] = static_cast<int32_t>(i);
      std::shuffle(table.begin(), table.end(), rng);
      int32_t *dtable, *dlens;
      float *q, *ws, *out;
      CHECK_CUDA(cudaMalloc(&dtable, blocks * sizeof(int32_t)));
      CHECK_CUDA(cudaMalloc(&dlens, batch * sizeof(int32_t)));
      CHECK_CUDA(cudaMemcpy(dtable, table.data(), blocks * sizeof(int32_t), cudaMemcpyHostToDevice));
      CHECK_CUDA(cudaMemcpy(dlens, lens.data(), batch * sizeof(int32_t), cudaMemcpyHostToDevice));
      CHECK_CUDA(cudaMalloc(&q, static_cast<size_t>(batch) * 128 * 576 * sizeof(float)));
      CHECK_CUDA(cudaMemset(q, 0x3C, static_cast<size_t>(batch) * 128 * 576 * sizeof(float)));
      CHECK_CUDA(cudaMalloc(&ws, MlaWorkspaceFloats(s) * sizeof(float)));
      CHECK_CUDA(cudaMalloc(&out, static_cast<size_t>(batch) * 128 * 512 * sizeof(float)));
      const double ms = MedianMs([&](int) {
        CheckOk(MlaDecodeDevice(q, cache, dtable, dlens, s, 0.07f, ws, out, nullptr));
      });
      const double bytes = static_cast<double>(batch) * ctx * 576 * 2;
      const double gbs = bytes / (ms * 1e-3) / 1e9;
      std::printf("| MLA decode batch %d context %d (%d splits) | %.3f ms, %.0f GB/s | %.2f |\n",
                  batch, ctx, s.splits, ms, gbs, gbs / hbm_gbs);
      for (void* p : {static_cast<void*>(cache), static_cast<void*>(dtable),
                      static_cast<void*>(dlens), static_cast<void*>(q), static_cast<void*>(ws),
                      static_cast<void*>(out)}) {
        CHECK_CUDA(cudaFree(p));
      }
    }
  }
  cublasDestroy(blas);
  return 0;
}
