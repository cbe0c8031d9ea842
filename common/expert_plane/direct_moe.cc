#include "common/expert_plane/direct_moe.h"

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <numeric>
#include <set>

#include "absl/strings/str_cat.h"
#include "common/engine/overlap.h"
#include "common/rpc/rpc.h"
#include "common/runtime/spin.h"

namespace splitmoe::expert_plane {
namespace {

// One answer (or failure) of one attempt, queued by an expert client's reader thread.
struct Answer {
  size_t part = 0;
  std::string address;
  absl::StatusOr<v1::ExpertResult> result;
};

// Shared with the callbacks, which may outlive the call (a late answer of a stalled replica).
struct CallState {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Answer> answers;
  std::atomic<uint64_t> arrived{0};  // answers ever queued: what a polling caller watches
};

struct Attempt {
  std::string address;
  absl::Time deadline;
  bool expired = false;   // its deadline passed (or it failed): a failover was tried for it
  bool answered = false;  // it failed: no answer can come any more
};

struct Part {
  routing::ShardBatch batch;
  std::vector<Attempt> attempts;
  std::set<std::string> tried;
  bool done = false;
  absl::Time give_up;
  std::vector<float> partial;
  std::string last_error;
};

}  // namespace

std::vector<routing::ShardBatch> SplitByExpert(const routing::ShardBatch& part, int32_t groups) {
  std::map<int32_t, int64_t> count;
  for (int32_t e : part.expert_ids) ++count[e];
  std::vector<std::pair<int32_t, int64_t>> experts(count.begin(), count.end());
  std::stable_sort(experts.begin(), experts.end(),
                   [](const auto& a, const auto& b) { return a.second > b.second; });
  groups = std::max<int32_t>(1, std::min<int32_t>(groups, static_cast<int32_t>(experts.size())));
  std::vector<int64_t> load(static_cast<size_t>(groups), 0);
  std::map<int32_t, int32_t> group_of;
  for (const auto& [e, n] : experts) {
    const auto g = static_cast<int32_t>(std::min_element(load.begin(), load.end()) - load.begin());
    group_of[e] = g;
    load[static_cast<size_t>(g)] += n;
  }
  std::vector<routing::ShardBatch> shares(static_cast<size_t>(groups));
  for (auto& s : shares) s.shard = part.shard;
  for (size_t i = 0; i < part.rows.size(); ++i) {
    for (int32_t j = part.offsets[i]; j < part.offsets[i + 1]; ++j) {
      routing::ShardBatch& s = shares[static_cast<size_t>(group_of[part.expert_ids[j]])];
      if (s.rows.empty() || s.rows.back() != part.rows[i]) {
        if (s.offsets.empty()) s.offsets.push_back(0);
        s.rows.push_back(part.rows[i]);
        s.offsets.push_back(s.offsets.back());
      }
      s.expert_ids.push_back(part.expert_ids[j]);
      s.weights.push_back(part.weights[j]);
      ++s.offsets.back();
    }
  }
  shares.erase(std::remove_if(shares.begin(), shares.end(),
                              [](const routing::ShardBatch& s) { return s.rows.empty(); }),
               shares.end());
  return shares;
}

absl::string_view MoeTransportName(MoeTransport transport) {
  return transport == MoeTransport::kUcx ? "ucx" : "grpc";
}

DirectMoeExecutor::DirectMoeExecutor(const model::ModelConfig& config,
                                     const model::ModelWeights& weights,
                                     const RoutingTableWatcher* watcher, DirectMoeOptions options)
    : config_(config), weights_(weights), watcher_(watcher), options_(options) {}

absl::StatusOr<std::unique_ptr<DirectMoeExecutor>> DirectMoeExecutor::Create(
    const model::ModelConfig& config, const model::ModelWeights& weights,
    const RoutingTableWatcher* watcher, DirectMoeOptions options) {
  std::unique_ptr<DirectMoeExecutor> moe(new DirectMoeExecutor(config, weights, watcher, options));
  if (options.transport == MoeTransport::kUcx) {
    absl::StatusOr<std::unique_ptr<UcxExpertLink>> link =
        UcxExpertLink::Create("moe", options.busy_poll);
    if (!link.ok()) return link.status();
    moe->ucx_ = std::move(*link);
  }
  return moe;
}

DirectMoeExecutor::~DirectMoeExecutor() {
  std::map<std::string, Replica> replicas;
  {
    std::lock_guard<std::mutex> lock(replicas_mu_);
    replicas.swap(replicas_);
  }
  // Clients close (and fail what they still wait for) outside the lock.
}

std::shared_ptr<const DirectMoeExecutor::View> DirectMoeExecutor::ViewOf(
    std::shared_ptr<const v1::RoutingTable> table) {
  std::lock_guard<std::mutex> view_lock(view_mu_);
  if (view_ != nullptr && view_->table == table) return view_;
  // A caller holding an older table of the same router (two passes at once) uses the newer
  // view: the view only moves forward, so it never reopens what a newer table closed.
  if (view_ != nullptr && view_->table->router_id() == table->router_id() &&
      table->version() < view_->table->version()) {
    return view_;
  }
  auto built = std::make_shared<View>();
  View& v = *built;
  v.table = table;
  const int64_t n = config_.n_routed_experts;
  v.expert_to_shard.assign(static_cast<size_t>(n), -1);
  for (int64_t e = 0; e < std::min<int64_t>(n, table->expert_to_shard_size()); ++e)
    v.expert_to_shard[static_cast<size_t>(e)] = table->expert_to_shard(static_cast<int>(e));
  int32_t shards = 0;
  for (int32_t s : v.expert_to_shard) shards = std::max(shards, s + 1);
  for (const v1::ExpertPool& pool : table->pools()) shards = std::max(shards, pool.shard() + 1);
  v.pools.assign(static_cast<size_t>(shards), nullptr);
  for (const v1::ExpertPool& pool : table->pools()) {
    if (pool.shard() >= 0) v.pools[static_cast<size_t>(pool.shard())] = &pool;
  }
  const size_t layers = static_cast<size_t>(config_.num_hidden_layers + config_.num_nextn_predict_layers);
  v.bias.resize(layers);
  for (size_t l = 0; l < layers; ++l) {
    const model::LayerWeights* w =
        l < weights_.layers.size()
            ? &weights_.layers[l]
            : (l - weights_.layers.size() < weights_.mtp.size()
                   ? &weights_.mtp[l - weights_.layers.size()].block
                   : nullptr);
    if (w != nullptr) v.bias[l] = w->gate_bias;
  }
  v.placement_id = table->placement().id();
  v.primary.resize(layers);
  v.copies.resize(layers);
  for (const v1::LayerPlacement& l : table->placement().layers()) {
    if (l.layer() < 0 || static_cast<size_t>(l.layer()) >= layers || l.experts_size() != n) continue;
    std::vector<int32_t> primary(static_cast<size_t>(n), -1);
    std::vector<std::vector<int32_t>> copies(static_cast<size_t>(n));
    bool ok = true;
    for (int64_t e = 0; e < n && ok; ++e) {
      const auto& c = l.experts(static_cast<int>(e)).shards();
      copies[static_cast<size_t>(e)].assign(c.begin(), c.end());
      ok = !c.empty();
      for (int32_t s : c) ok = ok && s >= 0 && s < shards;
      if (ok) primary[static_cast<size_t>(e)] = c[0];
    }
    if (!ok) continue;  // a malformed layer: the default placement serves it
    // Copies on shards with no live replica are skipped. Without a binding device limit a live
    // copy stands in for a dead primary; with one the primary stays (it bounds the shards).
    const bool binding = table->max_devices() > 0 && table->max_devices() < shards;
    auto live = [&](int32_t s) {
      return v.pools[static_cast<size_t>(s)] != nullptr &&
             v.pools[static_cast<size_t>(s)]->replicas_size() > 0;
    };
    for (int64_t e = 0; e < n; ++e) {
      std::vector<int32_t>& c = copies[static_cast<size_t>(e)];
      std::vector<int32_t> kept;
      for (size_t i = 0; i < c.size(); ++i) {
        if (live(c[i]) || (i == 0 && binding)) kept.push_back(c[i]);
      }
      if (kept.empty()) continue;  // nothing live: the primary stays and fails by name
      c = std::move(kept);
      primary[static_cast<size_t>(e)] = c[0];
    }
    v.primary[static_cast<size_t>(l.layer())] = std::move(primary);
    v.copies[static_cast<size_t>(l.layer())] = std::move(copies);
  }
  for (const v1::LayerBias& b : table->online_bias()) {
    if (b.layer() < 0 || static_cast<size_t>(b.layer()) >= layers || b.bias_size() != n) continue;
    std::vector<float>& bias = v.bias[static_cast<size_t>(b.layer())];
    if (bias.empty()) bias.assign(static_cast<size_t>(n), 0.0f);
    for (int64_t e = 0; e < n; ++e) bias[static_cast<size_t>(e)] += b.bias(static_cast<int>(e));
  }
  // Connections to replicas that left the table are closed.
  std::set<std::string> live;
  for (const v1::ExpertPool& pool : table->pools()) {
    for (const v1::ExpertReplica& r : pool.replicas()) live.insert(r.address());
  }
  std::vector<std::shared_ptr<ExpertChannel>> closing;
  {
    std::lock_guard<std::mutex> lock(replicas_mu_);
    for (auto it = replicas_.begin(); it != replicas_.end();) {
      if (live.count(it->first) == 0) {
        closing.push_back(std::move(it->second.client));
        it = replicas_.erase(it);
      } else {
        ++it;
      }
    }
  }
  closing.clear();
  view_ = std::move(built);
  return view_;
}

std::vector<const v1::ExpertReplica*> DirectMoeExecutor::Candidates(const v1::ExpertPool& pool,
                                                                    absl::Time now) {
  struct Entry {
    const v1::ExpertReplica* replica;
    bool suspect;
    uint64_t sent;
  };
  std::vector<Entry> entries;
  {
    std::lock_guard<std::mutex> lock(replicas_mu_);
    for (const v1::ExpertReplica& r : pool.replicas()) {
      const Replica& rep = replicas_[r.address()];
      entries.push_back({&r, now < rep.suspect_until, rep.assignments_sent});
    }
  }
  std::stable_sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.suspect != b.suspect ? !a.suspect : a.sent < b.sent;
  });
  std::vector<const v1::ExpertReplica*> out;
  for (const Entry& e : entries) out.push_back(e.replica);
  return out;
}

