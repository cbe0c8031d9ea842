// The decode cache's device copy (decode/device_arena.h), run on the CPU device, where the
// copy lives in host memory and the same code as on a GPU moves the bytes (DeviceArenaTest):
//   - decoding over it gives the host arena's tokens and logprobs, bit for bit, in fp32 and
//     bf16, and leaves both copies byte-identical (prompt rows uploaded, decoded rows written
//     through);
//   - the attention really reads the copy: withhold the prompt's upload and the logits change;
//   - a published block's decoded rows are in the host arena (where a prefill worker reads a
//     cached prefix) and on the device (where the sharing sequence's attention reads them): a
//     prompt that shares them decodes as the engine does.
// DeviceArenaGpuTest (ctest device_arena_gpu_test, skipped without a device) runs the decode
// worker's GPU path: the Transformer on cuda:0 in the fp32 mode with its experts staged through
// the host, the arena's copy in device memory, prompts written into the host arena by the CPU:
// greedy tokens equal the CPU's over the host arena, logprobs within 1e-3, including a prompt
// that shares published decoded rows.
#include "decode/device_arena.h"

#include <cstring>
#include <map>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/engine/batch_decoder.h"
#include "common/engine/engine.h"
#include "common/engine/on_device.h"
#include "gtest/gtest.h"
#ifdef SPLITMOE_OPS_CUDA
#include "common/kernels/cuda/cuda_ops.h"
#include "common/kernels/cuda/ops_cuda.h"
#endif
#include "tests/testing/test_models.h"

namespace splitmoe::decode {
namespace {

constexpr int64_t kBlockTokens = 4;

struct Decoded {
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
};

class DeviceArenaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto e = engine::Engine::Load(testing::TinyModel("device_arena"));
    ASSERT_TRUE(e.ok()) << e.status();
    engine_ = std::move(*e);
  }

  PagedLatentCache NewCache(LatentDType dtype) {
    const auto& c = engine_->config();
    PagedLatentCacheOptions options;
    options.layout = {c.num_hidden_layers, c.latent_dim(), kBlockTokens, dtype};
    options.num_blocks = 48;
    auto cache = PagedLatentCache::Create(options);
    EXPECT_TRUE(cache.ok()) << cache.status();
    return std::move(*cache);
  }

  // What a prefill worker does: the prompt's rows past `stored` (those shared, read from the
  // host arena) written into the host arena, and the first token.
  engine::DecodedToken WritePrompt(PagedLatentCache& cache, SequenceId id,
                                   const std::vector<int32_t>& prompt, int64_t stored = 0) {
    // The CPU engine writes, as a prefill worker on the CPU does.
    PagedSequenceCache writer(&cache, id, stored);
    auto first = engine::PrefillFirstToken(
        engine_->transformer(), absl::MakeConstSpan(prompt).subspan(static_cast<size_t>(stored)),
        &writer, {}, 2, engine::AttentionForm::kAbsorbed);
    EXPECT_TRUE(first.ok()) << first.status();
    return *first;
  }

  // Decodes `max_tokens` after each prompt (already written) with continuous batching, through
  // the device copy's views when `arena` is given (`upload`: the prompt's rows go to the device
  // first), else the host arena's. The sequences stay in the cache.
  std::vector<Decoded> Decode(PagedLatentCache& cache, DeviceArena* arena,
                              const std::vector<SequenceId>& ids,
                              const std::vector<std::vector<int32_t>>& prompts,
                              const std::vector<engine::DecodedToken>& firsts,
                              const std::vector<int64_t>& cached, int64_t max_tokens,
                              bool upload = true) {
    engine::BatchDecoder decoder(decoder_ != nullptr ? decoder_ : &engine_->transformer(),
                                 engine_->config().eos_token_id);
    std::vector<Decoded> out(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      const int64_t n = static_cast<int64_t>(prompts[i].size());
      engine::DecodeSequence s;
      s.id = std::to_string(i);
      if (arena != nullptr) {
        s.cache = arena->View(&cache, ids[i], n, 0,
                              upload ? DeviceArena::UploadFrom(cached[i], n) : nullptr);
      } else {
        s.cache = std::make_unique<PagedSequenceCache>(&cache, ids[i], n);
      }
      s.prompt_tokens = n;
      s.next_token = firsts[i].token;
      s.max_tokens = max_tokens;
      s.ignore_eos = true;
      s.logprobs = 2;
      out[i].tokens.push_back(firsts[i].token);
      out[i].logprobs.push_back(firsts[i].logprob->logprob);
      EXPECT_TRUE(decoder.Add(std::move(s)).ok());
    }
    while (decoder.running() > 0) {
      auto step = decoder.Step();
      EXPECT_TRUE(step.ok()) << step.status();
      if (!step.ok()) break;
      for (const engine::DecodedToken& t : *step) {
        Decoded& d = out[std::stoul(t.id)];
        d.tokens.push_back(t.token);
        d.logprobs.push_back(t.logprob->logprob);
      }
    }
    decoder.TakeFinished();
    return out;
  }

