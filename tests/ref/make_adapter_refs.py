#!/usr/bin/env python3
"""Seed-driven references for `dmx generate --adapter ...` and `--hypernetwork ...` on cases the fixtures of
../shared/fixtures/sd-tiny (t2i_adapter/*, hypernet/*) do not cover. Each case runs diffusers 0.27.2's
StableDiffusionAdapterPipeline, or StableDiffusionPipeline with AUTOMATIC1111's hypernetwork semantics (the
harness's hypernet_ref.py, as the fixtures' hypernet cases), from torch.Generator('cpu').manual_seed(seed) with
nothing injected, on the fixtures' tiny sd15 model and adapters, and records what the matching dmx command must
reproduce, with that command line (JSON "dmx"; paths relative to the fixtures folder for models/..., to this
folder for the input pictures and hypernetworks made here).

    adapter_seeded_color_resized   the light colour adapter alone, 192x128, its palette 150x100 (resized with
                                   PIL's Lanczos as the pipeline does), scale 0.9
    adapter_seeded_multi_scales    sketch (gray, 96x96: resized) 1.3 + colour 0.25 at 128x128: the scale list is
                                   MultiAdapter's adapter_weights
    adapter_seeded_lora            the sketch adapter at 0.8 with the fixtures' LoRA merged at 0.7 (UNet and text
                                   encoder, W += 0.7 B A)
    adapter_seeded_two_images      the sketch adapter with num_images_per_prompt=2 (features per image)
    adapter_seeded_controlnet      the fixtures' ControlNet (0.7) and the sketch adapter (0.8) in one run (the
                                   ControlNet pipeline with the adapter's features given to its UNet calls)
    hypernet_seeded_chain          tiny_hypernet.pt at 0.5, then hypernet_second.pt (made here: layer_structure
                                   1/1.5/1, relu, no LayerNorm, width 32 only) at 0.7, chained in that order

Usage, with the harness of ../shared/ref set up (its README):
    . ../shared/ref/env.sh && $REF_PY tests/ref/make_adapter_refs.py [--out DIR] [CASE ...]
DIR defaults to this folder. Torch runs 2 threads (REF_THREADS=1 re-runs a case with 1: the reference's own float
noise). Two runs give bit-identical files.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("DMX_SHARED_DIR", os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared")))
FIXTURES = os.path.join(SHARED, "fixtures", "sd-tiny")
sys.path.insert(0, os.path.join(SHARED, "ref"))
import hypernet_ref as HN  # noqa: E402
import make_ext as E  # noqa: E402  (the fixtures' adapter / hypernetwork runs and pictures)
import reference as R  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

PROMPT = "a red sports car parked in front of a modern house"
NEG = "low quality, blurry"
CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def models():
    return E.Models(os.path.join(FIXTURES, "models"))


def png(out, name, arr):
    return E.save_png(os.path.join(out, name), arr)


def adapter_run(out, name, names, pictures, scales, seed, W, H, lora_scale=None):
    """pictures: [(file suffix, uint8 array)] per adapter; lora_scale: the fixtures' LoRA merged first."""
    M = models()
    ims = [png(out, f"{name}.{suffix}.png", arr) for suffix, arr in pictures]
    T, J = {}, {}
    if lora_scale is None:
        E.run_adapter(M, T, J, names, ims, scales, PROMPT, NEG, seed, W, H)
    else:
        from diffusers import StableDiffusionAdapterPipeline
        from safetensors.torch import load_file

        ctx = M.sd15()
        comps = ctx.components(fresh=True)
        R._merge_lora(comps["unet"], comps["text_encoder"],
                      load_file(os.path.join(ctx.model_dir, "lora", "lora_peft.safetensors")), lora_scale)
        comps.pop("requires_safety_checker")
        assert len(names) == 1
        pipe = StableDiffusionAdapterPipeline(adapter=M.adapter(names[0]), **comps, requires_safety_checker=False)
        pipe.scheduler = R.make_scheduler("ddim", ctx.sched_config())
        pipe.set_progress_bar_config(disable=True)
        steps_ = []
        rec = R.RngRecorder()
        with rec, torch.no_grad():
            o = pipe(PROMPT, image=ims[0], negative_prompt=NEG, width=W, height=H, num_inference_steps=6,
                     guidance_scale=7.5, generator=E.gen(seed), output_type="np",
                     adapter_conditioning_scale=scales[0], callback=E.old_callback(steps_))
        E.finish(T, J, steps_, o.images, rec)
        J.update(prompt=PROMPT, negative_prompt=NEG, width=W, height=H, steps=6, guidance_scale=7.5, seed=seed,
                 adapters=list(names), adapter_scales=list(scales), lora="lora_peft.safetensors (= lora_diffusers)",
                 lora_scale=lora_scale, **E.sched_info(pipe.scheduler))
        with torch.no_grad():  # effect of the LoRA: the same run without it
            plain = E.adapter_pipe(M, names)
            lat = plain(PROMPT, image=ims[0], negative_prompt=NEG, width=W, height=H, num_inference_steps=6,
                        guidance_scale=7.5, generator=E.gen(seed), output_type="latent",
                        adapter_conditioning_scale=scales[0]).images
        J["max_abs_diff_vs_no_lora"] = float((lat - T["latents"]).abs().max())
    args = ""
    for n, (suffix, _), s in zip(names, pictures, scales):
        args += f" --adapter models/t2i_adapter/{n} --adapter-image {name}.{suffix}.png --adapter-scale {s}"
    if lora_scale is not None:
        args += f" --lora models/sd15/lora/lora_diffusers.safetensors:{lora_scale}"
    J.update(case=name, model_dir="models/sd15",
             dmx=(f"dmx generate --model models/sd15 --prompt '{PROMPT}' --negative-prompt '{NEG}' --width {W} "
                  f"--height {H} --steps 6 --guidance-scale 7.5 --scheduler ddim --seed {seed}{args} "
                  "--save-latents L.safetensors --output O.png"))
    return T, J


