// The experts actor on the manual scheduler: a batch is computed with the experts of the
// placement it was planned with (installed by the placement loader), a batch of a placement not
// held is answered with an error naming it (the worker fails over), and a placement goes only
// once no batch has used it for the grace, while the default stays. PlacementFilter: a listed layer holds exactly the experts whose copies
// include the shard, an unlisted one the contiguous default.
#include <cmath>

#include "common/rpc/rpc.h"
#include "common/runtime/actor.h"
#include "common/runtime/manual_scheduler.h"
#include "expert_service/expert_service.h"
#include "expert_service/placement_loader.h"
#include "gtest/gtest.h"
#include "tests/testing/test_models.h"

namespace splitmoe::expert_service {
namespace {

TEST(PlacementFilterTest, ListedLayersFollowTheCopiesOthersTheDefault) {
  v1::Placement p;
  p.set_id(7);
  v1::LayerPlacement* l = p.add_layers();
  l->set_layer(1);
  for (int e = 0; e < 8; ++e) {
    v1::ExpertCopies* c = l->add_experts();
    c->add_shards(e % 2);
    if (e == 5) c->add_shards(0);  // a redundant copy of expert 5 on shard 0
  }
  auto holds = PlacementFilter(p, {.shard = 0, .num_shards = 2}, 8);
  for (int e = 0; e < 8; ++e) {
    EXPECT_EQ(holds(1, e), e % 2 == 0 || e == 5) << "layer 1 expert " << e;
    EXPECT_EQ(holds(2, e), e < 4) << "layer 2 (unlisted) expert " << e;
  }
}

TEST(ExpertsActorTest, BatchesUseTheirPlacementsExperts) {
  const std::string dir = testing::TinyModel("experts_actor", nullptr);
  auto base = ExpertShard::Load(dir, {.shard = 0, .num_shards = 2});
  ASSERT_TRUE(base.ok()) << base.status();
  const model::ModelConfig c = (*base)->config();
  const int64_t n = c.n_routed_experts, h = c.hidden_size;
  const int32_t outside = static_cast<int32_t>(n - 1);  // not in shard 0's default half
  // Placement 9: shard 0 also holds the last expert in layer 1.
  v1::Placement p;
  p.set_id(9);
  v1::LayerPlacement* l = p.add_layers();
  l->set_layer(1);
  for (int64_t e = 0; e < n; ++e) {
    v1::ExpertCopies* copies = l->add_experts();
    copies->add_shards(e < n / 2 ? 0 : 1);
    if (e == outside) copies->add_shards(0);
  }
  auto placed = ExpertShard::LoadPlaced(dir, {.shard = 0, .num_shards = 2},
                                        PlacementFilter(p, {.shard = 0, .num_shards = 2}, n));
  ASSERT_TRUE(placed.ok()) << placed.status();
  EXPECT_GT((*placed)->resident_bytes(), (*base)->resident_bytes());  // one expert more

  runtime::ManualScheduler scheduler;
  runtime::Actor<ExpertsActor> actor("experts", std::make_unique<ExpertsActor>(std::move(*base)),
                                     &scheduler);
  std::vector<float> x(static_cast<size_t>(h), 0.5f);
  auto batch = [&](uint64_t placement, int32_t expert) {
    v1::ExpertBatch b;
    b.set_batch_id(placement * 100 + static_cast<uint64_t>(expert));
    b.set_layer(1);
    b.set_tokens(1);
    b.set_dtype(v1::WIRE_DTYPE_FP32);
    b.set_hidden(rpc::EncodeTensor(x, v1::WIRE_DTYPE_FP32));
    b.add_offsets(0);
    b.add_offsets(1);
    b.add_expert_ids(expert);
    b.add_weights(1.0f);
    b.set_placement_id(placement);
    v1::ExpertResult out;
    actor.Send(ComputeExpertBatch{b, [&out](absl::StatusOr<v1::ExpertResult> r) {
                                    ASSERT_TRUE(r.ok());
                                    out = *r;
                                  }});
    scheduler.RunUntilIdle();
    return out;
  };
  EXPECT_TRUE(batch(0, 0).error().empty());
  EXPECT_NE(batch(0, outside).error().find("not hosted"), std::string::npos);
  const v1::ExpertResult missing = batch(9, outside);
  EXPECT_NE(missing.error().find("placement 9 is not loaded"), std::string::npos)
      << missing.error();
  actor.Send(InstallPlacement{9, std::shared_ptr<const ExpertShard>(std::move(*placed))});
  scheduler.RunUntilIdle();
  const v1::ExpertResult got = batch(9, outside);
  ASSERT_TRUE(got.error().empty()) << got.error();
  std::vector<float> y;
  ASSERT_TRUE(rpc::DecodeTensor(got.output(), got.dtype(), h, &y).ok());
  double norm = 0;
  for (float v : y) norm += std::fabs(v);
  EXPECT_GT(norm, 0.0);
  std::vector<bool> gone;
  auto retire = [&](uint64_t placement, absl::Duration idle) {
    actor.Send(RetirePlacement{placement, idle, [&](absl::StatusOr<bool> r) {
                                 ASSERT_TRUE(r.ok());
                                 gone.push_back(*r);
                               }});
    scheduler.RunUntilIdle();
  };
  retire(9, absl::Hours(1));  // used just now: a worker may still plan with it
  EXPECT_TRUE(batch(9, outside).error().empty());
  retire(9, absl::ZeroDuration());
  retire(0, absl::ZeroDuration());  // the default is never retired
  EXPECT_EQ(gone, (std::vector<bool>{false, true, false}));
  EXPECT_NE(batch(9, outside).error().find("placement 9 is not loaded"), std::string::npos);
  EXPECT_TRUE(batch(0, 0).error().empty());
}

}  // namespace
}  // namespace splitmoe::expert_service
