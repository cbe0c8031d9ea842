// The public Generation service over a real gRPC channel, with a fake generation actor: a
// request whose strings are not valid UTF-8 (which gRPC's own deserialisation would drop with
// UNIMPLEMENTED and no message) is INVALID_ARGUMENT naming the field; valid requests still
// reach the actor and its events come back through the raw stream.
#include "router/generation_service.h"

#include <grpcpp/generic/generic_stub.h>

#include <future>
#include <map>
#include <memory>
#include <string>

#include "common/rpc/rpc.h"
#include "common/runtime/actor.h"
#include "gtest/gtest.h"

namespace splitmoe::router {
namespace {

// Answers every request with one event echoing its prompt, then OK; a request whose id begins
// with "hold" is held open (its stream kept) until a ClientGone arrives for it.
class FakeGeneration {
 public:
  using Message = GenerationActor::Message;
  void Handle(NewGeneration m) {
    if (m.request.request_id().rfind("hold", 0) == 0) {
      held_[m.serial] = m.stream;
      return;
    }
    v1::GenerateEvent event;
    event.set_request_id(m.request.request_id());
    for (int32_t id : m.prompt) event.add_token_ids(id);
    event.set_text("h\xc3\xa9llo");
    event.set_finish_reason(v1::FINISH_REASON_LENGTH);
    m.stream->Write(std::move(event));
    m.stream->Finish(grpc::Status::OK);
  }
  void Handle(ClientGone m) { held_.erase(m.serial); }
  template <typename Other>
  void Handle(Other) {}

 private:
  std::map<uint64_t, std::shared_ptr<rpc::ServerStream<v1::GenerateEvent>>> held_;
};

model::ModelConfig Config() {
  model::ModelConfig c;
  c.vocab_size = 512;
  c.max_position_embeddings = 4096;
  return c;
}

class GenerationServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<rpc::RunningServer> server = rpc::StartServer("127.0.0.1:0", {&service_});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    channel_ = grpc::CreateCustomChannel(server_.address, grpc::InsecureChannelCredentials(),
                                         rpc::ClientChannelArguments());
  }
  void TearDown() override {
    if (server_.server) server_.server->Shutdown();
    actor_.Stop();
  }

  // Sends `bytes` as the whole request of `method` and returns the call's status.
  grpc::Status SendRaw(const std::string& method, const std::string& bytes) {
    grpc::GenericStub stub(channel_);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    grpc::Slice slice(bytes);
    grpc::ByteBuffer request(&slice, 1);
    grpc::ByteBuffer response;
    std::promise<grpc::Status> done;
    stub.UnaryCall(&ctx, method, grpc::StubOptions(), &request, &response,
                   [&](grpc::Status s) { done.set_value(std::move(s)); });
    return done.get_future().get();
  }

  model::ModelConfig config_ = Config();
  runtime::Actor<FakeGeneration> actor_{"fake-generation", std::make_unique<FakeGeneration>()};
  GenerationService service_{config_, nullptr, "tiny", "{}", actor_.ref()};
  rpc::RunningServer server_;
  std::shared_ptr<grpc::Channel> channel_;
};

// Wire format by hand: field 2 (text), length-delimited, holding 0xff 0xfe.
const std::string kInvalidText("\x12\x02\xff\xfe", 4);

TEST_F(GenerationServiceTest, InvalidUtf8IsInvalidArgumentNamingTheField) {
  struct Case {
    std::string bytes, field;
  } cases[] = {
      {kInvalidText, "text"},
      // request_id (field 1) "a\xc0\x80": an overlong NUL.
      {std::string("\x0a\x03"
                   "a\xc0\x80",
                   5),
       "request_id"},
      // stop (field 5) { stop (field 2): "\xed\xa0\x80" (a surrogate) }.
      {std::string("\x2a\x05\x12\x03\xed\xa0\x80", 7), "stop.stop"},
  };
  for (const Case& c : cases) {
    grpc::Status s = SendRaw("/splitmoe.v1.Generation/Generate", c.bytes);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
    EXPECT_FALSE(s.error_message().empty());
    EXPECT_NE(s.error_message().find("request is not a valid GenerateRequest: field '" + c.field +
                                     "' is not valid UTF-8"),
              std::string::npos)
        << s.error_message();
  }
}

TEST_F(GenerationServiceTest, BytesThatAreNoMessageAreInvalidArgument) {
  grpc::Status s = SendRaw("/splitmoe.v1.Generation/Generate", std::string("\xff\xff\xff", 3));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("request is not a valid GenerateRequest"), std::string::npos)
      << s.error_message();
}

TEST_F(GenerationServiceTest, TokenizeWithInvalidUtf8IsInvalidArgument) {
  // TokenizeRequest.text is field 1.
  grpc::Status s = SendRaw("/splitmoe.v1.Generation/Tokenize", std::string("\x0a\x02\xff\xfe", 4));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("request is not a valid TokenizeRequest: field 'text'"),
            std::string::npos)
      << s.error_message();
  // Valid text gets past the parse (this model has no tokenizer).
  s = SendRaw("/splitmoe.v1.Generation/Tokenize", std::string("\x0a\x02hi", 4));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
}

