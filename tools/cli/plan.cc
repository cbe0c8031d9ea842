#include "tools/cli/plan.h"

#include <cstdio>
#include <iostream>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/base/file.h"
#include "common/base/status_macros.h"
#include "common/model/config.h"
#include "common/plan/capacity.h"
#include "nlohmann/json.hpp"
#include "tools/cli/flags.h"

namespace splitmoe::cli {
namespace {

constexpr uint64_t kMaxJsonBytes = 1 << 20;

nlohmann::json ToJson(const plan::Deployment& d, const plan::Prediction& p) {
  return {{"deployment",
           {{"prefill", d.prefill},
            {"decode", d.decode},
            {"expert_pools", d.expert_pools},
            {"replicas", d.replicas},
            {"devices", d.devices()},
            {"decode_batch", d.decode_batch},
            {"micro_batches", d.micro_batches},
            {"max_devices", d.max_devices},
            {"prompt_tokens", d.prompt_tokens},
            {"output_tokens", d.output_tokens}}},
          {"ttft_ms", p.ttft_s * 1e3},
          {"tpot_ms", p.tpot_s * 1e3},
          {"output_tokens_per_s", p.decode_tokens_per_s},
          {"tokens_per_s_per_device", p.tokens_per_s_per_device},
          {"prefill_tokens_per_s", p.prefill_tokens_per_s},
          {"step_ms", {{"attention", p.attention_s * 1e3}, {"experts", p.experts_s * 1e3},
                       {"network", p.network_s * 1e3}}},
          {"limit", p.limit},
          {"memory_gb", {{"decode_device", p.memory_per_decode_device / 1e9},
                         {"expert_device", p.memory_per_expert_device / 1e9}}},
          {"fits", p.fits}};
}

void PrintText(const plan::Deployment& d, const plan::Prediction& p) {
  std::printf("%lld prefill + %lld decode + %lld pools x %lld replicas = %lld devices, batch %lld"
              " per decode device%s\n",
              static_cast<long long>(d.prefill), static_cast<long long>(d.decode),
              static_cast<long long>(d.expert_pools), static_cast<long long>(d.replicas),
              static_cast<long long>(d.devices()), static_cast<long long>(d.decode_batch),
              d.micro_batches >= 2 ? ", 2 micro-batches" : "");
  std::printf("  TTFT %.1f ms  TPOT %.2f ms  output %.0f tokens/s  %.1f tokens/s per device  "
              "(limit: %s%s)\n",
              p.ttft_s * 1e3, p.tpot_s * 1e3, p.decode_tokens_per_s, p.tokens_per_s_per_device,
              p.limit.c_str(), p.fits ? "" : "; DOES NOT FIT in memory");
  std::printf("  decode step: attention %.2f ms, experts %.2f ms, network %.2f ms; memory %.1f GB "
              "per decode device, %.1f GB per expert device\n",
              p.attention_s * 1e3, p.experts_s * 1e3, p.network_s * 1e3,
              p.memory_per_decode_device / 1e9, p.memory_per_expert_device / 1e9);
}

}  // namespace

absl::Status PlanCommand(int argc, char** argv) {
  Flags f;
  SPLITMOE_RETURN_IF_ERROR(f.Parse(
      argc, argv, 2,
      {"model", "config", "hardware", "prefill", "decode", "experts", "expert-replicas",
       "micro-batches", "max-devices", "batch", "prompt-tokens", "output-tokens",
       "target-tpot-ms", "devices", "top"},
      {"json"}));
  if (f.Has("model") == f.Has("config") || !f.Has("hardware")) {
    return absl::InvalidArgumentError(
        "plan needs --model DIR (its config.json) or --config FILE, and --hardware FILE");
  }
  const std::string config_path =
      f.Has("model") ? f.Get("model") + "/config.json" : f.Get("config");
  SPLITMOE_ASSIGN_OR_RETURN(std::string config_text, ReadRegularFile(config_path, kMaxJsonBytes));
  SPLITMOE_ASSIGN_OR_RETURN(model::ModelConfig config,
                            model::ParseModelConfig(config_text, config_path));
  SPLITMOE_ASSIGN_OR_RETURN(std::string hw_text, ReadRegularFile(f.Get("hardware"), kMaxJsonBytes));
  SPLITMOE_ASSIGN_OR_RETURN(plan::Hardware hw, plan::ParseHardware(hw_text, f.Get("hardware")));
  plan::Deployment d;
  SPLITMOE_ASSIGN_OR_RETURN(d.prefill, f.GetInt("prefill", 1));
  SPLITMOE_ASSIGN_OR_RETURN(d.decode, f.GetInt("decode", 1));
  SPLITMOE_ASSIGN_OR_RETURN(d.expert_pools, f.GetInt("experts", 1));
  SPLITMOE_ASSIGN_OR_RETURN(d.replicas, f.GetInt("expert-replicas", 1));
  SPLITMOE_ASSIGN_OR_RETURN(d.micro_batches, f.GetInt("micro-batches", 1));
  SPLITMOE_ASSIGN_OR_RETURN(d.max_devices, f.GetInt("max-devices", 0));
  SPLITMOE_ASSIGN_OR_RETURN(d.decode_batch, f.GetInt("batch", 1));
  SPLITMOE_ASSIGN_OR_RETURN(d.prompt_tokens, f.GetInt("prompt-tokens", 1024));
  SPLITMOE_ASSIGN_OR_RETURN(d.output_tokens, f.GetInt("output-tokens", 256));
  if (d.prefill < 1 || d.decode < 1 || d.expert_pools < 1 || d.replicas < 1 ||
      d.decode_batch < 1 || d.prompt_tokens < 1 || d.output_tokens < 1 || d.max_devices < 0 ||
      (d.micro_batches != 1 && d.micro_batches != 2)) {
    return absl::InvalidArgumentError(
        "plan: --prefill, --decode, --experts, --expert-replicas, --batch, --prompt-tokens and "
        "--output-tokens must be >= 1, --micro-batches 1 or 2, --max-devices >= 0");
  }
  if (config.n_routed_experts > 0 && config.n_routed_experts % d.expert_pools != 0) {
    return absl::InvalidArgumentError(absl::StrCat("plan: ", config.n_routed_experts,
                                                   " routed experts do not split into ",
                                                   d.expert_pools, " pools"));
  }
  const plan::Prediction p = plan::Predict(config, hw, d);
  nlohmann::json out = {{"hardware", hw.name}, {"prediction", ToJson(d, p)}};
  const bool search = f.Has("target-tpot-ms");
  if (search) {
    SPLITMOE_ASSIGN_OR_RETURN(double target_ms, f.GetDouble("target-tpot-ms", 50));
    SPLITMOE_ASSIGN_OR_RETURN(int64_t devices, f.GetInt("devices", 32));
    SPLITMOE_ASSIGN_OR_RETURN(int64_t top, f.GetInt("top", 5));
    // The search tries every split (and batch): exhaustive, so bounded.
    if (!(target_ms > 0) || devices < 3 || devices > 256 || top < 1) {
      return absl::InvalidArgumentError(
          "plan: --target-tpot-ms > 0, --devices in [3, 256], --top >= 1");
    }
    nlohmann::json best = nlohmann::json::array();
    const auto splits =
        plan::BestSplits(config, hw, devices, target_ms / 1e3, d, static_cast<size_t>(top));
    if (!f.Has("json") && !splits.empty()) {
      std::printf("the best splits of %lld devices within TPOT %.1f ms (%lld + %lld tokens):\n",
                  static_cast<long long>(devices), target_ms,
                  static_cast<long long>(d.prompt_tokens), static_cast<long long>(d.output_tokens));
    }
    for (const auto& [bd, bp] : splits) {
      best.push_back(ToJson(bd, bp));
      if (!f.Has("json")) PrintText(bd, bp);
    }
    out["best"] = best;
    if (best.empty() && !f.Has("json")) {
      std::printf("no split of %lld devices meets TPOT %.1f ms\n", static_cast<long long>(devices),
                  target_ms);
    }
  }
  if (f.Has("json")) {
    std::cout << out.dump(2) << "\n";
  } else if (!search) {
    PrintText(d, p);
  }
  return absl::OkStatus();
}

}  // namespace splitmoe::cli
