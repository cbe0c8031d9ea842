#include "tools/cli/bench.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <deque>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/base/mix64.h"
#include "common/base/status_macros.h"
#include "common/engine/batch_decoder.h"
#include "common/engine/engine.h"
#include "common/rpc/rpc.h"
#include "common/rpc/security.h"
#include "nlohmann/json.hpp"
#include "splitmoe/v1/generation.grpc.pb.h"
#include "splitmoe/v1/internal.grpc.pb.h"
#include "tools/cli/flags.h"
#include "tools/cli/generate_common.h"

namespace splitmoe::cli {
namespace {

struct Workload {
  int64_t concurrency = 1;
  int64_t requests = 1;
  int64_t prompt_tokens = 128;
  int64_t max_tokens = 32;
  uint64_t seed = 1;
  int64_t draft_tokens = 0;  // --model with --speculative mtp
  int64_t shared_prefix_tokens = 0;  // every prompt starts with the same this many tokens
};

// One request's timeline, in ms from its own start.
struct Sample {
  double ttft_ms = 0;
  double e2e_ms = 0;
  int64_t tokens = 0;
  bool ok = false;
  std::string error;
};

// Request i's prompt: ids drawn from the first `vocab` ids (at most 32,000, which skips a big
// vocabulary's rarely trained tail), the same in both modes for a given seed.
std::vector<int32_t> Prompt(const Workload& w, int64_t i, int64_t vocab) {
  std::vector<int32_t> p;
  const auto range = static_cast<uint64_t>(std::max<int64_t>(1, std::min<int64_t>(vocab, 32000)));
  for (int64_t t = 0; t < w.prompt_tokens; ++t) {
    // The first shared_prefix_tokens are every request's (a system prompt); the rest its own.
    const uint64_t who = t < w.shared_prefix_tokens ? ~uint64_t{0} : static_cast<uint64_t>(i);
    const uint64_t h = Mix64(w.seed * 0x9E3779B97F4A7C15ull + who * 1000003ull +
                                   static_cast<uint64_t>(t));
    p.push_back(static_cast<int32_t>(h % range));
  }
  return p;
}

nlohmann::json Percentiles(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  auto at = [&](double q) {
    if (v.empty()) return 0.0;
    const size_t i = std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size())));
    return v[i];
  };
  double sum = 0;
  for (double x : v) sum += x;
  return {{"p50", at(0.5)},
          {"p90", at(0.9)},
          {"p99", at(0.99)},
          {"mean", v.empty() ? 0.0 : sum / static_cast<double>(v.size())}};
}

// The endpoint's model vocabulary (for the prompts).
absl::StatusOr<int64_t> RemoteVocab(v1::Generation::Stub& stub) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::ModelInfoResponse info;
  SPLITMOE_RETURN_IF_ERROR(
      rpc::FromGrpcStatus(stub.ModelInfo(&ctx, v1::ModelInfoRequest(), &info)));
  return info.vocab_size();
}

// The cluster's status (ClusterInfo, the public port), for the counters a run moved.
absl::StatusOr<v1::ClusterStatusResponse> ClusterCounters(const std::string& endpoint,
                                                          const std::string& api_key) {
  auto stub = v1::ClusterInfo::NewStub(rpc::PublicChannel(endpoint, api_key));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::ClusterStatusResponse status;
  SPLITMOE_RETURN_IF_ERROR(
      rpc::FromGrpcStatus(stub->ClusterStatus(&ctx, v1::ClusterStatusRequest(), &status)));
  return status;
}