@case
def adapter_seeded_color_resized(out):
    return adapter_run(out, "adapter_seeded_color_resized", ["color"], [("color", E.make_palette(100, 150, seed=7,
                                                                                                  block=10))],
                       [0.9], 5101, 192, 128)


@case
def adapter_seeded_multi_scales(out):
    return adapter_run(out, "adapter_seeded_multi_scales", ["sketch", "color"],
                       [("sketch", E.make_sketch(96, 96, seed=3)), ("color", E.make_palette(128, 128, seed=4))],
                       [1.3, 0.25], 5102, 128, 128)


@case
def adapter_seeded_lora(out):
    return adapter_run(out, "adapter_seeded_lora", ["sketch"], [("sketch", E.make_sketch(128, 128, seed=5))], [0.8],
                       5103, 128, 128, lora_scale=0.7)


@case
def adapter_seeded_two_images(out):
    """The sketch adapter (0.8) with num_images_per_prompt=2: one draw of [2, 4, h, w], the features repeated per
    image and doubled for guidance (the pipeline's repeat then cat)."""
    name, seed, W, H, scale = "adapter_seeded_two_images", 5106, 128, 128, 0.8
    M = models()
    sketch = png(out, f"{name}.sketch.png", E.make_sketch(H, W, seed=8))
    pipe = E.adapter_pipe(M, ["sketch"])
    T, J = {}, {}
    steps_ = []
    rec = R.RngRecorder()
    with rec, torch.no_grad():
        o = pipe(PROMPT, image=sketch, negative_prompt=NEG, width=W, height=H, num_inference_steps=6,
                 guidance_scale=7.5, generator=E.gen(seed), output_type="np", adapter_conditioning_scale=scale,
                 num_images_per_prompt=2, callback=E.old_callback(steps_))
    E.finish(T, J, steps_, o.images, rec)
    T["image_u8.1"] = (torch.from_numpy(np.ascontiguousarray(o.images[1])) * 255).round().to(torch.uint8)
    J.update(case=name, model_dir="models/sd15", prompt=PROMPT, negative_prompt=NEG, width=W, height=H, steps=6,
             guidance_scale=7.5, seed=seed, num_images=2, adapters=["sketch"], adapter_scales=[scale],
             **E.sched_info(pipe.scheduler),
             dmx=(f"dmx generate --model models/sd15 --prompt '{PROMPT}' --negative-prompt '{NEG}' --width {W} "
                  f"--height {H} --steps 6 --guidance-scale 7.5 --scheduler ddim --seed {seed} --num-images 2 "
                  f"--adapter models/t2i_adapter/sketch --adapter-image {name}.sketch.png --adapter-scale {scale} "
                  "--save-latents L.safetensors --output O.png"),
             notes="latents [2, 4, 16, 16]; image_u8 = the first picture (O-0.png), image_u8.1 the second (O-1.png)")
    return T, J


