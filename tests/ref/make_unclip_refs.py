#!/usr/bin/env python3
"""Small references for dmx's unCLIP component tests (tests/test_unclip.cpp) that ../shared/fixtures lacks,
computed by the reference harness (diffusers 0.27.2, transformers at the harness's pinned commit, Pillow 9.4,
torch 1.13.1, CPU, float32):

    pil_resize        Pillow's Image.resize on uint8 pictures (RGB and L; up, down, extreme down, one-axis),
                      BICUBIC on every case and the other filters (LANCZOS, BILINEAR, BOX, HAMMING) on some
    clip_processor    transformers' CLIPImageProcessor on pictures the fixtures do not have: portrait, RGBA,
                      gray, a crop larger than the resized picture (zero padding, by an even and an odd amount),
                      another size/crop/mean/std, an exact {"height","width"} resize with LANCZOS; with
                      transformers 4.44's center_crop (see center_crop_444: the harness pins the v4.37 branch point,
                      whose center_crop returned crop - 1 rows for an odd shortfall; PR #30934 fixed it)
    unclip_scheduler  diffusers' UnCLIPScheduler: timesteps for several step counts, and whole runs as Karlo's
                      UnCLIPPipeline and the Kandinsky prior pipelines drive it (prev_timestep = the next
                      timestep, None after the last): the Karlo prior (sample, clip 5, fixed_small_log), the
                      Kandinsky 2.2 prior (clip 10), the Karlo decoder (epsilon, learned_range); add_noise
    tiny_prior        a tiny random PriorTransformer with every size set apart (time_embed_dim, embedding_proj_dim,
                      clip_embed_dim, gelu time activation): weights, config, forward with and without the mask
    tiny_clip         a tiny random CLIPVisionModelWithProjection (gelu, patch 6) and CLIPTextModelWithProjection
                      (non-legacy eos_token_id: the pooled token is the first eos): weights, configs, outputs

Usage, with the harness of ../shared/ref set up (its README):
    . ../shared/ref/env.sh && $REF_PY tests/ref/make_unclip_refs.py [--out DIR]
DIR defaults to this folder. Writes unclip_refs.safetensors + unclip_refs.json and the tiny models' folders
(unclip_tiny_prior/, unclip_tiny_clip/). Two runs give bit-identical files.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("DMX_SHARED_DIR", os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared")))
sys.path.insert(0, os.path.join(SHARED, "ref"))
import reference as R  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

torch.set_num_threads(1)


def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def noise_picture(h, w, c, seed):
    return np.random.RandomState(seed).randint(0, 256, size=(h, w, c) if c > 1 else (h, w)).astype(np.uint8)


def pil_resize(T, J):
    import PIL.Image

    filters = {"lanczos": PIL.Image.LANCZOS, "bilinear": PIL.Image.BILINEAR, "bicubic": PIL.Image.BICUBIC,
               "box": PIL.Image.BOX, "hamming": PIL.Image.HAMMING}
    # name: (picture, out w, out h, filters)
    cases = {
        "fixture_like": (R.make_image(40, 56, seed=6), 44, 32, ["bicubic"]),
        "noise_down": (noise_picture(40, 56, 3, 1), 44, 32, list(filters)),
        "noise_up": (noise_picture(15, 21, 3, 2), 50, 37, list(filters)),
        "noise_far_down": (noise_picture(60, 90, 3, 3), 8, 6, ["bicubic", "lanczos", "box"]),
        "one_axis": (noise_picture(31, 64, 3, 4), 24, 31, ["bicubic"]),
        "gray_mixed": (noise_picture(17, 33, 1, 5), 20, 40, ["bicubic", "hamming"]),
        "smooth_wide": (R.make_image(96, 128, seed=7), 74, 56, ["bicubic"]),
    }
    J["pil_resize"] = {}
    for name, (arr, w, h, names) in cases.items():
        T[f"resize.{name}.input"] = torch.from_numpy(np.ascontiguousarray(arr))
        img = PIL.Image.fromarray(arr)
        for f in names:
            T[f"resize.{name}.{f}"] = torch.from_numpy(np.asarray(img.resize((w, h), resample=filters[f])).copy())
        J["pil_resize"][name] = {"width": w, "height": h, "filters": names}


def center_crop_444(image, size, data_format=None, input_data_format=None, return_numpy=None):
    """transformers 4.44's image_transforms.center_crop (after PR #30934: the padding is ceil((new - orig) / 2),
    so a crop larger than the picture by an odd amount has the crop's size), on the harness's helpers."""
    from math import ceil

    from transformers.image_transforms import to_channel_dimension_format
    from transformers.image_utils import ChannelDimension, get_image_size, infer_channel_dimension_format

    if input_data_format is None:
        input_data_format = infer_channel_dimension_format(image)
    output_data_format = data_format if data_format is not None else input_data_format
    image = to_channel_dimension_format(image, ChannelDimension.FIRST, input_data_format)
    orig_height, orig_width = get_image_size(image, ChannelDimension.FIRST)
    crop_height, crop_width = int(size[0]), int(size[1])
    top = (orig_height - crop_height) // 2
    bottom = top + crop_height
    left = (orig_width - crop_width) // 2
    right = left + crop_width
    if top >= 0 and bottom <= orig_height and left >= 0 and right <= orig_width:
        image = image[..., top:bottom, left:right]
        return to_channel_dimension_format(image, output_data_format, ChannelDimension.FIRST)
    new_height = max(crop_height, orig_height)
    new_width = max(crop_width, orig_width)
    new_shape = image.shape[:-2] + (new_height, new_width)
    new_image = np.zeros_like(image, shape=new_shape)
    top_pad = ceil((new_height - orig_height) / 2)
    bottom_pad = top_pad + orig_height
    left_pad = ceil((new_width - orig_width) / 2)
    right_pad = left_pad + orig_width
    new_image[..., top_pad:bottom_pad, left_pad:right_pad] = image
    top += top_pad
    bottom += top_pad
    left += left_pad
    right += left_pad
    new_image = new_image[..., max(0, top) : min(new_height, bottom), max(0, left) : min(new_width, right)]
    return to_channel_dimension_format(new_image, output_data_format, ChannelDimension.FIRST)


def clip_processor(T, J):
    import PIL.Image
    import transformers.image_processing_utils as ipu
    from transformers import CLIPImageProcessor

    ipu.center_crop = center_crop_444  # what BaseImageProcessor.center_crop calls
    fixture = dict(crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32}, resample=3)
    other = dict(crop_size={"height": 20, "width": 16}, size={"shortest_edge": 24}, resample=3,
                 image_mean=[0.5, 0.25, 0.75], image_std=[0.2, 0.3, 0.4], rescale_factor=0.004)
    padded = dict(crop_size={"height": 30, "width": 30}, size={"shortest_edge": 26}, resample=3)
    padded_odd = dict(crop_size={"height": 30, "width": 30}, size={"shortest_edge": 27}, resample=3)
    padded_both = dict(crop_size={"height": 28, "width": 30}, size={"shortest_edge": 25}, resample=3)
    exact = dict(crop_size={"height": 32, "width": 32}, size={"height": 36, "width": 40}, resample=1)
    rgba = np.concatenate([R.make_image(50, 38, seed=9), noise_picture(50, 38, 1, 10)[..., None]], axis=2)
    cases = {
        "portrait": (PIL.Image.fromarray(R.make_image(50, 35, seed=8)), fixture),
        "rgba": (PIL.Image.fromarray(rgba, mode="RGBA"), fixture),
        "gray": (PIL.Image.fromarray(noise_picture(33, 47, 1, 11)), fixture),
        "other_config": (PIL.Image.fromarray(R.make_image(48, 64, seed=12)), other),
        "padded": (PIL.Image.fromarray(R.make_image(26, 52, seed=13)), padded),
        # an odd shortfall (27 -> 30): 30 x 30 with 4.44's center_crop (29 x 30 with the v4.37 one)
        "padded_odd": (PIL.Image.fromarray(R.make_image(27, 54, seed=15)), padded_odd),
        # both sides short, by 3 rows and 5 columns
        "padded_both": (PIL.Image.fromarray(R.make_image(25, 25, seed=16)), padded_both),
        "exact_lanczos": (PIL.Image.fromarray(R.make_image(30, 44, seed=14)), exact),
    }
    J["clip_processor"] = {}
    for name, (img, cfg) in cases.items():
        proc = CLIPImageProcessor(**cfg)
        T[f"proc.{name}.image_u8"] = torch.from_numpy(np.asarray(img).copy())
        T[f"proc.{name}.pixel_values"] = proc(images=img, return_tensors="pt").pixel_values
        J["clip_processor"][name] = {"config": json.loads(proc.to_json_string()), "mode": img.mode}


def unclip_scheduler(T, J):
    from diffusers import UnCLIPScheduler

    J["unclip_scheduler"] = {"timesteps": {}, "runs": {}}
    base = UnCLIPScheduler()
    for n in (2, 3, 5, 7, 25, 1000):
        base.set_timesteps(n)
        J["unclip_scheduler"]["timesteps"][str(n)] = [int(t) for t in base.timesteps]
    runs = {
        # Karlo's prior_scheduler / Kandinsky 2.2's prior scheduler / Karlo's decoder_scheduler
        "karlo_prior": (dict(clip_sample=True, clip_sample_range=5.0, prediction_type="sample",
                             variance_type="fixed_small_log", num_train_timesteps=1000), 6, (2, 8), False),
        "kandinsky_prior": (dict(clip_sample=True, clip_sample_range=10.0, prediction_type="sample",
                                 variance_type="fixed_small_log", num_train_timesteps=1000), 5, (1, 16), False),
        "karlo_decoder": (dict(clip_sample=True, clip_sample_range=1.0, prediction_type="epsilon",
                               variance_type="learned_range", num_train_timesteps=1000), 7, (1, 3, 4, 4), True),
        "epsilon_short": (dict(clip_sample=False, prediction_type="epsilon", variance_type="fixed_small_log",
                               num_train_timesteps=100), 4, (2, 6), False),
    }
    for name, (cfg, steps, shape, learned) in runs.items():
        s = UnCLIPScheduler(**cfg)
        s.set_timesteps(steps)
        ts = s.timesteps
        x = torch.randn(shape, generator=gen(700 + steps)) * 3.0
        T[f"sched.{name}.x_T"] = x.clone()
        g = gen(710 + steps)
        rec = R.RngRecorder()
        with rec:
            for i, t in enumerate(ts):
                # a deterministic stand-in model: a sample / noise prediction, plus a variance channel block
                out = torch.tanh(x * 0.7 + float(t) / 500.0) * 2.5
                if learned:
                    out = torch.cat([out, torch.tanh(x * 0.3 - 0.2)], dim=1)
                T[f"sched.{name}.model_output.{i}"] = out
                prev = None if i + 1 == len(ts) else ts[i + 1]
                o = s.step(out, timestep=t, sample=x, prev_timestep=prev, generator=g)
                x = o.prev_sample
                T[f"sched.{name}.pred_original_sample.{i}"] = o.pred_original_sample
                T[f"sched.{name}.prev_sample.{i}"] = x
        for k, d in enumerate(rec.draws):
            T[f"sched.{name}.rng.{k}"] = d
        J["unclip_scheduler"]["runs"][name] = {"config": dict(s.config), "steps": steps,
                                               "timesteps": [int(t) for t in ts], "generator_seed": 710 + steps,
                                               "draws": len(rec.draws)}
    s = UnCLIPScheduler()
    x0 = torch.randn((2, 8), generator=gen(720))
    n = torch.randn((2, 8), generator=gen(721))
    T["sched.add_noise.x0"], T["sched.add_noise.noise"] = x0, n
    for t in (0, 1, 500, 999):
        T[f"sched.add_noise.t{t}"] = s.add_noise(x0, n, torch.tensor([t]))


def randomize(module, seed):
    g = gen(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("std") or name.endswith("weight") and p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / max(1.0, p.shape[-1] ** 0.5))


def tiny_prior(T, J, out):
    from diffusers import PriorTransformer

    cfg = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=12, num_embeddings=5,
               additional_embeddings=4, time_embed_act_fn="gelu", time_embed_dim=24, embedding_proj_dim=10,
               clip_embed_dim=14)
    prior = PriorTransformer(**cfg).eval()
    randomize(prior, 730)
    folder = os.path.join(out, "unclip_tiny_prior")
    prior.save_pretrained(folder, safe_serialization=True)
    hs = torch.randn((3, 12), generator=gen(731))
    pe = torch.randn((3, 10), generator=gen(732))
    ehs = torch.randn((3, 5, 12), generator=gen(733))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    T["prior.hidden_states"], T["prior.proj_embedding"], T["prior.encoder_hidden_states"] = hs, pe, ehs
    T["prior.attention_mask"] = mask.to(torch.int64)
    with torch.no_grad():
        T["prior.out.t37"] = prior(hs, timestep=torch.tensor(37), proj_embedding=pe, encoder_hidden_states=ehs,
                                   attention_mask=mask).predicted_image_embedding
        T["prior.out.per_row"] = prior(hs, timestep=torch.tensor([5, 250, 999]), proj_embedding=pe,
                                       encoder_hidden_states=ehs, attention_mask=mask).predicted_image_embedding
        T["prior.out.t37.no_mask"] = prior(hs, timestep=torch.tensor(37), proj_embedding=pe,
                                           encoder_hidden_states=ehs).predicted_image_embedding
        lat = torch.randn((3, 14), generator=gen(734))
        T["prior.post_process.input"], T["prior.post_process"] = lat, prior.post_process_latents(lat)
    J["tiny_prior"] = {"folder": "unclip_tiny_prior", "config": cfg}


def tiny_clip(T, J, out):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection

    vcfg = CLIPVisionConfig(hidden_size=16, intermediate_size=20, projection_dim=8, num_hidden_layers=2,
                            num_attention_heads=2, num_channels=3, image_size=24, patch_size=6, hidden_act="gelu",
                            layer_norm_eps=1e-5)
    torch.manual_seed(740)
    vision = CLIPVisionModelWithProjection(vcfg).eval()
    randomize(vision, 741)
    vision.save_pretrained(os.path.join(out, "unclip_tiny_clip", "image_encoder"), safe_serialization=True)
    pv = torch.randn((2, 3, 24, 24), generator=gen(742))
    with torch.no_grad():
        vo = vision(pv)
    T["vision.pixel_values"], T["vision.image_embeds"] = pv, vo.image_embeds
    T["vision.last_hidden_state"] = vo.last_hidden_state
    tcfg = CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=20, projection_dim=8, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=10, hidden_act="quick_gelu",
                          bos_token_id=48, eos_token_id=49, pad_token_id=49)
    torch.manual_seed(743)
    text = CLIPTextModelWithProjection(tcfg).eval()
    randomize(text, 744)
    text.save_pretrained(os.path.join(out, "unclip_tiny_clip", "text_encoder"), safe_serialization=True)
    # eos 49 first at 4 then padding with 49; a row with a larger id than eos before it; one truncated (eos last)
    ids = torch.tensor([[48, 3, 17, 5, 49, 49, 49, 49, 49, 49],
                        [48, 30, 2, 49, 49, 49, 49, 49, 49, 49],
                        [48, 1, 2, 3, 4, 5, 6, 7, 8, 49]])
    with torch.no_grad():
        to = text(ids)
    T["text.input_ids"], T["text.text_embeds"], T["text.last_hidden_state"] = ids, to.text_embeds, to.last_hidden_state
    J["tiny_clip"] = {"folder": "unclip_tiny_clip"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=HERE)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    T, J = {}, {}
    pil_resize(T, J)
    clip_processor(T, J)
    unclip_scheduler(T, J)
    tiny_prior(T, J, a.out)
    tiny_clip(T, J, a.out)
    import PIL
    import diffusers
    import transformers

    J["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "pillow": PIL.__version__}
    T = {k: v.contiguous() for k, v in sorted(T.items())}
    save_file(T, os.path.join(a.out, "unclip_refs.safetensors"))
    with open(os.path.join(a.out, "unclip_refs.json"), "w") as f:
        json.dump(J, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {len(T)} tensors to {a.out}")


if __name__ == "__main__":
    main()
