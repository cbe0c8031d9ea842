#include "common/rpc/remote_moe.h"

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/rpc/rpc.h"

namespace splitmoe::rpc {

absl::StatusOr<std::unique_ptr<RemoteMoeExecutor>> RemoteMoeExecutor::Connect(
    const std::string& router_address, const model::ModelConfig& config, v1::WireDtype dtype,
    absl::Duration call_timeout) {
  std::unique_ptr<RemoteMoeExecutor> moe(new RemoteMoeExecutor());
  moe->config_ = config;
  moe->dtype_ = dtype;
  moe->call_timeout_ = call_timeout;
  moe->channel_ = grpc::CreateCustomChannel(router_address, grpc::InsecureChannelCredentials(),
                                            ClientChannelArguments());
  if (!moe->channel_->WaitForConnected(std::chrono::system_clock::now() +
                                       std::chrono::seconds(10))) {
    return absl::UnavailableError(absl::StrCat("router ", router_address, " unreachable"));
  }
  moe->stub_ = v1::MoeDispatch::NewStub(moe->channel_);
  moe->stream_ = moe->stub_->Dispatch(&moe->context_);
  if (moe->stream_ == nullptr) return absl::UnavailableError("cannot open the MoeDispatch stream");
  moe->reader_ = std::thread([m = moe.get()] { m->ReadLoop(); });
  return moe;
}

RemoteMoeExecutor::~RemoteMoeExecutor() {
  if (stream_ != nullptr) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stream_->WritesDone();
    }
    context_.TryCancel();
  }
  if (reader_.joinable()) reader_.join();
  if (stream_ != nullptr) (void)stream_->Finish();
}

void RemoteMoeExecutor::ReadLoop() {
  v1::MoeResult result;
  while (stream_->Read(&result)) {
    bytes_received_ += result.ByteSizeLong();
    std::lock_guard<std::mutex> lock(mu_);
    auto it = waiting_.find(result.batch_id());
    if (it != waiting_.end()) it->second = std::move(result);
    result = v1::MoeResult();
    cv_.notify_all();
  }
  FailAll(absl::UnavailableError("the MoeDispatch stream to the router closed"));
}

void RemoteMoeExecutor::FailAll(const absl::Status& status) {
  std::lock_guard<std::mutex> lock(mu_);
  if (broken_.ok()) broken_ = status;
  cv_.notify_all();
}

absl::Status RemoteMoeExecutor::RoutedExperts(int64_t layer, const float* x, const float* scores,
                                              int64_t rows, float* out) {
  const int64_t h = config_.hidden_size, n = config_.n_routed_experts;
  v1::MoeBatch batch;
  batch.set_layer(static_cast<int32_t>(layer));
  batch.set_tokens(static_cast<int32_t>(rows));
  batch.set_dtype(dtype_);
  batch.set_hidden(EncodeTensor(absl::MakeConstSpan(x, static_cast<size_t>(rows * h)), dtype_));
  batch.set_scores(EncodeTensor(absl::MakeConstSpan(scores, static_cast<size_t>(rows * n)),
                                v1::WIRE_DTYPE_FP32));
  uint64_t id;
  std::unique_lock<std::mutex> lock(mu_);
  if (!broken_.ok()) return broken_;
  id = next_batch_id_++;
  batch.set_batch_id(id);
  waiting_[id];
  bytes_sent_ += batch.ByteSizeLong();
  if (!stream_->Write(batch)) {
    waiting_.erase(id);
    if (broken_.ok()) broken_ = absl::UnavailableError("writing to the MoeDispatch stream failed");
    return broken_;
  }
  const bool done = cv_.wait_for(lock, absl::ToChronoMilliseconds(call_timeout_),
                                 [&] { return waiting_[id].has_value() || !broken_.ok(); });
  std::optional<v1::MoeResult> result = std::move(waiting_[id]);
  waiting_.erase(id);
  lock.unlock();
  if (!result.has_value()) {
    if (!done) {
      return absl::DeadlineExceededError(absl::StrCat("MoE layer ", layer,
                                                      ": no reply from the router within ",
                                                      absl::FormatDuration(call_timeout_)));
    }
    return broken_;
  }
  if (!result->error().empty())
    return absl::UnavailableError(absl::StrCat("router: ", result->error()));
  std::vector<float> values;
  SPLITMOE_RETURN_IF_ERROR(DecodeTensor(result->output(), result->dtype(), rows * h, &values));
  std::copy(values.begin(), values.end(), out);
  return absl::OkStatus();
}

}  // namespace splitmoe::rpc
