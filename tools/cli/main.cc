// `splitmoe`: the command-line entry point (`splitmoe help` lists every subcommand).
//   single process:  make-tiny, inspect, score, generate
//   cluster roles:   router, prefill, decode, expert (long-running; SIGINT/SIGTERM stop them)
//   cluster tools:   up (a local cluster of child processes), status, and score/generate with
//                    --endpoint HOST:PORT instead of --model (same flags, same JSON)
// Errors print one line "error: <message>" on stderr and exit 1 (2 for usage errors).
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <filesystem>
#include <iostream>
#include <map>
#include <set>
#include <vector>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/base/log.h"
#include "common/base/status_macros.h"
#include "common/engine/engine.h"
#include "common/model/checkpoint.h"
#include "common/model/tiny.h"
#include "common/model/weights.h"
#include "common/process/signals.h"
#include "common/rpc/rpc.h"
#include "common/rpc/security.h"
#include "common/kernels/ops.h"
#include "expert_service/run_expert.h"
#ifdef SPLITMOE_HAVE_CUDA
#include "expert_service/cuda/gpu_experts.h"
#endif
#include "google/protobuf/util/json_util.h"
#include "nlohmann/json.hpp"
#include "router/run_router.h"
#include "splitmoe/v1/internal.grpc.pb.h"
#include "tools/cli/bench.h"
#include "tools/cli/cluster.h"
#include "tools/cli/flags.h"
#include "tools/cli/generate_common.h"
#include "tools/cli/plan.h"

