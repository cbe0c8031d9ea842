// The benchmark model (model::BenchModelOptions: hidden 1024, 64 experts top-6, as engine_bench)
// written once into the temp directory, for the benchmarks that start cluster processes.
#ifndef SPLITMOE_BENCH_BENCH_MODEL_H_
#define SPLITMOE_BENCH_BENCH_MODEL_H_

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "common/model/tiny.h"

namespace splitmoe::bench {

inline std::string BenchModelDir() {
  const std::string dir =
      (std::filesystem::temp_directory_path() / "splitmoe_cluster_bench_model").string();
  if (std::filesystem::exists(dir + "/config.json")) return dir;
  absl::Status s = model::WriteTinyModel(model::BenchModelOptions(), dir, "");
  if (!s.ok()) {
    std::fprintf(stderr, "cannot write the bench model: %s\n", s.ToString().c_str());
    std::exit(1);
  }
  return dir;
}

// build/bin/splitmoe, found from this benchmark's own path (build/bench/NAME).
inline std::string SplitmoeBinary() {
  char self[4096];
  const ssize_t len = ::readlink("/proc/self/exe", self, sizeof(self) - 1);
  return (std::filesystem::path(std::string(self, len > 0 ? static_cast<size_t>(len) : 0))
              .parent_path()
              .parent_path() /
          "bin" / "splitmoe")
      .string();
}

}  // namespace splitmoe::bench

#endif  // SPLITMOE_BENCH_BENCH_MODEL_H_