// Valid requests are validated as before, reach the actor, and its events arrive typed.
TEST_F(GenerationServiceTest, ValidRequestsStillStreamThroughTheRawMethod) {
  auto stub = v1::Generation::NewStub(channel_);
  v1::GenerateRequest request;
  request.set_request_id("r1");
  request.mutable_token_ids()->add_ids(5);
  request.mutable_token_ids()->add_ids(6);
  request.mutable_stop()->set_max_tokens(4);
  {
    grpc::ClientContext ctx;
    auto reader = stub->Generate(&ctx, request);
    v1::GenerateEvent event;
    ASSERT_TRUE(reader->Read(&event));
    EXPECT_EQ(event.request_id(), "r1");
    ASSERT_EQ(event.token_ids_size(), 2);
    EXPECT_EQ(event.token_ids(1), 6);
    EXPECT_EQ(event.text(), "h\xc3\xa9llo");
    EXPECT_EQ(event.finish_reason(), v1::FINISH_REASON_LENGTH);
    EXPECT_FALSE(reader->Read(&event));
    grpc::Status s = reader->Finish();
    EXPECT_TRUE(s.ok()) << s.error_message();
  }
  request.mutable_stop()->set_max_tokens(0);
  {
    grpc::ClientContext ctx;
    auto reader = stub->Generate(&ctx, request);
    v1::GenerateEvent event;
    EXPECT_FALSE(reader->Read(&event));
    grpc::Status s = reader->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(s.error_message().find("stop.max_tokens must be > 0"), std::string::npos)
        << s.error_message();
  }
  request.set_text("hello");  // valid UTF-8, but this model has no tokenizer
  request.mutable_stop()->set_max_tokens(4);
  {
    grpc::ClientContext ctx;
    auto reader = stub->Generate(&ctx, request);
    v1::GenerateEvent event;
    EXPECT_FALSE(reader->Read(&event));
    grpc::Status s = reader->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(s.error_message().find("need a tokenizer"), std::string::npos) << s.error_message();
  }
}

// At most N Generate streams per client, counted across its connections (one client: one host
// here); the next is RESOURCE_EXHAUSTED at once, and a stream that ends makes room.
TEST(GenerationStreamCapTest, AClientHoldsAtMostNStreamsAcrossConnections) {
  const model::ModelConfig config = Config();
  runtime::Actor<FakeGeneration> actor("fake-generation", std::make_unique<FakeGeneration>());
  GenerationService service(config, nullptr, "tiny", "{}", actor.ref(),
                            /*max_streams_per_client=*/2);
  absl::StatusOr<rpc::RunningServer> server = rpc::StartServer("127.0.0.1:0", {&service});
  ASSERT_TRUE(server.ok()) << server.status();
  // Separate connections (channels with different arguments are not shared by gRPC).
  auto connect = [&](int i) {
    grpc::ChannelArguments args = rpc::ClientChannelArguments();
    args.SetInt("splitmoe.test.connection", i);
    return v1::Generation::NewStub(
        grpc::CreateCustomChannel(server->address, grpc::InsecureChannelCredentials(), args));
  };
  auto request = [](const std::string& id) {
    v1::GenerateRequest r;
    r.set_request_id(id);
    r.mutable_token_ids()->add_ids(5);
    r.mutable_stop()->set_max_tokens(4);
    return r;
  };
  struct Open {
    std::unique_ptr<v1::Generation::Stub> stub;
    grpc::ClientContext ctx;
    std::unique_ptr<grpc::ClientReader<v1::GenerateEvent>> reader;
  };
  std::vector<std::unique_ptr<Open>> held;
  for (int i = 0; i < 2; ++i) {
    held.push_back(std::make_unique<Open>());
    held.back()->stub = connect(i);
    held.back()->reader = held.back()->stub->Generate(&held.back()->ctx, request(absl::StrCat("hold-", i)));
  }
  // Both reach the service before the third is sent (a short request on each connection would
  // be counted too, so wait on the server's side instead).
  absl::SleepFor(absl::Milliseconds(300));
  auto third = connect(2);
  {
    grpc::ClientContext ctx;
    auto reader = third->Generate(&ctx, request("third"));
    v1::GenerateEvent event;
    EXPECT_FALSE(reader->Read(&event));
    grpc::Status s = reader->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
    EXPECT_NE(s.error_message().find("--max-streams-per-client 2"), std::string::npos)
        << s.error_message();
  }
  // One held stream ends (its client cancels): the next request is served.
  held[0]->ctx.TryCancel();
  (void)held[0]->reader->Finish();
  grpc::Status served;
  for (int i = 0; i < 100; ++i) {
    grpc::ClientContext ctx;
    auto reader = third->Generate(&ctx, request(absl::StrCat("after-", i)));
    v1::GenerateEvent event;
    while (reader->Read(&event)) {
    }
    served = reader->Finish();
    if (served.error_code() != grpc::StatusCode::RESOURCE_EXHAUSTED) break;
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_TRUE(served.ok()) << served.error_message();
  held[1]->ctx.TryCancel();
  (void)held[1]->reader->Finish();
  server->server->Shutdown(std::chrono::system_clock::now());
  actor.Stop();
}

}  // namespace
}  // namespace splitmoe::router
