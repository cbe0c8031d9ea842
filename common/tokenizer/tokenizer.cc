#include "common/tokenizer/tokenizer.h"

#include <algorithm>
#include <array>
#include <deque>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/hash/hash.h"
#include "absl/strings/str_cat.h"
#include "common/base/file.h"
#include "common/base/json_text.h"
#include "common/base/status_macros.h"
#include "common/tokenizer/internal/regex.h"
#include "common/tokenizer/internal/utf8.h"
#include "nlohmann/json.hpp"

namespace splitmoe::tokenizer {
namespace internal {
namespace {

using Json = nlohmann::json;

// HF ByteLevel's own split regex (hard-coded in `tokenizers`), used when use_regex is true.
constexpr char kByteLevelRegex[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// Words longer than this are not cached (they rarely repeat).
constexpr size_t kMaxCachedWordBytes = 256;
constexpr size_t kCacheShards = 16;
constexpr size_t kMaxEntriesPerShard = 1 << 14;

// GPT-2's bytes_to_unicode(): printable bytes map to themselves, the others to U+0100 onwards.
std::array<char32_t, 256> BytesToUnicode() {
  std::array<char32_t, 256> table{};
  std::array<bool, 256> direct{};
  for (int b = '!'; b <= '~'; ++b) direct[b] = true;
  for (int b = 0xA1; b <= 0xAC; ++b) direct[b] = true;
  for (int b = 0xAE; b <= 0xFF; ++b) direct[b] = true;
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) table[b] = direct[b] ? static_cast<char32_t>(b) : next++;
  return table;
}

// A regular file of at most max_bytes (a FIFO or directory is refused, never waited on);
// NotFound when it does not exist.
absl::StatusOr<Json> ReadJsonFile(const std::string& path, uint64_t max_bytes) {
  SPLITMOE_ASSIGN_OR_RETURN(std::string text, ReadRegularFile(path, max_bytes));
  try {
    return Json::parse(text);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": invalid JSON: ", e.what()));
  }
}

bool GetBool(const Json& obj, const char* key, bool fallback) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return fallback;
  return it->get<bool>();
}

// A token id: an integer in [0, 2^31), or an error naming `what` (nlohmann's get<int32_t>()
// would convert a float or a larger integer, 2.5e48 included, without a word).
absl::StatusOr<int32_t> TokenId(const Json& id, const std::string& what) {
  if (!id.is_number_integer()) {
    return absl::InvalidArgumentError(absl::StrCat(what, " has id ", JsonForError(id), ": not an integer"));
  }
  if (id.is_number_unsigned() ? id.get<uint64_t>() > INT32_MAX
                              : (id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX)) {
    return absl::InvalidArgumentError(absl::StrCat(what, " has id ", JsonForError(id),
                                                   ": outside [0, 2147483647]"));
  }
  return static_cast<int32_t>(id.get<int64_t>());
}

// "type" of a component object, "" for null.
std::string TypeOf(const Json& component) {
  if (component.is_null()) return "";
  return component.at("type").get<std::string>();
}

uint64_t PairKey(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

}  // namespace

struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool special = false;
  bool lstrip = false;
  bool rstrip = false;
  bool single_word = false;
  bool normalized = false;
};

// Byte trie over added-token contents, for leftmost-longest matching.
class TokenTrie {
 public:
  TokenTrie() : nodes_(1) {}

  void Insert(absl::string_view s, int32_t value) {
    if (s.empty()) return;
    first_byte_[static_cast<unsigned char>(s[0])] = true;
    int32_t node = 0;
    for (char c : s) {
      const auto b = static_cast<unsigned char>(c);
      int32_t child = Child(node, b);
      if (child < 0) {
        child = static_cast<int32_t>(nodes_.size());
        nodes_[node].children.emplace_back(b, child);
        nodes_.emplace_back();
      }
      node = child;
    }
    nodes_[node].value = value;
  }

  bool empty() const { return nodes_.size() == 1; }
  bool MayStartAt(unsigned char b) const { return first_byte_[b]; }

  // The value of the longest key that starts at text[pos], or -1; its length goes to *len.
  int32_t LongestAt(absl::string_view text, size_t pos, size_t* len) const {
    int32_t node = 0;
    int32_t best = -1;
    for (size_t i = pos; i < text.size(); ++i) {
      node = Child(node, static_cast<unsigned char>(text[i]));
      if (node < 0) break;
      if (nodes_[node].value >= 0) {
        best = nodes_[node].value;
        *len = i + 1 - pos;
      }
    }
    return best;
  }

 private:
  struct Node {
    std::vector<std::pair<unsigned char, int32_t>> children;
    int32_t value = -1;
  };