namespace splitmoe::cli {
namespace {

using nlohmann::json;

std::string DefaultTokenizerDir() {
  if (const char* env = std::getenv("SPLITMOE_TOKENIZER_DIR")) return env;
  return SPLITMOE_DEFAULT_TOKENIZER_DIR;
}

absl::Status MakeTiny(int argc, char** argv) {
  Flags f;
  SPLITMOE_RETURN_IF_ERROR(f.Parse(argc, argv, 2,
                                   {"out",
                                    "style",
                                    "seed",
                                    "mtp",
                                    "shards",
                                    "vocab",
                                    "hidden",
                                    "layers",
                                    "dense-layers",
                                    "heads",
                                    "q-lora-rank",
                                    "kv-lora-rank",
                                    "qk-nope-head-dim",
                                    "qk-rope-head-dim",
                                    "v-head-dim",
                                    "inter",
                                    "moe-inter",
                                    "experts",
                                    "shared-experts",
                                    "experts-per-tok",
                                    "groups",
                                    "topk-groups",
                                    "max-position",
                                    "tokenizer-dir",
                                    "logit-scale",
                                    "mtp-draft",
                                    "expert-skew"},
                                   {"fp8", "no-tokenizer"}));
  if (!f.Has("out")) return absl::InvalidArgumentError("make-tiny needs --out DIR");
  model::TinyModelOptions o;
  o.style = f.Get("style", "v3");
  o.fp8 = f.Has("fp8");
  SPLITMOE_ASSIGN_OR_RETURN(int64_t seed, f.GetInt("seed", 1));
  o.seed = static_cast<uint64_t>(seed);
  SPLITMOE_ASSIGN_OR_RETURN(o.mtp_layers, f.GetInt("mtp", -1));
  SPLITMOE_ASSIGN_OR_RETURN(o.shards, f.GetInt("shards", 1));
  SPLITMOE_ASSIGN_OR_RETURN(o.vocab_size, f.GetInt("vocab", o.vocab_size));
  SPLITMOE_ASSIGN_OR_RETURN(o.hidden_size, f.GetInt("hidden", 0));
  SPLITMOE_ASSIGN_OR_RETURN(o.num_hidden_layers, f.GetInt("layers", 0));
  SPLITMOE_ASSIGN_OR_RETURN(o.first_k_dense_replace, f.GetInt("dense-layers", -1));
  SPLITMOE_ASSIGN_OR_RETURN(o.num_attention_heads, f.GetInt("heads", 0));
  SPLITMOE_ASSIGN_OR_RETURN(o.q_lora_rank, f.GetInt("q-lora-rank", -1));
  SPLITMOE_ASSIGN_OR_RETURN(o.kv_lora_rank, f.GetInt("kv-lora-rank", 0));
  SPLITMOE_ASSIGN_OR_RETURN(o.qk_nope_head_dim, f.GetInt("qk-nope-head-dim", 0));
  SPLITMOE_ASSIGN_OR_RETURN(o.qk_rope_head_dim, f.GetInt("qk-rope-head-dim", 0));
  SPLITMOE_ASSIGN_OR_RETURN(o.v_head_dim, f.GetInt("v-head-dim", 0));
  SPLITMOE_ASSIGN_OR_RETURN(o.intermediate_size, f.GetInt("inter", 0));
  SPLITMOE_ASSIGN_OR_RETURN(o.moe_intermediate_size, f.GetInt("moe-inter", 0));
  SPLITMOE_ASSIGN_OR_RETURN(o.n_routed_experts, f.GetInt("experts", 0));
  SPLITMOE_ASSIGN_OR_RETURN(o.n_shared_experts, f.GetInt("shared-experts", -1));
  SPLITMOE_ASSIGN_OR_RETURN(o.num_experts_per_tok, f.GetInt("experts-per-tok", 0));
  SPLITMOE_ASSIGN_OR_RETURN(o.n_group, f.GetInt("groups", 0));
  SPLITMOE_ASSIGN_OR_RETURN(o.topk_group, f.GetInt("topk-groups", 0));
  SPLITMOE_ASSIGN_OR_RETURN(o.max_position_embeddings, f.GetInt("max-position", 0));
  SPLITMOE_ASSIGN_OR_RETURN(o.logit_scale, f.GetDouble("logit-scale", o.logit_scale));
  o.mtp_draft = f.Get("mtp-draft", o.mtp_draft);
  SPLITMOE_ASSIGN_OR_RETURN(o.expert_skew, f.GetDouble("expert-skew", 0.0));
  // DeepSeek-V3's tokenizer has 128818 ids: a model with a smaller vocabulary gets none (unless a
  // tokenizer is named explicitly), so no encoded prompt can hold an id the model lacks.
  constexpr int64_t kDeepSeekV3TokenizerIds = 128818;
  std::string tokenizer_dir;
  if (f.Has("tokenizer-dir")) {
    tokenizer_dir = f.Get("tokenizer-dir");
  } else if (!f.Has("no-tokenizer") && o.vocab_size >= kDeepSeekV3TokenizerIds) {
    tokenizer_dir = DefaultTokenizerDir();
  }
  SPLITMOE_RETURN_IF_ERROR(model::WriteTinyModel(o, f.Get("out"), tokenizer_dir));
  std::cout << "wrote " << f.Get("out") << "\n";
  return absl::OkStatus();
}

absl::Status Inspect(int argc, char** argv) {
  Flags f;
  SPLITMOE_RETURN_IF_ERROR(f.Parse(argc, argv, 2, {"model", "weights"}, {"json"}));
  if (!f.Has("model")) return absl::InvalidArgumentError("inspect needs --model DIR");
  SPLITMOE_ASSIGN_OR_RETURN(auto ckpt, model::Checkpoint::Open(f.Get("model")));
  const model::ModelConfig& c = ckpt->config();
  // Validates every tensor by loading the model once (this is also what a server does at start),
  // holding the weights as a server would (--weights).
  model::LoadOptions load;
  SPLITMOE_ASSIGN_OR_RETURN(load.resident, model::ParseResidentDType(f.Get("weights", "checkpoint")));
  SPLITMOE_ASSIGN_OR_RETURN(model::ModelWeights w, model::LoadWeights(*ckpt, load));
  // What the weights occupy on disk: the safetensors files' sizes.
  uint64_t checkpoint_bytes = 0;
  SPLITMOE_ASSIGN_OR_RETURN(std::vector<std::string> files, model::WeightFileNames(ckpt->dir()));
  for (const std::string& name : files) {
    std::error_code error;
    checkpoint_bytes += std::filesystem::file_size(ckpt->dir() + "/" + name, error);
  }
  int64_t moe_layers = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) moe_layers += c.IsMoeLayer(l) ? 1 : 0;
  uint64_t expert_bytes = 0;
  for (const auto& layer : w.layers)
    for (const auto& e : layer.experts) expert_bytes += e ? e->bytes() : 0;
  json out = {
      {"model_dir", ckpt->dir()},
      {"config", json::parse(model::ModelConfigToJson(c))},
      {"tensors", ckpt->tensor_names().size()},
      {"checkpoint_bytes", checkpoint_bytes},
      {"checkpoint_bytes_read", ckpt->bytes_read()},
      {"weights", f.Get("weights", "checkpoint")},
      {"resident_bytes", w.bytes()},
      {"resident_to_checkpoint", checkpoint_bytes ? static_cast<double>(w.bytes()) /
                                                        static_cast<double>(checkpoint_bytes)
                                                  : 0.0},
      {"routed_expert_bytes", expert_bytes},
      {"attention_side_bytes", w.bytes() - expert_bytes},
      {"moe_layers", moe_layers},
      {"dense_layers", c.num_hidden_layers - moe_layers},
      {"mtp_modules_loaded", w.mtp.size()},
      {"latent_values_per_token_per_layer", c.latent_dim()},
      {"latent_cache_bytes_per_token_fp32", c.latent_dim() * c.num_hidden_layers * 4},
      {"latent_cache_bytes_per_token_bf16", c.latent_dim() * c.num_hidden_layers * 2},
      {"softmax_scale", c.SoftmaxScale()},
  };
  if (f.Has("json")) {
    std::cout << out.dump(2) << "\n";
    return absl::OkStatus();
  }
  std::cout << "model: " << ckpt->dir() << "\n"
            << "  layers " << c.num_hidden_layers << " (" << c.first_k_dense_replace
            << " dense first, " << moe_layers << " MoE), hidden " << c.hidden_size << ", heads "
            << c.num_attention_heads << ", vocab " << c.vocab_size << "\n"
            << "  MLA: q_lora_rank " << (c.q_lora_rank ? std::to_string(c.q_lora_rank) : "null")
            << ", kv_lora_rank " << c.kv_lora_rank << ", qk_nope " << c.qk_nope_head_dim
            << ", qk_rope " << c.qk_rope_head_dim << ", v " << c.v_head_dim << ", yarn "
            << (c.yarn.enabled ? "on" : "off") << " (factor " << c.yarn.factor << ")\n"
            << "  MoE: " << c.n_routed_experts << " routed + " << c.n_shared_experts
            << " shared, top-" << c.num_experts_per_tok << ", "
            << model::ScoringFuncName(c.scoring_func) << " / "
            << model::TopkMethodName(c.topk_method) << ", groups " << c.n_group << " keep "
            << c.topk_group << ", norm_topk_prob " << (c.norm_topk_prob ? "true" : "false")
            << ", scale " << c.routed_scaling_factor << "\n"
            << "  MTP modules: " << w.mtp.size() << " (config: " << c.num_nextn_predict_layers
            << ")\n"
            << "  tensors: " << ckpt->tensor_names().size() << ", checkpoint bytes "
            << checkpoint_bytes << ", resident bytes (" << f.Get("weights", "checkpoint")
            << ") " << w.bytes() << " (routed experts " << expert_bytes << ")\n"
            << "  latent cache: " << c.latent_dim()
            << " values per token per layer = " << c.latent_dim() * c.num_hidden_layers * 2
            << " bytes/token in bf16, " << c.latent_dim() * c.num_hidden_layers * 4 << " in fp32\n";
  return absl::OkStatus();
}

absl::Status Score(int argc, char** argv) {
  Flags f;
  SPLITMOE_RETURN_IF_ERROR(
      f.Parse(argc, argv, 2,
              {"model", "endpoint", "prompt", "prompt-tokens", "top-logprobs", "attention",
               "api-key", "weights"},
              {"json", "mtp"}));
  if (f.Has("endpoint") && !f.Has("model")) return ScoreRemote(f);
  if (f.Has("model") == f.Has("endpoint")) {
    return absl::InvalidArgumentError("score needs --model DIR or --endpoint HOST:PORT");
  }
  engine::EngineOptions options;
  SPLITMOE_ASSIGN_OR_RETURN(options.prefill_form, AttentionFormFromFlags(f));
  SPLITMOE_ASSIGN_OR_RETURN(options.weights,
                            model::ParseResidentDType(f.Get("weights", "checkpoint")));
  SPLITMOE_ASSIGN_OR_RETURN(auto eng, engine::Engine::Load(f.Get("model"), options));
  SPLITMOE_ASSIGN_OR_RETURN(std::vector<int32_t> tokens, PromptTokens(f, eng->tokenizer()));
  SPLITMOE_ASSIGN_OR_RETURN(int64_t k, f.GetInt("top-logprobs", 5));
  if (k < 0 || k > 100) return absl::InvalidArgumentError("--top-logprobs must be in [0, 100]");
  SPLITMOE_ASSIGN_OR_RETURN(engine::ScoreResult r, eng->Score(tokens, k, f.Has("mtp")));
  json lps = json::array();
  for (const auto& lp : r.prompt_logprobs) lps.push_back(lp ? LogprobJson(*lp) : json(nullptr));
  json out = {{"prompt_tokens", r.tokens}, {"prompt_logprobs", lps}};
  if (f.Has("mtp")) {
    json mtp = json::array();
    for (const auto& lp : r.mtp_logprobs) mtp.push_back(LogprobJson(lp));
    out["mtp_logprobs"] = mtp;
  }
  std::cout << out.dump() << "\n";
  return absl::OkStatus();
}

absl::Status Generate(int argc, char** argv) {
  Flags f;
  SPLITMOE_RETURN_IF_ERROR(
      f.Parse(argc, argv, 2,
              {"model", "endpoint", "api-key", "prompt", "prompt-tokens", "max-tokens", "temperature", "top-p",
               "top-k", "seed", "logprobs", "stop", "stop-token-ids", "attention", "device",
               "precision", "weights", "speculative", "draft-tokens"},
              {"json", "ignore-eos"}));
  if (f.Has("endpoint") && !f.Has("model")) return GenerateRemote(f);
  if (f.Has("model") == f.Has("endpoint")) {
    return absl::InvalidArgumentError("generate needs --model DIR or --endpoint HOST:PORT");
  }
  engine::EngineOptions options;
  options.device = f.Get("device", "cpu");
  SPLITMOE_RETURN_IF_ERROR(EnableDevice(options.device));
  SPLITMOE_ASSIGN_OR_RETURN(const bool bf16, Bf16PrecisionFlag(f));
  if (f.Has("precision") && options.device == "cpu") {
    return absl::InvalidArgumentError(
        "--precision applies to --device cuda:N (on the CPU the engine computes in fp32; "
        "--weights picks how the weights are held)");
  }
  options.device_weights = bf16 ? model::WeightDType::kBFloat16 : model::WeightDType::kFloat32;
  SPLITMOE_ASSIGN_OR_RETURN(options.prefill_form, AttentionFormFromFlags(f));
  SPLITMOE_ASSIGN_OR_RETURN(options.weights,
                            model::ParseResidentDType(f.Get("weights", "checkpoint")));
  SPLITMOE_ASSIGN_OR_RETURN(options.draft_tokens, DraftTokensFromFlags(f));
  SPLITMOE_ASSIGN_OR_RETURN(auto eng, engine::Engine::Load(f.Get("model"), options));
  SPLITMOE_ASSIGN_OR_RETURN(engine::GenerateRequest req,
                            GenerateRequestFromFlags(f, eng->tokenizer()));
  const bool as_json = f.Has("json");
  engine::TokenCallback stream;
  if (!as_json) {
    stream = [](int32_t, absl::string_view text) { std::cout << text << std::flush; };
  }
  SPLITMOE_ASSIGN_OR_RETURN(engine::GenerateResult r, eng->Generate(req, stream));
  if (!as_json) {
    std::cout << "\n";
    return absl::OkStatus();
  }
  PrintGenerateJson(r);
  return absl::OkStatus();
}

absl::Status Router(int argc, char** argv) {
  Flags f;
  SPLITMOE_RETURN_IF_ERROR(
      f.Parse(argc, argv, 2,
              {"model", "listen", "heartbeat-ms", "max-devices", "admission-timeout-ms",
               "prefill-timeout-ms", "bias-update-rate", "bias-bound", "launcher",
               "internal-listen", "api-keys", "max-message-bytes", "max-streams-per-client",
               "http-listen", "http-threads", "served-model-name", "metrics-listen"},
              {}));
  if (!f.Has("model")) return absl::InvalidArgumentError("router needs --model DIR");
  router::RouterOptions o;
  o.model_dir = f.Get("model");
  o.listen = f.Get("listen", o.listen);
  o.http_listen = f.Get("http-listen");
  o.served_model_name = f.Get("served-model-name");
  o.metrics_listen = f.Get("metrics-listen");
  SPLITMOE_ASSIGN_OR_RETURN(int64_t http_threads, f.GetInt("http-threads", 2));
  if (http_threads < 1 || http_threads > 64) {
    return absl::InvalidArgumentError("--http-threads must be in [1, 64]");
  }
  o.http_threads = static_cast<int>(http_threads);
  o.internal_listen = f.Get("internal-listen");
  o.api_keys_file = f.Get("api-keys");
  SPLITMOE_ASSIGN_OR_RETURN(int64_t max_message, f.GetInt("max-message-bytes", 4 << 20));
  if (max_message < 1024 || max_message > (1 << 30)) {
    return absl::InvalidArgumentError("--max-message-bytes must be in [1024, 1 GiB]");
  }
  o.public_max_message_bytes = static_cast<int32_t>(max_message);
  SPLITMOE_ASSIGN_OR_RETURN(int64_t streams, f.GetInt("max-streams-per-client", 1024));
  if (streams < 1 || streams > (1 << 20)) {
    return absl::InvalidArgumentError("--max-streams-per-client must be in [1, 1048576]");
  }
  o.max_streams_per_client = static_cast<int32_t>(streams);
  SPLITMOE_ASSIGN_OR_RETURN(int64_t ms, f.GetInt("heartbeat-ms", 300));
  if (ms <= 0) return absl::InvalidArgumentError("--heartbeat-ms must be > 0");
  o.heartbeat_interval = absl::Milliseconds(ms);
  // Default: the model's topk_group for grouped models (exact with group-aligned shards).
  if (f.Has("max-devices")) {
    SPLITMOE_ASSIGN_OR_RETURN(int64_t max_devices, f.GetInt("max-devices", 0));
    if (max_devices < 0) return absl::InvalidArgumentError("--max-devices must be >= 0");
    o.max_devices = static_cast<int32_t>(max_devices);
  }
  SPLITMOE_ASSIGN_OR_RETURN(double rate, f.GetDouble("bias-update-rate", 0.0));
  SPLITMOE_ASSIGN_OR_RETURN(double bound, f.GetDouble("bias-bound", 1.0));
  if (!(rate >= 0.0) || !(bound >= 0.0)) {
    return absl::InvalidArgumentError("--bias-update-rate and --bias-bound must be >= 0");
  }
  o.bias_update_rate = static_cast<float>(rate);
  o.launcher_address = f.Get("launcher");
  o.bias_bound = static_cast<float>(bound);
  SPLITMOE_ASSIGN_OR_RETURN(int64_t admission, f.GetInt("admission-timeout-ms", 600000));
  SPLITMOE_ASSIGN_OR_RETURN(int64_t prefill, f.GetInt("prefill-timeout-ms", 60000));
  if (admission <= 0 || prefill <= 0 || prefill > 600000) {
    return absl::InvalidArgumentError(
        "--admission-timeout-ms must be > 0 and --prefill-timeout-ms in (0, 600000] (a decode "
        "worker holds a reservation for its writer at most 10 minutes)");
  }
  o.admission_timeout = absl::Milliseconds(admission);
  o.prefill_timeout = absl::Milliseconds(prefill);
  return router::RunRouter(o);
}

absl::Status Expert(int argc, char** argv) {
  Flags f;
  SPLITMOE_RETURN_IF_ERROR(
      f.Parse(argc, argv, 2,
              {"model", "listen", "router", "shard", "num-shards", "moe-transport", "busy-poll-us",
               "weights", "metrics-listen", "device", "precision"},
              {}));
  if (!f.Has("model")) return absl::InvalidArgumentError("expert needs --model DIR");
  expert_service::ExpertOptions o;
  o.model_dir = f.Get("model");
  o.metrics_listen = f.Get("metrics-listen");
  o.listen = f.Get("listen", o.listen);
  o.router = f.Get("router");
  SPLITMOE_ASSIGN_OR_RETURN(int64_t shard, f.GetInt("shard", 0));
  SPLITMOE_ASSIGN_OR_RETURN(int64_t shards, f.GetInt("num-shards", 1));
  o.shard.shard = static_cast<int32_t>(shard);
  o.shard.num_shards = static_cast<int32_t>(shards);
  SPLITMOE_ASSIGN_OR_RETURN(o.shard.weights,
                            model::ParseResidentDType(f.Get("weights", "checkpoint")));
  SPLITMOE_ASSIGN_OR_RETURN(o.shard.device, kernels::ParseDevice(f.Get("device", "cpu")));
  SPLITMOE_ASSIGN_OR_RETURN(o.shard.device_bf16, cli::Bf16PrecisionFlag(f));
  if (f.Has("precision") && o.shard.device.backend == kernels::Backend::kCpu) {
    return absl::InvalidArgumentError(
        "--precision applies to --device cuda:N (on the CPU experts compute in fp32 over "
        "--weights)");
  }
  const std::string transport = f.Get("moe-transport", "ucx");
  if (transport != "ucx" && transport != "grpc") {
    return absl::InvalidArgumentError("--moe-transport must be ucx or grpc");
  }
  o.ucx = transport == "ucx";
  SPLITMOE_ASSIGN_OR_RETURN(o.busy_poll, cli::BusyPollFlag(f));
  return expert_service::RunExpert(o);
}

// `splitmoe status --endpoint HOST:PORT`: the cluster as the router sees it.
absl::Status Status(int argc, char** argv) {
  Flags f;
  SPLITMOE_RETURN_IF_ERROR(f.Parse(argc, argv, 2, {"endpoint", "api-key"}, {"json"}));
  if (!f.Has("endpoint")) return absl::InvalidArgumentError("status needs --endpoint HOST:PORT");
  // The public port (ClusterInfo), with an API key: an operator needs no internal certificate.
  // Several routers (--endpoint A,B): the first that answers.
  v1::ClusterStatusResponse status;
  SPLITMOE_RETURN_IF_ERROR(OnEachEndpoint(f, [&](const std::string& endpoint, bool*) {
    auto stub = v1::ClusterInfo::NewStub(
        rpc::PublicChannel(endpoint, rpc::ClientApiKey(f.Get("api-key"))));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    return rpc::FromGrpcStatus(stub->ClusterStatus(&ctx, v1::ClusterStatusRequest(), &status));
  }));
  if (f.Has("json")) {
    std::string text;
    google::protobuf::util::JsonPrintOptions options;
    options.preserve_proto_field_names = true;
    options.always_print_primitive_fields = true;
    (void)google::protobuf::util::MessageToJsonString(status, &text, options);
    nlohmann::json out = nlohmann::json::parse(text, nullptr, false);
    if (out.is_discarded()) return absl::InternalError("status: the router's answer is not JSON");
    // routing.expert_tokens / expert_bias as [layer][expert] (main layers, then MTP blocks;
    // empty for dense layers), the shape tools index.
    const v1::RoutingStatus& r = status.routing();
    int32_t layers = 0;
    for (const auto& t : r.expert_tokens()) layers = std::max(layers, t.layer() + 1);
    for (const auto& b : r.expert_bias()) layers = std::max(layers, b.layer() + 1);
    nlohmann::json tokens = nlohmann::json::array(), bias = nlohmann::json::array();
    for (int32_t l = 0; l < layers; ++l) {
      tokens.push_back(nlohmann::json::array());
      bias.push_back(nlohmann::json::array());
    }
    for (const auto& t : r.expert_tokens()) {
      for (uint64_t v : t.expert_tokens()) tokens[t.layer()].push_back(v);
    }
    for (const auto& b : r.expert_bias()) {
      for (float v : b.bias()) bias[b.layer()].push_back(v);
    }
    out["routing"]["expert_tokens"] = tokens;
    out["routing"]["expert_bias"] = bias;
    // Proto's JSON writes 64-bit integers as strings; tools want numbers.
    std::function<void(nlohmann::json&)> numbers = [&](nlohmann::json& v) {
      if (v.is_object()) {
        for (auto& [key, item] : v.items()) {
          if (key != "worker_id" && key != "address" && key != "router_id") numbers(item);
        }
      } else if (v.is_array()) {
        for (auto& item : v) numbers(item);
      } else if (v.is_string()) {
        const std::string& text = v.get_ref<const std::string&>();
        uint64_t n = 0;
        if (!text.empty() && text.size() <= 20 &&
            text.find_first_not_of("0123456789") == std::string::npos &&
            absl::SimpleAtoi(text, &n)) {
          v = n;
        }
      }
    };
    numbers(out);
    std::cout << out.dump(2) << "\n";
    return absl::OkStatus();
  }
  std::cout << "workers: " << status.workers_size()
            << ", requests in flight: " << status.requests_in_flight() << "\n";
  std::cout << "ready: "
            << (status.ready() ? "yes" : absl::StrCat("no (", status.not_ready_reason(), ")"));
  if (!status.http_url().empty()) std::cout << ", http " << status.http_url();
  if (!status.metrics_url().empty()) std::cout << ", metrics " << status.metrics_url();
  std::cout << "\n";
  // Resident weights: the expert services together hold the routed experts once; every
  // attention worker (prefill, decode) holds the attention side.
  uint64_t expert_bytes = 0;
  int attention_workers = 0;
  for (const v1::WorkerStatus& w : status.workers()) {
    if (w.role() == v1::WORKER_ROLE_EXPERT) expert_bytes += w.resident_weight_bytes();
    attention_workers += w.role() == v1::WORKER_ROLE_PREFILL || w.role() == v1::WORKER_ROLE_DECODE;
  }
  std::cout << "resident weights: routed experts " << expert_bytes << " B over the expert services; "
            << attention_workers << " attention workers\n";
  const v1::RoutingStatus& r = status.routing();
  std::cout << "routing table version " << r.table_version() << ", max devices "
            << (r.max_devices() > 0 ? std::to_string(r.max_devices()) : std::string("off"))
            << " (most seen " << r.max_devices_observed() << "), MaxVio " << r.max_vio()
            << " (last window " << r.max_vio_window() << "), online bias "
            << (r.bias_update_rate() > 0 ? absl::StrCat("rate ", r.bias_update_rate(), ", ",
                                                        r.bias_updates(), " updates")
                                         : std::string("off"))
            << ", failovers " << r.failovers() << "\n";
  std::cout << "requests moved after a worker failed " << status.request_failovers()
            << ", admitted again after a preemption " << status.request_preemptions() << "\n";
  std::cout << "MoE batch parts sent over ucx " << r.expert_parts_ucx() << ", over grpc "
            << r.expert_parts_grpc() << "\n";
  std::cout << "placement " << (r.placement_id() == 0 ? std::string("default (contiguous)")
                                                       : std::to_string(r.placement_id()));
  if (r.next_placement_id() != 0) std::cout << ", loading " << r.next_placement_id();
  std::cout << ", MaxVio over shards " << r.shard_max_vio() << "\n";
  std::cout << "devices per token:";
  for (int d = 1; d < r.devices_per_token_size(); ++d)
    std::cout << " " << d << ":" << r.devices_per_token(d);
  std::cout << "\n";
  for (const v1::PoolStatus& pool : status.pools()) {
    std::cout << "pool shard " << pool.shard() << " (" << pool.experts_size() << " experts):";
    int live = 0;
    for (const v1::ReplicaStatus& rep : pool.replicas()) {
      live += rep.healthy();
      std::cout << "  " << rep.worker_id() << (rep.healthy() ? "" : " (down)") << " ["
                << rep.transport() << "] tokens " << rep.tokens();
    }
    if (live == 0) std::cout << "  NO LIVE REPLICA";
    std::cout << "\n";
  }
  for (const v1::WorkerStatus& w : status.workers()) {
    std::cout << "  " << w.worker_id() << "  " << v1::WorkerRole_Name(w.role()).substr(12) << "  "
              << w.address() << "  " << (w.healthy() ? "healthy" : "OUT OF SERVICE")
              << "  heartbeat " << static_cast<int64_t>(w.last_heartbeat_age_ms())
              << " ms ago  weights " << w.resident_weight_bytes() << " B on "
              << (w.device().empty() ? std::string("cpu") : w.device());
    if (w.role() == v1::WORKER_ROLE_EXPERT) {
      std::cout << "  shard " << w.shard() << " (" << w.experts_size() << " experts)";
    }
    const v1::WorkerLoad& load = w.load();
    if (w.role() == v1::WORKER_ROLE_DECODE) {
      std::cout << "  cache blocks " << load.cache_blocks_used() << " used / "
                << load.cache_blocks_free() << " free";
      if (load.cache_blocks_quarantined() > 0)
        std::cout << " (" << load.cache_blocks_quarantined() << " awaiting their writer)";
      std::cout << "  sequences " << load.sequences_running() << " (most "
                << load.max_sequences_running() << ")";
      if (load.preemptions() > 0) std::cout << "  preemptions " << load.preemptions();
    }
    if (load.micro_batch_overlaps() > 0)
      std::cout << "  micro-batch overlaps " << load.micro_batch_overlaps();
    if (load.draft_tokens_proposed() > 0) {
      std::cout << "  drafts accepted " << load.draft_tokens_accepted() << "/"
                << load.draft_tokens_proposed() << " ("
                << absl::StrFormat("%.2f", static_cast<double>(load.draft_tokens_accepted()) /
                                               static_cast<double>(load.draft_tokens_proposed()))
                << ")";
    }
    if (w.role() != v1::WORKER_ROLE_EXPERT) {
      std::cout << "  in flight " << load.requests_in_flight();
      const uint64_t moved =
          w.role() == v1::WORKER_ROLE_PREFILL ? load.latent_bytes_sent() : load.latent_bytes_received();
      std::cout << "  latent bytes " << (w.role() == v1::WORKER_ROLE_PREFILL ? "sent " : "received ")
                << moved << " for " << load.latent_tokens() << " prompt tokens";
      if (load.latent_tokens() > 0) std::cout << " (" << moved / load.latent_tokens() << " B/token)";
      std::cout << "  " << w.transfer_mode();
    }
    std::cout << "\n";
  }
  return absl::OkStatus();
}

// The usage text: one block per subcommand ("  name  flags" and its indented continuation
// lines), then notes shared by several ("  (...").
constexpr char kUsage[] =
    "usage: splitmoe <make-tiny|inspect|score|generate|chat|up|router|prefill|decode|expert|\n"
         "                status|scale|rebalance|bench|plan> "
         "[flags]\n"
         "  make-tiny --out DIR [--style v3|v2|v2-greedy] [--fp8] [--seed N] [--shards N] [--mtp "
         "N]\n"
         "            [--mtp-draft random|agree]   (agree: an MTP module whose drafts mostly hold)\n"
         "            [--expert-skew B]   (every token routes to the same experts)\n"
         "  inspect   --model DIR [--weights checkpoint|fp32] [--json]\n"
         "  score     --model DIR (--prompt TEXT | --prompt-tokens IDS) [--top-logprobs K] [--mtp] "
         "--json\n"
         "  generate  --model DIR (--prompt TEXT | --prompt-tokens IDS) [--max-tokens N] "
         "[--temperature T]\n"
         "            [--top-p P] [--top-k K] [--seed S] [--logprobs K] [--stop STR]... [--json]\n"
         "            [--speculative mtp [--draft-tokens K]]   (the MTP module drafts K tokens,\n"
         "            default 2, the model verifies them in one pass; the same tokens, faster)\n"
         "            (score/generate: --endpoint HOST:PORT instead of --model asks a cluster;\n"
         "             generate --device cuda:N [--precision fp32|bf16] runs the engine on a GPU)\n"
         "  chat      (--endpoint HOST:PORT | --model DIR) [--system TEXT] [--max-tokens N]\n"
         "            [--temperature T] [--top-p P] [--seed S]   (interactive: a line per user\n"
         "            turn, the reply streams; /reset starts over, /exit quits)\n"
         "  up        --model DIR [--prefill N] [--decode N] [--experts N] [--expert-replicas R]\n"
         "            [--port P] [--http-port P] [--routers N] [--cache-blocks N] [--bias-update-rate U]\n"
         "            (and the roles' flags; --routers N: N routers, each worker registered with\n"
         "            every one; prints ready grpc=A,B,... [http=URL,...])\n"
         "            [--tls | --cluster-token-file F] [--api-keys FILE]   (a closed cluster)\n"
         "            [--speculative mtp [--draft-tokens K]]   (decode workers draft with MTP)\n"
         "            [--device D[,D...]] [--expert-device D[,D...]] [--precision fp32|bf16]\n"
         "            (D: cpu or cuda:N; --device places the decode, then the prefill workers\n"
         "            round robin, and the expert services unless --expert-device names theirs)\n"
         "  router    --model DIR [--listen HOST:PORT] [--internal-listen HOST:PORT] [--api-keys FILE]\n"
         "            [--max-message-bytes N] [--max-streams-per-client N] [--max-devices M]\n"
         "            [--heartbeat-ms MS] [--http-listen HOST:PORT] [--http-threads N]\n"
         "            [--served-model-name NAME] [--metrics-listen HOST:PORT]\n"
         "            (--http-listen: the OpenAI-compatible HTTP API, /v1/completions,\n"
         "            /v1/chat/completions, /v1/models, /health)\n"
         "            [--bias-update-rate U] [--bias-bound B]\n"
         "  (prefill, decode, expert: --advertise-host HOST registers HOST:PORT instead of the\n"
         "   bound address, e.g. a pod IP behind --listen 0.0.0.0:PORT; every role:\n"
         "   --metrics-listen HOST:PORT serves Prometheus /metrics and /health there)\n"
         "  (every command: --log-level debug|info|warning|error and --log-format text|json, or\n"
         "   SPLITMOE_LOG_LEVEL / SPLITMOE_LOG_FORMAT: one key=value or JSON line per record)\n"
         "  (router, prefill, decode, expert, scale, rebalance: --tls-cert F --tls-key F --tls-ca F\n"
         "   or --cluster-token-file F close the internal plane; generate, score, status, scale,\n"
         "   bench: --api-key KEY or SPLITMOE_API_KEY at the public port)\n"
         "  prefill   --model DIR --router HOST:PORT[,...] [--listen HOST:PORT] [--wire-dtype fp32|bf16]\n"
         "            [--expert-deadline-ms MS] [--batch-tokens N] [--micro-batches 1|2]\n"
         "            [--no-mtp]  (the MTP module not loaded: for decode pools that do not\n"
         "            speculate; up passes it unless --speculative mtp)\n"
         "            [--device cpu|cuda:N [--precision fp32|bf16] [--device-cache-tokens N]]\n"
         "            (cuda: the forward pass and the prompts' caches on that GPU, latents\n"
         "            staged through host memory to the decode workers; the batch's prompts,\n"
         "            cached prefixes included, must fit --device-cache-tokens, 32768 by default)\n"
         "  decode    --model DIR --router HOST:PORT[,...] [--listen HOST:PORT] [--cache-blocks N]\n"
         "            [--block-tokens T] [--cache-dtype fp32|bf16] [--wire-dtype fp32|bf16]\n"
         "            [--micro-batches 1|2]  (2: two micro-batches in ping-pong; default 1)\n"
         "            [--speculative mtp [--draft-tokens K]]  (MTP drafts, verified in one pass)\n"
         "            [--reserve-margin-tokens N] [--reserve-upfront]  (the cache grows as sequences\n"
         "            decode, the last arrival preempted when full; upfront: prompt + max_tokens)\n"
         "            [--no-prefix-cache]  (finished sequences' blocks are kept and shared in place\n"
         "            by prompts that start with the same tokens; on by default)\n"
         "            [--device cpu|cuda:N [--precision fp32|bf16]]  (cuda: the forward pass on\n"
         "            that GPU over a copy of the cache there; prompts' latents land in host\n"
         "            memory and are staged to it, pinned where the GPU allows)\n"
         "  expert    --model DIR --router HOST:PORT[,...] --shard S --num-shards N\n"
         "            [--device cpu|cuda:N [--precision fp32|bf16]]   (cuda: the shard's experts\n"
         "            resident on that GPU, each batch as grouped GEMMs; fp32 by default)\n"
         "  status    --endpoint HOST:PORT [--json]\n"
         "  scale     --endpoint HOST:PORT --shard K --replicas R   (a cluster started by up)\n"
         "  rebalance --endpoint HOST:PORT [--redundant-experts N] [--dry-run] [--wait-s S] [--json]\n"
         "            (EPLB from the observed loads, applied live)\n"
         "  bench     (--model DIR | --endpoint HOST:PORT) [--concurrency C] [--requests N]\n"
         "            [--prompt-tokens P] [--max-tokens T] [--seed S] [--json FILE]\n"
         "            [--shared-prefix-tokens N]  (every prompt starts with the same N tokens)\n"
         "            [--speculative mtp [--draft-tokens K]]  (--model: the engine speculates)\n"
         "  plan      (--model DIR | --config FILE) --hardware FILE [--prefill P] [--decode D]\n"
         "            [--experts E] [--expert-replicas R] [--batch B] [--micro-batches 1|2]\n"
         "            [--max-devices M] [--prompt-tokens N] [--output-tokens N] [--json]\n"
         "            [--target-tpot-ms T --devices N (<= 256) [--top K]]   (the capacity model;\n"
         "            docs/capacity.md; hardware files in deploy/hardware/)\n"
         "  (--router A,B: the worker registers with every router and follows the first live\n"
         "   one's routing table; --endpoint A,B: generate, score and status try the next router\n"
         "   when one is unreachable)\n";

int Usage() {
  std::cerr << kUsage;
  return 2;
}

// `splitmoe CMD --help`: CMD's block of the usage text and the notes that name it, on stdout.
// False when CMD has no block.
bool SubcommandHelp(const std::string& cmd) {
  std::vector<std::string> lines = absl::StrSplit(kUsage, '\n');
  std::string block;
  bool in_block = false, in_note = false, note_matches = false;
  std::string note;
  for (const std::string& line : lines) {
    const bool continuation = absl::StartsWith(line, "   ");
    if (!continuation) {
      if (in_note && note_matches) block += note;
      in_block = absl::StartsWith(line, "  " + cmd + " ");
      in_note = absl::StartsWith(line, "  (");
      note = "";
      note_matches = false;
    }
    if (in_block) block += line + "\n";
    if (in_note) {
      note += line + "\n";
      note_matches |= absl::StrContains(line, cmd);
    }
  }
  if (in_note && note_matches) block += note;
  if (block.empty()) return false;
  std::cout << "usage: splitmoe " << cmd << " [flags]\n" << block
            << "exit codes: 0 done, 1 failed (error: ... on stderr), 2 bad usage or arguments\n";
  return true;
}

// Takes the process-wide flags (--tls-cert, --tls-key, --tls-ca, --cluster-token-file,
// --advertise-host) out of argv for every command that joins or manages a cluster and
// configures this process's credentials and advertised host with them (role: the command for cluster roles, "admin" for the tools).
absl::Status TakeSecurityFlags(const std::string& cmd, std::vector<char*>* args) {
  static const std::set<std::string> kFlags = {"tls-cert", "tls-key", "tls-ca",
                                               "cluster-token-file", "advertise-host"};
  std::map<std::string, std::string> values;
  std::vector<char*> rest;
  for (size_t i = 0; i < args->size(); ++i) {
    std::string a = (*args)[i];
    if (i >= 2 && absl::StartsWith(a, "--")) {
      std::string name = a.substr(2), value;
      const size_t eq = name.find('=');
      bool has_value = false;
      if (eq != std::string::npos) {
        value = name.substr(eq + 1);
        name = name.substr(0, eq);
        has_value = true;
      }
      if (kFlags.count(name)) {
        if (!has_value) {
          if (i + 1 >= args->size()) {
            return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
          }
          value = (*args)[++i];
        }
        values[name] = value;
        continue;
      }
    }
    rest.push_back((*args)[i]);
  }
  *args = std::move(rest);
  const bool role = cmd == "router" || cmd == "prefill" || cmd == "decode" || cmd == "expert";
  if (values.count("advertise-host")) {
    if (!role || cmd == "router" || values["advertise-host"].empty()) {
      return absl::InvalidArgumentError(
          "--advertise-host HOST is for prefill, decode and expert (the address they register)");
    }
    splitmoe::rpc::SetAdvertiseHost(values["advertise-host"]);
  }
  splitmoe::rpc::SecurityOptions options{.tls_cert = values["tls-cert"],
                                         .tls_key = values["tls-key"],
                                         .tls_ca = values["tls-ca"],
                                         .cluster_token_file = values["cluster-token-file"],
                                         .role = role ? cmd : "admin"};
  return splitmoe::rpc::ConfigureInternalSecurity(options);
}

// Takes --log-level and --log-format (every command) out of argv and configures the logger.
absl::Status TakeLogFlags(std::vector<char*>* args) {
  SPLITMOE_RETURN_IF_ERROR(splitmoe::log::ConfigureFromEnvironment());
  std::string level, format;
  std::vector<char*> rest;
  for (size_t i = 0; i < args->size(); ++i) {
    const std::string a = (*args)[i];
    std::string* target = nullptr;
    std::string value;
    for (const auto& [name, dest] : {std::pair<const char*, std::string*>{"--log-level", &level},
                                     {"--log-format", &format}}) {
      if (a == name || absl::StartsWith(a, absl::StrCat(name, "="))) {
        target = dest;
        if (a == name) {
          if (i + 1 >= args->size()) {
            return absl::InvalidArgumentError(absl::StrCat(name, " needs a value"));
          }
          value = (*args)[++i];
        } else {
          value = a.substr(std::string(name).size() + 1);
        }
      }
    }
    if (target != nullptr && i >= 2) {
      *target = value;
      continue;
    }
    rest.push_back((*args)[i]);
  }
  *args = std::move(rest);
  SPLITMOE_RETURN_IF_ERROR(splitmoe::log::Configure(level, format));
  // Children (`up`'s cluster) log the same way.
  if (!level.empty()) ::setenv("SPLITMOE_LOG_LEVEL", level.c_str(), 1);
  if (!format.empty()) ::setenv("SPLITMOE_LOG_FORMAT", format.c_str(), 1);
  return absl::OkStatus();
}

}  // namespace
}  // namespace splitmoe::cli

