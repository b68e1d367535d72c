// Test labels (docs/testing.md). A test's label is the suffix of its suite's name: Unit, Tiny, Golden, Cli or
// Slow; tests/labels.cmake gives ctest the same label. Two checks keep the names honest:
//  - after every test, a listener compares what the test used (test_util.h: note_use) with its label, and
//    fails the test on a mismatch: fixtures read outside a *Golden suite, a *Golden test that ran without
//    reading them, the dmx binary started outside a *Cli (or *Golden) suite, a *Cli test that never started
//    it, a tiny model built in a *Unit suite;
//  - LabelsUnit reads the test sources, so that every suite has a label even where a test is skipped.
#include <gtest/gtest.h>

#include <dirent.h>

#include <fstream>
#include <regex>
#include <sstream>

#include "test_util.h"

namespace dmx::test {

// "unit", "tiny", "golden", "cli", "slow" or "" for a suite name (parameterised prefixes and DISABLED_ removed).
std::string label_of_suite(std::string suite) {
  const size_t slash = suite.find('/');
  if (slash != std::string::npos) suite = suite.substr(slash + 1);
  if (suite.rfind("DISABLED_", 0) == 0) suite = suite.substr(9);
  for (const char* l : {"Unit", "Tiny", "Golden", "Cli", "Slow"}) {
    const std::string s = l;
    if (suite.size() > s.size() && suite.compare(suite.size() - s.size(), s.size(), s) == 0) {
      std::string lower = s;
      for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      return lower;
    }
  }
  return "";
}

namespace {

// What a test used that its label does not allow ("" when it is consistent).
std::string label_mismatch(const std::string& suite, unsigned uses, bool skipped) {
  const std::string label = label_of_suite(suite);
  const std::string where = "suite " + suite + ": ";
  if (label.empty())
    return where + "no label: end the suite's name in Unit, Tiny, Golden, Cli or Slow (docs/testing.md)";
  if (label == "slow") return "";
  if ((uses & (kUsedFixtures | kAskedFixtures)) && label != "golden")
    return where + "labelled " + label + " but looks at ../shared/fixtures: name it *Golden, or use tiny_models.h";
  if (label == "golden" && !skipped && !(uses & kUsedFixtures))
    return where + "named *Golden but never read ../shared/fixtures: label it by what it uses";
  if ((uses & kUsedCli) && label != "cli" && label != "golden")
    return where + "labelled " + label + " but starts the dmx binary: name it *Cli, or call the API in-process";
  if (label == "cli" && !skipped && !(uses & kUsedCli))
    return where + "named *Cli but never started the dmx binary: label it by what it uses";
  if ((uses & kUsedTinyModel) && label == "unit") return where + "labelled unit but builds a tiny model: name it *Tiny";
  return "";
}

class LabelCheck : public ::testing::EmptyTestEventListener {
  void OnTestStart(const ::testing::TestInfo&) override { reset_uses(); }
  // Runs before the result printer's OnTestEnd (end events go to listeners in reverse order), so a failure
  // added here is reported with the test.
  void OnTestEnd(const ::testing::TestInfo& info) override {
    const std::string problem =
        label_mismatch(info.test_suite_name(), uses_of_current_test(), info.result()->Skipped());
    if (!problem.empty()) ADD_FAILURE() << "[label] " << problem;
  }
};

[[maybe_unused]] const bool g_registered = [] {
  ::testing::UnitTest::GetInstance()->listeners().Append(new LabelCheck);
  return true;
}();

std::vector<std::string> test_sources() {
  const std::string dir = std::string(DMX_SOURCE_DIR) + "/tests";
  std::vector<std::string> out;
  if (DIR* d = opendir(dir.c_str())) {
    while (dirent* e = readdir(d)) {
      const std::string n = e->d_name;
      if (n.size() > 4 && n.compare(n.size() - 4, 4, ".cpp") == 0) out.push_back(dir + "/" + n);
    }
    closedir(d);
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST(LabelsUnit, SuffixGivesTheLabel) {
  EXPECT_EQ(label_of_suite("ClipTokenizerUnit"), "unit");
  EXPECT_EQ(label_of_suite("UNetTiny"), "tiny");
  EXPECT_EQ(label_of_suite("Variants/UNetGolden"), "golden");
  EXPECT_EQ(label_of_suite("DISABLED_KernelBenchSlow"), "slow");
  EXPECT_EQ(label_of_suite("P2PCli"), "cli");
  EXPECT_EQ(label_of_suite("Checkpoint"), "");
  EXPECT_EQ(label_of_suite("Unit"), "");  // a suffix needs a name in front of it
  EXPECT_EQ(label_of_suite("GoldenTiles"), "");
}

TEST(LabelsUnit, MismatchesAreCaught) {
  EXPECT_EQ(label_mismatch("XGolden", kUsedFixtures | kAskedFixtures, false), "");
  EXPECT_EQ(label_mismatch("XGolden", kAskedFixtures, true), "");  // skipped: fixtures absent
  EXPECT_NE(label_mismatch("XGolden", kAskedFixtures, false), "");
  EXPECT_NE(label_mismatch("XGolden", 0, false), "");
  EXPECT_EQ(label_mismatch("XGolden", kUsedFixtures | kUsedCli, false), "");
  EXPECT_NE(label_mismatch("XTiny", kUsedFixtures, false), "");
  EXPECT_NE(label_mismatch("XTiny", kAskedFixtures, true), "");
  EXPECT_NE(label_mismatch("XUnit", kUsedCli, false), "");
  EXPECT_NE(label_mismatch("XUnit", kUsedTinyModel, false), "");
  EXPECT_EQ(label_mismatch("XTiny", kUsedTinyModel, false), "");
  EXPECT_EQ(label_mismatch("XUnit", 0, false), "");
  EXPECT_EQ(label_mismatch("XCli", kUsedCli | kUsedTinyModel, false), "");
  EXPECT_NE(label_mismatch("XCli", kUsedTinyModel, false), "");
  EXPECT_NE(label_mismatch("XCli", kUsedFixtures | kUsedCli, false), "");
  EXPECT_EQ(label_mismatch("XSlow", kUsedFixtures | kUsedCli | kUsedTinyModel, false), "");
  EXPECT_NE(label_mismatch("Plain", 0, false), "");
}

// Every TEST/TEST_F/TEST_P in tests/*.cpp names a labelled suite, skipped or not; the binary is started only
// through test_util's cli_path() (which tells the label check).
TEST(LabelsUnit, EverySuiteInTheSourcesHasALabel) {
  const std::regex test_macro(R"((^|\n)\s*TEST(_F|_P)?\(\s*(\w+)\s*,)");
  int suites = 0;
  for (const auto& path : test_sources()) {
    const std::string src = slurp(path);
    for (auto it = std::sregex_iterator(src.begin(), src.end(), test_macro); it != std::sregex_iterator(); ++it) {
      ++suites;
      EXPECT_NE(label_of_suite((*it)[3].str()), "") << path << ": suite " << (*it)[3].str() << " has no label";
    }
    if (path.size() < 14 || path.compare(path.size() - 14, 14, "/test_util.cpp") != 0) {
      EXPECT_EQ(src.find(std::string("DMX_CLI_") + "PATH"), std::string::npos)
          << path << ": start the dmx binary through cli_path() or dmx_run() (test_util.h)";
    }
  }
  EXPECT_GT(suites, 200);
}
}  // namespace
}  // namespace dmx::test