  void DecodeBothWays(const kernels::Device& device, double tolerance);
  void ShareDecodedRows(const kernels::Device& device, double tolerance);

  std::unique_ptr<engine::Engine> engine_;
  engine::Transformer* decoder_ = nullptr;  // decodes with the arena's views (null: engine_'s)
};

const std::vector<std::vector<int32_t>> kPrompts = {
    {0, 9, 27, 81, 243, 218, 142, 426, 254, 250, 238}, {0, 3}, {0, 5, 7}};

// Decodes kPrompts over a host arena and over `device`'s copy of another (decoding with
// decoder_, when set), prompts written by the CPU: the tokens must be equal and the logprobs
// within `tolerance` (0: equal); every row both copies hold must be equal bytes.
void DeviceArenaTest::DecodeBothWays(const kernels::Device& device, double tolerance) {
  for (LatentDType dtype : {LatentDType::kFloat32, LatentDType::kBFloat16}) {
    SCOPED_TRACE(dtype == LatentDType::kFloat32 ? "fp32" : "bf16");
    PagedLatentCache host = NewCache(dtype), mirrored = NewCache(dtype);
    auto arena = DeviceArena::Create(device, mirrored.layout(), mirrored.arena_base(),
                                     mirrored.num_blocks());
    ASSERT_TRUE(arena.ok()) << arena.status();
    EXPECT_EQ((*arena)->bytes(), static_cast<uint64_t>(mirrored.arena_bytes()));
    EXPECT_EQ((*arena)->Describe(), absl::StrCat("staged through pinned host memory into ",
                                                 kernels::DeviceName(device)));
    std::vector<SequenceId> host_ids, mirrored_ids;
    std::vector<engine::DecodedToken> firsts;
    for (const auto& prompt : kPrompts) {
      const int64_t n = static_cast<int64_t>(prompt.size());
      auto a = host.Reserve(n), b = mirrored.Reserve(n);
      ASSERT_TRUE(a.ok() && b.ok());
      host_ids.push_back(a->id);
      mirrored_ids.push_back(b->id);
      firsts.push_back(WritePrompt(host, a->id, prompt));
      WritePrompt(mirrored, b->id, prompt);
    }
    const std::vector<int64_t> none(kPrompts.size(), 0);
    engine::Transformer* on_device = decoder_;
    decoder_ = nullptr;  // the reference decodes on the CPU
    std::vector<Decoded> want = Decode(host, nullptr, host_ids, kPrompts, firsts, none, 9);
    decoder_ = on_device;
    std::vector<Decoded> got =
        Decode(mirrored, arena->get(), mirrored_ids, kPrompts, firsts, none, 9);
    for (size_t i = 0; i < kPrompts.size(); ++i) {
      EXPECT_EQ(got[i].tokens, want[i].tokens) << "prompt " << i;
      ASSERT_EQ(got[i].logprobs.size(), want[i].logprobs.size());
      for (size_t j = 0; j < want[i].logprobs.size(); ++j) {
        if (tolerance == 0) {
          EXPECT_EQ(got[i].logprobs[j], want[i].logprobs[j]) << i << "/" << j;  // same bytes read
        } else {
          EXPECT_NEAR(got[i].logprobs[j], want[i].logprobs[j], tolerance) << i << "/" << j;
        }
      }
      // Every row the sequence holds (the prompt's and those decoded: every token's but the
      // last), every layer: the device copy equals the host arena. (Slots past them hold
      // whatever the memory held.)
      const BlockTable* table = mirrored.Find(mirrored_ids[i]);
      ASSERT_NE(table, nullptr);
      const int64_t rows = static_cast<int64_t>(kPrompts[i].size() + got[i].tokens.size()) - 1;
      const PagedLatentLayout& layout = mirrored.layout();
      std::vector<uint8_t> on(static_cast<size_t>(layout.row_bytes()));
      for (int64_t layer = 0; layer < layout.num_layers; ++layer) {
        for (int64_t p = 0; p < rows; ++p) {
          const int64_t at = layout.RowOffset(table->blocks[static_cast<size_t>(p / kBlockTokens)],
                                              layer, p % kBlockTokens);
          ASSERT_TRUE(kernels::CopyToHost(device, on.data(), (*arena)->device_base() + at,
                                          on.size())
                          .ok());
          ASSERT_EQ(std::memcmp(mirrored.arena_base() + at, on.data(), on.size()), 0)
              << "layer " << layer << " row " << p;
        }
      }
      ASSERT_TRUE(host.Release(host_ids[i]).ok());
      ASSERT_TRUE(mirrored.Release(mirrored_ids[i]).ok());
    }
    EXPECT_EQ(mirrored.blocks_used(), 0);
  }
}

