// Loader tests: good checkpoints (BF16, FP8, sharded, subsets) load; corrupted ones give an
// error that names the file and the tensor, and never crash.
#include "common/model/checkpoint.h"

#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "common/model/numeric.h"
#include "common/model/safetensors.h"
#include "common/model/weights.h"
#include "gtest/gtest.h"
#include "tests/testing/special_files.h"
#include "tests/testing/test_models.h"

namespace splitmoe::model {
namespace {

namespace fs = std::filesystem;

std::vector<TensorToWrite> ReadAll(const std::string& path) {
  auto file = SafetensorsFile::Open(path);
  EXPECT_TRUE(file.ok()) << file.status();
  std::vector<TensorToWrite> out;
  for (const auto& [name, info] : (*file)->tensors()) {
    auto bytes = (*file)->Data(info);
    out.push_back({name, info.dtype, info.shape, std::vector<uint8_t>(bytes.begin(), bytes.end())});
  }
  return out;
}

// A copy of a fresh tiny model whose single safetensors file is rewritten by `edit`.
std::string CorruptedCopy(const std::string& name,
                          const std::function<void(std::vector<TensorToWrite>&)>& edit,
                          bool fp8 = false) {
  std::string src = testing::TinyModel(fp8 ? "ckpt_src_fp8" : "ckpt_src", [&](TinyModelOptions& o) {
    o.fp8 = fp8;
    o.mtp_layers = 0;
  });
  std::string dst = testing::TempDir(name);
  fs::copy(src, dst, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
  std::vector<TensorToWrite> tensors = ReadAll(src + "/model.safetensors");
  edit(tensors);
  EXPECT_TRUE(WriteSafetensors(dst + "/model.safetensors", tensors).ok());
  return dst;
}

absl::Status LoadAll(const std::string& dir) {
  auto ckpt = Checkpoint::Open(dir);
  if (!ckpt.ok()) return ckpt.status();
  return LoadWeights(**ckpt, LoadOptions{}).status();
}

void ExpectErrorMentions(const absl::Status& s, std::initializer_list<std::string> needles) {
  ASSERT_FALSE(s.ok());
  for (const std::string& n : needles) {
    EXPECT_NE(s.message().find(n), std::string::npos) << "'" << n << "' not in: " << s;
  }
}

TEST(CheckpointTest, LoadsBf16AndFp8) {
  SPLITMOE_ASSERT_OK(LoadAll(testing::TinyModel("bf16")));
  SPLITMOE_ASSERT_OK(LoadAll(testing::TinyModel("fp8", [](TinyModelOptions& o) { o.fp8 = true; })));
}

TEST(CheckpointTest, Fp8DequantisesWithBlockScales) {
  // hidden 160 and q_lora 96 make 128x128 blocks ragged at the edges.
  std::string dir = testing::TinyModel("fp8_ragged", [](TinyModelOptions& o) {
    o.fp8 = true;
    o.hidden_size = 160;
  });
  auto ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok());
  const std::string name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight";
  auto file = SafetensorsFile::Open(dir + "/model.safetensors");
  ASSERT_TRUE(file.ok());
  const TensorInfo* q = (*file)->Find(name);
  const TensorInfo* s = (*file)->Find(name + "_scale_inv");
  ASSERT_NE(q, nullptr);
  ASSERT_NE(s, nullptr);
  ASSERT_EQ(q->dtype, DType::kF8E4M3);
  EXPECT_EQ(s->shape, (std::vector<int64_t>{1, 2}));
  auto m = (*ckpt)->LoadMatrix(name, q->shape[0], q->shape[1]);
  ASSERT_TRUE(m.ok()) << m.status();
  const float* scales = reinterpret_cast<const float*>((*file)->Data(*s).data());
  auto raw = (*file)->Data(*q);
  for (int64_t r = 0; r < q->shape[0]; r += 7) {
    for (int64_t c = 0; c < q->shape[1]; c += 5) {
      float expect = Fp8E4M3ToFloat(raw[r * q->shape[1] + c]) * scales[c / 128];
      EXPECT_EQ(m->data[r * q->shape[1] + c], expect);
    }
  }
}

TEST(CheckpointTest, ShardedLoadsAndSubsetReadsOnlyItsShards) {
  std::string dir = testing::TinyModel("sharded", [](TinyModelOptions& o) {
    o.shards = 4;
    o.mtp_layers = 0;
  });
  ASSERT_TRUE(fs::exists(dir + "/model.safetensors.index.json"));
  SPLITMOE_ASSERT_OK(LoadAll(dir));

  auto full = Checkpoint::Open(dir);
  ASSERT_TRUE(full.ok());
  ASSERT_TRUE(LoadWeights(**full, LoadOptions{}).ok());
  auto ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok());
  LoadOptions experts_only;
  experts_only.attention_side = false;
  experts_only.expert_filter = [](int64_t layer, int64_t expert) {
    return layer == 2 && expert < 2;
  };
  auto w = LoadWeights(**ckpt, experts_only);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_TRUE(w->embed.empty());
  EXPECT_NE(w->layers[2].experts[0], nullptr);
  EXPECT_EQ(w->layers[2].experts[2], nullptr);
  EXPECT_EQ(w->layers[1].experts[0], nullptr);
  // Two experts of one layer: a tiny fraction of the bytes, from one shard.
  EXPECT_LT((*ckpt)->bytes_read() * 20, (*full)->bytes_read());
  EXPECT_EQ((*ckpt)->files_opened(), 1u);
  EXPECT_EQ((*full)->files_opened(), 4u);
}

TEST(CheckpointTest, MissingTensorIsNamed) {
  const std::string victim = "model.layers.1.mlp.experts.3.up_proj.weight";
  std::string dir = CorruptedCopy("missing", [&](auto& t) {
    std::erase_if(t, [&](const TensorToWrite& x) { return x.name == victim; });
  });
  ExpectErrorMentions(LoadAll(dir), {victim, "missing"});
}

TEST(CheckpointTest, ExtraTensorIsNamed) {
  std::string dir = CorruptedCopy("extra", [](auto& t) {
    t.push_back(
        {"model.layers.7.self_attn.o_proj.weight", DType::kBF16, {2, 2}, std::vector<uint8_t>(8)});
  });
  ExpectErrorMentions(LoadAll(dir), {"model.layers.7.self_attn.o_proj.weight", "unexpected"});
}

TEST(CheckpointTest, WrongShapeNamesFileTensorAndShapes) {
  const std::string victim = "model.layers.0.self_attn.kv_b_proj.weight";
  std::string dir = CorruptedCopy("shape", [&](auto& t) {
    for (auto& x : t) {
      if (x.name == victim) std::swap(x.shape[0], x.shape[1]);
    }
  });
  ExpectErrorMentions(LoadAll(dir),
                      {victim, "model.safetensors", "expected shape [256, 64]", "found [64, 256]"});
}

TEST(CheckpointTest, WrongDtypeIsNamed) {
  const std::string victim = "model.norm.weight";
  std::string dir = CorruptedCopy("dtype", [&](auto& t) {
    for (auto& x : t) {
      if (x.name == victim) {
        x.dtype = DType::kI32;
        x.shape = {x.shape[0] / 2};
      }
    }
  });
  // A changed element count is a shape error; the dtype is reported either way.
  ExpectErrorMentions(LoadAll(dir), {victim});
}

TEST(CheckpointTest, IntegerDtypeIsNotAWeight) {
  const std::string victim = "model.norm.weight";
  std::string dir = CorruptedCopy("int_dtype", [&](auto& t) {
    for (auto& x : t) {
      if (x.name == victim) {
        x.dtype = DType::kU8;
        x.data.resize(x.data.size() / 2);
      }
    }
  });
  ExpectErrorMentions(LoadAll(dir), {victim, "U8"});
}

TEST(CheckpointTest, Fp8WithoutScaleIsNamed) {
  const std::string victim = "model.layers.0.mlp.down_proj.weight";
  std::string dir = CorruptedCopy(
      "no_scale",
      [&](auto& t) {
        std::erase_if(t, [&](const TensorToWrite& x) { return x.name == victim + "_scale_inv"; });
      },
      /*fp8=*/true);
  ExpectErrorMentions(LoadAll(dir), {victim, "_scale_inv"});
}

TEST(CheckpointTest, Fp8ScaleOfWrongShapeIsNamed) {
  const std::string victim = "model.layers.0.mlp.down_proj.weight_scale_inv";
  std::string dir = CorruptedCopy(
      "bad_scale",
      [&](auto& t) {
        for (auto& x : t) {
          if (x.name == victim) {
            x.shape = {2, 2};
            x.data.resize(16);
          }
        }
      },
      /*fp8=*/true);
  ExpectErrorMentions(LoadAll(dir), {victim, "128x128"});
}

TEST(CheckpointTest, TruncatedFileIsNamed) {
  std::string dir = CorruptedCopy("truncated", [](auto&) {});
  const std::string path = dir + "/model.safetensors";
  fs::resize_file(path, fs::file_size(path) - 1000);
  ExpectErrorMentions(LoadAll(dir), {"model.safetensors", "out of range"});
  fs::resize_file(path, 5);
  ExpectErrorMentions(LoadAll(dir), {"model.safetensors", "truncated"});
}

void WriteRaw(const std::string& path, const std::string& header, size_t data_bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  uint64_t len = header.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((len >> (8 * i)) & 0xff));
  out << header;
  out << std::string(data_bytes, '\0');
}

