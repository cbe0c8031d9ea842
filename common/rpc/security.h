// The internal plane's security: who may call the cluster's internal services (Registry,
// Prefill, Decode, ExpertCompute, Launcher). Configured once per process, before any server or
// channel is made, from the role's flags:
//
//   --tls-cert F --tls-key F --tls-ca F   mutual TLS: every internal listener asks for a client
//                                         certificate signed by the CA and every internal
//                                         channel presents this process's certificate. The
//                                         certificate's common name is `splitmoe-<role>`, and the
//                                         callee checks the caller's role against the method
//                                         (InternalMethodRoles): a decode worker's Reserve is the
//                                         router's to call, its Start the prefill worker's.
//   --cluster-token-file F                without TLS: a shared secret sent on every internal
//                                         call (`x-splitmoe-cluster-token`) and checked by every
//                                         internal listener (compared in constant time).
//   neither                               open (a development cluster on loopback).
//
// The public door (the router's --listen: Generation, health, reflection) is separate and takes
// API keys instead (`--api-keys FILE`, one key per line: `authorization: Bearer KEY`).
//
//   SPLITMOE_RETURN_IF_ERROR(rpc::ConfigureInternalSecurity({.tls_cert = ..., .role = "decode"}));
//   auto channel = rpc::InternalChannel(address);               // credentials, token, arguments
//   rpc::StartServer(listen, {&service}, rpc::InternalServerCredentials());
#ifndef SPLITMOE_COMMON_RPC_SECURITY_H_
#define SPLITMOE_COMMON_RPC_SECURITY_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace splitmoe::rpc {

struct SecurityOptions {
  std::string tls_cert, tls_key, tls_ca;  // PEM files: all three or none
  std::string cluster_token_file;         // without TLS
  std::string role;                       // router | prefill | decode | expert | admin
};

// Reads the files and makes this process's credentials. InvalidArgument naming the file or flag
// on a missing file, half a TLS configuration, TLS and a token together, or an empty token.
absl::Status ConfigureInternalSecurity(const SecurityOptions& options);
// "tls", "token" or "open".
std::string InternalSecurityMode();
// What ConfigureInternalSecurity was given last (`splitmoe up` hands a token on to its children).
SecurityOptions ConfiguredSecurity();

// Credentials for an internal listener (with the caller checks) and a channel to one.
std::shared_ptr<grpc::ServerCredentials> InternalServerCredentials();
std::shared_ptr<grpc::Channel> InternalChannel(const std::string& address,
                                               int max_message_bytes = 256 << 20);

// The roles allowed to call `method` ("/splitmoe.v1.Decode/Reserve"); empty: nobody.
std::vector<std::string> InternalMethodRoles(const std::string& method);

// Every internal service handler begins with one of these. With a cluster token the caller's
// token is checked here (gRPC cannot attach a metadata check to a listener without TLS); with
// TLS the listener's check of the peer's role has already run; open: always OK.
grpc::Status CheckInternalCaller(const grpc::CallbackServerContext* ctx);
// For a unary handler: nullptr when the caller may call, else a reactor finished with the
// refusal (UNAUTHENTICATED, with a message) to return.
grpc::ServerUnaryReactor* RefuseInternal(grpc::CallbackServerContext* ctx);
// For a streaming handler: a reactor that ends the call with `status` at once.
template <typename Request, typename Response>
grpc::ServerBidiReactor<Request, Response>* RefusedBidi(grpc::Status status) {
  class Refused : public grpc::ServerBidiReactor<Request, Response> {
   public:
    explicit Refused(grpc::Status s) { this->Finish(std::move(s)); }
    void OnDone() override { delete this; }
  };
  return new Refused(std::move(status));
}
template <typename Response>
grpc::ServerWriteReactor<Response>* RefusedWriter(grpc::Status status) {
  class Refused : public grpc::ServerWriteReactor<Response> {
   public:
    explicit Refused(grpc::Status s) { this->Finish(std::move(s)); }
    void OnDone() override { delete this; }
  };
  return new Refused(std::move(status));
}

// The public door's API keys, from `api_keys_file` (one per line, `#` comments; empty path: no
// keys, open). Every public handler checks `authorization: Bearer KEY` with CheckApiKey /
// RefusePublic (the health service stays open, for load balancers).
absl::Status ConfigureApiKeys(const std::string& api_keys_file);
bool ApiKeysRequired();
grpc::Status CheckApiKey(const grpc::CallbackServerContext* ctx);
// The same check on the value of an `authorization` header (nullopt: no header), for the HTTP
// front door.
grpc::Status CheckAuthorization(const std::optional<absl::string_view>& authorization);
grpc::ServerUnaryReactor* RefusePublic(grpc::CallbackServerContext* ctx);
// The API key a client command sends: --api-key, else $SPLITMOE_API_KEY, else none.
std::string ClientApiKey(const std::string& flag_value);
// A channel to the public port that sends `api_key` (when not empty) as a bearer token.
std::shared_ptr<grpc::Channel> PublicChannel(const std::string& address, const std::string& api_key,
                                             int max_message_bytes = 256 << 20);

// Writes a throwaway CA and one certificate per role (`splitmoe-<role>`, valid for 127.0.0.1,
// localhost and this host's name) into `dir` with the openssl command-line tool:
// dir/ca.crt, dir/<role>.crt, dir/<role>.key.
absl::Status MakeLocalCertificates(const std::string& dir, const std::vector<std::string>& roles);

}  // namespace splitmoe::rpc

#endif  // SPLITMOE_COMMON_RPC_SECURITY_H_
