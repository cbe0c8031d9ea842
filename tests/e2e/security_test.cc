// The closed internal plane, through real `splitmoe up` clusters: with --tls every internal
// listener (router's internal port, prefill, decode, expert replicas, the launcher) refuses a
// caller without a certificate, with a certificate of another CA, and a certificate of a role
// that may not call the method; the public port serves Generation and ClusterInfo only, behind
// API keys. With --cluster-token-file every internal call without the token is refused.
#include <grpcpp/grpcpp.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/process/subprocess.h"
#include "common/rpc/rpc.h"
#include "common/rpc/security.h"
#include "gtest/gtest.h"
#include "splitmoe/v1/generation.grpc.pb.h"
#include "splitmoe/v1/internal.grpc.pb.h"
#include "tests/testing/test_models.h"

namespace splitmoe {
namespace {

std::string Binary() {
  const char* dir = std::getenv("SPLITMOE_BINARY_DIR");
  return std::string(dir ? dir : ".") + "/bin/splitmoe";
}

std::string TempDir(const std::string& name) {
  std::string dir = (std::filesystem::temp_directory_path() /
                     absl::StrCat("splitmoe-", name, "-", ::getpid()))
                        .string();
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void WriteFile(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

struct Up {
  std::unique_ptr<process::Subprocess> process;
  std::string public_address, internal_address, certificates;
};

Up StartUp(const std::vector<std::string>& flags) {
  Up up;
  std::vector<std::string> argv = {Binary(), "up", "--heartbeat-ms", "100"};
  argv.insert(argv.end(), flags.begin(), flags.end());
  auto p = process::Subprocess::Start("up", argv);
  EXPECT_TRUE(p.ok()) << p.status();
  if (!p.ok()) return up;
  up.process = std::move(*p);
  for (const std::string& prefix : {"certificates ", "internal grpc=", "ready grpc="}) {
    if (prefix == "certificates " &&
        std::find(flags.begin(), flags.end(), "--tls") == flags.end()) {
      continue;
    }
    auto line = up.process->ReadLineMatching(prefix, absl::Seconds(180));
    EXPECT_TRUE(line.ok()) << prefix << ": " << line.status();
    if (!line.ok()) return up;
    if (prefix == "certificates ") up.certificates = line->substr(0, line->find(' '));
    if (prefix == "internal grpc=") up.internal_address = *line;
    if (prefix == "ready grpc=") up.public_address = *line;
  }
  return up;
}

std::shared_ptr<grpc::ChannelCredentials> TlsAs(const std::string& dir, const std::string& role,
                                                const std::string& ca_dir) {
  grpc::SslCredentialsOptions o;
  o.pem_root_certs = ReadFile(ca_dir + "/ca.crt");
  o.pem_private_key = ReadFile(dir + "/" + role + ".key");
  o.pem_cert_chain = ReadFile(dir + "/" + role + ".crt");
  return grpc::SslCredentials(o);
}

std::shared_ptr<grpc::Channel> Channel(const std::string& address,
                                       std::shared_ptr<grpc::ChannelCredentials> credentials,
                                       const std::string& token = "") {
  grpc::ChannelArguments args = rpc::ClientChannelArguments();
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // a fresh connection per channel
  return grpc::CreateCustomChannel(address, credentials, args);
}

std::unique_ptr<grpc::ClientContext> Context(const std::string& token = "",
                                             const std::string& api_key = "") {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  if (!token.empty()) ctx->AddMetadata("x-splitmoe-cluster-token", token);
  if (!api_key.empty()) ctx->AddMetadata("authorization", "Bearer " + api_key);
  return ctx;
}

// One internal call per kind of internal listener; the status it got.
struct InternalTarget {
  std::string what, address;
  v1::WorkerRole role = v1::WORKER_ROLE_UNSPECIFIED;  // unspecified: router or launcher
};

grpc::Status CallInternal(const InternalTarget& t, std::shared_ptr<grpc::Channel> channel,
                          const std::string& token = "") {
  auto ctx = Context(token);
  if (t.what == "router") {
    v1::RegisterRequest request;
    v1::RegisterResponse response;
    request.set_role(v1::WORKER_ROLE_PREFILL);
    request.set_address("127.0.0.1:1");
    return v1::Registry::NewStub(channel)->Register(ctx.get(), request, &response);
  }
  if (t.what == "launcher") {
    v1::ScaleRequest request;
    v1::ScaleResponse response;
    request.set_shard(0);
    request.set_replicas(0);
    return v1::Launcher::NewStub(channel)->Scale(ctx.get(), request, &response);
  }
  if (t.role == v1::WORKER_ROLE_DECODE) {
    v1::ReserveRequest request;
    v1::ReserveResponse response;
    request.set_request_id("stranger");
    request.set_prompt_tokens(16);
    request.set_max_tokens(16);
    request.set_timeout_ms(1000);
    return v1::Decode::NewStub(channel)->Reserve(ctx.get(), request, &response);
  }
  if (t.role == v1::WORKER_ROLE_PREFILL) {
    v1::PrefillRequest request;
    v1::PrefillResponse response;
    request.add_prompt(1);
    return v1::Prefill::NewStub(channel)->RunPrefill(ctx.get(), request, &response);
  }
  // Expert replica: its batch stream.
  auto stream = v1::ExpertCompute::NewStub(channel)->Compute(ctx.get());
  v1::ExpertResult result;
  stream->WritesDone();
  while (stream->Read(&result)) {
  }
  return stream->Finish();
}

std::vector<InternalTarget> InternalTargets(const Up& up, v1::ClusterInfo::Stub& info,
                                            const std::string& api_key) {
  std::vector<InternalTarget> targets = {{"router", up.internal_address}};
  auto ctx = Context("", api_key);
  v1::ClusterStatusResponse status;
  const grpc::Status s = info.ClusterStatus(ctx.get(), v1::ClusterStatusRequest(), &status);
  EXPECT_TRUE(s.ok()) << s.error_message();
  for (const auto& w : status.workers()) {
    targets.push_back({"worker " + w.worker_id(), w.address(), w.role()});
  }
  if (!status.launcher_address().empty()) targets.push_back({"launcher", status.launcher_address()});
  EXPECT_EQ(targets.size(), 5u) << "router, prefill, decode, expert and launcher";
  return targets;
}

TEST(ClosedPlaneTest, TlsRefusesStrangersWrongCasAndWrongRolesAndKeysGuardTheDoor) {
  const std::string model = testing::TinyModel("security");
  const std::string dir = TempDir("security");
  WriteFile(dir + "/keys", "# one key per line\nkey-for-alice\nkey-for-bob\n");
  Up up = StartUp({"--model", model, "--tls", "--api-keys", dir + "/keys"});
  ASSERT_NE(up.process, nullptr);
  ASSERT_FALSE(up.certificates.empty());
  ASSERT_FALSE(up.public_address.empty());
  ASSERT_NE(up.internal_address, up.public_address);

  // The public door: no key, a wrong key, a right key.
  auto public_channel = Channel(up.public_address, grpc::InsecureChannelCredentials());
  auto generation = v1::Generation::NewStub(public_channel);
  v1::GenerateRequest request;
  request.mutable_token_ids()->add_ids(1);
  request.mutable_token_ids()->add_ids(2);
  request.mutable_stop()->set_max_tokens(4);
  for (const std::string& key : {std::string(), std::string("key-for-eve")}) {
    auto ctx = Context("", key);
    auto reader = generation->Generate(ctx.get(), request);
    v1::GenerateEvent e;
    while (reader->Read(&e)) {
    }
    const grpc::Status s = reader->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << key << ": " << s.error_message();
    EXPECT_FALSE(s.error_message().empty());
  }
  {
    auto ctx = Context("", "key-for-bob");
    auto reader = generation->Generate(ctx.get(), request);
    v1::GenerateEvent e;
    int tokens = 0;
    while (reader->Read(&e)) tokens += e.token_ids_size();
    const grpc::Status s = reader->Finish();
    EXPECT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(tokens, 4);
  }
  // The internal services are not on the public port, with or without a key.
  {
    auto ctx = Context("", "key-for-alice");
    v1::RegisterRequest r;
    v1::RegisterResponse out;
    EXPECT_EQ(v1::Registry::NewStub(public_channel)->Register(ctx.get(), r, &out).error_code(),
              grpc::StatusCode::UNIMPLEMENTED);
  }

  // Every internal listener: without a certificate, with one of another CA, with a role that
  // may not call it.
  auto info = v1::ClusterInfo::NewStub(public_channel);
  const std::vector<InternalTarget> targets = InternalTargets(up, *info, "key-for-alice");
  const std::string stranger = TempDir("security-stranger");
  ASSERT_TRUE(rpc::MakeLocalCertificates(stranger, {"router", "admin", "prefill"}).ok());
  int refused = 0, calls = 0;
  for (const InternalTarget& t : targets) {
    SCOPED_TRACE(t.what + " at " + t.address);
    const grpc::Status anonymous = CallInternal(t, Channel(t.address, grpc::InsecureChannelCredentials()));
    EXPECT_EQ(anonymous.error_code(), grpc::StatusCode::UNAVAILABLE) << anonymous.error_message();
    // The right role, but certified by a CA the cluster does not trust (trusting the cluster's).
    const std::string role = t.what == "launcher" ? "admin"
                             : t.what == "router" ? "prefill"
                                                  : "router";
    const std::string stranger_role = t.role == v1::WORKER_ROLE_EXPERT ? "prefill" : role;
    const grpc::Status forged =
        CallInternal(t, Channel(t.address, TlsAs(stranger, stranger_role, up.certificates)));
    EXPECT_EQ(forged.error_code(), grpc::StatusCode::UNAVAILABLE) << forged.error_message();
    // A real cluster certificate of a role that may not make this call.
    const std::string wrong = t.what == "launcher" ? "router"
                              : t.what == "router" ? "admin"
                              : t.role == v1::WORKER_ROLE_EXPERT ? "router"
                                                                 : "expert";
    const grpc::Status denied =
        CallInternal(t, Channel(t.address, TlsAs(up.certificates, wrong, up.certificates)));
    EXPECT_EQ(denied.error_code(), grpc::StatusCode::PERMISSION_DENIED) << denied.error_message();
    for (const grpc::Status& s : {anonymous, forged, denied}) {
      ++calls;
      refused += !s.ok();
    }
  }
  std::printf("internal calls refused: %d of %d (anonymous, other CA, wrong role)\n", refused, calls);
  EXPECT_EQ(refused, calls);

  // The cluster serves on: a request after all that.
  {
    auto ctx = Context("", "key-for-alice");
    auto reader = generation->Generate(ctx.get(), request);
    v1::GenerateEvent e;
    while (reader->Read(&e)) {
    }
    EXPECT_TRUE(reader->Finish().ok());
  }
  EXPECT_EQ(up.process->Terminate(absl::Seconds(20)), "exited with code 0");
  std::filesystem::remove_all(dir);
  std::filesystem::remove_all(stranger);
  std::filesystem::remove_all(up.certificates);
}

TEST(ClosedPlaneTest, AClusterTokenIsCheckedOnEveryInternalCall) {
  const std::string model = testing::TinyModel("security");
  const std::string dir = TempDir("security-token");
  const std::string token = "0123456789abcdef-cluster-secret";
  WriteFile(dir + "/token", token + "\n");
  Up up = StartUp({"--model", model, "--cluster-token-file", dir + "/token"});
  ASSERT_NE(up.process, nullptr);
  ASSERT_NE(up.internal_address, up.public_address);
  auto public_channel = Channel(up.public_address, grpc::InsecureChannelCredentials());
  auto info = v1::ClusterInfo::NewStub(public_channel);
  int refused = 0, calls = 0;
  for (const InternalTarget& t : InternalTargets(up, *info, "")) {
    SCOPED_TRACE(t.what + " at " + t.address);
    auto channel = Channel(t.address, grpc::InsecureChannelCredentials());
    for (const std::string& wrong : {std::string(), std::string("0123456789abcdef-cluster-secreT")}) {
      const grpc::Status s = CallInternal(t, channel, wrong);
      EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << s.error_message();
      ++calls;
      refused += !s.ok();
    }
  }
  std::printf("internal calls refused without the token: %d of %d\n", refused, calls);
  EXPECT_EQ(refused, calls);
  // The members themselves got through: the cluster serves.
  auto generation = v1::Generation::NewStub(public_channel);
  v1::GenerateRequest request;
  request.mutable_token_ids()->add_ids(3);
  request.mutable_stop()->set_max_tokens(3);
  auto ctx = Context();
  auto reader = generation->Generate(ctx.get(), request);
  v1::GenerateEvent e;
  int tokens = 0;
  while (reader->Read(&e)) tokens += e.token_ids_size();
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(tokens, 3);
  EXPECT_EQ(up.process->Terminate(absl::Seconds(20)), "exited with code 0");
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace splitmoe
