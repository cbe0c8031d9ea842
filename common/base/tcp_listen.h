// ListenTcp: an Asio acceptor listening on HOST:PORT as the command-line flags write it (port 0:
// any free port; an IPv6 host in brackets; an empty host: all IPv4 addresses), for the servers
// splitmoe runs besides gRPC (the router's HTTP front door, every process's /metrics). Returns
// the bound HOST:PORT; errors name `flag` (e.g. "--http-listen").
#ifndef SPLITMOE_COMMON_BASE_TCP_LISTEN_H_
#define SPLITMOE_COMMON_BASE_TCP_LISTEN_H_

#include <boost/asio.hpp>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace splitmoe {

inline absl::StatusOr<std::string> ListenTcp(boost::asio::ip::tcp::acceptor& acceptor,
                                             const std::string& listen, absl::string_view flag) {
  using tcp = boost::asio::ip::tcp;
  const size_t colon = listen.rfind(':');
  uint32_t port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(listen.substr(colon + 1), &port) ||
      port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": '", listen, "' is not HOST:PORT"));
  }
  std::string host = listen.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  boost::system::error_code ec;
  tcp::resolver resolver(acceptor.get_executor());
  auto results = resolver.resolve(host.empty() ? "0.0.0.0" : host, std::to_string(port),
                                  tcp::resolver::passive, ec);
  if (ec || results.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, ": cannot resolve '", host, "': ", ec.message()));
  }
  const tcp::endpoint endpoint = results.begin()->endpoint();
  acceptor.open(endpoint.protocol(), ec);
  if (!ec) acceptor.set_option(boost::asio::socket_base::reuse_address(true), ec);
  if (!ec) acceptor.bind(endpoint, ec);
  if (!ec) acceptor.listen(boost::asio::socket_base::max_listen_connections, ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat(flag, ": cannot listen on ", listen, ": ", ec.message()));
  }
  const tcp::endpoint bound = acceptor.local_endpoint(ec);
  const std::string bound_host = bound.address().is_v6()
                                     ? absl::StrCat("[", bound.address().to_string(), "]")
                                     : bound.address().to_string();
  return absl::StrCat(bound_host, ":", bound.port());
}

}  // namespace splitmoe

#endif  // SPLITMOE_COMMON_BASE_TCP_LISTEN_H_
