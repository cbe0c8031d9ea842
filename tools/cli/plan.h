// `splitmoe plan`: the capacity model (common/plan/capacity.h) for a model's config and a
// hardware description — the prediction for one deployment, and with --target-tpot-ms and
// --devices the splits that serve the most tokens per device within the target.
#ifndef SPLITMOE_TOOLS_CLI_PLAN_H_
#define SPLITMOE_TOOLS_CLI_PLAN_H_

#include "absl/status/status.h"

namespace splitmoe::cli {

absl::Status PlanCommand(int argc, char** argv);

}  // namespace splitmoe::cli

#endif  // SPLITMOE_TOOLS_CLI_PLAN_H_