  int32_t Child(int32_t node, unsigned char b) const {
    for (const auto& [byte, child] : nodes_[node].children) {
      if (byte == b) return child;
    }
    return -1;
  }

  std::vector<Node> nodes_;
  std::array<bool, 256> first_byte_{};
};

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct PreTokenizerStep {
  enum class Kind { kSplit, kByteLevel };
  Kind kind = Kind::kSplit;
  std::unique_ptr<Regex> regex;  // Split's pattern; ByteLevel's regex when use_regex; or null.
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
  bool add_prefix_space = false;  // ByteLevel only.
};

struct Segment {
  absl::string_view text;
  int32_t id;  // Added token id, or -1 for ordinary text.
};

class TokenizerImpl {
 public:
  absl::Status Parse(const Json& j);

  absl::Status EncodeInto(absl::string_view text, std::vector<int32_t>* ids) const;

  int32_t vocab_size() const { return static_cast<int32_t>(assigned_.size()); }
  bool IsAssigned(int32_t id) const { return id >= 0 && id < vocab_size() && assigned_[id]; }
  bool IsSpecial(int32_t id) const { return IsAssigned(id) && special_[id]; }
  absl::string_view TokenBytes(int32_t id) const {
    return absl::string_view(token_bytes_)
        .substr(bytes_offsets_[id], bytes_offsets_[id + 1] - bytes_offsets_[id]);
  }
  absl::string_view TokenText(int32_t id) const {
    return absl::string_view(token_text_)
        .substr(text_offsets_[id], text_offsets_[id + 1] - text_offsets_[id]);
  }
  // Id of a token string (added tokens first, then the BPE vocabulary), or -1.
  int32_t Lookup(absl::string_view token) const;

 private:
  absl::Status ParseModel(const Json& model, absl::flat_hash_map<std::string, int32_t>* vocab);
  absl::Status ParseNormalizer(const Json& normalizer);
  absl::Status ParsePreTokenizer(const Json& pre_tokenizer);
  absl::Status ParseDecoder(const Json& decoder);

  // HF AddedVocabulary::find_matches over `sentence` with `trie`; appends to `out`.
  void FindAddedTokens(absl::string_view sentence, const TokenTrie& trie,
                       std::vector<Segment>* out) const;
  bool IsWordChar(char32_t cp) const;
  bool EndsWithWordChar(absl::string_view s) const;
  bool StartsWithWordChar(absl::string_view s) const;

  absl::Status PreTokenize(absl::string_view text, std::vector<absl::string_view>* pieces,
                           std::deque<std::string>* arena) const;
  void EncodeWord(absl::string_view word, std::vector<int32_t>* ids) const;
  void MergeWord(absl::string_view word, std::vector<int32_t>* ids) const;

  // Tokens and ids.
  std::vector<bool> assigned_;
  std::vector<bool> special_;
  std::string token_text_;  // TokenText(id) for every id, concatenated.
  std::vector<uint32_t> text_offsets_;
  std::string token_bytes_;  // What each id decodes to, concatenated.
  std::vector<uint32_t> bytes_offsets_;
  absl::flat_hash_map<std::string, int32_t> vocab_;  // BPE vocabulary.

  // Added tokens.
  std::vector<AddedToken> added_tokens_;
  absl::flat_hash_map<std::string, int32_t> added_by_content_;
  TokenTrie unnormalized_trie_;  // Values index added_tokens_.
  TokenTrie normalized_trie_;
  std::unique_ptr<Regex> word_char_regex_;  // For single_word tokens only.

  // Pre-tokenization.
  std::vector<PreTokenizerStep> pre_tokenizers_;

  // BPE.
  struct Merge {
    int32_t rank;
    int32_t new_id;
  };
  absl::flat_hash_map<uint64_t, Merge> merges_;
  std::array<int32_t, 256> byte_to_id_{};

  struct CacheShard {
    std::mutex mu;
    absl::flat_hash_map<std::string, std::vector<int32_t>> words;
  };
  mutable std::array<CacheShard, kCacheShards> cache_;
};

