#include "core/output_plan.h"

#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "core/fs.h"
#include "dmx/error.h"

namespace dmx {

namespace fs = std::filesystem;

namespace {

// Bytes a folder output needs below its own path for what the command puts in it (the longest relative path
// dmx writes inside a model folder or a training folder, with its temporary suffix), so that PATH_MAX is
// checked before the work and not at the last file.
constexpr size_t kFolderReserve = 96;
// Symlinked entries of input folders are followed this deep, looking at this many entries at most.
constexpr int kInputScanDepth = 2;
constexpr size_t kInputScanEntries = 4096;

std::string parent_dir(const std::string& path) {
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  const size_t slash = p.find_last_of('/');
  return slash == std::string::npos ? "." : (slash == 0 ? "/" : p.substr(0, slash));
}

std::string base_name(const std::string& path) {
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  const size_t slash = p.find_last_of('/');
  return slash == std::string::npos ? p : p.substr(slash + 1);
}

bool folder_is_empty(const std::string& dir) {
  std::error_code ec;
  return fs::is_empty(dir, ec) && !ec;
}

struct ResolvedInput {
  PathIdentity id;
  std::string param, path, via;  // via: the symlink inside the input folder that leads here ("" = the input itself)
  bool may_be_in_work_folder;
};

// The input itself, and the targets of symlinks inside an input folder (a model folder of links into a
// cache, as huggingface_hub makes them): writing to a link's target would change the input as well.
void resolve_input(const std::string& path, const std::string& param, bool in_work, std::vector<ResolvedInput>* out) {
  const PathIdentity id = identify_path(path, true);
  if (!id.exists) return;  // a missing input is the command's own error (named there)
  out->push_back({id, param, path, "", in_work});
  if (!id.is_dir) return;
  size_t seen = 0;
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(id.resolved, fs::directory_options::skip_permission_denied, ec);
       !ec && it != fs::recursive_directory_iterator() && seen < kInputScanEntries; it.increment(ec), ++seen) {
    if (it.depth() >= kInputScanDepth) it.disable_recursion_pending();
    if (!it->is_symlink(ec)) continue;
    const PathIdentity target = identify_path(it->path().string(), true);
    if (target.exists) out->push_back({target, param, path, it->path().string(), in_work});
  }
}

std::string describe(const std::string& param, const std::string& path) { return param + " '" + path + "'"; }

}  // namespace

void OutputPlan::input(const std::string& path, const std::string& param, bool may_be_in_work_folder) {
  if (!path.empty()) inputs_.push_back({path, param, may_be_in_work_folder});
}

void OutputPlan::file(const std::string& path, const std::string& param, const std::string& ext) {
  outputs_.push_back({path, param, ext, "file", Kind::File, {}, nullptr});
}

void OutputPlan::folder(const std::string& path, const std::string& param, const std::vector<std::string>& markers,
                        const std::string& kind) {
  outputs_.push_back({path, param, "", kind, Kind::Folder, markers, nullptr});
}

void OutputPlan::work_folder(const std::string& path, const std::string& param, ExistingRule rule) {
  outputs_.push_back({path, param, "", "folder", Kind::Work, {}, std::move(rule)});
}

