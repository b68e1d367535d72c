// Tests for the CLIP BPE tokenizer (models/clip_tokenizer.h): golden ids and BPE strings from the
// reference fixtures (transformers CLIPTokenizer), plus unit tests on Unicode, normalisation, truncation
// and errors. The unit tests use tests/data/tiny-tokenizer, a copy of the fixtures' vocabulary (checked by
// TokenizerCopyGolden). Expected ids in ClipTokenizerUnit.UnicodeAndNormalisation were produced with transformers'
// slow CLIPTokenizer algorithm (no ftfy; Python 3.11 unicodedata and the `regex` module) on the fixture
// vocabulary. During development the C++ tokenizer was also compared with that algorithm on 60,000 random
// prompts (all assigned code points, combining sequences, special tokens, contractions): no differences.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <thread>

#include "core/fs.h"
#include "core/utf8.h"
#include "dmx/error.h"
#include "models/clip_tokenizer.h"
#include "models/clip_unicode.h"
#include "test_util.h"
#include "tiny_models.h"

namespace dmx::test {
namespace {
using models::CLIPTokenizer;

template <size_t N>
std::string S(const char (&lit)[N]) {
  return std::string(lit, N - 1);  // keeps embedded NULs
}

std::string tokenizer_dir(const std::string& variant) { return fixture_model(variant) + "/tokenizer"; }

std::vector<int64_t> ids_of(const at::Tensor& t) {
  at::Tensor c = t.to(at::kLong).contiguous().flatten();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

template <typename E, typename F>
void expect_throw_with(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected an exception containing '" << needle << "'";
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

// A scratch copy of the in-repo tokenizer folder, for variations on its files.
std::string copy_tokenizer(const std::string& name) {
  const std::string dir = temp_dir() + "/" + name;
  const std::string cmd = "mkdir -p '" + dir + "' && cp '" + tiny_tokenizer_dir() + "'/* '" + dir + "'/";
  EXPECT_EQ(std::system(cmd.c_str()), 0);
  return dir;
}

class ClipTokenizerGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(ClipTokenizerGolden, MatchesReference) {
  DMX_REQUIRE_FIXTURES();
  const std::string variant = GetParam();
  const RefCase ref = load_ref(variant, "clip");
  const CLIPTokenizer tok = CLIPTokenizer::from_folder(tokenizer_dir(variant));
  const auto& bep = ref.meta["bos_eos_pad"];
  EXPECT_EQ(tok.bos_id(), bep[0].get<int64_t>());
  EXPECT_EQ(tok.eos_id(), bep[1].get<int64_t>());
  EXPECT_EQ(tok.pad_id(), bep[2].get<int64_t>());
  EXPECT_EQ(tok.model_max_length(), ref.meta["model_max_length"].get<int>());
  const auto& prompts = ref.meta["prompts"];
  ASSERT_GT(prompts.size(), 0u);
  for (size_t i = 0; i < prompts.size(); ++i) {
    SCOPED_TRACE("prompt " + std::to_string(i));
    const std::string p = prompts[i].get<std::string>();
    const auto untruncated = ref.meta["untruncated_ids"][i].get<std::vector<int64_t>>();
    // "tokens" holds the (truncated) model input as token strings, BOS and EOS included.
    const auto ref_tokens = ref.meta["tokens"][i].get<std::vector<std::string>>();
    const std::vector<std::string> expected_bpe(ref_tokens.begin() + 1, ref_tokens.end() - 1);
    std::vector<std::string> bpe = tok.tokenize(p);
    EXPECT_EQ(bpe.size(), untruncated.size() - 2);
    ASSERT_GE(bpe.size(), expected_bpe.size());
    bpe.resize(expected_bpe.size());
    EXPECT_EQ(bpe, expected_bpe);
    EXPECT_EQ(tok.encode(p), untruncated);
    EXPECT_EQ(tok.encode_padded(p, 77), ids_of(ref["p" + std::to_string(i) + ".input_ids"]));
  }
}
INSTANTIATE_TEST_SUITE_P(Variants, ClipTokenizerGolden, ::testing::Values("sd15", "test"));

// The unit tests' expected ids hold for the in-repo copy because it is the fixtures' tokenizer, byte for byte.
TEST(TokenizerCopyGolden, InRepoCopyIsTheFixtureTokenizer) {
  DMX_REQUIRE_FIXTURES();
  for (const std::string variant : {"sd15", "test"})
    for (const char* f : {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"})
      EXPECT_EQ(read_text_file(tiny_tokenizer_dir() + "/" + f, f, kMaxJsonFileBytes),
                read_text_file(tokenizer_dir(variant) + "/" + f, f, kMaxJsonFileBytes))
          << variant << "/tokenizer/" << f;
}

TEST(ClipTokenizerUnit, EmptyPrompt) {
  const auto& tok = tiny_tokenizer();
  EXPECT_TRUE(tok.tokenize("").empty());
  EXPECT_TRUE(tok.tokenize(" \t\n ").empty());
  EXPECT_EQ(tok.encode(""), (std::vector<int64_t>{998, 999}));
  const auto padded = tok.encode_padded("");
  ASSERT_EQ(padded.size(), 77u);
  EXPECT_EQ(padded[0], 998);
  for (size_t i = 1; i < padded.size(); ++i) EXPECT_EQ(padded[i], 999) << i;
}

TEST(ClipTokenizerUnit, LongPromptTruncatesKeepingEos) {
  const auto& tok = tiny_tokenizer();
  std::string p;
  for (int i = 0; i < 200; ++i) p += "a cat ";
  const auto full = tok.encode(p);
  ASSERT_EQ(full.size(), 402u);
  const auto padded = tok.encode_padded(p);
  ASSERT_EQ(padded.size(), 77u);
  EXPECT_EQ(padded.front(), 998);
  EXPECT_EQ(padded.back(), 999);
  EXPECT_TRUE(std::equal(padded.begin(), padded.end() - 1, full.begin()));
  EXPECT_EQ(tok.encode_padded(p, 8), (std::vector<int64_t>{998, 320, 631, 320, 631, 320, 631, 999}));
  EXPECT_EQ(tok.encode_padded("a cat", 2), (std::vector<int64_t>{998, 999}));
  expect_throw_with<InvalidArgument>([&] { tok.encode_padded("a cat", 1); }, "max_length must be >= 2");
}

struct UnicodeCase {
  const char* name;
  std::string prompt;
  std::vector<int64_t> ids;  // without BOS/EOS
};

TEST(ClipTokenizerUnit, UnicodeAndNormalisation) {
  const auto& tok = tiny_tokenizer();
  // clang-format off
  const std::vector<UnicodeCase> cases = {
    {"accents", S("café crème brûlée"), {540, 69, 127, 358, 66, 81, 127, 101, 76, 324, 593, 127, 119, 75, 127, 102, 324}},
    {"nfd_accents", S("cafe\u0301 cre\u0300me"), {540, 69, 127, 358, 66, 81, 127, 101, 76, 324}},
    {"emoji", S("a 🐱 cat riding a 🚀 rocket 👨\u200D👩\u200D👧"), {320, 172, 253, 238, 365, 631, 547, 578, 320, 172, 253, 248, 478, 802, 765, 172, 253, 239, 101, 172, 253, 239, 102, 172, 253, 239, 356}},
    {"cjk", S("一只猫 on a 東京 street"), {160, 116, 478, 161, 237, 359, 163, 234, 360, 521, 320, 162, 251, 365, 160, 118, 361, 814, 568}},
    {"greek_final_sigma", S("ΟΔΥΣΣΕΥΣ Σίσυφος ΣΑ"), {138, 123, 138, 112, 139, 227, 139, 225, 139, 225, 138, 113, 139, 227, 139, 480, 139, 225, 138, 107, 139, 225, 139, 227, 139, 228, 138, 123, 139, 480, 139, 225, 138, 365}},
    {"special_casing", S("İstanbul ǅemal ﬁsh Straße"), {328, 136, 485, 517, 513, 624, 331, 131, 228, 68, 76, 566, 171, 105, 223, 808, 517, 535, 127, 253, 324}},
    {"whitespace_case", S("  A   Photo\x09" "OF\x0A" " a   CAT  "), {320, 793, 524, 320, 631}},
    {"plain", S("a photo of a cat"), {320, 793, 524, 320, 631}},
    {"contractions", S("it's don't we're I've I'm you'll he'd IT'S"), {603, 6, 338, 67, 521, 6, 339, 86, 324, 6, 81, 324, 328, 6, 85, 324, 328, 6, 332, 88, 78, 340, 6, 75, 331, 71, 324, 6, 323, 603, 6, 338}},
    {"control_and_separators", S("a\x01" "b\u200Bc\u00ADd e\u3000f\u2028g\u00A0h"), {64, 65, 66, 323, 324, 325, 326, 327}},
    {"special_tokens_in_text", S("a <|endoftext|> b<|startoftext|>c <|ENDOFTEXT|>"), {320, 999, 321, 998, 322, 999}},
    {"digits_punctuation", S("3.14 apples, 42 pears!!! (and) ... ~~~"), {274, 269, 272, 275, 897, 267, 275, 273, 79, 598, 338, 0, 0, 256, 263, 525, 264, 13, 13, 269, 93, 93, 349}},
    {"scripts", S("한국어 日本語 ひらがな カタカナ русский текст"), {169, 243, 250, 166, 113, 255, 168, 244, 368, 162, 245, 354, 162, 250, 361, 164, 103, 508, 159, 223, 110, 159, 224, 231, 159, 223, 234, 159, 223, 359, 159, 224, 104, 159, 224, 123, 159, 224, 104, 159, 225, 488, 141, 222, 141, 225, 141, 223, 141, 223, 140, 118, 140, 116, 140, 373, 141, 224, 140, 113, 140, 118, 141, 223, 141, 480}},
    {"replacement_and_nul", S("x\uFFFDy\x00" "z"), {87, 88, 345}},
    {"apostrophes_long_s", S("'''s ''t' 'ſ"), {6, 6, 262, 338, 6, 262, 339, 262, 6, 129, 379}},
    {"other_numbers", S("١٢٣ ½ ⅷ ²"), {149, 350, 149, 351, 149, 352, 126, 377, 158, 227, 371, 126, 366}},
    // U+0345 matches no class of the IGNORECASE split regex: it separates and vanishes.
    {"ypogegrammeni", S("a\u0345\u0345<|ENDOFTEXT|> !\u0345!"), {320, 999, 256, 256}},
    {"ypogegrammeni_in_word", S("ba\u0345b"), {65, 320, 321}},
  };
  // clang-format on
  for (const auto& c : cases) {
    std::vector<int64_t> expected{998};
    expected.insert(expected.end(), c.ids.begin(), c.ids.end());
    expected.push_back(999);
    EXPECT_EQ(tok.encode(c.prompt), expected) << c.name;
  }
}

TEST(ClipTokenizerUnit, WhitespaceCaseAndNfcAreNormalised) {
  const auto& tok = tiny_tokenizer();
  EXPECT_EQ(tok.tokenize("  A   Photo\tOF\n a   CAT  "), tok.tokenize("a photo of a cat"));
  EXPECT_EQ(tok.tokenize("a photo of a cat"),
            (std::vector<std::string>{"a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"}));
  EXPECT_EQ(tok.tokenize(S("cafe\xCC\x81")), tok.tokenize(S("caf\xC3\xA9")));  // NFD == NFC
  EXPECT_EQ(tok.tokenize(S("CAF\xC3\x89")), tok.tokenize(S("caf\xC3\xA9")));   // lower-casing beyond ASCII
  EXPECT_EQ(tok.tokenize(S("\xE4\xB8\x80\xE5\x8F\xAA")), tok.tokenize(S("\xE4\xB8\x80 \xE5\x8F\xAA")));  // CJK spacing
}

TEST(ClipTokenizerUnit, Contractions) {
  const auto& tok = tiny_tokenizer();
  EXPECT_EQ(tok.tokenize("it's"), (std::vector<std::string>{"it</w>", "'", "s</w>"}));
  EXPECT_EQ(tok.tokenize("IT'S"), tok.tokenize("it's"));
  EXPECT_EQ(tok.tokenize("we're"), (std::vector<std::string>{"w", "e</w>", "'", "r", "e</w>"}));
  EXPECT_EQ(tok.tokenize("you'll"), (std::vector<std::string>{"y", "o", "u</w>", "'", "l", "l</w>"}));
  EXPECT_EQ(tok.tokenize("'''s"), (std::vector<std::string>{"'", "'", "'</w>", "s</w>"}));
}

TEST(ClipTokenizerUnit, InvalidUtf8IsRejected) {
  const auto& tok = tiny_tokenizer();
  expect_throw_with<InvalidArgument>([&] { tok.encode(S("caf\xE9 au lait")); }, "byte 0xE9 at offset 3");
  expect_throw_with<InvalidArgument>([&] { tok.encode(S("bad \xFF prompt")); }, "bad \\xFF prompt");
  EXPECT_THROW(tok.tokenize(S("\xC0\xAF")), InvalidArgument);          // overlong '/'
  EXPECT_THROW(tok.tokenize(S("\xED\xA0\x80")), InvalidArgument);      // UTF-16 surrogate
  EXPECT_THROW(tok.tokenize(S("\xF4\x90\x80\x80")), InvalidArgument);  // > U+10FFFF
  EXPECT_THROW(tok.tokenize(S("ab\xF0\x9F\x90")), InvalidArgument);    // truncated sequence
}

TEST(ClipTokenizerUnit, AllCodePointsNeverCrash) {
  const auto& tok = tiny_tokenizer();
  // Every scalar value, in chunks, goes through clean-up, NFC, lower-casing, the split and BPE.
  std::u32string chunk;
  size_t n_tokens = 0;
  for (char32_t cp = 1; cp <= 0x10FFFF; ++cp) {
    if (cp >= 0xD800 && cp < 0xE000) continue;
    chunk.push_back(cp);
    if (chunk.size() == 4096 || cp == 0x10FFFF) {
      n_tokens += tok.encode(dmx::encode_utf8(chunk)).size();
      chunk.clear();
    }
  }
  EXPECT_GT(n_tokens, 100000u);
}

TEST(ClipTokenizerUnit, UnicodeHelpersMatchPython) {
  namespace u = models::unicode;
  EXPECT_EQ(u::nfc(U"e\u0301"), U"\u00e9");
  EXPECT_EQ(u::nfc(U"\u1100\u1161\u11a8"), U"\uac01");  // Hangul LVT
  EXPECT_EQ(u::nfc(U"a\u0323\u0302"), U"\u1ead");       // reordering, then composition
  EXPECT_EQ(u::nfc(U"a\u0302\u0323"), U"\u1ead");
  EXPECT_EQ(u::nfc(U"\u212b"), U"\u00c5");                               // singleton (Angstrom sign)
  EXPECT_EQ(u::nfc(U"\u0958"), U"\u0915\u093c");                         // composition exclusion
  EXPECT_EQ(u::py_lower(U"\u03a3\u0391\u03a3"), U"\u03c3\u03b1\u03c2");  // final sigma
  EXPECT_EQ(u::py_lower(U"\u0130"), U"i\u0307");
  EXPECT_TRUE(u::is_letter(U'\u4e00'));
  EXPECT_TRUE(u::is_number(U'\u0663'));
  EXPECT_FALSE(u::is_letter(U'\U0001F431'));
  EXPECT_EQ(u::uclass(U'\u200d'), u::UClass::C);
}

TEST(ClipTokenizerUnit, SpecialTokensAndPadFromConfig) {
  // SD 2.x tokenizers pad with "!" (id 0); transformers then also treats "!" as an added token.
  const std::string dir = copy_tokenizer("pad_bang");
  auto cfg = nlohmann::json::parse(read_text_file(dir + "/tokenizer_config.json", "test", dmx::kMaxJsonFileBytes));
  cfg["pad_token"] = "!";
  write_file(dir + "/tokenizer_config.json", cfg.dump());
  const CLIPTokenizer tok = CLIPTokenizer::from_folder(dir);
  EXPECT_EQ(tok.pad_id(), 0);
  EXPECT_EQ(tok.encode_padded("a cat!", 6), (std::vector<int64_t>{998, 320, 631, 0, 999, 0}));
}

TEST(ClipTokenizerUnit, MergesHeaderIsSkippedAndRanksApply) {
  std::unordered_map<std::string, int64_t> vocab{
      {"<|startoftext|>", 0}, {"<|endoftext|>", 1}, {"a", 2}, {"b", 3}, {"c</w>", 4}, {"ab", 5},
      {"bc</w>", 6},          {"abc</w>", 7}};
  // "b c</w>" outranks "a b": the word splits as a + bc</w>.
  const CLIPTokenizer t1(vocab, {{"b", "c</w>"}, {"a", "b"}});
  EXPECT_EQ(t1.tokenize("abc"), (std::vector<std::string>{"a", "bc</w>"}));
  EXPECT_EQ(t1.encode("abc"), (std::vector<int64_t>{0, 2, 6, 1}));
  const CLIPTokenizer t2(vocab, {{"a", "b"}, {"b", "c</w>"}, {"ab", "c</w>"}});
  EXPECT_EQ(t2.tokenize("abc"), (std::vector<std::string>{"abc</w>"}));
  EXPECT_EQ(t2.encode("x"), (std::vector<int64_t>{0, 1, 1}));  // unknown -> unk (<|endoftext|>)

  // From files: the first line of merges.txt is skipped whatever it holds.
  const std::string dir = temp_dir() + "/mini_tok";
  ASSERT_EQ(std::system(("mkdir -p '" + dir + "'").c_str()), 0);
  write_file(dir + "/vocab.json", nlohmann::json(vocab).dump());
  write_file(dir + "/merges.txt", "a b\nb c</w>\r\n");
  EXPECT_EQ(CLIPTokenizer::from_folder(dir).tokenize("abc"), (std::vector<std::string>{"a", "bc</w>"}));
}

// decode / convert_tokens_to_string: transformers' byte-level decoding, "</w>" -> " ", strip; a token that holds
// part of a character decodes to U+FFFD as Python's errors="replace" does ("Ã" is the symbol of byte 0xC3,
// "©" of 0xA9: "Ã©" is "é").
TEST(ClipTokenizerUnit, DecodeInvertsTheByteLevelBpe) {
  std::unordered_map<std::string, int64_t> vocab{
      {"<|startoftext|>", 0}, {"<|endoftext|>", 1}, {"a", 2}, {"b", 3}, {"c</w>", 4}, {"ab", 5}, {"bc</w>", 6}};
  const CLIPTokenizer t(vocab, {{"b", "c</w>"}, {"a", "b"}});
  EXPECT_EQ(t.decode(t.encode("abc"), /*skip_special_tokens=*/true), "abc");
  EXPECT_EQ(t.decode({2, 4, 3, 4}), "ac bc");
  EXPECT_EQ(t.id_to_token(6), "bc</w>");
  expect_throw_with<InvalidArgument>([&] { t.id_to_token(99); }, "99");
  EXPECT_EQ(t.convert_tokens_to_string({"\xc3\x83\xc2\xa9</w>"}), "\xc3\xa9");  // "Ã©</w>" -> "é"
  EXPECT_EQ(t.convert_tokens_to_string({"\xc3\x83"}), "\xef\xbf\xbd");          // "Ã" alone -> U+FFFD
  EXPECT_EQ(t.convert_tokens_to_string({"a</w>", "bc</w>"}), "a bc");
}

TEST(ClipTokenizerUnit, FileErrorsNameThePath) {
  const std::string missing = temp_dir() + "/no_such_tokenizer";
  expect_throw_with<InvalidArgument>([&] { CLIPTokenizer::from_folder(missing); }, missing + "/vocab.json");
  {
    const std::string dir = copy_tokenizer("no_merges");
    std::remove((dir + "/merges.txt").c_str());
    expect_throw_with<InvalidArgument>([&] { CLIPTokenizer::from_folder(dir); }, dir + "/merges.txt");
  }
  {
    const std::string dir = copy_tokenizer("bad_vocab");
    write_file(dir + "/vocab.json", "{\"a\": 1,");
    expect_throw_with<FormatError>([&] { CLIPTokenizer::from_folder(dir); }, dir + "/vocab.json");
    write_file(dir + "/vocab.json", "{\"a\": \"one\"}");
    expect_throw_with<FormatError>([&] { CLIPTokenizer::from_folder(dir); }, "must be an integer");
    // Without tokenizer_config.json's added_tokens_decoder the special tokens must be in the vocabulary.
    std::remove((dir + "/tokenizer_config.json").c_str());
    std::remove((dir + "/special_tokens_map.json").c_str());
    write_file(dir + "/vocab.json", "{\"a\": 1, \"<|endoftext|>\": 2}");
    expect_throw_with<FormatError>([&] { CLIPTokenizer::from_folder(dir); },
                                   "bos_token \"<|startoftext|>\" is not in the vocabulary");
  }
}

TEST(ClipTokenizerUnit, ThreadSafeCache) {
  const auto& tok = tiny_tokenizer();
  const std::string p = "a castle on a hill under a starry night sky, fantasy art";
  const auto expected = tok.encode(p);
  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      for (int i = 0; i < 200; ++i)
        if (tok.encode(p) != expected) ++bad;
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
}
}  // namespace
}  // namespace dmx::test
