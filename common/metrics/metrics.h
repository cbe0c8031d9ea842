// Prometheus metrics of this process (Debian's prometheus-cpp for the registry and the text
// format): one registry per process, served as GET /metrics by `Serve` on the role's
// --metrics-listen HOST:PORT (a small Boost.Beast server: prometheus-cpp's civetweb exposer
// cannot bind port 0 and refused to start inside the gRPC processes). The same port answers
// GET /health with 200 while the process lives: a liveness probe that needs no credentials.
//
// Two kinds of metric:
//   - counters, gauges and histograms updated where things happen (the request path), through
//     the registry (thread-safe, lock-free updates);
//   - families computed at scrape time from state someone else owns (`AddScrapeFamily`), e.g. a
//     worker's load as its heartbeat reports it (`ExportWorkerLoad`). The function runs on the
//     scraping thread, so it may only read thread-safe snapshots; the returned handle unregisters
//     it (waiting for a scrape in progress), so what it reads may die after the handle.
// Names follow Prometheus' conventions: splitmoe_ prefix, base units (seconds, bytes), _total
// for counters.
//
//   metrics::Counter("splitmoe_requests_total", "Requests by outcome", {{"outcome", "ok"}})
//       .Increment();
//   auto handle = metrics::ExportWorkerLoad("decode", [&] { return gauge.Get(); });
//   SPLITMOE_ASSIGN_OR_RETURN(std::string url, metrics::Serve("0.0.0.0:9400"));
#ifndef SPLITMOE_COMMON_METRICS_METRICS_H_
#define SPLITMOE_COMMON_METRICS_METRICS_H_

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "splitmoe/v1/internal.pb.h"

namespace splitmoe::metrics {

using Labels = std::map<std::string, std::string>;

// This process's registry.
std::shared_ptr<prometheus::Registry> Registry();

// The metric `name` with `labels` (created on first use; the same name always has one help and
// type). Never throws: a name that Prometheus refuses is a programming error and aborts.
prometheus::Counter& Counter(const std::string& name, const std::string& help,
                             const Labels& labels = {});
prometheus::Gauge& Gauge(const std::string& name, const std::string& help,
                         const Labels& labels = {});
prometheus::Histogram& Histogram(const std::string& name, const std::string& help,
                                 const std::vector<double>& buckets, const Labels& labels = {});

// Latency buckets in seconds, 0.5 ms to 120 s.
const std::vector<double>& LatencyBuckets();

enum class Kind { kGauge, kCounter };
struct Sample {
  Labels labels;
  double value = 0;
};
using Handle = std::shared_ptr<void>;
// A family whose samples `collect` gives at each scrape. Unregistered when the handle goes.
Handle AddScrapeFamily(const std::string& name, const std::string& help, Kind kind,
                       std::function<std::vector<Sample>()> collect);

// A worker's load (what its heartbeat reports) as metrics labelled role=`role`: requests in
// flight, cache blocks used / free / quarantined, sequences running, latent bytes and tokens
// moved, tokens processed, micro-batch overlaps, and the MoE dispatch counters (batches, parts by
// transport, failovers, per-layer per-expert token counts, the devices a token touched).
Handle ExportWorkerLoad(const std::string& role, std::function<v1::WorkerLoad()> load);

// Serves GET /metrics on HOST:PORT (port 0: any) until the process ends; returns the URL
// "http://HOST:PORT/metrics" (a wildcard host advertised as this machine's name, as workers
// register their gRPC address). An error when it cannot listen. At most once per process.
absl::StatusOr<std::string> Serve(const std::string& listen);

// What GET /metrics answers now (Prometheus' text format).
std::string Scrape();

}  // namespace splitmoe::metrics

#endif  // SPLITMOE_COMMON_METRICS_METRICS_H_