TEST(SafetensorsTest, RefusesBadHeaders) {
  std::string dir = testing::TempDir("raw");
  const std::string path = dir + "/x.safetensors";
  struct Case {
    std::string header;
    size_t data;
    std::string expect;
  } cases[] = {
      {R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", 8, "out of range"},
      {R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
          "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}})",
       24, "overlaps"},
      {R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}})", 16, "needs 16"},
      {R"({"a": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}})", 16, "unsupported dtype"},
      {R"({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}})", 16, "bad shape"},
      {R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}})", 16, "out of range"},
      {R"({"a": {"dtype": "F32", "shape": [4]}})", 16, "lacks"},
      {R"({"a": )", 16, "not a JSON object"},
      // Each dimension within bounds, their product not (it overflowed int64 and wrapped to 0).
      {R"({"a": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}})", 16,
       "shape too large"},
      // Nested past any stack the error message's text would need (found by safetensors_fuzz).
      {R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": )" + std::string(200000, '[') +
           std::string(200000, ']') + "}}",
       16, "bad data_offsets [[[[...]]]]"},
  };
  for (const Case& c : cases) {
    WriteRaw(path, c.header, c.data);
    auto file = SafetensorsFile::Open(path);
    ASSERT_FALSE(file.ok()) << c.header;
    EXPECT_NE(file.status().message().find(c.expect), std::string::npos) << file.status();
    EXPECT_NE(file.status().message().find(path), std::string::npos) << file.status();
  }
  // A header length pointing past the end of the file.
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    uint64_t len = 1ull << 40;
    for (int i = 0; i < 8; ++i) out.put(static_cast<char>((len >> (8 * i)) & 0xff));
    out << "{}";
  }
  auto file = SafetensorsFile::Open(path);
  ASSERT_FALSE(file.ok());
  EXPECT_NE(file.status().message().find("header length"), std::string::npos) << file.status();
}