// What the cluster did during a run: preemptions and failovers (deltas), and the most sequences
// a decode worker ran in one step (its high-water mark since it started).
nlohmann::json ClusterDelta(const v1::ClusterStatusResponse& before,
                            const v1::ClusterStatusResponse& after) {
  int32_t most = 0;
  struct Sums {
    uint64_t preempted = 0, drafted = 0, accepted = 0, queried = 0, hit = 0;
  };
  auto decode_sums = [](const v1::ClusterStatusResponse& s) {
    Sums x;
    for (const auto& w : s.workers()) {
      if (w.role() != v1::WORKER_ROLE_DECODE) continue;
      x.preempted += w.load().preemptions();
      x.drafted += w.load().draft_tokens_proposed();
      x.accepted += w.load().draft_tokens_accepted();
      x.queried += w.load().prefix_tokens_queried();
      x.hit += w.load().prefix_tokens_hit();
    }
    return x;
  };
  const Sums s0 = decode_sums(before), s1 = decode_sums(after);
  const uint64_t p0 = s0.preempted, d0 = s0.drafted, a0 = s0.accepted;
  const uint64_t preempted = s1.preempted, drafted = s1.drafted, accepted = s1.accepted;
  for (const auto& w : after.workers()) {
    if (w.role() == v1::WORKER_ROLE_DECODE) most = std::max(most, w.load().max_sequences_running());
  }
  nlohmann::json out = {
      {"request_preemptions", after.request_preemptions() - before.request_preemptions()},
      {"request_failovers", after.request_failovers() - before.request_failovers()},
      {"sequences_preempted", preempted - p0},
      {"max_sequences_running", most},
      {"prefix_tokens_queried", s1.queried - s0.queried},
      {"prefix_tokens_hit", s1.hit - s0.hit},
      {"prefix_hit_rate", s1.queried > s0.queried ? static_cast<double>(s1.hit - s0.hit) /
                                                        static_cast<double>(s1.queried - s0.queried)
                                                  : 0.0}};
  if (drafted > d0) {
    out["draft_tokens_proposed"] = drafted - d0;
    out["draft_tokens_accepted"] = accepted - a0;
    out["acceptance_rate"] =
        static_cast<double>(accepted - a0) / static_cast<double>(drafted - d0);
  }
  return out;
}

absl::StatusOr<std::vector<Sample>> RunEndpoint(const std::string& endpoint,
                                                const std::string& api_key, const Workload& w,
                                                double* wall_s) {
  auto stub = v1::Generation::NewStub(rpc::PublicChannel(endpoint, api_key));
  SPLITMOE_ASSIGN_OR_RETURN(int64_t vocab, RemoteVocab(*stub));
  std::vector<Sample> samples(static_cast<size_t>(w.requests));
  std::atomic<int64_t> next{0};
  auto client = [&] {
    for (int64_t i = next++; i < w.requests; i = next++) {
      v1::GenerateRequest r;
      r.set_request_id(absl::StrCat("bench-", w.seed, "-", i));
      const std::vector<int32_t> prompt = Prompt(w, i, vocab);
      *r.mutable_token_ids()->mutable_ids() = {prompt.begin(), prompt.end()};
      r.mutable_stop()->set_max_tokens(static_cast<int32_t>(w.max_tokens));
      r.mutable_stop()->set_ignore_eos(true);
      Sample& s = samples[static_cast<size_t>(i)];
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(10));
      const absl::Time start = absl::Now();
      auto reader = stub->Generate(&ctx, r);
      v1::GenerateEvent e;
      while (reader->Read(&e)) {
        if (s.tokens == 0 && e.token_ids_size() > 0)
          s.ttft_ms = absl::ToDoubleMilliseconds(absl::Now() - start);
        s.tokens += e.token_ids_size();
      }
      const grpc::Status status = reader->Finish();
      s.e2e_ms = absl::ToDoubleMilliseconds(absl::Now() - start);
      s.ok = status.ok();
      if (!s.ok) s.error = status.error_message();
    }
  };
  const absl::Time start = absl::Now();
  std::vector<std::thread> clients;
  for (int64_t c = 0; c < w.concurrency; ++c) clients.emplace_back(client);
  for (auto& t : clients) t.join();
  *wall_s = absl::ToDoubleSeconds(absl::Now() - start);
  return samples;
}