absl::Status TokenizerImpl::Parse(const Json& j) {
  absl::flat_hash_map<std::string, int32_t>& vocab = vocab_;
  SPLITMOE_RETURN_IF_ERROR(ParseModel(j.at("model"), &vocab));
  SPLITMOE_RETURN_IF_ERROR(ParseNormalizer(j.value("normalizer", Json())));
  SPLITMOE_RETURN_IF_ERROR(ParsePreTokenizer(j.value("pre_tokenizer", Json())));
  SPLITMOE_RETURN_IF_ERROR(ParseDecoder(j.value("decoder", Json())));

  // Added tokens.
  if (auto it = j.find("added_tokens"); it != j.end() && !it->is_null()) {
    for (const Json& t : *it) {
      AddedToken token;
      token.content = t.at("content").get<std::string>();
      const bool valid_utf8 = internal::FindInvalidUtf8(token.content) == internal::kAllValid;
      SPLITMOE_ASSIGN_OR_RETURN(
          token.id, TokenId(t.at("id"), valid_utf8 ? absl::StrCat("added token \"", token.content, "\"")
                                                   : std::string("an added token")));
      token.special = GetBool(t, "special", false);
      token.lstrip = GetBool(t, "lstrip", false);
      token.rstrip = GetBool(t, "rstrip", false);
      token.single_word = GetBool(t, "single_word", false);
      token.normalized = GetBool(t, "normalized", !token.special);
      if (!valid_utf8) {
        return absl::InvalidArgumentError(
            absl::StrCat("added token ", token.id, " is not valid UTF-8"));
      }
      added_tokens_.push_back(std::move(token));
    }
  }
  bool need_word_chars = false;
  for (size_t i = 0; i < added_tokens_.size(); ++i) {
    const AddedToken& t = added_tokens_[i];
    added_by_content_[t.content] = t.id;
    (t.normalized ? normalized_trie_ : unnormalized_trie_)
        .Insert(t.content, static_cast<int32_t>(i));
    need_word_chars |= t.single_word;
  }
  if (need_word_chars) {
    // Rust's char::is_alphanumeric() || '_'. Older PCRE2 lacks \p{Alphabetic}; \p{L} is close.
    auto re = Regex::Compile(R"([\p{Alphabetic}\p{N}_])");
    if (!re.ok()) re = Regex::Compile(R"([\p{L}\p{N}_])");
    SPLITMOE_RETURN_IF_ERROR(re.status());
    word_char_regex_ = std::move(re).value();
  }

  // Id tables.
  int32_t max_id = -1;
  for (const auto& [token, id] : vocab) max_id = std::max(max_id, id);
  for (const AddedToken& t : added_tokens_) max_id = std::max(max_id, t.id);
  if (max_id >= (1 << 26)) {
    return absl::InvalidArgumentError(absl::StrCat("token id ", max_id, " is implausibly large"));
  }
  const size_t n = static_cast<size_t>(max_id + 1);
  std::vector<const std::string*> text(n, nullptr);
  for (const auto& [token, id] : vocab) text[id] = &token;
  assigned_.assign(n, false);
  special_.assign(n, false);
  for (const AddedToken& t : added_tokens_) {
    text[t.id] = &t.content;  // Added tokens take precedence, as in HF's id_to_token.
    special_[t.id] = t.special;
  }
  const std::array<char32_t, 256> byte_to_char = BytesToUnicode();
  std::array<int16_t, 512> char_to_byte;
  char_to_byte.fill(-1);
  for (int b = 0; b < 256; ++b) char_to_byte[byte_to_char[b]] = static_cast<int16_t>(b);
  text_offsets_.assign(n + 1, 0);
  bytes_offsets_.assign(n + 1, 0);
  std::string bytes;
  for (size_t id = 0; id < n; ++id) {
    text_offsets_[id] = static_cast<uint32_t>(token_text_.size());
    bytes_offsets_[id] = static_cast<uint32_t>(token_bytes_.size());
    if (text[id] == nullptr) continue;
    assigned_[id] = true;
    const std::string& s = *text[id];
    token_text_ += s;
    // HF's ByteLevel decoder: map each char back to its byte; a token with any char outside
    // the table is emitted as its own UTF-8 bytes.
    bytes.clear();
    bool mapped = true;
    for (size_t pos = 0; pos < s.size();) {
      const char32_t cp = internal::DecodeCodePoint(s, &pos);
      if (cp >= char_to_byte.size() || char_to_byte[cp] < 0) {
        mapped = false;
        break;
      }
      bytes.push_back(static_cast<char>(char_to_byte[cp]));
    }
    token_bytes_ += mapped ? bytes : s;
  }
  text_offsets_[n] = static_cast<uint32_t>(token_text_.size());
  bytes_offsets_[n] = static_cast<uint32_t>(token_bytes_.size());

  // Byte-level alphabet.
  for (int b = 0; b < 256; ++b) {
    std::string ch;
    internal::AppendCodePoint(byte_to_char[b], &ch);
    auto it = vocab.find(ch);
    if (it == vocab.end()) {
      return absl::UnimplementedError(
          absl::StrCat("BPE vocabulary lacks the byte-level token for byte ", b));
    }
    byte_to_id_[b] = it->second;
  }
  return absl::OkStatus();
}

