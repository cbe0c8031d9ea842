#include "common/metrics/metrics.h"

#include <prometheus/collectable.h>
#include <prometheus/metric_family.h>
#include <prometheus/text_serializer.h>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <sstream>
#include <thread>

#include <cstdlib>
#include <exception>
#include <iostream>
#include <mutex>

#include "common/base/log.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/base/tcp_listen.h"
#include "common/rpc/rpc.h"

namespace splitmoe::metrics {

std::string Scrape();

namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;

// Scrape-time families, collected by the exposer with the registry.
class ScrapeFamilies : public prometheus::Collectable {
 public:
  struct Entry {
    std::string name, help;
    Kind kind;
    std::function<std::vector<Sample>()> collect;
  };

  std::vector<prometheus::MetricFamily> Collect() const override {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<prometheus::MetricFamily> out;
    for (const auto& [id, e] : entries_) {
      prometheus::MetricFamily family;
      family.name = e.name;
      family.help = e.help;
      family.type = e.kind == Kind::kCounter ? prometheus::MetricType::Counter
                                             : prometheus::MetricType::Gauge;
      for (const Sample& s : e.collect()) {
        prometheus::ClientMetric m;
        for (const auto& [k, v] : s.labels) m.label.push_back({k, v});
        if (e.kind == Kind::kCounter) {
          m.counter.value = s.value;
        } else {
          m.gauge.value = s.value;
        }
        family.metric.push_back(std::move(m));
      }
      out.push_back(std::move(family));
    }
    return out;
  }

  uint64_t Add(Entry e) {
    std::lock_guard<std::mutex> lock(mu_);
    entries_.emplace(next_, std::move(e));
    return next_++;
  }
  void Remove(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu_);  // waits for a scrape in progress
    entries_.erase(id);
  }

 private:
  mutable std::mutex mu_;
  std::map<uint64_t, Entry> entries_;
  uint64_t next_ = 0;
};

// GET /metrics (and GET /health, 200 while the process lives: a probe that needs no
// credentials) over HTTP/1.1 with keep-alive, on one thread of its own (Boost.Beast).
class MetricsServer {
 public:
  ~MetricsServer() {
    ioc_.stop();
    if (thread_.joinable()) thread_.join();
  }

  absl::StatusOr<std::string> Start(const std::string& listen) {
    SPLITMOE_ASSIGN_OR_RETURN(std::string address,
                              ListenTcp(acceptor_, listen, "--metrics-listen"));
    Accept();
    thread_ = std::thread([this] { ioc_.run(); });
    return address;
  }

 private:
  struct Connection : std::enable_shared_from_this<Connection> {
    explicit Connection(tcp::socket socket) : stream(std::move(socket)) {}
    beast::tcp_stream stream;
    beast::flat_buffer buffer;
    http::request<http::empty_body> request;
    http::response<http::string_body> response;

    void Read() {
      request = {};
      stream.expires_after(std::chrono::seconds(30));
      http::async_read(stream, buffer, request,
                       [self = shared_from_this()](beast::error_code ec, size_t) {
                         if (ec) return self->Close();
                         self->Answer();
                       });
    }
    void Answer() {
      response = {};
      response.version(request.version());
      response.keep_alive(request.keep_alive());
      const beast::string_view target = request.target();
      const bool get = request.method() == http::verb::get;
      if (get && (target == "/metrics" || target.starts_with("/metrics?"))) {
        response.result(http::status::ok);
        response.set(http::field::content_type, "text/plain; version=0.0.4; charset=utf-8");
        response.body() = Scrape();
      } else if (get && target == "/health") {
        response.result(http::status::ok);
        response.set(http::field::content_type, "text/plain");
        response.body() = "ok\n";
      } else {
        // Anything else is answered and the connection closed (a HEAD would not expect the
        // body, so the connection could not be reused).
        response.keep_alive(false);
        response.result(get ? http::status::not_found : http::status::method_not_allowed);
        response.set(http::field::content_type, "text/plain");
        response.body() = "GET /metrics or /health\n";
      }
      response.prepare_payload();
      http::async_write(stream, response,
                        [self = shared_from_this()](beast::error_code ec, size_t) {
                          if (ec || !self->response.keep_alive()) return self->Close();
                          self->Read();
                        });
    }
    void Close() {
      beast::error_code ignored;
      stream.socket().shutdown(tcp::socket::shutdown_both, ignored);
      stream.close();
    }
  };

  void Accept() {
    acceptor_.async_accept([this](boost::system::error_code ec, tcp::socket socket) {
      if (!acceptor_.is_open() || ec == net::error::operation_aborted) return;
      if (ec) {  // out of descriptors and the like: try again shortly, not in a busy loop
        retry_.expires_after(std::chrono::milliseconds(100));
        retry_.async_wait([this](boost::system::error_code e) {
          if (!e) Accept();
        });
        return;
      }
      std::make_shared<Connection>(std::move(socket))->Read();
      Accept();
    });
  }

  net::io_context ioc_;
  tcp::acceptor acceptor_{ioc_};
  net::steady_timer retry_{ioc_};
  std::thread thread_;
};