absl::StatusOr<std::shared_ptr<ExpertChannel>> DirectMoeExecutor::Client(
    const v1::ExpertReplica& replica) {
  const std::string& address = replica.address();
  {
    std::lock_guard<std::mutex> lock(replicas_mu_);
    Replica& r = replicas_[address];
    if (r.client != nullptr && !r.client->broken()) return r.client;
  }
  absl::StatusOr<std::unique_ptr<ExpertChannel>> client =
      absl::FailedPreconditionError("no UCX expert transport here or there");
  if (ucx_ != nullptr && !replica.ucx_worker_address().empty()) {
    client = ucx_->Connect(replica, options_.connect_timeout);
  }
  // No UCX path to the replica (or none asked for): its gRPC stream.
  if (client.status().code() == absl::StatusCode::kFailedPrecondition) {
    absl::StatusOr<std::unique_ptr<ExpertClient>> grpc =
        ExpertClient::Connect(address, options_.connect_timeout);
    if (grpc.ok()) {
      client = std::unique_ptr<ExpertChannel>(std::move(*grpc));
    } else {
      client = grpc.status();
    }
  }
  if (!client.ok()) return client.status();
  std::shared_ptr<ExpertChannel> shared = std::move(*client);
  std::lock_guard<std::mutex> lock(replicas_mu_);
  Replica& r = replicas_[address];
  // Another pass may have connected meanwhile: keep the one already in use (ours closes).
  if (r.client != nullptr && !r.client->broken()) return r.client;
  r.client = shared;
  return shared;
}

