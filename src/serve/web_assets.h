// The web page's files (web/ in the repository), embedded into the binary at build time
// (cmake/embed_files.cmake writes web_assets.cpp in the build folder): no CDN, no files to install.
#pragma once
#include <cstddef>
#include <string>

namespace dmx::serve {
struct WebAsset {
  const char* name;  // "index.html", "app.js", ...
  const char* mime;
  const char* data;
  size_t size;
};
// nullptr when there is no such file.
const WebAsset* find_web_asset(const std::string& name);
}  // namespace dmx::serve