TEST_F(DeviceArenaTest, DecodesAsTheHostArenaAndKeepsBothCopiesEqual) {
  DecodeBothWays(kernels::Device{}, /*tolerance=*/0);
}

TEST_F(DeviceArenaTest, TheAttentionReadsTheDeviceCopy) {
  PagedLatentCache host = NewCache(LatentDType::kFloat32), mirrored = NewCache(LatentDType::kFloat32);
  auto arena = DeviceArena::Create(kernels::Device{}, mirrored.layout(), mirrored.arena_base(),
                                   mirrored.num_blocks());
  ASSERT_TRUE(arena.ok()) << arena.status();
  const std::vector<std::vector<int32_t>> prompt = {kPrompts[0]};
  auto a = host.Reserve(11), b = mirrored.Reserve(11);
  ASSERT_TRUE(a.ok() && b.ok());
  const std::vector<engine::DecodedToken> firsts = {WritePrompt(host, a->id, prompt[0])};
  WritePrompt(mirrored, b->id, prompt[0]);
  std::vector<Decoded> want = Decode(host, nullptr, {a->id}, prompt, firsts, {0}, 3);
  // The prompt's rows never reach the copy: its attention sees zeros there.
  std::vector<Decoded> got =
      Decode(mirrored, arena->get(), {b->id}, prompt, firsts, {0}, 3, /*upload=*/false);
  EXPECT_NE(got[0].logprobs, want[0].logprobs);
}

