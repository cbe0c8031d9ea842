// The router's side of chat: a Generate request's `messages` rendered through the model's own
// chat template (DeepSeek-V3's, from the real tokenizer_config.json) and tokenised without
// adding BOS; context_max_tokens meaning "up to the context".
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "router/generation_service.h"
#include "tests/testing/test_models.h"

namespace splitmoe::router {
namespace {

using ::testing::HasSubstr;

class ChatPromptTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto tok = tokenizer::Tokenizer::LoadFromDir(testing::TokenizerDir());
    ASSERT_TRUE(tok.ok()) << tok.status();
    tokenizer_ = std::move(*tok);
  }
  std::unique_ptr<tokenizer::Tokenizer> tokenizer_;
};

v1::ChatMessage Message(const std::string& role, const std::string& content) {
  v1::ChatMessage m;
  m.set_role(role);
  m.set_content(content);
  return m;
}

TEST_F(ChatPromptTest, RendersDeepSeekV3Conversations) {
  v1::ChatMessages chat;
  *chat.add_messages() = Message("system", "Be brief.");
  *chat.add_messages() = Message("user", "Hi");
  *chat.add_messages() = Message("assistant", "Hello.");
  *chat.add_messages() = Message("user", "And 日本語?");
  absl::StatusOr<std::string> text = ChatPromptText(chat, *tokenizer_);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text,
            "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>Hello.<｜end▁of▁sentence｜>"
            "<｜User｜>And 日本語?<｜Assistant｜>");

  chat.set_add_generation_prompt(false);
  text = ChatPromptText(chat, *tokenizer_);
  ASSERT_TRUE(text.ok());
  EXPECT_THAT(*text, ::testing::EndsWith("<｜User｜>And 日本語?"));

  // An assistant turn with only tool calls, then the tool's answer.
  v1::ChatMessages tools;
  *tools.add_messages() = Message("user", "Weather?");
  v1::ChatMessage* call = tools.add_messages();
  call->set_role("assistant");  // content unset: none to the template
  v1::ToolCall* c = call->add_tool_calls();
  c->set_type("function");
  c->mutable_function()->set_name("get_weather");
  c->mutable_function()->set_arguments("{\"city\": \"Paris\"}");
  v1::ChatMessage* answer = tools.add_messages();
  *answer = Message("tool", "21C");
  answer->set_tool_call_id("c1");
  text = ChatPromptText(tools, *tokenizer_);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_THAT(*text, HasSubstr("<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
                               "{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜>"));
  EXPECT_THAT(*text, HasSubstr("<｜tool▁output▁begin｜>21C<｜tool▁output▁end｜>"));
}

TEST_F(ChatPromptTest, GenerateRequestWithMessagesIsTheRenderedPromptsIds) {
  model::ModelConfig config;
  config.vocab_size = 129280;
  config.max_position_embeddings = 4096;
  v1::GenerateRequest r;
  *r.mutable_messages()->add_messages() = Message("user", "Hello!");
  r.mutable_stop()->set_max_tokens(16);
  absl::StatusOr<std::vector<int32_t>> ids = ValidateGenerateRequest(r, config, tokenizer_.get());
  ASSERT_TRUE(ids.ok()) << ids.status();
  absl::StatusOr<std::vector<int32_t>> expected =
      tokenizer_->Encode("<｜begin▁of▁sentence｜><｜User｜>Hello!<｜Assistant｜>", false);
  ASSERT_TRUE(expected.ok());
  EXPECT_EQ(*ids, *expected);
  EXPECT_EQ(ids->front(), tokenizer_->bos_id());  // once: the template writes it
  EXPECT_NE((*ids)[1], tokenizer_->bos_id());
  // max_tokens 0 is refused unless context_max_tokens asks for what the context leaves.
  EXPECT_EQ(EffectiveMaxTokens(r, ids->size(), config), 16);
  r.mutable_stop()->set_max_tokens(0);
  EXPECT_EQ(EffectiveMaxTokens(r, ids->size(), config), 0);
  EXPECT_FALSE(ValidateGenerateRequest(r, config, tokenizer_.get()).ok());
  r.mutable_stop()->set_context_max_tokens(true);
  EXPECT_EQ(EffectiveMaxTokens(r, ids->size(), config), 4096 - static_cast<int32_t>(ids->size()));
  EXPECT_TRUE(ValidateGenerateRequest(r, config, tokenizer_.get()).ok());
  r.mutable_stop()->set_max_tokens(7);
  EXPECT_EQ(EffectiveMaxTokens(r, ids->size(), config), 7);

  v1::GenerateRequest empty;
  empty.mutable_messages();
  EXPECT_THAT(ValidateGenerateRequest(empty, config, tokenizer_.get()).status().message(),
              HasSubstr("messages is empty"));
  EXPECT_THAT(ValidateGenerateRequest(r, config, nullptr).status().message(),
              HasSubstr("tokenizer"));
}

TEST_F(ChatPromptTest, TemplateRefusalsAreInvalidArgument) {
  // A template that raises (as many do for roles they do not know).
  v1::ChatMessages chat;
  *chat.add_messages() = Message("user", "x");
  v1::ChatMessages bad_tools = chat;
  bad_tools.set_tools_json("{not json");
  absl::StatusOr<std::string> text = ChatPromptText(bad_tools, *tokenizer_);
  EXPECT_EQ(text.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(text.status().message(), HasSubstr("tools_json"));
}

}  // namespace
}  // namespace splitmoe::router
