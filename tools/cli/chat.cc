// `splitmoe chat`: an interactive chat in the terminal. Each line read is a user turn; the reply
// streams as it is generated and joins the conversation. Through a cluster (`--endpoint`) the
// router renders the model's chat template (Generate's `messages`); with `--model` the engine
// runs in this process on the same rendering (router::ChatPromptText).
#include <unistd.h>

#include <algorithm>
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/base/status_macros.h"
#include "common/engine/engine.h"
#include "common/rpc/rpc.h"
#include "common/rpc/security.h"
#include "router/generation_service.h"
#include "splitmoe/v1/generation.grpc.pb.h"
#include "tools/cli/cluster.h"
#include "tools/cli/flags.h"

namespace splitmoe::cli {
namespace {

struct ChatSettings {
  int64_t max_tokens = 0;  // 0: up to the context
  double temperature = 0.0;
  double top_p = 1.0;
  uint64_t seed = 0;
};

// One reply through a cluster; its text streamed to stdout as it comes.
absl::StatusOr<std::string> ReplyRemote(v1::Generation::Stub& stub,
                                        const v1::ChatMessages& chat, const ChatSettings& s) {
  v1::GenerateRequest request;
  *request.mutable_messages() = chat;
  request.mutable_stop()->set_max_tokens(static_cast<int32_t>(s.max_tokens));
  request.mutable_sampling()->set_temperature(s.temperature);
  request.mutable_sampling()->set_top_p(s.top_p);
  request.mutable_sampling()->set_seed(s.seed);
  grpc::ClientContext ctx;
  std::unique_ptr<grpc::ClientReader<v1::GenerateEvent>> reader = stub.Generate(&ctx, request);
  std::string text;
  v1::GenerateEvent event;
  while (reader->Read(&event)) {
    std::cout << event.text() << std::flush;
    text += event.text();
  }
  SPLITMOE_RETURN_IF_ERROR(rpc::FromGrpcStatus(reader->Finish()));
  return text;
}

absl::StatusOr<std::string> ReplyLocal(engine::Engine& eng, const v1::ChatMessages& chat,
                                       const ChatSettings& s) {
  if (eng.tokenizer() == nullptr) {
    return absl::FailedPreconditionError("chat needs tokenizer.json in the model directory");
  }
  SPLITMOE_ASSIGN_OR_RETURN(std::string prompt, router::ChatPromptText(chat, *eng.tokenizer()));
  engine::GenerateRequest req;
  SPLITMOE_ASSIGN_OR_RETURN(req.prompt, eng.tokenizer()->Encode(prompt, false));
  const int64_t left = eng.config().max_position_embeddings - static_cast<int64_t>(req.prompt.size());
  req.max_tokens = s.max_tokens > 0 ? s.max_tokens : std::max<int64_t>(left, 1);
  req.sampling.temperature = s.temperature;
  req.sampling.top_p = s.top_p;
  req.sampling.seed = s.seed;
  SPLITMOE_ASSIGN_OR_RETURN(
      engine::GenerateResult r,
      eng.Generate(req, [](int32_t, absl::string_view text) { std::cout << text << std::flush; }));
  return r.text;
}

}  // namespace

absl::Status ChatCommand(int argc, char** argv) {
  Flags f;
  SPLITMOE_RETURN_IF_ERROR(f.Parse(argc, argv, 2,
                                   {"endpoint", "model", "api-key", "system", "max-tokens",
                                    "temperature", "top-p", "seed", "weights"},
                                   {}));
  if (f.Has("endpoint") == f.Has("model")) {
    return absl::InvalidArgumentError("chat needs --endpoint HOST:PORT or --model DIR");
  }
  ChatSettings s;
  SPLITMOE_ASSIGN_OR_RETURN(s.max_tokens, f.GetInt("max-tokens", 0));
  SPLITMOE_ASSIGN_OR_RETURN(s.temperature, f.GetDouble("temperature", 0.0));
  SPLITMOE_ASSIGN_OR_RETURN(s.top_p, f.GetDouble("top-p", 1.0));
  SPLITMOE_ASSIGN_OR_RETURN(int64_t seed, f.GetInt("seed", 0));
  s.seed = static_cast<uint64_t>(seed);
  if (s.max_tokens < 0) return absl::InvalidArgumentError("--max-tokens must be >= 0");

  std::unique_ptr<v1::Generation::Stub> stub;
  std::unique_ptr<engine::Engine> eng;
  if (f.Has("endpoint")) {
    stub = v1::Generation::NewStub(
        rpc::PublicChannel(f.Get("endpoint"), rpc::ClientApiKey(f.Get("api-key"))));
  } else {
    engine::EngineOptions options;
    SPLITMOE_ASSIGN_OR_RETURN(options.weights,
                              model::ParseResidentDType(f.Get("weights", "checkpoint")));
    SPLITMOE_ASSIGN_OR_RETURN(eng, engine::Engine::Load(f.Get("model"), options));
  }
  v1::ChatMessages chat;
  auto reset = [&] {
    chat.Clear();
    if (f.Has("system")) {
      v1::ChatMessage* m = chat.add_messages();
      m->set_role("system");
      m->set_content(f.Get("system"));
    }
  };
  reset();
  const bool tty = ::isatty(0);
  std::string line;
  while (true) {
    if (tty) std::cout << "> " << std::flush;
    if (!std::getline(std::cin, line)) break;
    const absl::string_view input = absl::StripAsciiWhitespace(line);
    if (input.empty()) continue;
    if (input == "/exit" || input == "/quit") break;
    if (input == "/reset") {
      reset();
      continue;
    }
    v1::ChatMessage* user = chat.add_messages();
    user->set_role("user");
    user->set_content(std::string(input));
    absl::StatusOr<std::string> reply =
        stub != nullptr ? ReplyRemote(*stub, chat, s) : ReplyLocal(*eng, chat, s);
    std::cout << "\n";
    if (!reply.ok()) {
      // The turn did not happen: the conversation stays as it was.
      chat.mutable_messages()->RemoveLast();
      std::cerr << "error: " << reply.status() << "\n";
      if (!tty) return reply.status();
      continue;
    }
    v1::ChatMessage* assistant = chat.add_messages();
    assistant->set_role("assistant");
    assistant->set_content(*reply);
  }
  return absl::OkStatus();
}

}  // namespace splitmoe::cli