@case
def adapter_seeded_controlnet(out):
    """The fixtures' ControlNet (scale 0.7) and the sketch adapter (0.8) in one run. diffusers has no pipeline for
    both; its UNet takes both inputs (down_block_additional_residuals and down_intrablock_additional_residuals),
    so this is StableDiffusionControlNetPipeline with the UNet call given the adapter's features exactly as
    StableDiffusionAdapterPipeline passes them (scaled, duplicated for the guidance halves, cloned per call)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    name, seed, W, H, cn_scale, ad_scale = "adapter_seeded_controlnet", 5105, 128, 128, 0.7, 0.8
    M = models()
    ctx = M.sd15()
    sketch = png(out, f"{name}.sketch.png", E.make_sketch(H, W, seed=6))
    comps = ctx.components(fresh=True)
    comps.pop("requires_safety_checker")
    net = ControlNetModel.from_pretrained(os.path.join(ctx.model_dir, "controlnet")).eval()
    pipe = StableDiffusionControlNetPipeline(controlnet=net, **comps, requires_safety_checker=False)
    pipe.scheduler = R.make_scheduler("ddim", ctx.sched_config())
    pipe.set_progress_bar_config(disable=True)
    adapter = M.adapter("sketch")
    x = torch.from_numpy(np.asarray(sketch).astype(np.float32) / 255.0)[None, None]
    with torch.no_grad():
        feats = [torch.cat([f * ad_scale] * 2, dim=0) for f in adapter(x)]
    forward = pipe.unet.forward

    def with_adapter(*args, **kw):
        kw["down_intrablock_additional_residuals"] = [f.clone() for f in feats]
        return forward(*args, **kw)

    pipe.unet.forward = with_adapter
    T, J = {}, {}
    steps_ = []
    rec = R.RngRecorder()
    with rec, torch.no_grad():
        o = pipe(PROMPT, image=sketch.convert("RGB"), negative_prompt=NEG, width=W, height=H, num_inference_steps=6,
                 guidance_scale=7.5, generator=E.gen(seed), output_type="np", controlnet_conditioning_scale=cn_scale,
                 callback_on_step_end=E.new_callback(steps_))
    E.finish(T, J, steps_, o.images, rec)
    pipe.unet.forward = forward
    with torch.no_grad():  # the same run without the adapter
        lat = pipe(PROMPT, image=sketch.convert("RGB"), negative_prompt=NEG, width=W, height=H, num_inference_steps=6,
                   guidance_scale=7.5, generator=E.gen(seed), output_type="latent",
                   controlnet_conditioning_scale=cn_scale).images
    J["max_abs_diff_vs_no_adapter"] = float((lat - T["latents"]).abs().max())
    J.update(case=name, model_dir="models/sd15", prompt=PROMPT, negative_prompt=NEG, width=W, height=H, steps=6,
             guidance_scale=7.5, seed=seed, controlnet="models/sd15/controlnet", controlnet_scale=cn_scale,
             adapters=["sketch"], adapter_scales=[ad_scale], **E.sched_info(pipe.scheduler),
             dmx=(f"dmx generate --model models/sd15 --prompt '{PROMPT}' --negative-prompt '{NEG}' --width {W} "
                  f"--height {H} --steps 6 --guidance-scale 7.5 --scheduler ddim --seed {seed} --controlnet "
                  f"models/sd15/controlnet --control-image {name}.sketch.png --control-scale {cn_scale} --adapter "
                  f"models/t2i_adapter/sketch --adapter-image {name}.sketch.png --adapter-scale {ad_scale} "
                  "--save-latents L.safetensors --output O.png"))
    return T, J


SECOND = dict(sizes=[32], layer_structure=[1.0, 1.5, 1.0], activation_func="relu", add_layer_norm=False,
              use_dropout=False, dropout_structure=None, activate_output=True, weight_init="Normal")


def make_second_hypernet(path):
    c = SECOND
    hn = HN.Hypernetwork(name="hypernet_second", enable_sizes=c["sizes"], layer_structure=c["layer_structure"],
                         activation_func=c["activation_func"], weight_init=c["weight_init"],
                         add_layer_norm=c["add_layer_norm"], use_dropout=c["use_dropout"],
                         activate_output=c["activate_output"], dropout_structure=c["dropout_structure"])
    g = torch.Generator().manual_seed(451)
    for dim in c["sizes"]:
        for m in hn.layers[dim]:
            m.init_random(g)
    hn.step = 10
    hn.save(path)
    return HN.Hypernetwork.load(path)


@case
def hypernet_seeded_chain(out):
    name, seed, W, H, mults = "hypernet_seeded_chain", 5104, 128, 128, (0.5, 0.7)
    M = models()
    first = M.hypernet()
    second = make_second_hypernet(os.path.join(out, "hypernet_second.pt"))
    first.set_multiplier(mults[0])
    second.set_multiplier(mults[1])
    pipe = E.hypernet_pipe(M, None, 1.0)
    HN.install(pipe.unet, [first, second])
    prompt = "a portrait of an old man with a white beard, black and white photo"
    T, J = {}, {}
    steps_ = []
    rec = R.RngRecorder()
    with rec, torch.no_grad():
        o = pipe(prompt, negative_prompt=NEG, width=W, height=H, num_inference_steps=6, guidance_scale=7.5,
                 generator=E.gen(seed), output_type="np", callback_on_step_end=E.new_callback(steps_))
    E.finish(T, J, steps_, o.images, rec)
    with torch.no_grad():
        only_first = E.hypernet_pipe(M, M.hypernet(), mults[0])
        lat = only_first(prompt, negative_prompt=NEG, width=W, height=H, num_inference_steps=6, guidance_scale=7.5,
                         generator=E.gen(seed), output_type="latent").images
    J["max_abs_diff_vs_first_only"] = float((lat - T["latents"]).abs().max())
    J.update(case=name, model_dir="models/sd15", prompt=prompt, negative_prompt=NEG, width=W, height=H, steps=6,
             guidance_scale=7.5, seed=seed, hypernetworks=["tiny_hypernet.pt", "hypernet_second.pt"],
             multipliers=list(mults), second_config=SECOND, **E.sched_info(pipe.scheduler),
             dmx=(f"dmx generate --model models/sd15 --prompt '{prompt}' --negative-prompt '{NEG}' --width {W} "
                  f"--height {H} --steps 6 --guidance-scale 7.5 --scheduler ddim --seed {seed} --hypernetwork "
                  f"models/hypernet/tiny_hypernet.pt:{mults[0]} --hypernetwork hypernet_second.pt:{mults[1]} "
                  "--save-latents L.safetensors --output O.png"),
             notes=("apply_hypernetworks: in every attention layer, context_k/context_v go through tiny_hypernet "
                    "(x0.5), then hypernet_second (x0.7) where the width is 32 (the text, and the 32-wide level's "
                    "self-attention); 64-wide self-attention sees only the first."))
    return T, J


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=HERE)
    ap.add_argument("cases", nargs="*", choices=[[]] + sorted(CASES), default=[])
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("REF_THREADS", "2")))
    os.makedirs(a.out, exist_ok=True)
    for name in a.cases or sorted(CASES):
        torch.manual_seed(0)
        T, J = CASES[name](a.out)
        # kept small: the pictures are the PNGs beside the case
        T = {k: v.contiguous() for k, v in T.items() if k == "latents" or k.startswith("image_u8")
             or k.startswith("step.") or k.startswith("rng.")}
        save_file(T, os.path.join(a.out, name + ".safetensors"))
        J["made_by"] = "tests/ref/make_adapter_refs.py " + name
        J["tolerance"] = {"latents": 1e-3, "image": 3}
        with open(os.path.join(a.out, name + ".json"), "w") as f:
            json.dump(J, f, indent=1, sort_keys=True, default=str)
        print("wrote", os.path.join(a.out, name), {k: list(v.shape) for k, v in T.items()},
              {k: v for k, v in J.items() if k.startswith("max_abs")})


if __name__ == "__main__":
    main()
