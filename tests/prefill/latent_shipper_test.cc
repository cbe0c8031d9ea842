// Prefill to decode over UCX, in one process with two transports (the test's two "workers"):
// the prefill side runs prompts with the Transformer's per-layer hook putting each layer's new
// latents into the decode side's paged cache, which lives in a UCX-registered region; after the
// flush, the decode side continues from those blocks alone and must produce exactly the engine's
// tokens. Only latents cross: layers x tokens x latent_dim x dtype bytes. Run over UCX_TLS=sm and
// tcp (ctest sets the environment).
#include "prefill/latent_shipper.h"

#include <map>

#include "common/engine/batch_decoder.h"
#include "common/engine/engine.h"
#include "decode/paged_sequence_cache.h"
#include "gtest/gtest.h"
#include "tests/testing/test_models.h"

namespace splitmoe::prefill {
namespace {

using decode::LatentDType;

void ShipAndDecode(LatentDType dtype) {
  auto e = engine::Engine::Load(testing::TinyModel("ship", nullptr));
  ASSERT_TRUE(e.ok()) << e.status();
  const auto& c = (*e)->config();
  decode::PagedLatentLayout layout{c.num_hidden_layers, c.latent_dim(), /*block_tokens=*/8, dtype};
  const int64_t num_blocks = 64;

  // The decode side: its cache arena is a registered UCX region.
  auto decode_side = transfer::UcxTransport::Create({.name = "decode"});
  ASSERT_TRUE(decode_side.ok()) << decode_side.status();
  auto region =
      (*decode_side)->RegisterRegion(static_cast<size_t>(num_blocks * layout.block_bytes()));
  ASSERT_TRUE(region.ok()) << region.status();
  decode::PagedLatentCacheOptions options;
  options.layout = layout;
  options.arena = region->base;
  options.arena_bytes = static_cast<int64_t>(region->size_bytes);
  auto cache = decode::PagedLatentCache::Create(options);
  ASSERT_TRUE(cache.ok()) << cache.status();

  // The prefill side.
  auto prefill_side = transfer::UcxTransport::Create({.name = "prefill"});
  ASSERT_TRUE(prefill_side.ok()) << prefill_side.status();
  auto peer = (*prefill_side)->Connect((*decode_side)->WorkerAddress());
  ASSERT_TRUE(peer.ok()) << peer.status();
  const transfer::RegionDescriptor remote = (*decode_side)->Describe(*region);

  std::vector<std::vector<int32_t>> prompts = {{0, 7, 11}, {}};
  for (int i = 0; i < 300; ++i) prompts[1].push_back((i * 37 + 5) % 512);  // > one prefill chunk
  engine::BatchDecoder decoder(&(*e)->transformer(), c.eos_token_id);
  std::map<std::string, std::vector<int32_t>> got;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const int64_t n = static_cast<int64_t>(prompts[i].size());
    auto reservation = cache->Reserve(n);
    ASSERT_TRUE(reservation.ok()) << reservation.status();
    engine::LatentCache local(c.num_hidden_layers, c.latent_dim());
    LatentShipper shipper(prefill_side->get(), *peer, remote, layout, reservation->blocks);
    auto first = engine::PrefillFirstToken((*e)->transformer(), prompts[i], &local, {}, -1,
                                           engine::AttentionForm::kAbsorbed,
                                           [&](int64_t layer, int64_t from, int64_t count) {
                                             return shipper.ShipLayer(local, layer, from,
                                                                      count);
                                           });
    ASSERT_TRUE(first.ok()) << first.status();
    absl::Status flushed = shipper.Finish();  // data, flush — then the decode side may start
    ASSERT_TRUE(flushed.ok()) << flushed;
    EXPECT_EQ(shipper.bytes_put(), static_cast<uint64_t>(c.num_hidden_layers * n * c.latent_dim() *
                                                         layout.value_bytes()));
    ASSERT_TRUE(cache->Validate(*reservation).ok());
    engine::DecodeSequence s;
    s.id = "s" + std::to_string(i);
    s.cache = std::make_unique<decode::PagedSequenceCache>(&*cache, reservation->id, n);
    s.prompt_tokens = n;
    s.next_token = first->token;
    s.max_tokens = 8;
    s.ignore_eos = true;
    got[s.id].push_back(first->token);
    ASSERT_TRUE(decoder.Add(std::move(s)).ok());
  }
  while (decoder.running() > 0) {
    auto step = decoder.Step();
    ASSERT_TRUE(step.ok()) << step.status();
    for (auto& t : *step) got[t.id].push_back(t.token);
  }
  for (size_t i = 0; i < prompts.size(); ++i) {
    engine::GenerateRequest r;
    r.prompt = prompts[i];
    r.max_tokens = 8;
    r.ignore_eos = true;
    auto want = (*e)->Generate(r, nullptr);
    ASSERT_TRUE(want.ok());
    if (dtype == LatentDType::kFloat32) {
      EXPECT_EQ(got["s" + std::to_string(i)], want->tokens) << "prompt " << i;
    } else {
      EXPECT_EQ(got["s" + std::to_string(i)][0], want->tokens[0])
          << "prompt " << i;  // first token: prefill's own
    }
  }
  std::printf("%s transport: %s\n", dtype == LatentDType::kFloat32 ? "fp32" : "bf16",
              (*prefill_side)->Capabilities().Summary().c_str());
}

TEST(LatentShipperTest, Fp32LatentsOverUcxDecodeExactlyLikeTheEngine) {
  ShipAndDecode(LatentDType::kFloat32);
}
TEST(LatentShipperTest, Bf16LatentsOverUcx) { ShipAndDecode(LatentDType::kBFloat16); }

}  // namespace
}  // namespace splitmoe::prefill
