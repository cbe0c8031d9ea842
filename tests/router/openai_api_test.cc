#include "router/openai_api.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace splitmoe::router::openai {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;

Defaults TestDefaults() {
  Defaults d;
  d.model_name = "tiny";
  return d;
}

absl::StatusOr<ApiRequest> Parse(Endpoint e, const json& body) {
  return ParseRequest(e, body.dump(), TestDefaults(), 42);
}

TEST(OpenAiApiTest, CompletionsDefaultsAndFields) {
  auto r = Parse(Endpoint::kCompletions, {{"model", "tiny"}, {"prompt", "Hello"}});
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->generates.size(), 1u);
  const v1::GenerateRequest& g = r->generates[0];
  EXPECT_EQ(g.text(), "Hello");
  EXPECT_EQ(g.stop().max_tokens(), 16);  // OpenAI's default for completions
  EXPECT_EQ(g.sampling().temperature(), 1.0);
  EXPECT_EQ(g.logprobs(), 0);
  EXPECT_FALSE(r->stream);
  EXPECT_THAT(r->id, ::testing::StartsWith("cmpl-"));
  EXPECT_EQ(g.request_id(), r->id);

  r = Parse(Endpoint::kCompletions, {{"model", "tiny"},
                                     {"prompt", {1, 2, 3}},
                                     {"max_tokens", 5},
                                     {"temperature", 0},
                                     {"top_p", 0.5},
                                     {"seed", -1},
                                     {"stop", {"a", "b"}},
                                     {"logprobs", 0},
                                     {"stream", true},
                                     {"stream_options", {{"include_usage", true}}},
                                     {"user", "u1"},
                                     {"some_future_field", 1}});
  ASSERT_TRUE(r.ok()) << r.status();
  const v1::GenerateRequest& h = r->generates[0];
  EXPECT_EQ(h.token_ids().ids_size(), 3);
  EXPECT_EQ(h.stop().max_tokens(), 5);
  EXPECT_EQ(h.sampling().temperature(), 0.0);
  EXPECT_EQ(h.sampling().top_p(), 0.5);
  EXPECT_EQ(h.sampling().seed(), ~uint64_t{0});
  EXPECT_EQ(h.stop().stop_size(), 2);
  EXPECT_EQ(r->top_logprobs, 0);
  EXPECT_EQ(h.logprobs(), 1);  // the wire's 0 is "none": one is asked, none shown
  EXPECT_TRUE(r->stream);
  EXPECT_TRUE(r->include_usage);
}

TEST(OpenAiApiTest, CompletionsListOfPromptsIsOneChoiceEach) {
  auto r = Parse(Endpoint::kCompletions,
                 {{"model", "tiny"}, {"prompt", json::array({"a", "b", json::array({5, 6})})}});
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->generates.size(), 3u);
  EXPECT_EQ(r->generates[1].text(), "b");
  EXPECT_EQ(r->generates[2].token_ids().ids(1), 6);
  EXPECT_NE(r->generates[0].request_id(), r->generates[1].request_id());
}