void OutputPlan::check() const {
  std::vector<std::string> problems;
  auto fail = [&](const std::string& s) { problems.push_back(s); };

  std::vector<ResolvedInput> inputs;
  for (const auto& in : inputs_) resolve_input(in.path, in.param, in.may_be_in_work_folder, &inputs);
  // Work folders are written through a symlink (files are added inside); files and folders are renamed over the
  // path itself, so a symlink there is replaced, never followed.
  std::vector<PathIdentity> ids;
  for (const auto& o : outputs_) ids.push_back(identify_path(o.path, o.kind == Kind::Work));
  std::vector<bool> conflict(outputs_.size(), false);

  // 1. Outputs against inputs: never the same, never one inside the other.
  for (size_t i = 0; i < outputs_.size(); ++i) {
    const Output& o = outputs_[i];
    if (ids[i].resolved.empty()) continue;
    for (const auto& in : inputs) {
      if (o.kind == Kind::Work && in.may_be_in_work_folder) continue;
      const std::string via = in.via.empty() ? "" : " (through its symlink '" + in.via + "')";
      if (path_within(ids[i], in.id)) {
        const bool same = ids[i].resolved == in.id.resolved ||
                          (ids[i].exists && !ids[i].chain.empty() && ids[i].chain[0] == in.id.chain[0]);
        fail(describe(o.param, o.path) + (same ? " is the input " : " lies inside the input ") +
             describe(in.param, in.path) + via + ": dmx never writes over or into its inputs");
        conflict[i] = true;
        break;
      }
      if (o.kind != Kind::File && path_within(in.id, ids[i])) {
        fail(describe(o.param, o.path) + " contains the input " + describe(in.param, in.path) + via +
             ": dmx never writes a folder that holds its inputs");
        conflict[i] = true;
        break;
      }
    }
  }
  // 2. Outputs against each other.
  for (size_t i = 0; i < outputs_.size(); ++i)
    for (size_t j = i + 1; j < outputs_.size(); ++j) {
      if (ids[i].resolved.empty() || ids[j].resolved.empty()) continue;
      const bool ij = path_within(ids[i], ids[j]), ji = path_within(ids[j], ids[i]);
      if (!ij && !ji) continue;
      const std::string a = describe(outputs_[i].param, outputs_[i].path);
      const std::string b = describe(outputs_[j].param, outputs_[j].path);
      if (ij && ji)
        fail(a + " and " + b + " are the same path: each output needs its own");
      else
        fail((ij ? a : b) + " lies inside " + (ij ? b : a) + ": each output needs its own path");
      conflict[i] = conflict[j] = true;
    }

  // 3. Each output: its name, its folder, what is there already.
  for (size_t i = 0; i < outputs_.size(); ++i) {
    const Output& o = outputs_[i];
    const PathIdentity& id = ids[i];
    const std::string what = describe(o.param, o.path);
    if (o.path.empty()) {
      fail(o.param + ": no path given");
      continue;
    }
    if (!o.ext.empty() &&
        (o.path.size() <= o.ext.size() || o.path.compare(o.path.size() - o.ext.size(), o.ext.size(), o.ext) != 0)) {
      fail(o.param + " must end in " + o.ext + ", got '" + o.path + "'");
      continue;
    }
    if (conflict[i]) continue;  // said above
    const std::string parent = parent_dir(o.path), name = base_name(o.path);
    if (name == "." || name == ".." || name == "/") {
      fail(what + ": give a path that names the " + (o.kind == Kind::File ? "file" : "folder") + " to write");
      continue;
    }
    if (id.resolved.empty() || !is_directory(parent)) {
      fail(what + ": output directory does not exist: '" + parent + "'");
      continue;
    }
    const bool existing_work = o.kind == Kind::Work && id.exists;  // written inside, not beside
    if (!existing_work && ::access(parent.c_str(), W_OK | X_OK) != 0) {
      fail(what + ": cannot write into the folder '" + parent + "' (" + std::strerror(errno) + ")");
      continue;
    }
    long name_max = ::pathconf(parent.c_str(), _PC_NAME_MAX);
    if (name_max <= 0) name_max = NAME_MAX;
    if (name.size() + kTempSuffixMax > static_cast<size_t>(name_max)) {
      fail(detail::concat(what, ": the name is ", name.size(), " bytes; with the temporary suffix (.tmp.<pid>, up to ",
                          kTempSuffixMax, " bytes) it must fit the filesystem's ", name_max, "-byte limit: at most ",
                          static_cast<size_t>(name_max) - kTempSuffixMax, " bytes"));
      continue;
    }
    const size_t reserve = o.kind == Kind::File ? 0 : kFolderReserve;
    if (o.path.size() + kTempSuffixMax + reserve >= PATH_MAX ||
        id.resolved.size() + kTempSuffixMax + reserve >= PATH_MAX) {
      fail(detail::concat(what, ": the path is ", std::max(o.path.size(), id.resolved.size()),
                          " bytes; with the temporary suffix", reserve ? " and the files inside" : "",
                          " it must stay under PATH_MAX (", PATH_MAX, "): at most ",
                          PATH_MAX - 1 - kTempSuffixMax - reserve, " bytes"));
      continue;
    }
    if (!id.exists) continue;
    switch (o.kind) {
      case Kind::File:
        if (id.is_dir)
          fail(what + " is a folder; give the path of a file" + (o.ext.empty() ? "" : " ending in " + o.ext));
        else if (!overwrite_)
          fail(what + " already exists; pass --overwrite to replace it, or choose another path");
        break;
      case Kind::Folder: {
        if (!id.is_dir) {
          fail(what + " exists and is not a folder; choose another path");
          break;
        }
        if (!overwrite_) {
          fail(what + " already exists; pass --overwrite to replace it (and everything in it), or choose another path");
          break;
        }
        bool ours = folder_is_empty(o.path);
        for (const auto& m : o.markers) ours = ours || path_exists(join_path(o.path, m));
        if (!ours) {
          std::string list;
          for (const auto& m : o.markers) list += (list.empty() ? "" : ", ") + m;
          fail(what + " is not a " + o.kind_name + " (it has none of " + list +
               "): --overwrite replaces only empty folders and folders of the kind this command writes; "
               "remove it yourself or choose another path");
        }
        break;
      }
      case Kind::Work: {
        if (!id.is_dir) {
          fail(what + " exists and is not a folder; choose another path");
          break;
        }
        if (::access(id.resolved.c_str(), W_OK | X_OK) != 0) {
          fail(what + ": cannot write into it (" + std::strerror(errno) + ")");
          break;
        }
        if (o.rule) {
          const std::string why = o.rule(o.path);
          if (!why.empty()) fail(what + " " + why);
        }
        break;
      }
    }
  }

  if (problems.empty()) return;
  std::string msg = problems[0];
  for (size_t i = 1; i < problems.size(); ++i) msg += "; " + problems[i];
  throw InvalidArgument(msg);
}

void OutputPlan::prepare() const {
  check();
  for (const auto& o : outputs_) {
    const std::string name = base_name(o.path);
    remove_stale_temporaries(parent_dir(o.path), [&](const std::string& n) { return n == name; });
  }
}

}  // namespace dmx
