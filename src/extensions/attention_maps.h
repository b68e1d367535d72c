// Cross-attention maps as pictures (Hertz et al. 2022, Fig. 4; the reference notebooks' show_cross_attention):
// per-token heat maps of each prompt, averaged over the denoising steps, the heads and the cross-attention
// layers at a quarter of the latent side (16x16 for 64x64 latents; the stored resolution closest to that for
// smaller models), each stretched to [0, 1], laid out one row per prompt with the token under each map.
#pragma once
#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "core/image.h"
#include "extensions/prompt_to_prompt.h"
#include "models/clip_tokenizer.h"

namespace dmx::extensions {

// [P, r, r, L] maps averaged over steps, heads and the chosen sites; r is returned through res.
at::Tensor average_cross_attention(const AttentionStore& store, int64_t latent_h, int64_t latent_w, int64_t* res);

// One row per prompt, one cell (cell x cell pixels + a label strip) per token (BOS/EOS left out).
Image attention_map_grid(const AttentionStore& store, const std::vector<std::string>& prompts,
                         const models::CLIPTokenizer& tok, int64_t latent_h, int64_t latent_w, int cell = 96);

// Draws text with a built-in 5x7 bitmap font (lower-case letters, digits, common punctuation; others as a
// box) at (x, y), scale pixels per font pixel, into an RGB image.
void draw_text(Image& img, int x, int y, const std::string& text, int scale, uint8_t r, uint8_t g, uint8_t b);
}  // namespace dmx::extensions