TEST(CheckpointTest, ContradictoryConfigIsReported) {
  std::string src = testing::TinyModel("ckpt_src", [](TinyModelOptions& o) { o.mtp_layers = 0; });
  std::string dir = testing::TempDir("contradict");
  fs::copy(src, dir, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
  auto rewrite = [&](const std::string& from, const std::string& to) {
    std::ifstream in(src + "/config.json");
    std::string text((std::istreambuf_iterator<char>(in)), {});
    size_t at = text.find(from);
    ASSERT_NE(at, std::string::npos) << from;
    text.replace(at, from.size(), to);
    std::ofstream(dir + "/config.json", std::ios::trunc) << text;
  };
  rewrite("\"num_hidden_layers\": 3", "\"num_hidden_layers\": 4");
  ExpectErrorMentions(LoadAll(dir), {"model.layers.3.", "missing"});
  rewrite("\"num_hidden_layers\": 3", "\"num_hidden_layers\": 2");
  ExpectErrorMentions(LoadAll(dir), {"model.layers.2.", "unexpected"});
  rewrite("\"kv_lora_rank\": 64", "\"kv_lora_rank\": 32");
  ExpectErrorMentions(LoadAll(dir), {"kv_a_proj_with_mqa", "expected shape"});
}

TEST(CheckpointTest, TiedEmbeddingsIgnoreAStoredLmHead) {
  std::string src = testing::TinyModel("ckpt_src", [](TinyModelOptions& o) { o.mtp_layers = 0; });
  std::string dir = testing::TempDir("tied");
  fs::copy(src, dir, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
  std::ifstream in(src + "/config.json");
  std::string text((std::istreambuf_iterator<char>(in)), {});
  const std::string from = "\"tie_word_embeddings\": false";
  ASSERT_NE(text.find(from), std::string::npos);
  text.replace(text.find(from), from.size(), "\"tie_word_embeddings\": true");
  std::ofstream(dir + "/config.json", std::ios::trunc) << text;
  auto ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok());
  auto w = LoadWeights(**ckpt, LoadOptions{});
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->lm_head.data, w->embed.data);
}