void DirectMoeExecutor::MarkSuspect(const std::string& address, absl::Time now) {
  std::lock_guard<std::mutex> lock(replicas_mu_);
  replicas_[address].suspect_until = now + options_.suspect_for;
}

void DirectMoeExecutor::Count(int64_t layer, const std::vector<routing::ShardBatch>& plan,
                              int64_t rows) {
  std::vector<int32_t> touched(static_cast<size_t>(rows), 0);
  for (const routing::ShardBatch& b : plan) {
    for (int32_t r : b.rows) ++touched[static_cast<size_t>(r)];
  }
  std::lock_guard<std::mutex> lock(stats_mu_);
  stats_.set_batches(stats_.batches() + 1);
  v1::MoeLayerTokens* entry = nullptr;
  for (v1::MoeLayerTokens& l : *stats_.mutable_layers()) {
    if (l.layer() == layer) entry = &l;
  }
  if (entry == nullptr) {
    entry = stats_.add_layers();
    entry->set_layer(static_cast<int32_t>(layer));
    entry->mutable_expert_tokens()->Resize(static_cast<int>(config_.n_routed_experts), 0);
  }
  for (const routing::ShardBatch& b : plan) {
    for (int32_t e : b.expert_ids) entry->set_expert_tokens(e, entry->expert_tokens(e) + 1);
  }
  for (int32_t d : touched) {
    while (stats_.devices_touched_size() <= d) stats_.add_devices_touched(0);
    stats_.set_devices_touched(d, stats_.devices_touched(d) + 1);
  }
}

