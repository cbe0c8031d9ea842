// Termination signals for the long-running roles. Call BlockTerminationSignals() first thing in
// main, before any thread exists (threads inherit the mask, so no gRPC or UCX thread is ever
// interrupted); later WaitForTerminationSignal() returns the SIGINT/SIGTERM that arrived, and
// the role shuts down in order from the main thread.
#ifndef SPLITMOE_COMMON_PROCESS_SIGNALS_H_
#define SPLITMOE_COMMON_PROCESS_SIGNALS_H_

#include "absl/time/time.h"

namespace splitmoe::process {

void BlockTerminationSignals();
int WaitForTerminationSignal();
// The signal that arrived within `timeout`, or 0 (the launcher polls its children in between).
int WaitForTerminationSignalFor(absl::Duration timeout);

}  // namespace splitmoe::process

#endif  // SPLITMOE_COMMON_PROCESS_SIGNALS_H_