absl::Status TokenizerImpl::ParseModel(const Json& model,
                                       absl::flat_hash_map<std::string, int32_t>* vocab) {
  const std::string type = model.value("type", std::string("BPE"));
  if (type != "BPE") {
    return absl::UnimplementedError(absl::StrCat("model type \"", type, "\" is not supported"));
  }
  if (auto it = model.find("dropout");
      it != model.end() && !it->is_null() && it->get<double>() != 0.0) {
    return absl::UnimplementedError("BPE dropout is not supported");
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (auto it = model.find(key);
        it != model.end() && !it->is_null() && !it->get<std::string>().empty()) {
      return absl::UnimplementedError(absl::StrCat("BPE ", key, " is not supported"));
    }
  }
  if (GetBool(model, "byte_fallback", false)) {
    return absl::UnimplementedError("BPE byte_fallback is not supported");
  }
  if (GetBool(model, "ignore_merges", false)) {
    return absl::UnimplementedError("BPE ignore_merges is not supported");
  }
  const Json& v = model.at("vocab");
  if (!v.is_object()) return absl::InvalidArgumentError("model.vocab is not an object");
  vocab->reserve(v.size());
  for (auto it = v.begin(); it != v.end(); ++it) {
    SPLITMOE_ASSIGN_OR_RETURN(const int32_t id,
                              TokenId(it.value(), absl::StrCat("vocab token \"", it.key(), "\"")));
    (*vocab)[it.key()] = id;
  }
  const Json& merges = model.at("merges");
  merges_.reserve(merges.size());
  int32_t rank = 0;
  for (const Json& m : merges) {
    std::string a, b;
    if (m.is_string()) {
      // Old format "a b": exactly one space, as HF requires.
      const std::string s = m.get<std::string>();
      const size_t space = s.find(' ');
      if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
        return absl::InvalidArgumentError(
            absl::StrCat("merge ", rank, " (\"", s, "\") is not of the form \"a b\""));
      }
      a = s.substr(0, space);
      b = s.substr(space + 1);
    } else if (m.is_array() && m.size() == 2) {
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    } else {
      return absl::InvalidArgumentError(absl::StrCat("merge ", rank, " is malformed"));
    }
    auto ia = vocab->find(a);
    auto ib = vocab->find(b);
    auto iab = vocab->find(a + b);
    if (ia == vocab->end() || ib == vocab->end() || iab == vocab->end()) {
      return absl::InvalidArgumentError(absl::StrCat("merge ", rank, " (\"", a, "\", \"", b,
                                                     "\") uses a token not in the vocabulary"));
    }
    // A repeated pair keeps its last rank, like HF's HashMap collect.
    merges_[PairKey(ia->second, ib->second)] = Merge{rank, iab->second};
    ++rank;
  }
  return absl::OkStatus();
}

absl::Status TokenizerImpl::ParseNormalizer(const Json& normalizer) {
  const std::string type = TypeOf(normalizer);
  if (type.empty()) return absl::OkStatus();
  if (type == "Sequence") {
    for (const Json& n : normalizer.at("normalizers")) SPLITMOE_RETURN_IF_ERROR(ParseNormalizer(n));
    return absl::OkStatus();
  }
  return absl::UnimplementedError(absl::StrCat("normalizer \"", type, "\" is not supported"));
}

absl::Status TokenizerImpl::ParsePreTokenizer(const Json& pre_tokenizer) {
  const std::string type = TypeOf(pre_tokenizer);
  if (type.empty()) return absl::OkStatus();
  if (type == "Sequence") {
    for (const Json& p : pre_tokenizer.at("pretokenizers")) {
      SPLITMOE_RETURN_IF_ERROR(ParsePreTokenizer(p));
    }
    return absl::OkStatus();
  }
  if (!pre_tokenizers_.empty() &&
      pre_tokenizers_.back().kind == PreTokenizerStep::Kind::kByteLevel) {
    return absl::UnimplementedError(
        absl::StrCat("pre_tokenizer \"", type, "\" after ByteLevel is not supported"));
  }
  PreTokenizerStep step;
  if (type == "Split") {
    step.kind = PreTokenizerStep::Kind::kSplit;
    const Json& pattern = pre_tokenizer.at("pattern");
    std::string regex;
    if (pattern.contains("Regex")) {
      regex = pattern.at("Regex").get<std::string>();
    } else if (pattern.contains("String")) {
      regex = EscapeRegexLiteral(pattern.at("String").get<std::string>());
    } else {
      return absl::InvalidArgumentError("Split pattern has neither Regex nor String");
    }
    SPLITMOE_ASSIGN_OR_RETURN(step.regex, Regex::Compile(regex));
    const std::string behavior = pre_tokenizer.at("behavior").get<std::string>();
    if (behavior == "Removed") {
      step.behavior = SplitBehavior::kRemoved;
    } else if (behavior == "Isolated") {
      step.behavior = SplitBehavior::kIsolated;
    } else if (behavior == "MergedWithPrevious") {
      step.behavior = SplitBehavior::kMergedWithPrevious;
    } else if (behavior == "MergedWithNext") {
      step.behavior = SplitBehavior::kMergedWithNext;
    } else if (behavior == "Contiguous") {
      step.behavior = SplitBehavior::kContiguous;
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown Split behavior \"", behavior, "\""));
    }
    step.invert = GetBool(pre_tokenizer, "invert", false);
  } else if (type == "ByteLevel") {
    step.kind = PreTokenizerStep::Kind::kByteLevel;
    step.add_prefix_space = GetBool(pre_tokenizer, "add_prefix_space", true);
    if (GetBool(pre_tokenizer, "use_regex", true)) {
      SPLITMOE_ASSIGN_OR_RETURN(step.regex, Regex::Compile(kByteLevelRegex));
    }
  } else {
    return absl::UnimplementedError(absl::StrCat("pre_tokenizer \"", type, "\" is not supported"));
  }
  pre_tokenizers_.push_back(std::move(step));
  return absl::OkStatus();
}