int main(int argc, char** raw_argv) {
  using namespace splitmoe::cli;
  if (argc < 2) return Usage();
  const std::string cmd = raw_argv[1];
  absl::Status status;
  for (int i = 2; i < argc; ++i) {
    const std::string a = raw_argv[i];
    if (a == "--help" || a == "-h") return SubcommandHelp(cmd) ? 0 : Usage();
  }
  std::vector<char*> args(raw_argv, raw_argv + argc);
  const bool long_running =
      cmd == "router" || cmd == "expert" || cmd == "prefill" || cmd == "decode" || cmd == "up";
#ifdef SPLITMOE_HAVE_CUDA
  splitmoe::expert_service::EnableCudaExperts();  // `expert --device cuda:N`
#endif
  // The logger: SPLITMOE_LOG_LEVEL / SPLITMOE_LOG_FORMAT, then --log-level / --log-format. The
  // one-shot commands (generate, score, inspect, ...) print results that scripts read, often with
  // stderr merged in: they log warnings and errors only unless asked for more.
  if (!long_running) (void)splitmoe::log::Configure("warning", "");
  status = TakeLogFlags(&args);
  if (!status.ok()) {
    std::cerr << "error: " << status.ToString() << "\n";
    return 2;
  }
  // Before any thread exists (making credentials starts gRPC's threads): SIGINT/SIGTERM are then
  // taken only by the waiting main thread, never by a thread that would die of them.
  if (long_running) splitmoe::process::BlockTerminationSignals();
  if (cmd != "make-tiny" && cmd != "inspect" && cmd != "help" && cmd != "--help") {
    status = TakeSecurityFlags(cmd, &args);
    if (!status.ok()) {
      std::cerr << "error: " << status.ToString() << "\n";
      return 2;
    }
  }
  args.push_back(nullptr);
  argc = static_cast<int>(args.size()) - 1;
  char** argv = args.data();
  if (cmd == "make-tiny") {
    status = MakeTiny(argc, argv);
  } else if (cmd == "inspect") {
    status = Inspect(argc, argv);
  } else if (cmd == "score") {
    status = Score(argc, argv);
  } else if (cmd == "generate") {
    status = Generate(argc, argv);
  } else if (cmd == "chat") {
    status = ChatCommand(argc, argv);
  } else if (cmd == "scale") {
    status = ScaleCommand(argc, argv);
  } else if (cmd == "rebalance") {
    status = RebalanceCommand(argc, argv);
  } else if (cmd == "bench") {
    status = BenchCommand(argc, argv);
  } else if (cmd == "plan") {
    status = PlanCommand(argc, argv);
  } else if (cmd == "status") {
    status = Status(argc, argv);
  } else if (long_running) {
    if (cmd == "router") status = Router(argc, argv);
    if (cmd == "expert") status = Expert(argc, argv);
    if (cmd == "prefill") status = PrefillCommand(argc, argv);
    if (cmd == "decode") status = DecodeCommand(argc, argv);
    if (cmd == "up") status = UpCommand(argc, argv);
  } else if (cmd == "--help" || cmd == "help") {
    return Usage() - 2;
  } else {
    return Usage();
  }
  if (!status.ok()) {
    std::cerr << "error: " << status.ToString() << "\n";
    return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}