// The same closed loop in process: up to `concurrency` requests live at once; the ones admitted
// since the last decode step are prefilled together, then every live sequence decodes one token
// per step (continuous batching).
absl::StatusOr<std::vector<Sample>> RunModel(const std::string& dir, const Workload& w,
                                             double* wall_s, engine::SpeculativeStats* speculative) {
  engine::EngineOptions options;
  options.draft_tokens = w.draft_tokens;
  SPLITMOE_ASSIGN_OR_RETURN(std::unique_ptr<engine::Engine> e, engine::Engine::Load(dir, options));
  const model::ModelConfig& c = e->config();
  engine::BatchDecoder decoder(&e->transformer(), c.eos_token_id, nullptr, w.draft_tokens);
  std::vector<Sample> samples(static_cast<size_t>(w.requests));
  std::vector<absl::Time> started(static_cast<size_t>(w.requests));
  std::vector<std::vector<int32_t>> prompts(static_cast<size_t>(w.requests));
  int64_t next = 0, live = 0, done = 0;
  const absl::Time start = absl::Now();
  std::deque<int64_t> waiting;  // admitted, not yet prefilled
  auto admit = [&] {
    while (live < w.concurrency && next < w.requests) {
      started[static_cast<size_t>(next)] = absl::Now();
      prompts[static_cast<size_t>(next)] = Prompt(w, next, c.vocab_size);
      waiting.push_back(next++);
      ++live;
    }
  };
  auto finish = [&](int64_t i) {
    Sample& s = samples[static_cast<size_t>(i)];
    s.e2e_ms = absl::ToDoubleMilliseconds(absl::Now() - started[static_cast<size_t>(i)]);
    s.ok = true;
    --live;
    ++done;
  };
  admit();
  while (done < w.requests) {
    if (!waiting.empty()) {
      std::vector<engine::PrefillItem> items;
      std::vector<std::unique_ptr<engine::LatentCache>> caches, mtp_caches;
      std::vector<int64_t> ids(waiting.begin(), waiting.end());
      waiting.clear();
      for (int64_t i : ids) {
        caches.push_back(std::make_unique<engine::LatentCache>(c.num_hidden_layers, c.latent_dim()));
        mtp_caches.push_back(w.draft_tokens > 0
                                 ? std::make_unique<engine::LatentCache>(1, c.latent_dim())
                                 : nullptr);
        engine::PrefillItem item;
        item.prompt = prompts[static_cast<size_t>(i)];
        item.cache = caches.back().get();
        item.mtp_cache = mtp_caches.back().get();
        items.push_back(std::move(item));
      }
      SPLITMOE_RETURN_IF_ERROR(
          engine::PrefillBatch(e->transformer(), items, engine::AttentionForm::kAuto));
      for (size_t k = 0; k < ids.size(); ++k) {
        const int64_t i = ids[k];
        SPLITMOE_RETURN_IF_ERROR(items[k].status);
        Sample& s = samples[static_cast<size_t>(i)];
        s.ttft_ms = absl::ToDoubleMilliseconds(absl::Now() - started[static_cast<size_t>(i)]);
        s.tokens = 1;
        if (w.max_tokens <= 1) {
          finish(i);
          continue;
        }
        engine::DecodeSequence seq;
        seq.id = std::to_string(i);
        seq.prompt_tokens = w.prompt_tokens;
        seq.next_token = items[k].first.token;
        seq.max_tokens = w.max_tokens;
        seq.ignore_eos = true;
        seq.cache = std::move(caches[k]);
        if (mtp_caches[k] != nullptr) {
          seq.mtp_cache = std::move(mtp_caches[k]);
          seq.mtp_tokens = {seq.next_token};
          seq.mtp_hidden = std::move(items[k].last_hidden);
        }
        SPLITMOE_RETURN_IF_ERROR(decoder.Add(std::move(seq)));
      }
      admit();
      continue;  // prompts admitted meanwhile (max_tokens 1) are prefilled before decoding
    }
    SPLITMOE_ASSIGN_OR_RETURN(std::vector<engine::DecodedToken> step, decoder.Step());
    for (const engine::DecodedToken& t : step) {
      const int64_t i = std::stoll(t.id);
      ++samples[static_cast<size_t>(i)].tokens;
      if (t.finished) finish(i);
    }
    (void)decoder.TakeFinished();
    admit();
  }
  *wall_s = absl::ToDoubleSeconds(absl::Now() - start);
  *speculative = decoder.speculative_stats();
  return samples;
}

}  // namespace