absl::Status TokenizerImpl::ParseDecoder(const Json& decoder) {
  // The BPE here works on bytes, which only a ByteLevel pre-tokenizer and decoder make sense of.
  if (pre_tokenizers_.empty() ||
      pre_tokenizers_.back().kind != PreTokenizerStep::Kind::kByteLevel) {
    return absl::UnimplementedError("only byte-level BPE (a ByteLevel pre_tokenizer) is supported");
  }
  const std::string type = TypeOf(decoder);
  if (type != "ByteLevel") {
    return absl::UnimplementedError(absl::StrCat("decoder \"", type, "\" is not supported"));
  }
  return absl::OkStatus();
}

int32_t TokenizerImpl::Lookup(absl::string_view token) const {
  if (auto it = added_by_content_.find(token); it != added_by_content_.end()) return it->second;
  if (auto it = vocab_.find(token); it != vocab_.end()) return it->second;
  return -1;
}

bool TokenizerImpl::IsWordChar(char32_t cp) const {
  if (cp < 0x80) {
    return (cp >= '0' && cp <= '9') || (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z') ||
           cp == '_';
  }
  std::string ch;
  internal::AppendCodePoint(cp, &ch);
  std::vector<std::pair<size_t, size_t>> m;
  return word_char_regex_->FindAll(ch, &m).ok() && !m.empty();
}

bool TokenizerImpl::EndsWithWordChar(absl::string_view s) const {
  if (s.empty()) return false;
  size_t start = s.size() - 1;
  while (start > 0 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
  size_t pos = start;
  return IsWordChar(internal::DecodeCodePoint(s, &pos));
}

bool TokenizerImpl::StartsWithWordChar(absl::string_view s) const {
  if (s.empty()) return false;
  size_t pos = 0;
  return IsWordChar(internal::DecodeCodePoint(s, &pos));
}

void TokenizerImpl::FindAddedTokens(absl::string_view sentence, const TokenTrie& trie,
                                    std::vector<Segment>* out) const {
  const size_t n = sentence.size();
  size_t start_offset = 0;  // End of the previous emitted token.
  size_t pos = 0;           // Where the search for the next match resumes.
  while (!trie.empty() && pos < n) {
    int32_t index = -1;
    size_t len = 0;
    size_t i = pos;
    for (; i < n; ++i) {
      if (!trie.MayStartAt(static_cast<unsigned char>(sentence[i]))) continue;
      index = trie.LongestAt(sentence, i, &len);
      if (index >= 0) break;
    }
    if (index < 0) break;
    size_t start = i;
    size_t stop = i + len;
    pos = stop;
    const AddedToken& token = added_tokens_[index];
    if (token.single_word) {
      const bool start_space = start == 0 || !EndsWithWordChar(sentence.substr(0, start));
      const bool stop_space = stop == n || !StartsWithWordChar(sentence.substr(stop));
      if (!start_space || !stop_space) continue;
    }
    if (token.lstrip) {
      size_t new_start = start;
      while (new_start > 0) {
        size_t prev = new_start - 1;
        while (prev > 0 && (static_cast<unsigned char>(sentence[prev]) & 0xC0) == 0x80) --prev;
        size_t p = prev;
        if (!internal::IsWhiteSpace(internal::DecodeCodePoint(sentence, &p))) break;
        new_start = prev;
      }
      start = std::max(new_start, start_offset);
    }
    if (token.rstrip) {
      while (stop < n) {
        size_t p = stop;
        if (!internal::IsWhiteSpace(internal::DecodeCodePoint(sentence, &p))) break;
        stop = p;
      }
    }
    if (start < start_offset) continue;  // Would overlap whitespace a previous rstrip took.
    if (start_offset < start)
      out->push_back({sentence.substr(start_offset, start - start_offset), -1});
    out->push_back({sentence.substr(start, stop - start), token.id});
    start_offset = stop;
  }
  if (start_offset < n) out->push_back({sentence.substr(start_offset), -1});
}

absl::Status TokenizerImpl::PreTokenize(absl::string_view text,
                                        std::vector<absl::string_view>* pieces,
                                        std::deque<std::string>* arena) const {
  pieces->assign(1, text);
  std::vector<absl::string_view> next;
  std::vector<std::pair<size_t, size_t>> matches;
  struct Part {
    size_t start, end;
    bool is_match;
  };
  std::vector<Part> parts, merged;
  for (const PreTokenizerStep& step : pre_tokenizers_) {
    next.clear();
    for (absl::string_view piece : *pieces) {
      if (step.add_prefix_space && (piece.empty() || piece[0] != ' ')) {
        arena->push_back(absl::StrCat(" ", piece));
        piece = arena->back();
      }
      if (step.regex == nullptr) {
        if (!piece.empty()) next.push_back(piece);
        continue;
      }
      matches.clear();
      SPLITMOE_RETURN_IF_ERROR(step.regex->FindAll(piece, &matches));
      // HF's Pattern::find_matches: the piece as alternating (offsets, is_match) parts.
      parts.clear();
      size_t prev = 0;
      for (const auto& [s, e] : matches) {
        if (prev != s) parts.push_back({prev, s, step.invert});
        parts.push_back({s, e, !step.invert});
        prev = e;
      }
      if (prev != piece.size()) parts.push_back({prev, piece.size(), step.invert});
      // HF's NormalizedString::split by behavior; `is_match` then means "remove".
      merged.clear();
      switch (step.behavior) {
        case SplitBehavior::kIsolated:
          for (const Part& p : parts) merged.push_back({p.start, p.end, false});
          break;
        case SplitBehavior::kRemoved:
          merged = parts;
          break;
        case SplitBehavior::kContiguous: {
          bool previous_match = false;
          for (const Part& p : parts) {
            if (p.is_match == previous_match && !merged.empty()) {
              merged.back().end = p.end;
            } else {
              merged.push_back({p.start, p.end, false});
            }
            previous_match = p.is_match;
          }
          break;
        }
        case SplitBehavior::kMergedWithPrevious: {
          bool previous_match = false;
          for (const Part& p : parts) {
            if (p.is_match && !previous_match && !merged.empty()) {
              merged.back().end = p.end;
            } else {
              merged.push_back({p.start, p.end, false});
            }
            previous_match = p.is_match;
          }
          break;
        }
        case SplitBehavior::kMergedWithNext: {
          bool previous_match = false;
          for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
            if (it->is_match && !previous_match && !merged.empty()) {
              merged.back().start = it->start;
            } else {
              merged.push_back({it->start, it->end, false});
            }
            previous_match = it->is_match;
          }
          std::reverse(merged.begin(), merged.end());
          break;
        }
      }
      for (const Part& p : merged) {
        if (!p.is_match && p.end > p.start) next.push_back(piece.substr(p.start, p.end - p.start));
      }
    }
    pieces->swap(next);
  }
  return absl::OkStatus();
}

void TokenizerImpl::MergeWord(absl::string_view word, std::vector<int32_t>* ids) const {
  // HF's Word::merge_all: repeatedly apply the lowest-rank merge (leftmost on ties) until none
  // applies, with a heap of candidate merges that are re-validated when popped.
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    bool alive;
  };
  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t new_id;
  };
  const auto lower_priority = [](const Candidate& a, const Candidate& b) {
    return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
  };
  const int32_t n = static_cast<int32_t>(word.size());
  std::vector<Symbol> symbols(n);
  for (int32_t i = 0; i < n; ++i) {
    symbols[i] = {byte_to_id_[static_cast<unsigned char>(word[i])], i - 1, i + 1 < n ? i + 1 : -1,
                  true};
  }
  std::vector<Candidate> heap;
  heap.reserve(n);
  const auto push = [&](int32_t pos) {
    const Symbol& left = symbols[pos];
    auto it = merges_.find(PairKey(left.id, symbols[left.next].id));
    if (it == merges_.end()) return;
    heap.push_back({it->second.rank, pos, it->second.new_id});
    std::push_heap(heap.begin(), heap.end(), lower_priority);
  };
  for (int32_t i = 0; i + 1 < n; ++i) push(i);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), lower_priority);
    const Candidate top = heap.back();
    heap.pop_back();
    Symbol& left = symbols[top.pos];
    if (!left.alive || left.next < 0) continue;
    Symbol& right = symbols[left.next];
    auto it = merges_.find(PairKey(left.id, right.id));
    if (it == merges_.end() || it->second.new_id != top.new_id) continue;  // Stale entry.
    left.id = top.new_id;
    left.next = right.next;
    right.alive = false;
    if (left.next >= 0) symbols[left.next].prev = top.pos;
    if (left.prev >= 0) push(left.prev);
    if (left.next >= 0) push(top.pos);
  }
  for (int32_t i = 0; i >= 0 && i < n; i = symbols[i].next) ids->push_back(symbols[i].id);
}

