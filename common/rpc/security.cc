#include "common/rpc/security.h"

#include <grpcpp/security/auth_metadata_processor.h>
#include <grpcpp/support/client_interceptor.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <mutex>
#include <set>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/base/status_macros.h"
#include "common/rpc/rpc.h"

namespace splitmoe::rpc {
namespace {

constexpr char kTokenHeader[] = "x-splitmoe-cluster-token";
constexpr char kRolePrefix[] = "splitmoe-";
// Secrets and certificates are small: anything larger is the wrong file.
constexpr size_t kMaxSecretFileBytes = 1 << 20;

struct InternalState {
  SecurityOptions options;
  std::string mode = "open";
  std::string token;
  std::string role;
  std::shared_ptr<grpc::ChannelCredentials> channel_credentials;
  std::shared_ptr<grpc::ServerCredentials> server_credentials;
  std::vector<std::string> api_keys;
};

std::mutex& StateMutex() {
  static std::mutex mu;
  return mu;
}
InternalState& State() {
  static InternalState* state = new InternalState();
  return *state;
}

absl::StatusOr<std::string> ReadSecretFile(const std::string& path, const std::string& flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat(flag, ": cannot read ", path));
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.size() > kMaxSecretFileBytes) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": ", path, " is larger than 1 MiB"));
  }
  if (bytes.empty()) return absl::InvalidArgumentError(absl::StrCat(flag, ": ", path, " is empty"));
  return bytes;
}

// Equal, in time independent of where they differ (the length is not secret).
bool ConstantTimeEqual(absl::string_view a, absl::string_view b) {
  if (a.size() != b.size() || b.empty()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

bool OpenToEveryMember(absl::string_view method) {
  return absl::StartsWith(method, "/grpc.health.v1.Health/") ||
         absl::StartsWith(method, "/grpc.reflection.");
}

// Checks every call on a TLS internal listener: the peer's role (its certificate's common name,
// `splitmoe-<role>`) against the method.
class TlsRoleAuth : public grpc::AuthMetadataProcessor {
 public:
  bool IsBlocking() const override { return false; }
  grpc::Status Process(const InputMetadata& metadata, grpc::AuthContext* context,
                       OutputMetadata* /*consumed*/, OutputMetadata* /*response*/) override {
    std::string method;
    if (auto it = metadata.find(":path"); it != metadata.end()) {
      method.assign(it->second.data(), it->second.size());
    }
    // TLS: the handshake verified the certificate against the CA; its name carries the role.
    std::string role;
    for (const grpc::string_ref& cn : context->FindPropertyValues("x509_common_name")) {
      const std::string name(cn.data(), cn.size());
      if (absl::StartsWith(name, kRolePrefix)) role = name.substr(sizeof(kRolePrefix) - 1);
    }
    if (role.empty()) {
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                          absl::StrCat(method, ": the client certificate names no splitmoe role"));
    }
    if (OpenToEveryMember(method)) return grpc::Status::OK;
    const std::vector<std::string> allowed = InternalMethodRoles(method);
    if (std::find(allowed.begin(), allowed.end(), role) == allowed.end()) {
      return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                          absl::StrCat("a ", role, " may not call ", method));
    }
    return grpc::Status::OK;
  }
};

// Adds one metadata entry to every call of a channel.
class HeaderInterceptor : public grpc::experimental::Interceptor {
 public:
  HeaderInterceptor(std::string key, std::string value)
      : key_(std::move(key)), value_(std::move(value)) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      methods->GetSendInitialMetadata()->insert({key_, value_});
    }
    methods->Proceed();
  }

 private:
  std::string key_, value_;
};
class HeaderInterceptorFactory : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  HeaderInterceptorFactory(std::string key, std::string value)
      : key_(std::move(key)), value_(std::move(value)) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo* /*info*/) override {
    return new HeaderInterceptor(key_, value_);
  }

 private:
  std::string key_, value_;
};

std::shared_ptr<grpc::Channel> ChannelWithHeader(
    const std::string& address, std::shared_ptr<grpc::ChannelCredentials> credentials,
    int max_message_bytes, const std::string& key, const std::string& value) {
  grpc::ChannelArguments args = ClientChannelArguments(max_message_bytes);
  if (value.empty()) return grpc::CreateCustomChannel(address, credentials, args);
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> factories;
  factories.push_back(std::make_unique<HeaderInterceptorFactory>(key, value));
  return grpc::experimental::CreateCustomChannelWithInterceptors(address, credentials, args,
                                                                 std::move(factories));
}

}  // namespace