TEST(CheckpointTest, BadIndexIsReported) {
  std::string src = testing::TinyModel("sharded_src", [](TinyModelOptions& o) {
    o.shards = 2;
    o.mtp_layers = 0;
  });
  std::string dir = testing::TempDir("bad_index");
  fs::copy(src, dir, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
  fs::remove(dir + "/model-00002-of-00002.safetensors");
  ExpectErrorMentions(LoadAll(dir), {"model-00002-of-00002.safetensors", "cannot open"});
  std::ofstream(dir + "/model.safetensors.index.json", std::ios::trunc)
      << R"({"weight_map": {"model.norm.weight": "../etc/passwd"}})";
  ExpectErrorMentions(LoadAll(dir), {"model.norm.weight", "invalid file name"});
}

TEST(CheckpointTest, MissingDirectoryIsNotFound) {
  auto ckpt = Checkpoint::Open("/nonexistent/model");
  ASSERT_FALSE(ckpt.ok());
  EXPECT_EQ(ckpt.status().code(), absl::StatusCode::kNotFound);
}

// A FIFO, directory or device where a checkpoint file should be is an error naming the path,
// returned at once: opening a FIFO for reading would otherwise wait for a writer forever.
TEST(CheckpointTest, NonRegularFilesAreRefusedWithoutBlocking) {
  const std::string single =
      testing::TinyModel("special_src", [](TinyModelOptions& o) { o.mtp_layers = 0; });
  const std::string sharded = testing::TinyModel("special_sharded_src", [](TinyModelOptions& o) {
    o.shards = 2;
    o.mtp_layers = 0;
  });
  struct Case {
    std::string src, file;
    bool fifo;
  } cases[] = {
      {single, "config.json", true},
      {single, "config.json", false},
      {single, "model.safetensors", true},
      {single, "model.safetensors", false},
      {sharded, "model.safetensors.index.json", true},
      {sharded, "model.safetensors.index.json", false},
      {sharded, "model-00002-of-00002.safetensors", true},
      {sharded, "model-00001-of-00002.safetensors", false},
  };
  int n = 0;
  for (const Case& c : cases) {
    const std::string dir = testing::TempDir(absl::StrCat("special_", n++));
    fs::copy(c.src, dir, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
    const std::string path = dir + "/" + c.file;
    if (c.fifo) {
      testing::MakeFifo(path);
    } else {
      testing::MakeDirectory(path);
    }
    absl::Status s = testing::RunWithDeadline([&] { return LoadAll(dir); }, {path});
    ExpectErrorMentions(
        s, {path, c.fifo ? "not a regular file (a FIFO)" : "not a regular file (a directory)"});
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  }
  // The device case, on the file the loader maps.
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> dev = SafetensorsFile::Open("/dev/zero");
  ASSERT_FALSE(dev.ok());
  EXPECT_NE(dev.status().message().find("a character device"), std::string::npos) << dev.status();
}

// A config.json whose sizes are absurd is refused by Checkpoint::Open with the field named,
// before anything is allocated for it.
TEST(CheckpointTest, AbsurdConfigIsRefusedBeforeAllocating) {
  const std::string src =
      testing::TinyModel("absurd_src", [](TinyModelOptions& o) { o.mtp_layers = 0; });
  const std::string dir = testing::TempDir("absurd");
  fs::copy(src, dir, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
  std::ifstream in(dir + "/config.json");
  std::string text((std::istreambuf_iterator<char>(in)), {});
  const std::string from = "\"n_routed_experts\": 16";
  ASSERT_NE(text.find(from), std::string::npos) << text;
  text.replace(text.find(from), from.size(), "\"n_routed_experts\": 4194304");
  std::ofstream(dir + "/config.json", std::ios::trunc) << text;
  auto ckpt = Checkpoint::Open(dir);
  ASSERT_FALSE(ckpt.ok());
  EXPECT_EQ(ckpt.status().code(), absl::StatusCode::kInvalidArgument);
  ExpectErrorMentions(ckpt.status(),
                      {dir + "/config.json", "n_routed_experts = 4194304 exceeds the limit 65536"});
}

// The tiny-model writer holds the whole checkpoint in memory: a model over its limit is refused
// before anything is generated or written.
TEST(CheckpointTest, TinyWriterRefusesAModelOverItsLimit) {
  TinyModelOptions o;
  o.hidden_size = 4096;  // 2 x 129280 x 4096 BF16 embeddings and heads alone: 2 GiB, x2 with MTP
  const std::string dir = testing::TempDir("tiny_too_big") + "/out";
  absl::Status s = WriteTinyModel(o, dir, "");
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  ExpectErrorMentions(s, {"make-tiny", "over the limit of 4294967296"});
  EXPECT_FALSE(fs::exists(dir));
}

TEST(CheckpointTest, WeightFileNamesComeFromTheIndexElseTheDirectory) {
  const std::string sharded = testing::TinyModel("names_sharded", [](TinyModelOptions& o) {
    o.shards = 3;
    o.mtp_layers = 0;
  });
  auto names = WeightFileNames(sharded);
  ASSERT_TRUE(names.ok()) << names.status();
  EXPECT_EQ(*names, (std::vector<std::string>{"model-00001-of-00003.safetensors",
                                              "model-00002-of-00003.safetensors",
                                              "model-00003-of-00003.safetensors"}));
  const std::string dir = testing::TempDir("names_dir");
  std::ofstream(dir + "/b.safetensors") << "x";
  std::ofstream(dir + "/a.safetensors") << "x";
  std::ofstream(dir + "/config.json") << "{}";
  names = WeightFileNames(dir);
  ASSERT_TRUE(names.ok()) << names.status();
  EXPECT_EQ(*names, (std::vector<std::string>{"a.safetensors", "b.safetensors"}));
}

TEST(CheckpointTest, TinyModelIsDeterministic) {
  std::string a = testing::TempDir("det_a"), b = testing::TempDir("det_b");
  TinyModelOptions o;
  o.vocab_size = 512;
  ASSERT_TRUE(WriteTinyModel(o, a, "").ok());
  ASSERT_TRUE(WriteTinyModel(o, b, "").ok());
  auto read = [](const std::string& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(in)), {});
  };
  EXPECT_EQ(read(a + "/model.safetensors"), read(b + "/model.safetensors"));
  o.seed = 2;
  ASSERT_TRUE(WriteTinyModel(o, b, "").ok());
  EXPECT_NE(read(a + "/model.safetensors"), read(b + "/model.safetensors"));
}

}  // namespace
}  // namespace splitmoe::model