void TokenizerImpl::EncodeWord(absl::string_view word, std::vector<int32_t>* ids) const {
  if (word.size() == 1) {
    ids->push_back(byte_to_id_[static_cast<unsigned char>(word[0])]);
    return;
  }
  if (word.size() > kMaxCachedWordBytes) {
    MergeWord(word, ids);
    return;
  }
  const size_t hash = absl::Hash<absl::string_view>{}(word);
  CacheShard& shard = cache_[(hash >> 7) % kCacheShards];
  {
    std::lock_guard<std::mutex> lock(shard.mu);
    auto it = shard.words.find(word);
    if (it != shard.words.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t begin = ids->size();
  MergeWord(word, ids);
  std::vector<int32_t> result(ids->begin() + static_cast<ptrdiff_t>(begin), ids->end());
  std::lock_guard<std::mutex> lock(shard.mu);
  if (shard.words.size() >= kMaxEntriesPerShard) shard.words.clear();
  shard.words.emplace(word, std::move(result));
}

absl::Status TokenizerImpl::EncodeInto(absl::string_view text, std::vector<int32_t>* ids) const {
  // 1. Added tokens: first those matched on the raw text, then (in the remaining pieces) those
  //    matched on normalized text. The normalizer is the identity (anything else is refused at
  //    load), so both passes run on the text itself.
  std::vector<Segment> first, segments;
  FindAddedTokens(text, unnormalized_trie_, &first);
  for (const Segment& s : first) {
    if (s.id >= 0) {
      segments.push_back(s);
    } else {
      FindAddedTokens(s.text, normalized_trie_, &segments);
    }
  }
  // 2. Everything else: pre-tokenize, then BPE each piece.
  std::vector<absl::string_view> pieces;
  std::deque<std::string> arena;
  for (const Segment& s : segments) {
    if (s.id >= 0) {
      ids->push_back(s.id);
      continue;
    }
    SPLITMOE_RETURN_IF_ERROR(PreTokenize(s.text, &pieces, &arena));
    for (absl::string_view piece : pieces) EncodeWord(piece, ids);
  }
  return absl::OkStatus();
}

}  // namespace internal

namespace {

using Json = nlohmann::json;

// A special-token entry of tokenizer_config.json: a string, {"content": ...}, or null.
std::optional<std::string> ConfigTokenContent(const Json& config, const char* key) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  return it->at("content").get<std::string>();
}

}  // namespace

