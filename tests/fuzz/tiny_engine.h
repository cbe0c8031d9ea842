// The engine the worker targets (decode actor, prefill) run, loaded once per process.
#ifndef SPLITMOE_TESTS_FUZZ_TINY_ENGINE_H_
#define SPLITMOE_TESTS_FUZZ_TINY_ENGINE_H_

#include <memory>
#include <string>

#include "common/engine/engine.h"
#include "common/model/tiny.h"
#include "tests/fuzz/fuzz_util.h"

namespace splitmoe::fuzz {

// The model the worker targets (decode actor, prefill) run: the tiny DeepSeek-V3 model with a
// 512-token vocabulary and a 64-token context, so that prompt + max_tokens limits are reached
// by small inputs. Written into TempDir() and loaded once per process.
inline engine::Engine& TinyEngine() {
  static engine::Engine* loaded = [] {
    model::TinyModelOptions o;
    o.vocab_size = 512;
    o.max_position_embeddings = 64;
    const std::string dir = TempDir() + "/tiny_model";
    if (absl::Status s = model::WriteTinyModel(o, dir, ""); !s.ok()) Die(s.ToString());
    absl::StatusOr<std::unique_ptr<engine::Engine>> e = engine::Engine::Load(dir);
    if (!e.ok()) Die(e.status().ToString());
    return e->release();
  }();
  return *loaded;
}

}  // namespace splitmoe::fuzz

#endif  // SPLITMOE_TESTS_FUZZ_TINY_ENGINE_H_
