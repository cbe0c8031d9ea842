// CUDA kernels against the CPU kernels. Without a GPU every case is skipped with the reason
// (ctest reports them as skipped, never as passed).
#include "common/kernels/cuda/cuda_ops.h"

#include <cmath>
#include <random>

#include "common/kernels/cpu_ops.h"
#include "gtest/gtest.h"

namespace splitmoe::kernels {
namespace {

class CudaOpsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<int> n = cuda::DeviceCount();
    if (!n.ok() || *n == 0) {
      GTEST_SKIP() << "no CUDA device on this machine ("
                   << (n.ok() ? "0 devices" : n.status().ToString()) << "): GPU check owed";
    }
  }
};

TEST_F(CudaOpsTest, RmsNormMatchesCpu) {
  std::mt19937 rng(7);
  std::normal_distribution<float> d;
  for (auto [rows, dim] :
       std::vector<std::pair<int64_t, int64_t>>{{1, 7168}, {33, 512}, {5, 1536}, {0, 64}}) {
    std::vector<float> x(rows * dim), w(dim), cpu(rows * dim), gpu(rows * dim, NAN);
    for (float& v : x) v = d(rng);
    for (float& v : w) v = 1.0f + 0.1f * d(rng);
    RmsNorm(x.data(), rows, dim, dim, w.data(), 1e-6f, cpu.data(), dim);
    ASSERT_TRUE(cuda::RmsNorm(x.data(), rows, dim, w.data(), 1e-6f, gpu.data()).ok());
    for (int64_t i = 0; i < rows * dim; ++i)
      ASSERT_NEAR(gpu[i], cpu[i], 1e-5f * (1 + std::fabs(cpu[i]))) << i;
  }
}

}  // namespace
}  // namespace splitmoe::kernels