// a decodes over `device`'s copy and publishes its blocks; b shares them (decoded rows
// included) and must decode as the engine does, logprobs within `tolerance`.
void DeviceArenaTest::ShareDecodedRows(const kernels::Device& device, double tolerance) {
  PagedLatentCache cache = NewCache(LatentDType::kFloat32);
  auto arena = DeviceArena::Create(device, cache.layout(), cache.arena_base(),
                                   cache.num_blocks());
  ASSERT_TRUE(arena.ok()) << arena.status();
  // a: a 5-token prompt and 8 decoded tokens; rows 0..11 are final (the last token has none).
  const std::vector<int32_t> a_prompt = {0, 17, 33, 65, 129};
  auto a = cache.ReserveWithPrefix(a_prompt, 5);
  ASSERT_TRUE(a.ok()) << a.status();
  const engine::DecodedToken a_first = WritePrompt(cache, a->id, a_prompt);
  std::vector<Decoded> a_out = Decode(cache, arena->get(), {a->id}, {a_prompt}, {a_first}, {0}, 8);
  std::vector<int32_t> rows_of = a_prompt;  // the tokens whose rows a's cache holds
  rows_of.insert(rows_of.end(), a_out[0].tokens.begin(), a_out[0].tokens.end() - 1);
  ASSERT_EQ(rows_of.size(), 12u);
  ASSERT_TRUE(cache.Publish(a->id, rows_of).ok());
  ASSERT_TRUE(cache.Release(a->id).ok());
  EXPECT_EQ(cache.blocks_cached(), 3);

  // b starts with those 12 tokens: its three blocks, two of them holding decoded rows, are
  // shared; its writer reads them from the host arena, its decoding from the device copy.
  std::vector<int32_t> b_prompt = rows_of;
  b_prompt.push_back(301);
  b_prompt.push_back(302);
  auto b = cache.ReserveWithPrefix(b_prompt, static_cast<int64_t>(b_prompt.size()));
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_EQ(b->cached_tokens, 12);
  const engine::DecodedToken b_first = WritePrompt(cache, b->id, b_prompt, b->cached_tokens);
  std::vector<Decoded> b_out =
      Decode(cache, arena->get(), {b->id}, {b_prompt}, {b_first}, {b->cached_tokens}, 6);

  engine::GenerateRequest r;
  r.prompt = b_prompt;
  r.max_tokens = 6;
  r.ignore_eos = true;
  r.logprobs = 2;
  auto want = engine_->Generate(r, nullptr);
  ASSERT_TRUE(want.ok()) << want.status();
  EXPECT_EQ(b_out[0].tokens, want->tokens);
  ASSERT_EQ(b_out[0].logprobs.size(), want->logprobs.size());
  for (size_t j = 0; j < want->logprobs.size(); ++j) {
    EXPECT_NEAR(b_out[0].logprobs[j], want->logprobs[j].logprob, tolerance) << "token " << j;
  }
  ASSERT_TRUE(cache.Release(b->id).ok());
}

TEST_F(DeviceArenaTest, PublishedDecodedRowsServeTheNextPromptFromBothCopies) {
  ShareDecodedRows(kernels::Device{}, 1e-4);
}

