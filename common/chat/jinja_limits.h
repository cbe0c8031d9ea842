// Bounds on one render of a Jinja template (jinja.h), so that no template or context makes the
// renderer crash, hang or exhaust memory: past a bound, Render returns ResourceExhausted. The
// defaults are far above what real chat templates need (a 10,000-message conversation renders
// through DeepSeek-V3's template in about 0.2 s, well within them).
#ifndef SPLITMOE_COMMON_CHAT_JINJA_LIMITS_H_
#define SPLITMOE_COMMON_CHAT_JINJA_LIMITS_H_

#include <cstddef>
#include <cstdint>

namespace splitmoe::chat {

struct JinjaLimits {
  // The rendered text, and every string built while rendering.
  size_t max_output_bytes = size_t{64} << 20;
  // Bytes copied into strings while rendering, in total (bounds quadratic string building).
  int64_t max_copied_bytes = int64_t{4} << 30;
  // Evaluated expressions and statements plus loop iterations.
  int64_t max_steps = 50'000'000;
  // Nested evaluations (expression nesting and macro recursion together), and the stack they
  // may use below Render's frame (keep it under the calling thread's stack size).
  int max_depth = 500;
  size_t max_stack_bytes = size_t{2} << 20;
  // Elements of one range(), and of an array built by `+`.
  size_t max_sequence_length = size_t{1} << 20;
  // Scopes created (for loops, macro calls, call blocks).
  size_t max_scopes = size_t{1} << 20;
};

}  // namespace splitmoe::chat

#endif  // SPLITMOE_COMMON_CHAT_JINJA_LIMITS_H_