Tokenizer::Tokenizer() = default;
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::LoadFromDir(absl::string_view dir) {
  std::unique_ptr<Tokenizer> tokenizer(new Tokenizer());
  tokenizer->impl_ = std::make_unique<internal::TokenizerImpl>();

  const std::string tokenizer_path = absl::StrCat(dir, "/tokenizer.json");
  {
    SPLITMOE_ASSIGN_OR_RETURN(Json j,
                              internal::ReadJsonFile(tokenizer_path, kMaxTokenizerJsonBytes));
    absl::Status status;
    try {
      status = tokenizer->impl_->Parse(j);
    } catch (const std::exception& e) {
      status = absl::InvalidArgumentError(e.what());
    }
    if (!status.ok()) return Annotate(status, tokenizer_path);
  }

  const std::string config_path = absl::StrCat(dir, "/tokenizer_config.json");
  auto config_or = internal::ReadJsonFile(config_path, kMaxTokenizerConfigJsonBytes);
  if (absl::IsNotFound(config_or.status())) return tokenizer;
  SPLITMOE_RETURN_IF_ERROR(config_or.status());
  const Json& config = *config_or;
  absl::Status status;
  try {
    if (!config.is_object()) throw std::runtime_error("not a JSON object");
    tokenizer->add_bos_token_ = internal::GetBool(config, "add_bos_token", false);
    tokenizer->add_eos_token_ = internal::GetBool(config, "add_eos_token", false);
    for (auto [key, id] : {std::pair<const char*, int32_t*>{"bos_token", &tokenizer->bos_id_},
                           std::pair<const char*, int32_t*>{"eos_token", &tokenizer->eos_id_}}) {
      std::optional<std::string> content = ConfigTokenContent(config, key);
      if (!content.has_value()) continue;
      *id = tokenizer->impl_->Lookup(*content);
      if (*id < 0) {
        status = absl::InvalidArgumentError(
            absl::StrCat(key, " \"", *content, "\" is not a token of tokenizer.json"));
        break;
      }
    }
    if (auto it = config.find("chat_template"); it != config.end() && !it->is_null()) {
      if (it->is_string()) {
        tokenizer->chat_template_ = it->get<std::string>();
      } else {
        // A list of {"name", "template"}: take "default", else the first.
        for (const Json& entry : *it) {
          if (entry.at("name").get<std::string>() == "default" ||
              tokenizer->chat_template_.empty()) {
            tokenizer->chat_template_ = entry.at("template").get<std::string>();
          }
        }
      }
    }
  } catch (const std::exception& e) {
    status = absl::InvalidArgumentError(e.what());
  }
  if (!status.ok()) return Annotate(status, config_path);
  if (tokenizer->add_bos_token_ && tokenizer->bos_id_ < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(config_path, ": add_bos_token is set but there is no bos_token"));
  }
  if (tokenizer->add_eos_token_ && tokenizer->eos_id_ < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(config_path, ": add_eos_token is set but there is no eos_token"));
  }
  return tokenizer;
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::Encode(absl::string_view text,
                                                       bool add_special_tokens) const {
  if (const size_t bad = internal::FindInvalidUtf8(text); bad != internal::kAllValid) {
    return absl::InvalidArgumentError(
        absl::StrCat("text is not valid UTF-8 (byte ", bad, " of ", text.size(), ")"));
  }
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 2);
  if (add_special_tokens && add_bos_token_) ids.push_back(bos_id_);
  SPLITMOE_RETURN_IF_ERROR(impl_->EncodeInto(text, &ids));
  if (add_special_tokens && add_eos_token_) ids.push_back(eos_id_);
  return ids;
}