absl::Status BenchCommand(int argc, char** argv) {
  Flags f;
  SPLITMOE_RETURN_IF_ERROR(f.Parse(argc, argv, 2,
                                   {"model", "endpoint", "concurrency", "requests",
                                    "prompt-tokens", "max-tokens", "json", "seed", "api-key",
                                    "speculative", "draft-tokens", "shared-prefix-tokens"},
                                   {}));
  if (f.Has("model") == f.Has("endpoint")) {
    return absl::InvalidArgumentError("bench needs exactly one of --model DIR and --endpoint HOST:PORT");
  }
  Workload w;
  SPLITMOE_ASSIGN_OR_RETURN(w.concurrency, f.GetInt("concurrency", 1));
  SPLITMOE_ASSIGN_OR_RETURN(w.requests, f.GetInt("requests", 16));
  SPLITMOE_ASSIGN_OR_RETURN(w.prompt_tokens, f.GetInt("prompt-tokens", 128));
  SPLITMOE_ASSIGN_OR_RETURN(w.max_tokens, f.GetInt("max-tokens", 32));
  SPLITMOE_ASSIGN_OR_RETURN(int64_t seed, f.GetInt("seed", 1));
  w.seed = static_cast<uint64_t>(seed);
  SPLITMOE_ASSIGN_OR_RETURN(w.draft_tokens, DraftTokensFromFlags(f));
  SPLITMOE_ASSIGN_OR_RETURN(w.shared_prefix_tokens, f.GetInt("shared-prefix-tokens", 0));
  if (w.shared_prefix_tokens < 0 || w.shared_prefix_tokens > w.prompt_tokens) {
    return absl::InvalidArgumentError("bench: --shared-prefix-tokens must be in [0, --prompt-tokens]");
  }
  if (w.draft_tokens > 0 && !f.Has("model")) {
    return absl::InvalidArgumentError(
        "bench: --speculative applies to --model; a cluster speculates when its decode workers "
        "do (up --speculative mtp)");
  }
  if (w.concurrency < 1 || w.concurrency > 4096 || w.requests < 1 || w.requests > 1000000 ||
      w.prompt_tokens < 1 || w.max_tokens < 1) {
    return absl::InvalidArgumentError(
        "bench: --concurrency in [1, 4096], --requests in [1, 1000000], --prompt-tokens and "
        "--max-tokens >= 1");
  }
  double wall_s = 0;
  engine::SpeculativeStats speculative;
  const std::string api_key = rpc::ClientApiKey(f.Get("api-key"));
  absl::StatusOr<v1::ClusterStatusResponse> before =
      f.Has("endpoint") ? ClusterCounters(f.Get("endpoint"), api_key)
                        : absl::UnimplementedError("no cluster");
  absl::StatusOr<std::vector<Sample>> samples =
      f.Has("model") ? RunModel(f.Get("model"), w, &wall_s, &speculative)
                     : RunEndpoint(f.Get("endpoint"), api_key, w, &wall_s);
  if (!samples.ok()) return samples.status();
  std::vector<double> ttft, tpot, e2e;
  int64_t tokens = 0, errors = 0;
  std::string first_error;
  for (const Sample& s : *samples) {
    if (!s.ok) {
      if (errors++ == 0) first_error = s.error;
      continue;
    }
    tokens += s.tokens;
    ttft.push_back(s.ttft_ms);
    e2e.push_back(s.e2e_ms);
    if (s.tokens > 1) tpot.push_back((s.e2e_ms - s.ttft_ms) / static_cast<double>(s.tokens - 1));
  }
  nlohmann::json out = {
      {"mode", f.Has("model") ? "model" : "endpoint"},
      {"target", f.Has("model") ? f.Get("model") : f.Get("endpoint")},
      {"concurrency", w.concurrency},
      {"requests", w.requests},
      {"prompt_tokens", w.prompt_tokens},
      {"max_tokens", w.max_tokens},
      {"shared_prefix_tokens", w.shared_prefix_tokens},
      {"seed", w.seed},
      {"errors", errors},
      {"output_tokens", tokens},
      {"duration_s", wall_s},
      {"output_tokens_per_s", wall_s > 0 ? static_cast<double>(tokens) / wall_s : 0.0},
      {"requests_per_s",
       wall_s > 0 ? static_cast<double>(w.requests - errors) / wall_s : 0.0},
      {"ttft_ms", Percentiles(ttft)},
      {"tpot_ms", Percentiles(tpot)},
      {"e2e_ms", Percentiles(e2e)}};
  if (errors > 0) out["first_error"] = first_error;
  if (before.ok()) {
    absl::SleepFor(absl::Milliseconds(500));  // the workers' last heartbeats carry the counters
    absl::StatusOr<v1::ClusterStatusResponse> after = ClusterCounters(f.Get("endpoint"), api_key);
    if (after.ok()) out["cluster"] = ClusterDelta(*before, *after);
  }
  if (w.draft_tokens > 0) {
    out["speculative"] = {{"draft_tokens", w.draft_tokens},
                          {"drafted", speculative.drafted},
                          {"accepted", speculative.accepted},
                          {"acceptance_rate", speculative.acceptance_rate()},
                          {"tokens_per_pass", speculative.tokens_per_pass()}};
  }
  std::printf("%s %s: %lld requests x (%lld prompt + %lld new tokens), concurrency %lld\n",
              out["mode"].get<std::string>().c_str(), out["target"].get<std::string>().c_str(),
              static_cast<long long>(w.requests), static_cast<long long>(w.prompt_tokens),
              static_cast<long long>(w.max_tokens), static_cast<long long>(w.concurrency));
  std::printf("output tokens/s %.1f  (%lld tokens in %.2f s, %lld errors)\n",
              out["output_tokens_per_s"].get<double>(), static_cast<long long>(tokens), wall_s,
              static_cast<long long>(errors));
  for (const char* key : {"ttft_ms", "tpot_ms", "e2e_ms"}) {
    std::printf("%-8s p50 %8.1f  p90 %8.1f  p99 %8.1f  mean %8.1f\n", key,
                out[key]["p50"].get<double>(), out[key]["p90"].get<double>(),
                out[key]["p99"].get<double>(), out[key]["mean"].get<double>());
  }
  if (w.draft_tokens > 0) {
    std::printf("speculative K=%lld: %lld of %lld drafts accepted (%.2f), %.2f tokens per pass\n",
                static_cast<long long>(w.draft_tokens), static_cast<long long>(speculative.accepted),
                static_cast<long long>(speculative.drafted), speculative.acceptance_rate(),
                speculative.tokens_per_pass());
  }
  if (out.contains("cluster")) {
    const nlohmann::json& k = out["cluster"];
    std::printf("cluster: prefix cache hit %llu of %llu looked-up prompt tokens\n",
                static_cast<unsigned long long>(k["prefix_tokens_hit"].get<uint64_t>()),
                static_cast<unsigned long long>(k["prefix_tokens_queried"].get<uint64_t>()));
    std::printf("cluster: at most %d sequences in a decode step, %llu requests preempted, %llu "
                "failovers\n",
                k["max_sequences_running"].get<int>(),
                static_cast<unsigned long long>(k["request_preemptions"].get<uint64_t>()),
                static_cast<unsigned long long>(k["request_failovers"].get<uint64_t>()));
  }
  if (errors > 0) std::printf("first error: %s\n", first_error.c_str());
  if (f.Has("json")) {
    std::ofstream file(f.Get("json"));
    file << out.dump(2) << "\n";
    if (!file) return absl::InternalError(absl::StrCat("bench: cannot write ", f.Get("json")));
  }
  return errors == 0 ? absl::OkStatus()
                     : absl::UnavailableError(
                           absl::StrCat("bench: ", errors, " requests failed: ", first_error));
}

}  // namespace splitmoe::cli