struct State {
  std::mutex mu;
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
  std::shared_ptr<ScrapeFamilies> scraped = std::make_shared<ScrapeFamilies>();
  std::unique_ptr<MetricsServer> server;
};

State& GetState() {
  static State* state = new State();  // lives to the end of the process (scrapes may race exit)
  return *state;
}

template <typename T, typename Builder, typename... Args>
T& Get(Builder builder, const std::string& name, const std::string& help, const Labels& labels,
       Args&&... args) {
  try {
    auto& family = builder.Name(name).Help(help).Register(*GetState().registry);
    return family.Add(labels, std::forward<Args>(args)...);
  } catch (const std::exception& e) {
    SPLITMOE_LOG(ERROR, "metrics").With("metric", name) << "cannot make the metric: " << e.what();
    std::abort();
  }
}

}  // namespace

std::shared_ptr<prometheus::Registry> Registry() { return GetState().registry; }

prometheus::Counter& Counter(const std::string& name, const std::string& help,
                             const Labels& labels) {
  return Get<prometheus::Counter>(prometheus::BuildCounter(), name, help, labels);
}

prometheus::Gauge& Gauge(const std::string& name, const std::string& help, const Labels& labels) {
  return Get<prometheus::Gauge>(prometheus::BuildGauge(), name, help, labels);
}

prometheus::Histogram& Histogram(const std::string& name, const std::string& help,
                                 const std::vector<double>& buckets, const Labels& labels) {
  return Get<prometheus::Histogram>(prometheus::BuildHistogram(), name, help, labels,
                                    prometheus::Histogram::BucketBoundaries(buckets));
}

const std::vector<double>& LatencyBuckets() {
  static const std::vector<double> buckets = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                              0.1,    0.25,  0.5,    1,     2.5,  5,     10,
                                              30,     60,    120};
  return buckets;
}

Handle AddScrapeFamily(const std::string& name, const std::string& help, Kind kind,
                       std::function<std::vector<Sample>()> collect) {
  std::shared_ptr<ScrapeFamilies> scraped = GetState().scraped;
  const uint64_t id = scraped->Add({name, help, kind, std::move(collect)});
  return Handle(nullptr, [scraped, id](void*) { scraped->Remove(id); });
}

