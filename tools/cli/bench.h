// `splitmoe bench`: a closed-loop load generator. `--concurrency C` clients each send their next
// request as soon as the previous one finished, until `--requests N` have been served; every
// request has `--prompt-tokens P` random token ids (seeded, the same in both modes) and asks for
// exactly `--max-tokens T` tokens (eos ignored). It reports p50/p90/p99 time to first token,
// time per output token (after the first), end-to-end latency and output tokens/s, on stdout
// and with `--json FILE` as JSON (`output_tokens_per_s`, `ttft_ms.p50`, `tpot_ms.p50`,
// `e2e_ms.p99`, ...).
//
//   --endpoint HOST:PORT  the requests go to a cluster's public Generate API
//   --model DIR           the same workload served in this process by the engine's continuous
//                         batching (engine::BatchDecoder; newly admitted prompts prefilled
//                         together between decode steps), so a cluster is compared with
//                         batching on both sides
#ifndef SPLITMOE_TOOLS_CLI_BENCH_H_
#define SPLITMOE_TOOLS_CLI_BENCH_H_

#include "absl/status/status.h"

namespace splitmoe::cli {

absl::Status BenchCommand(int argc, char** argv);

}  // namespace splitmoe::cli

#endif  // SPLITMOE_TOOLS_CLI_BENCH_H_
