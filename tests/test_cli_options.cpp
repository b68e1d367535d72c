// The CLI's option table (src/cli/options.cpp): every option declared once, every help default read from the
// options struct and equal to it, every command's help listing the shared options, and the binary printing
// exactly that help.
#include <gtest/gtest.h>

#include <set>
#include <string>
#include <vector>

#include "cli/options.h"
#include "dmx/dmx.h"
#include "dmx/p2p.h"
#include "test_util.h"

namespace {

using namespace dmx::cli;

// argv for Args::parse: {"dmx", <command words>, args...}.
struct Argv {
  std::vector<std::string> words;
  std::vector<char*> ptrs;
  Argv(const CommandInfo& c, std::vector<std::string> args) {
    words.push_back("dmx");
    const std::string name = c.name;
    for (size_t i = 0; i <= name.size();) {
      size_t j = name.find(' ', i);
      if (j == std::string::npos) j = name.size();
      words.push_back(name.substr(i, j - i));
      i = j + 1;
    }
    words.insert(words.end(), args.begin(), args.end());
    for (auto& w : words) ptrs.push_back(w.data());
  }
  int argc() { return static_cast<int>(ptrs.size()); }
};

// f throws InvalidArgument with `needle` in its message.
template <class F>
void expect_invalid(F f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no error; expected: " << needle;
  } catch (const dmx::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

// Every value the help of each command shows, read back from a target.
std::vector<std::string> shown_values(Command c, const Target& t) {
  std::vector<std::string> out;
  for (const Option& o : option_table())
    if (const Use* u = use_for(o, c)) out.push_back(o.name + "=" + (u->show ? u->show(t) : ""));
  return out;
}

TEST(CliOptionsUnit, EveryOptionIsDeclaredOnceWithOneMeaningPerCommand) {
  std::set<std::string> names;
  for (const Option& o : option_table()) {
    EXPECT_TRUE(names.insert(o.name).second) << "--" << o.name << " is declared twice";
    EXPECT_FALSE(o.uses.empty()) << o.name;
    Commands seen = 0;
    for (const Use& u : o.uses) {
      EXPECT_NE(u.commands, 0u) << "--" << o.name << ": a use with no command";
      EXPECT_EQ(seen & u.commands, 0u) << "--" << o.name << " has two meanings for one command";
      seen |= u.commands;
      EXPECT_FALSE(u.help.empty()) << o.name;
    }
  }
  // The commands of the table are the ones dispatched, each with a distinct bit and name.
  std::set<std::string> cmds;
  Commands bits = 0;
  for (const CommandInfo& c : commands()) {
    EXPECT_TRUE(cmds.insert(c.name).second) << c.name;
    EXPECT_EQ(bits & c.id, 0u) << c.name;
    bits |= c.id;
    EXPECT_EQ(find_command(c.name), &c);
  }
  EXPECT_EQ(bits, kAllCommands);
}

// Parsing nothing leaves the default-constructed struct; each help default is that struct's value; and giving
// the shown default back as the value (--steps 50) parses to the same value: the help cannot drift.
TEST(CliOptionsUnit, HelpDefaultsAreTheStructDefaults) {
  int checked = 0;
  for (const CommandInfo& c : commands()) {
    with_default_target(c.id, [&](const Target& defaults) {
      const std::string help = help_text(c.id);
      for (const Option& o : option_table()) {
        const Use* u = use_for(o, c.id);
        if (!u || !u->show) continue;
        const std::string shown = u->show(defaults);
        const std::string line = help_line(*u, defaults);
        if (!shown.empty()) {
          EXPECT_NE(line.find("(default " + shown + ")"), std::string::npos)
              << c.name << " --" << o.name << ": " << line;
        } else if (!u->unset.empty()) {
          EXPECT_NE(line.find("(default: " + u->unset + ")"), std::string::npos) << c.name << " --" << o.name;
        }
        EXPECT_NE(help.find(line), std::string::npos) << c.name << " --" << o.name;
        if (shown.empty() || u->repeatable || !u->set) continue;
        // Round trip: parse `--name <shown>` into a fresh default struct; every shown value stays the default.
        with_default_target(c.id, [&](const Target& t) {
          Argv argv(c, {"--" + o.name, shown});
          std::optional<Args> a = parse_args(c.id, argv.argc(), argv.ptrs.data(), t);
          ASSERT_TRUE(a.has_value());
          apply_options(*a, t);
          EXPECT_EQ(shown_values(c.id, t), shown_values(c.id, defaults)) << c.name << " --" << o.name << " " << shown;
          ++checked;
        });
      }
      // Parsing nothing changes nothing.
      with_default_target(c.id, [&](const Target& t) {
        Argv argv(c, {});
        std::optional<Args> a = parse_args(c.id, argv.argc(), argv.ptrs.data(), t);
        ASSERT_TRUE(a.has_value());
        apply_options(*a, t);
        EXPECT_EQ(shown_values(c.id, t), shown_values(c.id, defaults)) << c.name;
      });
    });
  }
  EXPECT_GT(checked, 60);
  // Spot checks against the public structs themselves.
  EXPECT_NE(help_text(kGenerate).find("--guidance-scale G"), std::string::npos);
  EXPECT_NE(help_text(kGenerate).find("(default " + format_number(dmx::GenerateOptions().guidance_scale) + ")"),
            std::string::npos);
  EXPECT_NE(help_text(kEval).find("denoising steps (default 25)"), std::string::npos);
  EXPECT_NE(help_text(kGenerate).find("denoising steps (default 50)"), std::string::npos);
  EXPECT_EQ(format_number(7.5), "7.5");
  EXPECT_EQ(format_number(1e-8), "1e-8");
  EXPECT_EQ(format_number(1e30), "1e30");
  EXPECT_EQ(format_number(2e-3), "0.002");
  EXPECT_EQ(format_number(200.0), "200");
  EXPECT_EQ(format_number(0.9999), "0.9999");
}

// Every handler writes a field the command's struct has (a value is parsed into each row of each command).
TEST(CliOptionsUnit, EveryHandlerWritesTheCommandsStruct) {
  for (const CommandInfo& c : commands()) {
    for (const Option& o : option_table()) {
      const Use* u = use_for(o, c.id);
      if (!u || !u->set) continue;
      with_default_target(c.id, [&](const Target& t) {
        std::vector<std::string> args = {"--" + o.name};
        if (!u->value_name.empty()) args.push_back(u->show && !u->show(t).empty() ? u->show(t) : "8");
        Argv argv(c, args);
        std::optional<Args> a = parse_args(c.id, argv.argc(), argv.ptrs.data(), t);
        ASSERT_TRUE(a.has_value());
        try {
          apply_options(*a, t);
        } catch (const dmx::InvalidArgument&) {  // a value this row refuses: the rule, not the table, spoke
        }
      });
    }
  }
  // The shared groups reach the command's struct: --steps of generate writes GenerateOptions::steps.
  dmx::GenerateOptions g;
  Argv argv(command_info(kGenerate), {"--steps", "7", "--threads", "3", "--model", "m", "--dtype", "bf16", "--quiet"});
  std::optional<Args> a = parse_options(kGenerate, argv.argc(), argv.ptrs.data(), g);
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ(g.steps, 7);
  EXPECT_EQ(g.threads, 3);
  EXPECT_EQ(g.model, "m");
  EXPECT_EQ(g.dtype, "bf16");
  EXPECT_FALSE(g.progress);
  // Errors keep naming the option, the rule and the value.
  dmx::P2POptions p;
  Argv bad(command_info(kP2P), {"--guidance-scale", "101"});
  expect_invalid([&] { parse_options(kP2P, bad.argc(), bad.ptrs.data(), p); },
                 "--guidance-scale must be in [0, 100], got 101");
  Argv missing(command_info(kP2P), {"--prompt", "x"});
  expect_invalid(
      [&] {
        parse_options(kP2P, missing.argc(), missing.ptrs.data(), p, {{"model", "a folder"}});
      },
      "--model is required (a folder)");
}

// Every command lists the options it shares with the others: --help and --verbose everywhere; --threads, --quiet,
// --overwrite where they apply; the model, sampling and run groups on every command whose struct embeds them.
TEST(CliOptionsUnit, EveryCommandsHelpListsTheSharedOptions) {
  auto lists = [](const std::string& help, const std::string& option) {
    return help.find("\n  --" + option + " ") != std::string::npos;
  };
  for (const CommandInfo& c : commands()) {
    const std::string help = help_text(c.id);
    EXPECT_EQ(help.rfind(std::string("usage: dmx ") + c.name + " [options]", 0), 0u) << help;
    for (const char* o : {"help", "verbose"}) EXPECT_TRUE(lists(help, o)) << c.name << " --" << o;
    if (c.id != kTrainBench && c.id != kBench) {
      EXPECT_TRUE(lists(help, "quiet")) << c.name;
    }
    with_default_target(c.id, [&](const Target& t) {
      std::vector<const char*> shared;
      if (t.model) shared.insert(shared.end(), {"model", "config", "tokenizer"});
      if (t.device) shared.insert(shared.end(), {"dtype", "device"});
      if (t.sampling) shared.insert(shared.end(), {"negative-prompt", "steps", "guidance-scale", "seed"});
      if (t.run) shared.insert(shared.end(), {"threads", "quiet", "verbose", "overwrite"});
      for (const char* o : shared) EXPECT_TRUE(lists(help, o)) << c.name << " --" << o;
    });
    // Every row that names the command is in its help, and only those.
    for (const Option& o : option_table())
      EXPECT_EQ(lists(help, o.name), use_for(o, c.id) != nullptr) << c.name << " --" << o.name;
  }
  for (Command c : {kGenerate, kP2P, kDiffEdit, kBench, kTrainLora, kTrainBench, kTrainClassifier, kEval})
    EXPECT_TRUE(lists(help_text(c), "threads")) << command_info(c).name;
}

// The binary prints the table's help (a command and a sub-command: each run starts libtorch).
TEST(CliOptionsCli, HelpIsTheTablesHelp) {
  for (Command c : {kGenerate, kTrainLora}) {
    std::vector<std::string> args;
    const std::string name = command_info(c).name;
    for (size_t i = 0; i <= name.size();) {
      size_t j = name.find(' ', i);
      if (j == std::string::npos) j = name.size();
      args.push_back(name.substr(i, j - i));
      i = j + 1;
    }
    args.push_back("--help");
    const dmx::test::CliRun r = dmx::test::dmx_run(args);
    EXPECT_EQ(r.code, 0) << name;
    EXPECT_EQ(r.output, help_text(c)) << name;
  }
}
}  // namespace
