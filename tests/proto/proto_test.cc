// The generated API compiles, round-trips, and keeps its wire contract: field numbers of the
// public messages are part of the v1 promise to generated clients in other languages.
#include "gtest/gtest.h"
#include "splitmoe/v1/generation.grpc.pb.h"
#include "splitmoe/v1/generation.pb.h"
#include "splitmoe/v1/internal.grpc.pb.h"

namespace splitmoe {
namespace {

TEST(ProtoTest, GenerateRequestRoundTrips) {
  v1::GenerateRequest req;
  req.set_request_id("r-1");
  req.mutable_token_ids()->add_ids(0);
  req.mutable_token_ids()->add_ids(17);
  req.mutable_sampling()->set_temperature(0.7);
  req.mutable_sampling()->set_seed(42);
  req.mutable_stop()->set_max_tokens(16);
  req.mutable_stop()->add_stop("\n\n");
  req.set_logprobs(5);
  std::string wire = req.SerializeAsString();
  v1::GenerateRequest back;
  ASSERT_TRUE(back.ParseFromString(wire));
  EXPECT_EQ(back.prompt_case(), v1::GenerateRequest::kTokenIds);
  EXPECT_EQ(back.token_ids().ids_size(), 2);
  EXPECT_EQ(back.sampling().seed(), 42u);
  EXPECT_EQ(back.stop().stop(0), "\n\n");
}

TEST(ProtoTest, PublicFieldNumbersAreStable) {
  const auto* d = v1::GenerateRequest::descriptor();
  EXPECT_EQ(d->FindFieldByName("request_id")->number(), 1);
  EXPECT_EQ(d->FindFieldByName("text")->number(), 2);
  EXPECT_EQ(d->FindFieldByName("token_ids")->number(), 3);
  EXPECT_EQ(d->FindFieldByName("sampling")->number(), 4);
  EXPECT_EQ(d->FindFieldByName("stop")->number(), 5);
  EXPECT_EQ(d->FindFieldByName("logprobs")->number(), 6);
  EXPECT_EQ(d->FindFieldByName("prompt_logprobs")->number(), 7);
  const auto* e = v1::GenerateEvent::descriptor();
  EXPECT_EQ(e->FindFieldByName("token_ids")->number(), 2);
  EXPECT_EQ(e->FindFieldByName("finished")->number(), 7);
  EXPECT_EQ(v1::Generation::service_full_name(), std::string("splitmoe.v1.Generation"));
  EXPECT_EQ(v1::ExpertCompute::service_full_name(), std::string("splitmoe.v1.ExpertCompute"));
}

}  // namespace
}  // namespace splitmoe