absl::Status ConfigureInternalSecurity(const SecurityOptions& options) {
  const bool any_tls =
      !options.tls_cert.empty() || !options.tls_key.empty() || !options.tls_ca.empty();
  const bool all_tls =
      !options.tls_cert.empty() && !options.tls_key.empty() && !options.tls_ca.empty();
  if (any_tls && !all_tls) {
    return absl::InvalidArgumentError("--tls-cert, --tls-key and --tls-ca go together");
  }
  if (all_tls && !options.cluster_token_file.empty()) {
    return absl::InvalidArgumentError(
        "--cluster-token-file is for clusters without TLS: give one or the other");
  }
  InternalState next;
  next.options = options;
  next.role = options.role;
  if (all_tls) {
    SPLITMOE_ASSIGN_OR_RETURN(std::string cert, ReadSecretFile(options.tls_cert, "--tls-cert"));
    SPLITMOE_ASSIGN_OR_RETURN(std::string key, ReadSecretFile(options.tls_key, "--tls-key"));
    SPLITMOE_ASSIGN_OR_RETURN(std::string ca, ReadSecretFile(options.tls_ca, "--tls-ca"));
    grpc::SslServerCredentialsOptions server(
        GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
    server.pem_root_certs = ca;
    server.pem_key_cert_pairs.push_back({key, cert});
    next.server_credentials = grpc::SslServerCredentials(server);
    grpc::SslCredentialsOptions client;
    client.pem_root_certs = ca;
    client.pem_private_key = key;
    client.pem_cert_chain = cert;
    next.channel_credentials = grpc::SslCredentials(client);
    next.mode = "tls";
  } else if (!options.cluster_token_file.empty()) {
    SPLITMOE_ASSIGN_OR_RETURN(std::string token,
                              ReadSecretFile(options.cluster_token_file, "--cluster-token-file"));
    token = std::string(absl::StripAsciiWhitespace(token));
    if (token.size() < 16) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--cluster-token-file: ", options.cluster_token_file,
          " holds a token shorter than 16 characters"));
    }
    next.token = token;
    next.server_credentials = grpc::InsecureServerCredentials();
    next.channel_credentials = grpc::InsecureChannelCredentials();
    next.mode = "token";
  } else {
    next.server_credentials = grpc::InsecureServerCredentials();
    next.channel_credentials = grpc::InsecureChannelCredentials();
  }
  if (next.mode == "tls") {
    next.server_credentials->SetAuthMetadataProcessor(
        std::make_shared<TlsRoleAuth>());
  }
  std::lock_guard<std::mutex> lock(StateMutex());
  next.api_keys = std::move(State().api_keys);
  State() = std::move(next);
  return absl::OkStatus();
}

SecurityOptions ConfiguredSecurity() {
  std::lock_guard<std::mutex> lock(StateMutex());
  return State().options;
}

std::string InternalSecurityMode() {
  std::lock_guard<std::mutex> lock(StateMutex());
  return State().mode;
}

std::shared_ptr<grpc::ServerCredentials> InternalServerCredentials() {
  std::lock_guard<std::mutex> lock(StateMutex());
  return State().server_credentials != nullptr ? State().server_credentials
                                               : grpc::InsecureServerCredentials();
}

std::shared_ptr<grpc::Channel> InternalChannel(const std::string& address, int max_message_bytes) {
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  std::string token;
  {
    std::lock_guard<std::mutex> lock(StateMutex());
    credentials = State().channel_credentials != nullptr ? State().channel_credentials
                                                         : grpc::InsecureChannelCredentials();
    token = State().token;
  }
  return ChannelWithHeader(address, credentials, max_message_bytes, kTokenHeader, token);
}

std::vector<std::string> InternalMethodRoles(const std::string& method) {
  const std::vector<std::string> workers = {"prefill", "decode", "expert"};
  if (absl::StartsWith(method, "/splitmoe.v1.Registry/")) {
    const std::string name = method.substr(sizeof("/splitmoe.v1.Registry/") - 1);
    if (name == "ClusterStatus" || name == "Rebalance") return {"admin", "router"};
    if (name == "WatchRoutingTable") return workers;
    if (name == "Register" || name == "Heartbeat" || name == "Deregister" || name == "Attach") {
      return workers;
    }
    return {};
  }
  if (absl::StartsWith(method, "/splitmoe.v1.Decode/")) {
    const std::string name = method.substr(sizeof("/splitmoe.v1.Decode/") - 1);
    if (name == "Start") return {"prefill"};
    if (name == "Release") return {"router", "prefill"};
    if (name == "Reserve" || name == "StreamTokens" || name == "Cancel" || name == "WritersGone") {
      return {"router"};
    }
    return {};
  }
  if (method == "/splitmoe.v1.Prefill/RunPrefill") return {"router"};
  if (method == "/splitmoe.v1.ExpertCompute/Compute") return {"prefill", "decode"};
  if (absl::StartsWith(method, "/splitmoe.v1.Launcher/")) return {"admin"};
  return {};
}

