// Minimal command-line flags for the splitmoe subcommands: `--name value`, `--name=value` and
// boolean `--name`. Unknown flags are errors, so a typo never silently changes behaviour.
//
//   Flags flags;
//   SPLITMOE_RETURN_IF_ERROR(flags.Parse(argc, argv, /*first=*/2, {"model", "prompt"}, {"json"}));
//   std::string dir = flags.Get("model");
#ifndef SPLITMOE_TOOLS_CLI_FLAGS_H_
#define SPLITMOE_TOOLS_CLI_FLAGS_H_

#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace splitmoe::cli {

class Flags {
 public:
  absl::Status Parse(int argc, char** argv, int first, const std::set<std::string>& valued,
                     const std::set<std::string>& boolean);
  bool Has(const std::string& name) const { return values_.count(name) > 0; }
  std::string Get(const std::string& name, const std::string& fallback = "") const;
  // All values of a repeatable flag, in order.
  std::vector<std::string> GetAll(const std::string& name) const;
  absl::StatusOr<int64_t> GetInt(const std::string& name, int64_t fallback) const;
  absl::StatusOr<double> GetDouble(const std::string& name, double fallback) const;
  absl::StatusOr<std::vector<int32_t>> GetIntList(const std::string& name) const;

 private:
  std::multimap<std::string, std::string> values_;
};

}  // namespace splitmoe::cli

#endif  // SPLITMOE_TOOLS_CLI_FLAGS_H_