// Speculative decoding (MTP module 0's latents are the arena's last layer, read through a view
// with a layer offset): over the device copy the same tokens, drafts and logprobs as over the
// host arena, and every row of every layer, the module's included, equal in both copies.
TEST_F(DeviceArenaTest, SpeculativeDecodingReadsTheMtpLayerOfTheDeviceCopy) {
  engine::EngineOptions with_mtp;
  with_mtp.draft_tokens = 3;
  auto e = engine::Engine::Load(testing::TinyModel("device_arena_mtp", [](model::TinyModelOptions& o) {
                                  o.mtp_draft = "agree";
                                }),
                                with_mtp);
  ASSERT_TRUE(e.ok()) << e.status();
  engine::Transformer& t = (*e)->transformer();
  const model::ModelConfig& c = (*e)->config();
  ASSERT_GT(t.mtp_modules(), 0);
  const int64_t layers = c.num_hidden_layers;
  auto run = [&](bool on_device, std::vector<uint8_t>* host_bytes,
                 std::vector<uint8_t>* device_bytes) {
    PagedLatentCacheOptions options;
    options.layout = {layers + 1, c.latent_dim(), kBlockTokens, LatentDType::kFloat32};
    options.num_blocks = 64;
    auto cache = PagedLatentCache::Create(options);
    EXPECT_TRUE(cache.ok()) << cache.status();
    std::unique_ptr<DeviceArena> arena;
    if (on_device) {
      auto created = DeviceArena::Create(kernels::Device{}, cache->layout(), cache->arena_base(),
                                         cache->num_blocks());
      EXPECT_TRUE(created.ok()) << created.status();
      arena = std::move(*created);
    }
    engine::BatchDecoder decoder(&t, c.eos_token_id, nullptr, /*draft_tokens=*/3);
    std::map<std::string, std::vector<std::pair<int32_t, float>>> out;
    std::vector<SequenceId> ids;
    for (size_t i = 0; i < kPrompts.size(); ++i) {
      const std::vector<int32_t>& prompt = kPrompts[i];
      const int64_t n = static_cast<int64_t>(prompt.size());
      auto r = cache->Reserve(n);
      EXPECT_TRUE(r.ok()) << r.status();
      ids.push_back(r->id);
      // The writer: the main layers' rows and the module's (every prompt row but the last).
      PagedSequenceCache main(&*cache, r->id, 0), module(&*cache, r->id, 0, layers);
      std::vector<engine::PrefillItem> items(1);
      items[0].prompt = prompt;
      items[0].cache = &main;
      items[0].mtp_cache = &module;
      items[0].logprobs = 2;
      EXPECT_TRUE(engine::PrefillBatch(t, items, engine::AttentionForm::kAbsorbed).ok());
      EXPECT_TRUE(items[0].status.ok()) << items[0].status;
      engine::DecodeSequence s;
      s.id = std::to_string(i);
      if (on_device) {
        auto upload = DeviceArena::UploadFrom(0, n);
        s.cache = arena->View(&*cache, r->id, n, 0, upload);
        s.mtp_cache = arena->View(&*cache, r->id, n - 1, layers, upload);
      } else {
        s.cache = std::make_unique<PagedSequenceCache>(&*cache, r->id, n);
        s.mtp_cache = std::make_unique<PagedSequenceCache>(&*cache, r->id, n - 1, layers);
      }
      s.prompt_tokens = n;
      s.next_token = items[0].first.token;
      s.mtp_tokens = {s.next_token};
      s.mtp_hidden = items[0].last_hidden;
      s.max_tokens = 12;
      s.ignore_eos = true;
      s.logprobs = 2;
      out[s.id].push_back({items[0].first.token, items[0].first.logprob->logprob});
      EXPECT_TRUE(decoder.Add(std::move(s)).ok());
    }
    while (decoder.running() > 0) {
      auto step = decoder.Step();
      EXPECT_TRUE(step.ok()) << step.status();
      if (!step.ok()) break;
      for (const engine::DecodedToken& tok : *step) {
        out[tok.id].push_back({tok.token, tok.logprob->logprob});
      }
    }
    EXPECT_GT(decoder.speculative_stats().accepted, 0);
    for (engine::DecodeSequence& done : decoder.TakeFinished()) {
      // Every row the caches hold in every layer (the module's trail the main layers').
      const int64_t rows = std::min(done.cache->length(), done.mtp_cache->length());
      const BlockTable* table = cache->Find(ids[std::stoul(done.id)]);
      const PagedLatentLayout& layout = cache->layout();
      for (int64_t layer = 0; layer <= layers; ++layer) {
        for (int64_t p = 0; p < rows; ++p) {
          const int64_t at = layout.RowOffset(
              table->blocks[static_cast<size_t>(p / kBlockTokens)], layer, p % kBlockTokens);
          host_bytes->insert(host_bytes->end(), cache->arena_base() + at,
                             cache->arena_base() + at + layout.row_bytes());
          if (arena != nullptr) {
            device_bytes->insert(device_bytes->end(), arena->device_base() + at,
                                 arena->device_base() + at + layout.row_bytes());
          }
        }
      }
    }
    return out;
  };
  std::vector<uint8_t> host_rows, unused, mirrored_rows, device_rows;
  const auto want = run(false, &host_rows, &unused);
  const auto got = run(true, &mirrored_rows, &device_rows);
  EXPECT_EQ(got, want);
  EXPECT_EQ(mirrored_rows, host_rows);  // the host arena holds what it would without a device
  EXPECT_EQ(device_rows, mirrored_rows);
}