absl::Status Tokenizer::AppendTokenBytes(int32_t id, bool skip_special_tokens,
                                         std::string* out) const {
  if (id < 0) return absl::InvalidArgumentError(absl::StrCat("token id ", id, " is negative"));
  // As HF's decode: an id with no token (DeepSeek-V3's model vocabulary of 129280 pads the
  // tokenizer's 128815 ids) contributes no text. A model may sample such an id.
  if (!impl_->IsAssigned(id)) return absl::OkStatus();
  if (skip_special_tokens && impl_->IsSpecial(id)) return absl::OkStatus();
  absl::string_view bytes = impl_->TokenBytes(id);
  out->append(bytes.data(), bytes.size());
  return absl::OkStatus();
}

absl::StatusOr<std::string> Tokenizer::Decode(absl::Span<const int32_t> ids,
                                              bool skip_special_tokens) const {
  std::string bytes;
  for (int32_t id : ids)
    SPLITMOE_RETURN_IF_ERROR(AppendTokenBytes(id, skip_special_tokens, &bytes));
  if (internal::FindInvalidUtf8(bytes) == internal::kAllValid) return bytes;
  std::string text;
  text.reserve(bytes.size() + 8);
  internal::AppendUtf8Lossy(bytes, /*final=*/true, &text);
  return text;
}

int32_t Tokenizer::vocab_size() const { return impl_->vocab_size(); }

std::optional<std::string> Tokenizer::TokenText(int32_t id) const {
  if (!impl_->IsAssigned(id)) return std::nullopt;
  return std::string(impl_->TokenText(id));
}

bool Tokenizer::IsSpecial(int32_t id) const { return impl_->IsSpecial(id); }

IncrementalDetokenizer::IncrementalDetokenizer(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tokenizer_(tokenizer), skip_special_tokens_(skip_special_tokens) {}

absl::StatusOr<std::string> IncrementalDetokenizer::Push(int32_t id) {
  std::string bytes = pending_;
  SPLITMOE_RETURN_IF_ERROR(tokenizer_.AppendTokenBytes(id, skip_special_tokens_, &bytes));
  std::string text;
  text.reserve(bytes.size());
  const size_t consumed = internal::AppendUtf8Lossy(bytes, /*final=*/false, &text);
  pending_.assign(bytes, consumed, std::string::npos);
  return text;
}

std::string IncrementalDetokenizer::Finish() {
  std::string text;
  internal::AppendUtf8Lossy(pending_, /*final=*/true, &text);
  pending_.clear();
  return text;
}

}  // namespace splitmoe::tokenizer