v1::MoeStats DirectMoeExecutor::Stats() const {
  std::lock_guard<std::mutex> lock(stats_mu_);
  v1::MoeStats out = stats_;
  out.set_failovers(failovers_.load());
  out.set_parts_ucx(parts_ucx_.load());
  out.set_parts_grpc(parts_grpc_.load());
  return out;
}

// One MoE layer in flight: its parts, their attempts, and the answers as they come.
class DirectMoeExecutor::Call : public engine::MoeExecutor::Pending {
 public:
  Call(DirectMoeExecutor* owner, int64_t layer, int64_t rows, float* out)
      : owner_(owner), layer_(layer), rows_(rows), out_(out) {}
  absl::Status Wait() override;

 private:
  friend class DirectMoeExecutor;
  // Sends part i to `replica`; a failure to connect or send comes back as an answer like any.
  void Send(size_t i, const v1::ExpertReplica& replica);
  // Resends part i to a replica of its pool it has not tried; false when none is left.
  bool FailOver(size_t i);
  absl::Status Collect();

  DirectMoeExecutor* owner_;
  int64_t layer_, rows_;
  float* out_;
  absl::Status failed_;  // set by Start: nothing was sent
  std::shared_ptr<const View> view_;
  std::vector<Part> parts_;
  std::shared_ptr<CallState> state_ = std::make_shared<CallState>();
  std::string hidden_bytes_;
  std::vector<std::shared_ptr<ExpertChannel>> clients_;  // every channel this call sent on
};

std::unique_ptr<engine::MoeExecutor::Pending> DirectMoeExecutor::Start(int64_t layer,
                                                                      const float* x,
                                                                      const float* scores,
                                                                      int64_t rows, float* out) {
  auto call = std::make_unique<Call>(this, layer, rows, out);
  call->failed_ = Prepare(*call, x, scores);
  return call;
}

absl::Status DirectMoeExecutor::Prepare(Call& call, const float* x, const float* scores) {
  const int64_t h = config_.hidden_size, n = config_.n_routed_experts;
  const int64_t layer = call.layer_, rows = call.rows_;
  std::fill(call.out_, call.out_ + rows * h, 0.0f);
  if (rows == 0) return absl::OkStatus();
  std::shared_ptr<const v1::RoutingTable> table = watcher_->Current();
  if (table == nullptr) {
    return absl::UnavailableError("no routing table from the router yet: no expert pool known");
  }
  call.view_ = ViewOf(std::move(table));
  const View& view = *call.view_;
  if (layer < 0 || static_cast<size_t>(layer) >= view.bias.size()) {
    return absl::InvalidArgumentError(absl::StrCat("MoE layer ", layer, " out of range"));
  }
  for (int64_t e = 0; e < n; ++e) {
    if (view.expert_to_shard[static_cast<size_t>(e)] < 0) {
      return absl::UnavailableError(absl::StrCat(
          "routed expert ", e, " is hosted by no expert shard the router knows (table version ",
          view.table->version(), ")"));
    }
  }
  const bool placed = !view.primary[static_cast<size_t>(layer)].empty();
  absl::StatusOr<std::vector<routing::ShardBatch>> plan = routing::PlanDispatch(
      config_, absl::MakeConstSpan(scores, static_cast<size_t>(rows * n)), rows,
      view.bias[static_cast<size_t>(layer)],
      placed ? view.primary[static_cast<size_t>(layer)] : view.expert_to_shard,
      static_cast<int32_t>(view.pools.size()), view.table->max_devices(),
      placed ? absl::MakeConstSpan(view.copies[static_cast<size_t>(layer)])
             : absl::Span<const std::vector<int32_t>>());
  if (!plan.ok()) return plan.status();
  Count(layer, *plan, rows);

  // Parts: each shard's batch, split over its pool when large enough.
  const absl::Time now = absl::Now();
  std::vector<const v1::ExpertReplica*> first_choice;
  for (routing::ShardBatch& b : *plan) {
    const v1::ExpertPool* pool = view.pools[static_cast<size_t>(b.shard)];
    if (pool == nullptr || pool->replicas_size() == 0) {
      return absl::UnavailableError(
          absl::StrCat("MoE layer ", layer, ": expert shard ", b.shard,
                       " has no live replica (table version ", view.table->version(), ")"));
    }
    std::vector<const v1::ExpertReplica*> candidates = Candidates(*pool, now);
    const auto assignments = static_cast<int64_t>(b.expert_ids.size());
    std::vector<routing::ShardBatch> shares;
    if (candidates.size() > 1 && assignments >= options_.min_split_assignments) {
      shares = SplitByExpert(b, static_cast<int32_t>(candidates.size()));
    } else {
      shares.push_back(std::move(b));
    }
    for (size_t i = 0; i < shares.size(); ++i) {
      Part p;
      p.batch = std::move(shares[i]);
      p.give_up = now + options_.give_up_after;
      call.parts_.push_back(std::move(p));
      first_choice.push_back(candidates[i % candidates.size()]);
    }
  }
  call.hidden_bytes_ =
      rpc::EncodeTensor(absl::MakeConstSpan(x, static_cast<size_t>(rows * h)), options_.dtype);
  // All parts go out before any answer is awaited: one round trip, every replica in parallel.
  for (size_t i = 0; i < call.parts_.size(); ++i) call.Send(i, *first_choice[i]);
  return absl::OkStatus();
}