TEST_F(DeviceArenaTest, RefusesRowsFromAnotherDeviceAndBadArenas) {
  PagedLatentCache cache = NewCache(LatentDType::kFloat32);
  EXPECT_EQ(DeviceArena::Create(kernels::Device{}, cache.layout(), nullptr, 4).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DeviceArena::Create(kernels::Device{}, cache.layout(), cache.arena_base(), 0)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  auto arena = DeviceArena::Create(kernels::Device{}, cache.layout(), cache.arena_base(),
                                   cache.num_blocks());
  ASSERT_TRUE(arena.ok()) << arena.status();
  auto r = cache.Reserve(3);
  ASSERT_TRUE(r.ok());
  auto view = (*arena)->View(&cache, r->id, 0, 0, nullptr);
  ASSERT_TRUE(view->Reserve(3).ok());
  std::vector<float> rows(3 * static_cast<size_t>(cache.layout().latent_dim), 1.0f);
  kernels::Device gpu;
  gpu.backend = kernels::Backend::kCuda;
  EXPECT_EQ(view->Store(gpu, 0, 0, rows.data(), 3).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(view->Store(kernels::Device{}, cache.layout().num_layers, 0, rows.data(), 3).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(view->Store(kernels::Device{}, 0, 2, rows.data(), 3).ok());  // past the table
  EXPECT_EQ(view->Row(0, 0), nullptr);
  // Written rows read back from the host arena, and the same bytes are on the device.
  ASSERT_TRUE(view->WriteRows(1, 0, rows.data(), 3).ok());
  std::vector<float> back(rows.size(), 0.0f);
  ASSERT_TRUE(view->ReadRows(1, 0, 3, back.data()).ok());
  EXPECT_EQ(back, rows);
  const BlockTable* table = cache.Find(r->id);
  const int64_t offset = cache.layout().RowOffset(table->blocks[0], 1, 0);
  EXPECT_EQ(std::memcmp(cache.arena_base() + offset, (*arena)->device_base() + offset,
                        static_cast<size_t>(3 * cache.layout().row_bytes())),
            0);
  ASSERT_TRUE(cache.Release(r->id).ok());
}


#ifdef SPLITMOE_OPS_CUDA
// The decode worker's path on a GPU: the forward pass on cuda:0 (fp32 mode, experts staged
// through the host as the worker's remote ones are), over the arena's device copy.
class DeviceArenaGpuTest : public DeviceArenaTest {
 protected:
  void SetUp() override {
    absl::StatusOr<int> n = kernels::cuda::DeviceCount();
    if (!n.ok() || *n == 0) {
      GTEST_SKIP() << "no CUDA device on this machine: GPU check owed, run scripts/gpu-check.sh";
    }
    kernels::EnableCudaOps();
    DeviceArenaTest::SetUp();
    const model::ModelConfig& c = engine_->config();
    engine::EngineOptions unpacked;
    unpacked.pack_weights = false;  // the host executor reads the experts as loaded
    auto host = engine::Engine::Load(testing::TinyModel("device_arena"), unpacked);
    ASSERT_TRUE(host.ok()) << host.status();
    host_ = std::move(*host);
    kernels::Device cuda;
    cuda.backend = kernels::Backend::kCuda;
    auto gpu = engine::OnDevice::Open(cuda, c, host_->weights(), {.cache_tokens = 0});
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    gpu_ = std::move(*gpu);
    experts_ = std::make_unique<engine::LocalMoeExecutor>(c, host_->weights());
    staged_ = std::make_unique<engine::StagedMoeExecutor>(experts_.get(), gpu_->device(), c);
    on_gpu_ = std::make_unique<engine::Transformer>(c, host_->weights(), staged_.get(),
                                                    gpu_->weights());
    decoder_ = on_gpu_.get();
  }

  std::unique_ptr<engine::Engine> host_;
  std::unique_ptr<engine::OnDevice> gpu_;
  std::unique_ptr<engine::LocalMoeExecutor> experts_;
  std::unique_ptr<engine::StagedMoeExecutor> staged_;
  std::unique_ptr<engine::Transformer> on_gpu_;
};

TEST_F(DeviceArenaGpuTest, Fp32DecodeOverTheDeviceCopyGivesTheCpusTokens) {
  DecodeBothWays(gpu_->device(), 1e-3);
}

TEST_F(DeviceArenaGpuTest, Fp32SharedDecodedRowsServeTheNextPrompt) {
  ShareDecodedRows(gpu_->device(), 1e-3);
}
#endif  // SPLITMOE_OPS_CUDA

}  // namespace
}  // namespace splitmoe::decode