grpc::Status CheckInternalCaller(const grpc::CallbackServerContext* ctx) {
  std::string token;
  {
    std::lock_guard<std::mutex> lock(StateMutex());
    if (State().mode != "token") return grpc::Status::OK;
    token = State().token;
  }
  const auto& metadata = ctx->client_metadata();
  auto it = metadata.find(kTokenHeader);
  if (it == metadata.end() ||
      !ConstantTimeEqual(absl::string_view(it->second.data(), it->second.size()), token)) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "an internal call needs the cluster token (x-splitmoe-cluster-token)");
  }
  return grpc::Status::OK;
}

grpc::ServerUnaryReactor* RefuseInternal(grpc::CallbackServerContext* ctx) {
  grpc::Status s = CheckInternalCaller(ctx);
  if (s.ok()) return nullptr;
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(std::move(s));
  return reactor;
}

absl::Status ConfigureApiKeys(const std::string& api_keys_file) {
  std::vector<std::string> keys;
  if (!api_keys_file.empty()) {
    SPLITMOE_ASSIGN_OR_RETURN(std::string text, ReadSecretFile(api_keys_file, "--api-keys"));
    for (absl::string_view line : absl::StrSplit(text, '\n')) {
      line = absl::StripAsciiWhitespace(line);
      if (line.empty() || line[0] == '#') continue;
      keys.emplace_back(line);
    }
    if (keys.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--api-keys: ", api_keys_file, " holds no key"));
    }
  }
  std::lock_guard<std::mutex> lock(StateMutex());
  State().api_keys = std::move(keys);
  return absl::OkStatus();
}

bool ApiKeysRequired() {
  std::lock_guard<std::mutex> lock(StateMutex());
  return !State().api_keys.empty();
}

grpc::Status CheckAuthorization(const std::optional<absl::string_view>& authorization) {
  std::vector<std::string> keys;
  {
    std::lock_guard<std::mutex> lock(StateMutex());
    if (State().api_keys.empty()) return grpc::Status::OK;
    keys = State().api_keys;
  }
  if (!authorization.has_value()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "an API key is required: metadata `authorization: Bearer KEY`");
  }
  const absl::string_view value = *authorization;
  bool ok = false;
  if (absl::StartsWith(value, "Bearer ")) {
    for (const std::string& k : keys) ok |= ConstantTimeEqual(value.substr(7), k);
  }
  if (!ok) return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "the API key is not valid");
  return grpc::Status::OK;
}

grpc::Status CheckApiKey(const grpc::CallbackServerContext* ctx) {
  const auto& metadata = ctx->client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) return CheckAuthorization(std::nullopt);
  return CheckAuthorization(absl::string_view(it->second.data(), it->second.size()));
}

grpc::ServerUnaryReactor* RefusePublic(grpc::CallbackServerContext* ctx) {
  grpc::Status s = CheckApiKey(ctx);
  if (s.ok()) return nullptr;
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(std::move(s));
  return reactor;
}

std::string ClientApiKey(const std::string& flag_value) {
  if (!flag_value.empty()) return flag_value;
  const char* env = std::getenv("SPLITMOE_API_KEY");
  return env != nullptr ? std::string(env) : std::string();
}

std::shared_ptr<grpc::Channel> PublicChannel(const std::string& address, const std::string& api_key,
                                             int max_message_bytes) {
  return ChannelWithHeader(address, grpc::InsecureChannelCredentials(), max_message_bytes,
                           "authorization", api_key.empty() ? "" : "Bearer " + api_key);
}

absl::Status MakeLocalCertificates(const std::string& dir, const std::vector<std::string>& roles) {
  char host[256] = {};
  (void)::gethostname(host, sizeof(host) - 1);
  {
    std::ofstream ext(dir + "/ext.cnf");
    ext << "subjectAltName=IP:127.0.0.1,DNS:localhost" << (host[0] ? ",DNS:" : "") << host
        << "\nextendedKeyUsage=serverAuth,clientAuth\n";
    if (!ext) return absl::InternalError(absl::StrCat("cannot write ", dir, "/ext.cnf"));
  }
  const std::string ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
  std::string script = absl::StrCat(
      "set -e; cd '", dir, "'; umask 077; ",
      "openssl req -x509 ", ec, " -keyout ca.key -out ca.crt -days 30 -subj /CN=splitmoe-local-ca;");
  for (const std::string& role : roles) {
    absl::StrAppend(&script, "openssl req ", ec, " -keyout ", role, ".key -out ", role,
                    ".csr -subj /CN=", kRolePrefix, role, ";",
                    "openssl x509 -req -in ", role, ".csr -CA ca.crt -CAkey ca.key -CAcreateserial",
                    " -out ", role, ".crt -days 30 -extfile ext.cnf;");
  }
  const std::string command = absl::StrCat("(", script, ") >/dev/null 2>&1");
  const int rc = std::system(command.c_str());
  if (rc != 0) {
    return absl::InternalError(absl::StrCat(
        "making certificates in ", dir, " with the openssl command failed (exit ", rc,
        "); is openssl installed?"));
  }
  return absl::OkStatus();
}

}  // namespace splitmoe::rpc