void DirectMoeExecutor::Call::Send(size_t i, const v1::ExpertReplica& replica) {
  const std::string& address = replica.address();
  const DirectMoeOptions& options = owner_->options_;
  const int64_t h = owner_->config_.hidden_size;
  const size_t width = options.dtype == v1::WIRE_DTYPE_BF16 ? 2 : 4;
  Part& p = parts_[i];
  const absl::Time t = absl::Now();
  p.tried.insert(address);
  p.attempts.push_back(
      {address, t + options.deadline +
                    options.deadline_per_row * static_cast<int64_t>(p.batch.rows.size())});
  v1::ExpertBatch eb;
  eb.set_batch_id(owner_->next_batch_id_.fetch_add(1));
  eb.set_layer(static_cast<int32_t>(layer_));
  eb.set_tokens(static_cast<int32_t>(p.batch.rows.size()));
  eb.set_dtype(options.dtype);
  eb.set_placement_id(view_->placement_id);
  std::string* hidden = eb.mutable_hidden();
  hidden->reserve(p.batch.rows.size() * h * width);
  for (int32_t row : p.batch.rows)
    hidden->append(hidden_bytes_, static_cast<size_t>(row) * h * width, h * width);
  *eb.mutable_offsets() = {p.batch.offsets.begin(), p.batch.offsets.end()};
  *eb.mutable_expert_ids() = {p.batch.expert_ids.begin(), p.batch.expert_ids.end()};
  *eb.mutable_weights() = {p.batch.weights.begin(), p.batch.weights.end()};
  {
    std::lock_guard<std::mutex> lock(owner_->replicas_mu_);
    owner_->replicas_[address].assignments_sent += p.batch.expert_ids.size();
  }
  auto done = [state = state_, i, address](absl::StatusOr<v1::ExpertResult> r) {
    std::lock_guard<std::mutex> lock(state->mu);
    state->answers.push_back({i, address, std::move(r)});
    state->arrived.fetch_add(1, std::memory_order_release);
    state->cv.notify_all();
  };
  absl::StatusOr<std::shared_ptr<ExpertChannel>> client = owner_->Client(replica);
  if (!client.ok()) return done(client.status());
  owner_->bytes_sent_ += eb.ByteSizeLong();
  ++((*client)->transport() == "ucx" ? owner_->parts_ucx_ : owner_->parts_grpc_);
  // Held until the call ends: a client dropped from the map meanwhile (a newer table without
  // the replica) still delivers this part's answer.
  clients_.push_back(*client);
  (*client)->Send(std::move(eb), std::move(done));
}

