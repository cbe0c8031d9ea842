// A chaos soak: a cluster with a spare of every role (2 routers, 2 prefill, 2 decode, 2 expert
// shards x 2 replicas) under steady load from concurrent clients spread over both routers, while
// a random process (a router included) is killed with SIGKILL every few seconds and `splitmoe up`
// restarts it. Asserts that no request is lost (a client retries, on the other router, only when
// the router it was talking to died), every output equals the engine's, and afterwards nothing
// is held: no request in flight, no cache block used or quarantined. Prints requests, kills per role, retries, failovers and the time the router took
// to notice each worker's death. SPLITMOE_CHAOS_SECONDS sets the length (default 75).
#include <grpcpp/grpcpp.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/engine/engine.h"
#include "common/process/subprocess.h"
#include "common/rpc/rpc.h"
#include "gtest/gtest.h"
#include "splitmoe/v1/generation.grpc.pb.h"
#include "splitmoe/v1/internal.grpc.pb.h"
#include "tests/testing/children.h"
#include "tests/testing/test_models.h"

namespace splitmoe {
namespace {

std::string Binary() {
  const char* dir = std::getenv("SPLITMOE_BINARY_DIR");
  return std::string(dir ? dir : ".") + "/bin/splitmoe";
}

// Children of `parent` running `splitmoe <role>`.
std::vector<pid_t> Children(pid_t parent, const std::string& role) {
  return testing::ChildrenMatching(parent, {"splitmoe " + role + " "});
}

struct Case {
  std::vector<int32_t> prompt;
  engine::SamplingParams sampling;
  int max_tokens = 16;
  std::vector<int32_t> want;
};

v1::GenerateRequest ToRequest(const Case& c) {
  v1::GenerateRequest r;
  *r.mutable_token_ids()->mutable_ids() = {c.prompt.begin(), c.prompt.end()};
  r.mutable_sampling()->set_temperature(c.sampling.temperature);
  r.mutable_sampling()->set_top_p(c.sampling.top_p);
  r.mutable_sampling()->set_top_k(static_cast<int32_t>(c.sampling.top_k));
  r.mutable_sampling()->set_seed(c.sampling.seed);
  r.mutable_stop()->set_max_tokens(c.max_tokens);
  r.mutable_stop()->set_ignore_eos(true);
  return r;
}

TEST(ChaosSoakTest, RandomKillsUnderLoadLoseNothingAndChangeNothing) {
  const char* env = std::getenv("SPLITMOE_CHAOS_SECONDS");
  const absl::Duration length = absl::Seconds(env != nullptr ? std::atoi(env) : 75);
  const std::string model = testing::TinyModel("chaos");
  auto e = engine::Engine::Load(model);
  ASSERT_TRUE(e.ok()) << e.status();

  // A pool of requests (greedy and seeded, prompts around the 16-token block) and the engine's
  // answers.
  std::mt19937_64 rng(2026);
  std::vector<Case> cases;
  const int lengths[] = {1, 7, 16, 17, 40, 90};
  for (int i = 0; i < 24; ++i) {
    Case c;
    for (int t = 0; t < lengths[i % 6]; ++t) {
      c.prompt.push_back(static_cast<int32_t>(rng() % (*e)->config().vocab_size));
    }
    c.max_tokens = 8 + static_cast<int>(rng() % 40);
    if (i % 2 == 1) c.sampling = {.temperature = 0.9, .top_p = 0.95, .top_k = 50, .seed = rng()};
    engine::GenerateRequest r;
    r.prompt = c.prompt;
    r.sampling = c.sampling;
    r.max_tokens = c.max_tokens;
    r.ignore_eos = true;
    auto out = (*e)->Generate(r, nullptr);
    ASSERT_TRUE(out.ok()) << out.status();
    c.want = out->tokens;
    cases.push_back(std::move(c));
  }

  auto up = process::Subprocess::Start(
      "up", {Binary(), "up", "--model", model, "--heartbeat-ms", "100", "--prefill", "2",
             "--decode", "2", "--experts", "2", "--expert-replicas", "2", "--block-tokens", "16",
             "--cache-blocks", "200", "--routers", "2"});
  ASSERT_TRUE(up.ok()) << up.status();
  auto ready = (*up)->ReadLineMatching("ready grpc=", absl::Seconds(180));
  ASSERT_TRUE(ready.ok()) << ready.status();
  const std::vector<std::string> endpoints = absl::StrSplit(*ready, ',');
  ASSERT_EQ(endpoints.size(), 2u) << *ready;
  std::unique_ptr<v1::Generation::Stub> generation[2];
  std::unique_ptr<v1::ClusterInfo::Stub> info[2];
  for (int i = 0; i < 2; ++i) {
    auto channel = grpc::CreateCustomChannel(endpoints[i], grpc::InsecureChannelCredentials(),
                                             rpc::ClientChannelArguments());
    generation[i] = v1::Generation::NewStub(channel);
    info[i] = v1::ClusterInfo::NewStub(channel);
  }
  // Router i's view; status() is the first live router's.
  auto status_of = [&](int i) -> std::optional<v1::ClusterStatusResponse> {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    v1::ClusterStatusResponse s;
    if (!info[i]->ClusterStatus(&ctx, v1::ClusterStatusRequest(), &s).ok()) return std::nullopt;
    return s;
  };
  auto status = [&]() -> std::optional<v1::ClusterStatusResponse> {
    if (auto s = status_of(0)) return s;
    return status_of(1);
  };
  auto healthy = [&](v1::WorkerRole role) {
    int n = 0;
    if (auto s = status()) {
      for (const auto& w : s->workers()) n += w.role() == role && w.healthy();
    }
    return n;
  };
  const std::map<v1::WorkerRole, int> full = {{v1::WORKER_ROLE_PREFILL, 2},
                                              {v1::WORKER_ROLE_DECODE, 2},
                                              {v1::WORKER_ROLE_EXPERT, 4}};
  // Both routers up, each with every worker registered.
  auto whole = [&] {
    for (int i = 0; i < 2; ++i) {
      auto s = status_of(i);
      if (!s) return false;
      std::map<v1::WorkerRole, int> n;
      for (const auto& w : s->workers()) n[w.role()] += w.healthy();
      for (const auto& [role, want] : full) {
        if (n[role] != want) return false;
      }
    }
    return true;
  };

  // Clients, spread over the two routers: each request until it succeeds; a failure is retried,
  // on the other router, only if a router was killed while it was in flight.
  std::mutex mu;
  std::vector<absl::Time> router_kills;
  std::atomic<bool> stop{false};
  std::atomic<int> requests{0}, retries{0}, lost{0}, changed{0};
  std::vector<std::string> failures;
  // A router killed while the request was in flight, or shortly before it was sent.
  auto router_died_since = [&](absl::Time t) {
    std::lock_guard<std::mutex> lock(mu);
    for (absl::Time k : router_kills) {
      if (k >= t - absl::Seconds(10)) return true;
    }
    return false;
  };
  std::vector<std::thread> clients;
  for (int k = 0; k < 4; ++k) {
    clients.emplace_back([&, k] {
      std::mt19937_64 pick(k);
      int router = k % 2;
      while (!stop.load()) {
        const Case& c = cases[pick() % cases.size()];
        ++requests;
        for (int attempt = 0;; ++attempt) {
          const absl::Time start = absl::Now();
          grpc::ClientContext ctx;
          ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
          auto reader = generation[router]->Generate(&ctx, ToRequest(c));
          v1::GenerateEvent event;
          std::vector<int32_t> got;
          while (reader->Read(&event)) got.insert(got.end(), event.token_ids().begin(), event.token_ids().end());
          const grpc::Status s = reader->Finish();
          if (s.ok()) {
            if (got != c.want) {
              ++changed;
              std::lock_guard<std::mutex> lock(mu);
              failures.push_back("output differs from the engine");
            }
            break;
          }
          // Only the router's own absence: an error a worker caused names the worker. The
          // other router serves meanwhile.
          const bool router_gone = s.error_code() == grpc::StatusCode::UNAVAILABLE &&
                                   s.error_message().find("worker") == std::string::npos;
          if (router_gone && router_died_since(start) && attempt < 300) {
            ++retries;
            router = 1 - router;
            if (attempt > 0) absl::SleepFor(absl::Milliseconds(100));
            continue;
          }
          ++lost;
          std::lock_guard<std::mutex> lock(mu);
          failures.push_back(absl::StrCat(absl::FormatTime(absl::Now()), " ", s.error_code(), ": ",
                                          s.error_message()));
          break;
        }
      }
    });
  }

  // The killer: one process at a time, the next only once the cluster is whole again.
  std::map<std::string, int> kills;
  uint64_t request_failovers = 0, part_failovers = 0;  // summed over router incarnations
  double router_recovery_ms = 0;  // kill to every worker registered with the new router
  std::vector<double> notice_ms;
  std::mt19937_64 chaos(7);
  const std::vector<std::string> roles = {"prefill", "decode", "expert", "expert", "router"};
  const absl::Time end = absl::Now() + length;
  while (absl::Now() < end) {
    absl::SleepFor(absl::Milliseconds(1500 + static_cast<int64_t>(chaos() % 2000)));
    const std::string role = roles[chaos() % roles.size()];
    const std::vector<pid_t> pids = Children((*up)->pid(), role);
    if (pids.empty()) continue;
    const pid_t victim = pids[chaos() % pids.size()];
    const v1::WorkerRole worker_role = role == "prefill" ? v1::WORKER_ROLE_PREFILL
                                       : role == "decode" ? v1::WORKER_ROLE_DECODE
                                                          : v1::WORKER_ROLE_EXPERT;
    const int before = role == "router" ? 0 : healthy(worker_role);
    // A router's counters die with it: keep both routers' as they were before the kill, and
    // add the dead one's once it is known which it was.
    std::optional<v1::ClusterStatusResponse> before_kill[2];
    if (role == "router") {
      for (int i = 0; i < 2; ++i) before_kill[i] = status_of(i);
    }
    const absl::Time killed = absl::Now();
    if (role == "router") {
      std::lock_guard<std::mutex> lock(mu);
      router_kills.push_back(killed);
    }
    ::kill(victim, SIGKILL);
    ++kills[role];
    if (role != "router") {
      while (healthy(worker_role) >= before && absl::Now() - killed < absl::Seconds(10)) {
        absl::SleepFor(absl::Milliseconds(5));
      }
      notice_ms.push_back(absl::ToDoubleMilliseconds(absl::Now() - killed));
    } else {
      for (int i = 0; i < 2; ++i) {
        if (before_kill[i] && !status_of(i)) {
          request_failovers += before_kill[i]->request_failovers();
          part_failovers += before_kill[i]->routing().failovers();
        }
      }
    }
    // `up` restarts it (after its back-off); wait until every role is whole again.
    const absl::Time deadline = absl::Now() + absl::Seconds(60);
    absl::SleepFor(absl::Milliseconds(300));
    while (!whole() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(100));
    ASSERT_TRUE(whole()) << "the cluster did not recover from killing a " << role;
    if (role == "router") {
      router_recovery_ms = std::max(router_recovery_ms, absl::ToDoubleMilliseconds(absl::Now() - killed));
    }
  }
  stop = true;
  for (auto& t : clients) t.join();

  // Nothing held afterwards (heartbeats lag a little).
  std::string held;
  for (int i = 0; i < 100; ++i) {
    held.clear();
    auto s = status();
    for (int r = 0; r < 2; ++r) {
      auto v = status_of(r);
      if (v && v->requests_in_flight() != 0) {
        absl::StrAppend(&held, "router ", r, " in flight ", v->requests_in_flight(), " ");
      }
    }
    if (!s) {
      held = "no status";
    } else {
      for (const auto& w : s->workers()) {
        const auto& l = w.load();
        if (l.requests_in_flight() || l.cache_blocks_used() || l.cache_blocks_quarantined() ||
            l.sequences_running()) {
          absl::StrAppend(&held, " ", w.worker_id(), " holds something");
        }
      }
    }
    if (held.empty()) break;
    absl::SleepFor(absl::Milliseconds(50));
  }
  std::optional<v1::ClusterStatusResponse> final_status[2] = {status_of(0), status_of(1)};
  for (int i = 0; i < 2; ++i) {
    if (!final_status[i]) continue;
    request_failovers += final_status[i]->request_failovers();
    part_failovers += final_status[i]->routing().failovers();
  }
  std::sort(notice_ms.begin(), notice_ms.end());
  std::printf(
      "chaos soak: %s, %d requests, %d attempts retried after a router death, %d lost, %d "
      "changed; "
      "kills: prefill %d, decode %d, expert %d, router %d; request failovers %llu, expert-part "
      "failovers %llu; worker death noticed in median %.0f ms, max %.0f ms; a killed router "
      "restarted by up (1 s back-off) with every worker registered again within %.0f ms (the other "
      "router serving meanwhile)\n",
      absl::FormatDuration(length).c_str(), requests.load(), retries.load(), lost.load(),
      changed.load(), kills["prefill"], kills["decode"], kills["expert"], kills["router"],
      static_cast<unsigned long long>(request_failovers),
      static_cast<unsigned long long>(part_failovers),
      notice_ms.empty() ? 0.0 : notice_ms[notice_ms.size() / 2],
      notice_ms.empty() ? 0.0 : notice_ms.back(), router_recovery_ms);
  for (size_t i = 0; i < failures.size() && i < 10; ++i) std::printf("  %s\n", failures[i].c_str());
  EXPECT_EQ(lost.load(), 0);
  EXPECT_EQ(changed.load(), 0);
  EXPECT_EQ(held, "");
  EXPECT_GT(requests.load(), 0);
  EXPECT_GT(kills["prefill"] + kills["decode"] + kills["expert"], 0);
  if (!notice_ms.empty()) EXPECT_LT(notice_ms.back(), 1000.0);
  EXPECT_EQ((*up)->Terminate(absl::Seconds(30)), "exited with code 0");
}

}  // namespace
}  // namespace splitmoe
