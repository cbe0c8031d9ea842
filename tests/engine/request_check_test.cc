// The one request check (common/engine/request_check.h): each refusal names its field, the
// caller's spelling of max_tokens is used, a GPU cache's tighter context applies, and the
// boundaries are exact (a request that just fits is accepted; overflowing sums are refused).
#include "common/engine/request_check.h"

#include <limits>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace splitmoe::engine {
namespace {

model::ModelConfig Config() {
  model::ModelConfig c;
  c.vocab_size = 100;
  c.max_position_embeddings = 64;
  return c;
}

TEST(RequestCheckTest, EachRefusalNamesWhatIsWrong) {
  const model::ModelConfig c = Config();
  const std::vector<int32_t> prompt = {1, 2, 3};
  const SamplingParams sampling;
  RequestShape ok;
  ok.prompt = prompt;
  ok.max_tokens = 4;
  ok.sampling = &sampling;
  ASSERT_TRUE(CheckRequest(c, ok).ok());

  auto expect = [&](const RequestShape& r, const std::string& needle) {
    absl::Status s = CheckRequest(c, r);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << needle;
    EXPECT_NE(s.message().find(needle), std::string::npos) << s;
  };
  RequestShape r = ok;
  r.prompt = {};
  expect(r, "empty prompt");
  const std::vector<int32_t> bad_id = {1, 100};
  r = ok;
  r.prompt = bad_id;
  expect(r, "prompt token id 100 outside the vocabulary [0, 100)");
  r = ok;
  r.max_tokens = 0;
  expect(r, "max_tokens must be > 0, got 0");
  r.max_tokens_name = "stop.max_tokens";
  expect(r, "stop.max_tokens must be > 0");
  r = ok;
  r.max_tokens = 62;
  expect(r, "prompt (3 tokens) + max_tokens (62) exceeds the context of 64 tokens");
  r.max_tokens = 61;  // exactly the context
  EXPECT_TRUE(CheckRequest(c, r).ok());
  r.max_context = 32;  // a device cache smaller than the model's context
  expect(r, "exceeds the context of 32 tokens");
  r = ok;
  r.max_tokens = std::numeric_limits<int64_t>::max();  // no overflow into acceptance
  expect(r, "exceeds the context");
  r.max_context = 1000;  // a larger cache does not widen the model's context
  r.max_tokens = 62;
  expect(r, "exceeds the context of 64 tokens");
  r = ok;
  r.logprobs = -1;  // none
  r.prompt_logprobs = -1;
  EXPECT_TRUE(CheckRequest(c, r).ok());
  r.logprobs = kMaxLogprobs;
  EXPECT_TRUE(CheckRequest(c, r).ok());
  r = ok;
  r.logprobs = kMaxLogprobs + 1;
  expect(r, "logprobs must be in [0, 20]");
  r = ok;
  r.prompt_logprobs = kMaxLogprobs + 1;
  expect(r, "prompt_logprobs must be in [0, 20]");
  const std::vector<std::string> stop = {"end"}, empty_stop = {""};
  r = ok;
  r.stop = stop;
  expect(r, "stop strings need a tokenizer");
  r.has_tokenizer = true;
  EXPECT_TRUE(CheckRequest(c, r).ok());
  r.stop = empty_stop;
  expect(r, "empty stop string");
  const std::vector<int32_t> bad_stop_id = {-1};
  r = ok;
  r.stop_token_ids = bad_stop_id;
  expect(r, "stop token id -1 outside the vocabulary");
  SamplingParams hot;
  hot.temperature = -1;
  r = ok;
  r.sampling = &hot;
  expect(r, "temperature");
}

TEST(RequestCheckTest, ContextAloneForReservationsAndPrefills) {
  const model::ModelConfig c = Config();
  EXPECT_TRUE(CheckContext(c, 60, 4).ok());
  EXPECT_FALSE(CheckContext(c, 65, 0).ok());
  EXPECT_FALSE(CheckContext(c, 60, 5).ok());
  const std::vector<int32_t> ids = {0, 99};
  EXPECT_TRUE(CheckTokenIds(c, ids, "token id").ok());
  const std::vector<int32_t> negative = {-5};
  EXPECT_NE(CheckTokenIds(c, negative, "token id").message().find("token id -5"),
            std::string::npos);
}

}  // namespace
}  // namespace splitmoe::engine