bool DirectMoeExecutor::Call::FailOver(size_t i) {
  const v1::ExpertPool* pool = view_->pools[static_cast<size_t>(parts_[i].batch.shard)];
  for (const v1::ExpertReplica* replica : owner_->Candidates(*pool, absl::Now())) {
    if (parts_[i].tried.count(replica->address())) continue;
    ++owner_->failovers_;
    Send(i, *replica);
    return true;
  }
  return false;
}

absl::Status DirectMoeExecutor::Call::Wait() {
  if (!failed_.ok()) return failed_;
  absl::Status status;
  {
    // Inside a micro-batch pass, the other pass computes while this one waits.
    engine::ComputeReleased away;
    status = Collect();
  }
  if (!status.ok()) return status;
  const int64_t h = owner_->config_.hidden_size;
  for (const Part& p : parts_)
    routing::CombineShardOutput(p.batch, p.partial, h, absl::MakeSpan(out_, rows_ * h));
  return absl::OkStatus();
}

absl::Status DirectMoeExecutor::Call::Collect() {
  const DirectMoeOptions& options = owner_->options_;
  const int64_t h = owner_->config_.hidden_size;
  size_t remaining = parts_.size();
  uint64_t taken = 0;  // answers handled so far
  while (remaining > 0) {
    // The next moment something must happen: an attempt's deadline or a part's last chance.
    absl::Time wake = absl::InfiniteFuture();
    for (const Part& p : parts_) {
      if (p.done) continue;
      wake = std::min(wake, p.give_up);
      for (const Attempt& a : p.attempts) {
        if (!a.expired) wake = std::min(wake, a.deadline);
      }
    }
    std::deque<Answer> answers;
    runtime::SpinFor(std::min(options.busy_poll, wake - absl::Now()), [&] {
      return state_->arrived.load(std::memory_order_acquire) > taken;
    });
    {
      std::unique_lock<std::mutex> lock(state_->mu);
      state_->cv.wait_for(lock, absl::ToChronoMicroseconds(std::max(wake - absl::Now(),
                                                                     absl::ZeroDuration())),
                          [&] { return !state_->answers.empty(); });
      answers.swap(state_->answers);
    }
    taken += answers.size();
    for (Answer& a : answers) {
      Part& p = parts_[a.part];
      if (p.done) continue;  // another replica answered first
      absl::Status s = a.result.status();
      if (s.ok() && !a.result->error().empty()) s = absl::UnavailableError(a.result->error());
      if (s.ok()) {
        s = rpc::DecodeTensor(a.result->output(), a.result->dtype(),
                              static_cast<int64_t>(p.batch.rows.size()) * h, &p.partial);
      }
      if (s.ok()) {
        p.done = true;
        --remaining;
        continue;
      }
      p.last_error = absl::StrCat(a.address, ": ", s.message());
      owner_->MarkSuspect(a.address, absl::Now());
      for (Attempt& at : p.attempts) {
        if (at.address == a.address) at.expired = at.answered = true;
      }
      // A late attempt (past its deadline) may still answer: wait for it until give_up.
      const bool outstanding = std::any_of(p.attempts.begin(), p.attempts.end(),
                                           [](const Attempt& at) { return !at.answered; });
      if (!FailOver(a.part) && !outstanding) {
        return absl::UnavailableError(absl::StrCat("MoE layer ", layer_, ": expert shard ",
                                                   p.batch.shard, " failed on every live replica (",
                                                   p.last_error, ")"));
      }
    }
    const absl::Time t = absl::Now();
    for (size_t i = 0; i < parts_.size(); ++i) {
      Part& p = parts_[i];
      if (p.done) continue;
      if (t >= p.give_up) {
        return absl::UnavailableError(
            absl::StrCat("MoE layer ", layer_, ": expert shard ", p.batch.shard,
                         " did not answer within ", absl::FormatDuration(options.give_up_after),
                         p.last_error.empty() ? "" : absl::StrCat(" (", p.last_error, ")")));
      }
      for (size_t k = 0; k < p.attempts.size(); ++k) {
        if (p.attempts[k].expired || t < p.attempts[k].deadline) continue;
        p.attempts[k].expired = true;  // late: still accepted if it answers first
        const std::string late = p.attempts[k].address;
        owner_->MarkSuspect(late, t);
        p.last_error = absl::StrCat(late, " missed its deadline");
        (void)FailOver(i);  // none left: wait for the outstanding ones until give_up
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace splitmoe::expert_plane