TEST(OpenAiApiTest, RefusesWhatItCannotHonourNamingTheField) {
  struct Case {
    json body;
    std::string mention;
  };
  const std::vector<Case> cases = {
      {{{"prompt", "x"}, {"n", 2}}, "'n'"},
      {{{"prompt", "x"}, {"echo", true}}, "'echo'"},
      {{{"prompt", "x"}, {"best_of", 3}}, "'best_of'"},
      {{{"prompt", "x"}, {"presence_penalty", 0.5}}, "'presence_penalty'"},
      {{{"prompt", "x"}, {"logit_bias", {{"5", 1}}}}, "'logit_bias'"},
      {{{"prompt", "x"}, {"stream_options", {{"include_usage", true}}}}, "'stream_options'"},
      {{{"prompt", "x"}, {"max_tokens", 0}}, "'max_tokens'"},
      {{{"prompt", "x"}, {"max_tokens", "5"}}, "'max_tokens'"},
      {{{"prompt", "x"}, {"temperature", -1}}, "'temperature'"},
      {{{"prompt", "x"}, {"top_p", 0}}, "'top_p'"},
      {{{"prompt", "x"}, {"logprobs", 21}}, "'logprobs'"},
      {{{"prompt", "x"}, {"stop", 5}}, "'stop'"},
      {{{"prompt", json::array()}}, "'prompt'"},
      {{{"prompt", {-1}}}, "'prompt'"},
      {json::object(), "'prompt'"},
  };
  for (const Case& c : cases) {
    auto r = Parse(Endpoint::kCompletions, c.body);
    ASSERT_FALSE(r.ok()) << c.body.dump();
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.body.dump();
    EXPECT_THAT(r.status().message(), HasSubstr(c.mention)) << c.body.dump();
  }
  const std::string deep = "{\"prompt\": " + std::string(100000, '[') + std::string(100000, ']') + "}";
  auto too_deep = ParseRequest(Endpoint::kCompletions, deep, TestDefaults(), 1);
  EXPECT_THAT(too_deep.status().message(), HasSubstr("deeper than 64"));
  // Brackets inside strings do not count.
  EXPECT_TRUE(ParseRequest(Endpoint::kCompletions,
                           "{\"prompt\": \"" + std::string(1000, '[') + "\"}", TestDefaults(), 1)
                  .ok());
  auto format = Parse(Endpoint::kCompletions,
                      {{"prompt", "x"}, {"response_format", {{"type", {1, 2}}}}});
  EXPECT_THAT(format.status().message(), HasSubstr("'response_format'"));
  auto bad_json = ParseRequest(Endpoint::kCompletions, "{\"prompt\": ", TestDefaults(), 1);
  EXPECT_THAT(bad_json.status().message(), HasSubstr("not valid JSON"));
  auto other = Parse(Endpoint::kCompletions, {{"model", "gpt-4"}, {"prompt", "x"}});
  EXPECT_EQ(other.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(ErrorFrom(other.status().code(), "").http_status, 404);
  EXPECT_EQ(ErrorFrom(other.status().code(), "").code, "model_not_found");
}

TEST(OpenAiApiTest, ChatMessagesToolsAndLimits) {
  json body = {
      {"model", "tiny"},
      {"messages",
       {{{"role", "system"}, {"content", "Be brief."}},
        {{"role", "user"}, {"content", {{{"type", "text"}, {"text", "a"}},
                                         {{"type", "text"}, {"text", "b"}}}}},
        {{"role", "assistant"},
         {"content", nullptr},
         {"tool_calls",
          {{{"id", "c1"},
            {"type", "function"},
            {"function", {{"name", "f"}, {"arguments", "{\"x\":1}"}}}}}}},
        {{"role", "tool"}, {"tool_call_id", "c1"}, {"content", "42"}}}},
      {"tools", {{{"type", "function"}, {"function", {{"name", "f"}}}}}},
      {"max_tokens", 7},
      {"max_completion_tokens", 9},
      {"logprobs", true},
      {"top_logprobs", 3}};
  auto r = Parse(Endpoint::kChat, body);
  ASSERT_TRUE(r.ok()) << r.status();
  const v1::GenerateRequest& g = r->generates[0];
  ASSERT_EQ(g.messages().messages_size(), 4);
  EXPECT_EQ(g.messages().messages(1).content(), "a\nb");
  EXPECT_FALSE(g.messages().messages(2).has_content());
  EXPECT_EQ(g.messages().messages(2).tool_calls(0).function().arguments(), "{\"x\":1}");
  EXPECT_EQ(g.messages().messages(3).tool_call_id(), "c1");
  EXPECT_THAT(g.messages().tools_json(), HasSubstr("\"name\":\"f\""));
  EXPECT_TRUE(g.messages().add_generation_prompt());
  EXPECT_EQ(g.stop().max_tokens(), 9);  // max_completion_tokens wins
  EXPECT_EQ(r->top_logprobs, 3);
  EXPECT_EQ(g.logprobs(), 3);
  EXPECT_THAT(r->id, ::testing::StartsWith("chatcmpl-"));

  EXPECT_FALSE(g.stop().context_max_tokens());
  // Without a limit a chat generates up to the context.
  auto open = Parse(Endpoint::kChat, {{"messages", {{{"role", "user"}, {"content", "hi"}}}}});
  ASSERT_TRUE(open.ok());
  EXPECT_EQ(open->generates[0].stop().max_tokens(), 0);
  EXPECT_TRUE(open->generates[0].stop().context_max_tokens());
  EXPECT_EQ(open->top_logprobs, -1);

  for (const json& bad :
       {json{{"messages", json::array()}},
        json{{"messages", {{{"content", "no role"}}}}},
        json{{"messages", {{{"role", "user"}, {"content", {{{"type", "image_url"}}}}}}}},
        json{{"messages", {{{"role", "user"}, {"content", "x"}}}}, {"top_logprobs", 2}},
        json{{"messages", {{{"role", "user"}, {"content", "x"}}}}, {"tool_choice", "required"}}}) {
    auto r2 = Parse(Endpoint::kChat, bad);
    EXPECT_EQ(r2.status().code(), absl::StatusCode::kInvalidArgument) << bad.dump();
  }
}

v1::GenerateEvent Event(std::vector<int32_t> ids, std::string text, bool finished = false) {
  v1::GenerateEvent e;
  for (int32_t id : ids) {
    e.add_token_ids(id);
    v1::TokenLogprob* lp = e.add_logprobs();
    lp->set_token(id);
    lp->set_logprob(-0.5f);
    auto* alt = lp->add_top();
    alt->set_token(id);
    alt->set_logprob(-0.5f);
  }
  e.set_text(std::move(text));
  if (finished) {
    e.set_finished(true);
    e.set_finish_reason(v1::FINISH_REASON_LENGTH);
    e.mutable_usage()->set_prompt_tokens(4);
    e.mutable_usage()->set_completion_tokens(static_cast<int32_t>(ids.size()) + 1);
  }
  return e;
}

TEST(OpenAiApiTest, ChatStreamChunksAndFinalResponse) {
  auto r = Parse(Endpoint::kChat, {{"messages", {{{"role", "user"}, {"content", "hi"}}}},
                                   {"stream", true},
                                   {"stream_options", {{"include_usage", true}}},
                                   {"logprobs", true},
                                   {"top_logprobs", 1}});
  ASSERT_TRUE(r.ok());
  ResponseBuilder b(*r, "tiny", nullptr);
  std::vector<std::string> first = b.Add(0, Event({7}, "Hel"));
  ASSERT_EQ(first.size(), 2u);  // the role, then the text
  json role = json::parse(first[0]);
  EXPECT_EQ(role["object"], "chat.completion.chunk");
  EXPECT_EQ(role["choices"][0]["delta"]["role"], "assistant");
  EXPECT_TRUE(role["usage"].is_null());
  json text = json::parse(first[1]);
  EXPECT_EQ(text["choices"][0]["delta"]["content"], "Hel");
  EXPECT_EQ(text["choices"][0]["logprobs"]["content"][0]["logprob"], -0.5);
  std::vector<std::string> last = b.Add(0, Event({8}, "lo", true));
  ASSERT_EQ(last.size(), 2u);
  json finish = json::parse(last[1]);
  EXPECT_EQ(finish["choices"][0]["finish_reason"], "length");
  EXPECT_TRUE(finish["choices"][0]["delta"].empty());
  json usage = json::parse(b.UsageChunk());
  EXPECT_TRUE(usage["choices"].empty());
  EXPECT_EQ(usage["usage"]["prompt_tokens"], 4);
  EXPECT_EQ(usage["usage"]["completion_tokens"], 2);
  EXPECT_EQ(usage["usage"]["total_tokens"], 6);
  json whole = json::parse(b.Response());
  EXPECT_EQ(whole["object"], "chat.completion");
  EXPECT_EQ(whole["choices"][0]["message"]["content"], "Hello");
  EXPECT_EQ(whole["choices"][0]["logprobs"]["content"].size(), 2u);
}

TEST(OpenAiApiTest, CompletionLogprobsShape) {
  auto r = Parse(Endpoint::kCompletions, {{"prompt", "x"}, {"logprobs", 1}});
  ASSERT_TRUE(r.ok());
  ResponseBuilder b(*r, "tiny", nullptr);
  b.Add(0, Event({3, 4}, "ab"));
  b.Add(0, Event({}, "", true));
  json whole = json::parse(b.Response());
  EXPECT_EQ(whole["object"], "text_completion");
  EXPECT_EQ(whole["choices"][0]["text"], "ab");
  const json& lp = whole["choices"][0]["logprobs"];
  EXPECT_EQ(lp["tokens"].size(), 2u);
  EXPECT_EQ(lp["token_logprobs"].size(), 2u);
  EXPECT_EQ(lp["top_logprobs"][0].size(), 1u);
  EXPECT_EQ(lp["text_offset"][0], 0);
  EXPECT_EQ(whole["usage"]["prompt_tokens"], 4);
}

TEST(OpenAiApiTest, ErrorsMapToHttpCodes) {
  EXPECT_EQ(ErrorFrom(absl::StatusCode::kInvalidArgument, "x").http_status, 400);
  EXPECT_EQ(ErrorFrom(absl::StatusCode::kUnauthenticated, "x").http_status, 401);
  EXPECT_EQ(ErrorFrom(absl::StatusCode::kResourceExhausted, "x").http_status, 429);
  EXPECT_EQ(ErrorFrom(absl::StatusCode::kUnavailable, "x").http_status, 503);
  json body = json::parse(ErrorBody(ErrorFrom(absl::StatusCode::kInvalidArgument, "bad \xff")));
  EXPECT_EQ(body["error"]["type"], "invalid_request_error");
  EXPECT_TRUE(body["error"]["code"].is_null());
}

}  // namespace
}  // namespace splitmoe::router::openai
