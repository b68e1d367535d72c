// Cross-attention maps as pictures (see attention_maps.h).
#include "extensions/attention_maps.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <map>

#include "dmx/error.h"

namespace dmx::extensions {

namespace {
// 5x7 glyphs, one byte per row, bit 4 = leftmost column.
const std::map<char, std::array<uint8_t, 7>>& font() {
  static const std::map<char, std::array<uint8_t, 7>> f = {
      {' ', {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00}},  {'!', {0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x04}},
      {'\'', {0x0C, 0x04, 0x08, 0x00, 0x00, 0x00, 0x00}}, {'(', {0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02}},
      {')', {0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08}},  {'+', {0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00}},
      {',', {0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08}},  {'-', {0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00}},
      {'.', {0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C}},  {'/', {0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00}},
      {'0', {0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E}},  {'1', {0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E}},
      {'2', {0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F}},  {'3', {0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E}},
      {'4', {0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02}},  {'5', {0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E}},
      {'6', {0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E}},  {'7', {0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08}},
      {'8', {0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E}},  {'9', {0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C}},
      {':', {0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00}},  {'<', {0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02}},
      {'=', {0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00}},  {'>', {0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08}},
      {'?', {0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04}},  {'_', {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F}},
      {'a', {0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F}},  {'b', {0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E}},
      {'c', {0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E}},  {'d', {0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F}},
      {'e', {0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E}},  {'f', {0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08}},
      {'g', {0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E}},  {'h', {0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11}},
      {'i', {0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E}},  {'j', {0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0C}},
      {'k', {0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12}},  {'l', {0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E}},
      {'m', {0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11}},  {'n', {0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11}},
      {'o', {0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E}},  {'p', {0x00, 0x00, 0x1E, 0x11, 0x1E, 0x10, 0x10}},
      {'q', {0x00, 0x00, 0x0D, 0x13, 0x0F, 0x01, 0x01}},  {'r', {0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10}},
      {'s', {0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E}},  {'t', {0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06}},
      {'u', {0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D}},  {'v', {0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04}},
      {'w', {0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A}},  {'x', {0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11}},
      {'y', {0x00, 0x00, 0x11, 0x11, 0x0F, 0x01, 0x0E}},  {'z', {0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F}},
      {'|', {0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04}},
  };
  return f;
}

void put(Image& img, int x, int y, uint8_t r, uint8_t g, uint8_t b) {
  if (x < 0 || y < 0 || x >= img.width || y >= img.height) return;
  uint8_t* p = &img.data[(static_cast<size_t>(y) * img.width + x) * 3];
  p[0] = r, p[1] = g, p[2] = b;
}
}  // namespace

void draw_text(Image& img, int x, int y, const std::string& text, int scale, uint8_t r, uint8_t g, uint8_t b) {
  DMX_CHECK_ARG(img.channels == 3, "draw_text needs an RGB image, got ", img.channels, " channels");
  static const std::array<uint8_t, 7> box{0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F};
  int cx = x;
  for (char ch : text) {
    const char lower = (ch >= 'A' && ch <= 'Z') ? static_cast<char>(ch - 'A' + 'a') : ch;
    auto it = font().find(lower);
    const auto& glyph = it != font().end() ? it->second : box;
    for (int row = 0; row < 7; ++row)
      for (int col = 0; col < 5; ++col)
        if (glyph[row] & (0x10 >> col))
          for (int dy = 0; dy < scale; ++dy)
            for (int dx = 0; dx < scale; ++dx) put(img, cx + col * scale + dx, y + row * scale + dy, r, g, b);
    cx += 6 * scale;
  }
}

at::Tensor average_cross_attention(const AttentionStore& store, int64_t latent_h, int64_t latent_w, int64_t* res) {
  at::NoGradGuard no_grad;
  const int64_t target = (latent_h / 4) * (latent_w / 4);
  int64_t best = -1;
  for (const auto& e : store.entries()) {
    if (!e.second.site.is_cross) continue;
    const int64_t nq = e.second.sum.size(2);
    const int64_t r = static_cast<int64_t>(std::lround(std::sqrt(static_cast<double>(nq))));
    if (r * r != nq) continue;
    if (best < 0 || std::llabs(nq - target) < std::llabs(best - target) ||
        (std::llabs(nq - target) == std::llabs(best - target) && nq > best))
      best = nq;
  }
  DMX_CHECK_ARG(best > 0, "attention maps: no square cross-attention maps were stored");
  const int64_t r = static_cast<int64_t>(std::lround(std::sqrt(static_cast<double>(best))));
  std::vector<at::Tensor> maps;
  for (const auto& e : store.entries()) {
    if (!e.second.site.is_cross || e.second.sum.size(2) != best) continue;
    const at::Tensor avg = store.average(e.first);  // [P, H, Nq, L]
    maps.push_back(avg.reshape({avg.size(0), avg.size(1), r, r, avg.size(3)}));
  }
  at::Tensor all = at::cat(maps, 1);  // [P, S*H, r, r, L]
  if (res) *res = r;
  return all.mean(1);  // [P, r, r, L]
}

Image attention_map_grid(const AttentionStore& store, const std::vector<std::string>& prompts,
                         const models::CLIPTokenizer& tok, int64_t latent_h, int64_t latent_w, int cell) {
  DMX_CHECK_ARG(cell >= 16 && cell <= 1024, "attention map cell size must be in [16, 1024], got ", cell);
  int64_t r = 0;
  const at::Tensor maps = average_cross_attention(store, latent_h, latent_w, &r);  // [P, r, r, L]
  DMX_CHECK_ARG(maps.size(0) == static_cast<int64_t>(prompts.size()), "attention maps: stored ", maps.size(0),
                " prompts, got ", prompts.size(), " prompt texts");
  std::vector<std::vector<std::string>> labels;
  size_t cols = 1;
  for (const auto& p : prompts) {
    labels.push_back(token_texts(tok, p));
    const size_t max_tokens = static_cast<size_t>(maps.size(3)) - 2;  // BOS and EOS kept out
    if (labels.back().size() > max_tokens) labels.back().resize(max_tokens);
    cols = std::max(cols, labels.back().size());
  }
  const int scale = cell >= 64 ? 2 : 1;
  const int label_h = 7 * scale + 6, pad = 4;
  Image img;
  img.channels = 3;
  img.width = static_cast<int>(cols) * (cell + pad) + pad;
  img.height = static_cast<int>(prompts.size()) * (cell + label_h + pad) + pad;
  img.data.assign(static_cast<size_t>(img.width) * img.height * 3, 255);
  for (size_t p = 0; p < prompts.size(); ++p) {
    for (size_t k = 0; k < labels[p].size(); ++k) {
      at::Tensor m = maps[static_cast<int64_t>(p)].select(-1, static_cast<int64_t>(k) + 1);  // [r, r]
      // Stretched to [0, 1] per map (the reference divides by the maximum only; near-uniform maps of weak or
      // random models then show as flat white).
      const double lo = m.min().item<double>(), hi = m.max().item<double>();
      m = (m - lo) / std::max(hi - lo, 1e-12);
      m = at::upsample_bilinear2d(m.view({1, 1, r, r}), {cell, cell}, false).view({cell, cell}).clamp(0, 1);
      const at::Tensor u8 = (m * 255).round().to(at::kByte).contiguous();
      const uint8_t* src = u8.data_ptr<uint8_t>();
      const int x0 = pad + static_cast<int>(k) * (cell + pad);
      const int y0 = pad + static_cast<int>(p) * (cell + label_h + pad);
      for (int y = 0; y < cell; ++y)
        for (int x = 0; x < cell; ++x) {
          const uint8_t v = src[y * cell + x];
          put(img, x0 + x, y0 + y, v, v, v);
        }
      std::string label = labels[p][k];
      const size_t fit = static_cast<size_t>(std::max(1, cell / (6 * scale)));
      if (label.size() > fit) label.resize(fit);
      const int tw = static_cast<int>(label.size()) * 6 * scale;
      draw_text(img, x0 + std::max(0, (cell - tw) / 2), y0 + cell + 3, label, scale, 0, 0, 0);
    }
  }
  return img;
}
}  // namespace dmx::extensions
