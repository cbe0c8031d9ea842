// Fuzzes config.json parsing: the input is the file's text, given to ParseModelConfig. Every
// config it accepts must serialise (ModelConfigToJson) to text it accepts again, to the same
// JSON (a fixed point), and answer the derived queries (latent_dim, SoftmaxScale, IsMoeLayer
// for every layer) without overflow.
#include <cmath>
#include <cstdint>
#include <string>

#include "common/model/config.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using splitmoe::model::ModelConfig;
  if (size > splitmoe::model::kMaxConfigJsonBytes) return -1;  // what LoadModelConfig refuses
  const std::string text(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<ModelConfig> config = splitmoe::model::ParseModelConfig(text, "fuzz/config.json");
  if (!config.ok()) {
    FUZZ_CHECK(!config.status().message().empty(), "an error without a message");
    return 0;
  }
  const ModelConfig& c = *config;
  FUZZ_CHECK(c.num_hidden_layers > 0 && c.num_hidden_layers <= 1024,
             "num_hidden_layers " << c.num_hidden_layers);
  int64_t moe_layers = 0;
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) moe_layers += c.IsMoeLayer(layer);
  (void)moe_layers;
  (void)c.UsesGroups();
  (void)c.HasScoreBias();
  FUZZ_CHECK(c.latent_dim() > 0 && c.qk_head_dim() > 0,
             "latent_dim " << c.latent_dim() << " qk_head_dim " << c.qk_head_dim());
  const double scale = c.SoftmaxScale();
  FUZZ_CHECK(std::isfinite(scale) && scale > 0, "SoftmaxScale " << scale);

  const std::string json = splitmoe::model::ModelConfigToJson(c);
  absl::StatusOr<ModelConfig> again = splitmoe::model::ParseModelConfig(json, "round trip");
  FUZZ_CHECK(again.ok(), "an accepted config does not round-trip: " << again.status() << "\n"
                                                                    << json);
  const std::string json2 = splitmoe::model::ModelConfigToJson(*again);
  FUZZ_CHECK(json2 == json, "round trip changed the config:\n" << json << "\n" << json2);
  return 0;
}
