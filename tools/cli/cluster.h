// The cluster subcommands of `splitmoe`:
//   prefill / decode            the worker processes
//   up                          a local cluster of child processes on loopback
//   scale                       grows or shrinks an expert pool of a cluster `up` started
//   generate/score --endpoint   the single-process commands' output, through a cluster's
//                               public Generation API
#ifndef SPLITMOE_TOOLS_CLI_CLUSTER_H_
#define SPLITMOE_TOOLS_CLI_CLUSTER_H_

#include <functional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "tools/cli/flags.h"

namespace splitmoe::cli {

// `--busy-poll-us N` of prefill, decode, expert and up: how long latency-critical threads poll
// before they sleep (runtime/spin.h); 0 turns polling off.
absl::StatusOr<absl::Duration> BusyPollFlag(const Flags& f);
// `--precision fp32|bf16` of a GPU (generate, expert, up): whether it is bf16 (fp32 when not
// given); anything else InvalidArgument.
absl::StatusOr<bool> Bf16PrecisionFlag(const Flags& f);

absl::Status PrefillCommand(int argc, char** argv);
absl::Status DecodeCommand(int argc, char** argv);
absl::Status UpCommand(int argc, char** argv);
// `scale --endpoint E --shard K --replicas R`: asks the `up` that started cluster E to grow or
// shrink shard K's pool, then waits until the router sees R live replicas.
absl::Status ScaleCommand(int argc, char** argv);
// `splitmoe rebalance --endpoint E [--redundant-experts N] [--dry-run] [--wait-s S] [--json]`:
// EPLB from the router's observed loads; applied live unless --dry-run (waits until in force).
absl::Status RebalanceCommand(int argc, char** argv);
// `--endpoint A,B,...`: runs `call` against each router in turn while it fails UNAVAILABLE (the
// router is down, or died under the call) and has not set `*committed` (output already given,
// which a retry would repeat). Returns the last status.
absl::Status OnEachEndpoint(
    const Flags& f,
    const std::function<absl::Status(const std::string& endpoint, bool* committed)>& call);
// `f` was parsed by the single-process command and has --endpoint.
absl::Status GenerateRemote(const Flags& f);
absl::Status ScoreRemote(const Flags& f);
// `chat --endpoint E | --model DIR`: an interactive terminal chat that streams the replies
// (stdin lines are user turns; /reset starts over, /exit or end of input quits).
absl::Status ChatCommand(int argc, char** argv);
// Makes `--device` runnable in this process: nothing for "cpu"; for "cuda:N" enables the CUDA
// backend of the ops (FailedPrecondition in a build without CUDA).
absl::Status EnableDevice(const std::string& device);

}  // namespace splitmoe::cli

#endif  // SPLITMOE_TOOLS_CLI_CLUSTER_H_