Handle ExportWorkerLoad(const std::string& role, std::function<v1::WorkerLoad()> load) {
  // One read of the load per scrape, shared by the families below.
  struct Cache {
    std::mutex mu;
    std::function<v1::WorkerLoad()> load;
    v1::WorkerLoad last;
  };
  auto cache = std::make_shared<Cache>();
  cache->load = std::move(load);
  const Labels base = {{"role", role}};
  auto field = [cache, base](auto getter) {
    return [cache, base, getter] {
      std::lock_guard<std::mutex> lock(cache->mu);
      return std::vector<Sample>{{base, static_cast<double>(getter(cache->last))}};
    };
  };
  std::vector<Handle> handles;
  // The first family re-reads the load; the others use that read.
  handles.push_back(AddScrapeFamily(
      "splitmoe_requests_in_flight", "Requests this worker is serving now", Kind::kGauge,
      [cache, base] {
        std::lock_guard<std::mutex> lock(cache->mu);
        cache->last = cache->load();
        return std::vector<Sample>{{base, static_cast<double>(cache->last.requests_in_flight())}};
      }));
  using L = v1::WorkerLoad;
  struct Field {
    const char* name;
    const char* help;
    Kind kind;
    double (*get)(const L&);
  };
  static const Field kFields[] = {
      {"splitmoe_cache_blocks_used", "Decode latent cache blocks in use", Kind::kGauge,
       [](const L& l) { return double(l.cache_blocks_used()); }},
      {"splitmoe_cache_blocks_free", "Decode latent cache blocks free", Kind::kGauge,
       [](const L& l) { return double(l.cache_blocks_free()); }},
      {"splitmoe_cache_blocks_quarantined",
       "Decode cache blocks of released reservations waiting for their writer's confirmation",
       Kind::kGauge, [](const L& l) { return double(l.cache_blocks_quarantined()); }},
      {"splitmoe_sequences_running", "Sequences decoding now", Kind::kGauge,
       [](const L& l) { return double(l.sequences_running()); }},
      {"splitmoe_latent_bytes_sent_total", "Latent bytes sent to decode workers", Kind::kCounter,
       [](const L& l) { return double(l.latent_bytes_sent()); }},
      {"splitmoe_latent_bytes_received_total", "Latent bytes received from prefill workers",
       Kind::kCounter, [](const L& l) { return double(l.latent_bytes_received()); }},
      {"splitmoe_latent_tokens_total", "Prompt tokens whose latents were sent or accepted",
       Kind::kCounter, [](const L& l) { return double(l.latent_tokens()); }},
      {"splitmoe_tokens_processed_total",
       "Tokens processed (prefill: prompts; decode: tokens generated; expert: token-expert "
       "assignments)",
       Kind::kCounter, [](const L& l) { return double(l.tokens_processed()); }},
      {"splitmoe_micro_batch_overlaps_total",
       "Times one micro-batch computed while the other waited for its experts", Kind::kCounter,
       [](const L& l) { return double(l.micro_batch_overlaps()); }},
      {"splitmoe_draft_tokens_proposed_total",
       "Draft tokens the MTP module proposed (speculative decoding)", Kind::kCounter,
       [](const L& l) { return double(l.draft_tokens_proposed()); }},
      {"splitmoe_draft_tokens_accepted_total",
       "Draft tokens the main model accepted (speculative decoding)", Kind::kCounter,
       [](const L& l) { return double(l.draft_tokens_accepted()); }},
      {"splitmoe_verify_passes_total",
       "Sequence steps that verified drafts (speculative decoding)", Kind::kCounter,
       [](const L& l) { return double(l.verify_passes()); }},
      {"splitmoe_preemptions_total",
       "Running sequences preempted because the decode cache could not grow", Kind::kCounter,
       [](const L& l) { return double(l.preemptions()); }},
      {"splitmoe_max_sequences_running", "Most sequences that ran in one decode step",
       Kind::kGauge, [](const L& l) { return double(l.max_sequences_running()); }},
      {"splitmoe_moe_batches_total", "MoE batches dispatched to the expert services",
       Kind::kCounter, [](const L& l) { return double(l.moe().batches()); }},
      {"splitmoe_moe_failovers_total",
       "Parts of MoE batches resent to another replica (a replica failed or missed its deadline)",
       Kind::kCounter, [](const L& l) { return double(l.moe().failovers()); }},
  };
  for (const Field& f : kFields) {
    auto get = f.get;
    handles.push_back(AddScrapeFamily(f.name, f.help, f.kind,
                                      field([get](const L& l) { return get(l); })));
  }
  handles.push_back(AddScrapeFamily(
      "splitmoe_moe_parts_total", "Parts of MoE batches sent, by transport", Kind::kCounter,
      [cache, base] {
        std::lock_guard<std::mutex> lock(cache->mu);
        Labels ucx = base, grpc = base;
        ucx["transport"] = "ucx";
        grpc["transport"] = "grpc";
        return std::vector<Sample>{{ucx, double(cache->last.moe().parts_ucx())},
                                   {grpc, double(cache->last.moe().parts_grpc())}};
      }));
  handles.push_back(AddScrapeFamily(
      "splitmoe_moe_expert_tokens_total",
      "Token-expert assignments this worker dispatched, per routed expert (all MoE layers)",
      Kind::kCounter, [cache, base] {
        std::lock_guard<std::mutex> lock(cache->mu);
        std::vector<double> per_expert;
        for (const v1::MoeLayerTokens& layer : cache->last.moe().layers()) {
          if (per_expert.size() < static_cast<size_t>(layer.expert_tokens_size()))
            per_expert.resize(static_cast<size_t>(layer.expert_tokens_size()));
          for (int e = 0; e < layer.expert_tokens_size(); ++e)
            per_expert[static_cast<size_t>(e)] += static_cast<double>(layer.expert_tokens(e));
        }
        std::vector<Sample> out;
        for (size_t e = 0; e < per_expert.size(); ++e) {
          Labels l = base;
          l["expert"] = absl::StrCat(e);
          out.push_back({std::move(l), per_expert[e]});
        }
        return out;
      }));
  handles.push_back(AddScrapeFamily(
      "splitmoe_moe_tokens_by_devices_total",
      "Tokens whose experts lay on exactly `devices` expert shards", Kind::kCounter,
      [cache, base] {
        std::lock_guard<std::mutex> lock(cache->mu);
        std::vector<Sample> out;
        for (int d = 1; d < cache->last.moe().devices_touched_size(); ++d) {
          Labels l = base;
          l["devices"] = absl::StrCat(d);
          out.push_back({std::move(l), double(cache->last.moe().devices_touched(d))});
        }
        return out;
      }));
  return Handle(new std::vector<Handle>(std::move(handles)),
                [](void* p) { delete static_cast<std::vector<Handle>*>(p); });
}

absl::StatusOr<std::string> Serve(const std::string& listen) {
  State& state = GetState();
  std::lock_guard<std::mutex> lock(state.mu);
  if (state.server != nullptr) {
    return absl::FailedPreconditionError("metrics are already served by this process");
  }
  auto server = std::make_unique<MetricsServer>();
  SPLITMOE_ASSIGN_OR_RETURN(std::string address, server->Start(listen));
  state.server = std::move(server);
  return absl::StrCat("http://", rpc::AdvertisedAddress(address), "/metrics");
}

std::string Scrape() {
  State& state = GetState();
  std::vector<prometheus::MetricFamily> families = state.registry->Collect();
  std::vector<prometheus::MetricFamily> scraped = state.scraped->Collect();
  families.insert(families.end(), std::make_move_iterator(scraped.begin()),
                  std::make_move_iterator(scraped.end()));
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, families);
  return out.str();
}

}  // namespace splitmoe::metrics
