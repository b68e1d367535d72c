#!/usr/bin/env python3
"""Seed-driven references for `dmx upscale` beyond the fixture's cases (tests/test_upscale.cpp,
UpscaleSeededGolden): diffusers 0.27.2's StableDiffusionUpscalePipeline on the tiny x4 upscaler of
../shared/fixtures/sd-tiny/models/upscale_x4, called with generator=torch.Generator('cpu').manual_seed(seed) and
nothing injected, with other sizes, noise levels, schedulers and batch sizes than the fixture's:

    upscale_seeded_euler_resize   45x62 picture (not multiples of 4: VaeImageProcessor resizes it to 44x60 with
                                  PIL bicubic), EulerDiscreteScheduler, noise level 100, 7 steps, guidance 6
    upscale_seeded_dpmpp2m_nl0    36x24, DPMSolverMultistep (dpmsolver++, order 2), noise level 0, no negative
                                  prompt, guidance 9 (the pipeline default), 8 steps
    upscale_seeded_ddim_eta_n2    20x28, DDIM eta 0.5 (scheduler draws after the latents), noise level 350 (the
                                  model's max_noise_level), 2 images per prompt, 5 steps
and, for the tiled VAE decode (AutoencoderKL.enable_tiling with tile_sample_min_size 64 / tile_latent_min_size 16,
i.e. `--vae-tile-size 64`; overlap 0.25: 3 x 4 tiles), the final latents of the dpmpp2m case decoded with and
without tiling (tiled.decode, untiled.decode: [1, 3, 96, 144] in [-1, 1]).

The cascade (`dmx generate ... --upscale-model`), upscale_cascade_test: StableDiffusionPipeline on the fixtures'
test model (32x32, DDIM 5 steps, guidance 7.5), then StableDiffusionUpscalePipeline on its PIL picture with the
same prompts (4 steps, guidance 9, noise level 30), ONE torch.Generator passed to both: base latents, then the
picture's noise, then the upscaler's latents (cascade.base_latents, cascade.base_image_u8, cascade.latents,
cascade.image_u8).

Each case stores its input picture (<case>.low.png), the final latents, every step's latents, the picture
(image_u8) and the dmx command line (JSON "dmx", paths: data:... = the fixtures folder, ref:... = this folder).

Usage, with the harness of ../shared/ref set up (its README):
    . ../shared/ref/env.sh && $REF_PY tests/ref/make_upscale_refs.py [--out DIR]
DIR defaults to this folder. Two runs give bit-identical files.
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
import reference as R  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
NEG = "low quality, blurry"
CASES = [
    # name, (W, H), picture seed, scheduler, noise level, steps, guidance, negative, eta, images, seed
    ("upscale_seeded_euler_resize", (45, 62), 11, "euler", 100, 7, 6.0, NEG, 0.0, 1, 2101),
    ("upscale_seeded_dpmpp2m_nl0", (36, 24), 12, "dpm2m", 0, 8, 9.0, None, 0.0, 1, 2102),
    ("upscale_seeded_ddim_eta_n2", (20, 28), 13, "ddim", 350, 5, 7.5, NEG, 0.5, 2, 2103),
]
DMX_SCHED = {"euler": "euler", "dpm2m": "dpmpp_2m", "ddim": "ddim"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("REF_THREADS", "2")))
    import PIL.Image
    from diffusers import StableDiffusionUpscalePipeline

    model = os.path.join(FIXTURES, "models", "upscale_x4")
    pipe = StableDiffusionUpscalePipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    base = pipe.scheduler
    T, J = {}, {"cases": {}}
    for name, (W, H), pic_seed, sched, nl, steps, cfg, neg, eta, n, seed in CASES:
        png = os.path.join(args.out, name + ".low.png")
        PIL.Image.fromarray(R.make_image(H, W, seed=pic_seed)).save(png, format="PNG")
        low = PIL.Image.open(png).convert("RGB")
        pipe.scheduler = R.make_scheduler(sched, base.config)
        store = []

        def cb(i, t, latents):
            store.append((i, int(t), latents.detach().clone()))

        with torch.no_grad():
            out = pipe(PROMPT, image=low, negative_prompt=neg, num_inference_steps=steps, guidance_scale=cfg,
                       noise_level=nl, eta=eta, num_images_per_prompt=n, generator=R.gen(seed), output_type="np",
                       callback=cb)
        for i, t, lat in store:
            T[f"{name}.step.{i}.latents"] = lat.contiguous()
        latents = store[-1][2].contiguous()
        T[f"{name}.latents"] = latents
        T[f"{name}.image_u8"] = (torch.from_numpy(np.ascontiguousarray(out.images)) * 255).round().to(torch.uint8)
        dmx = ["upscale", "--model", "data:models/upscale_x4", "--image", "ref:" + name + ".low.png", "--prompt", PROMPT,
               "--noise-level", str(nl), "--steps", str(steps), "--guidance-scale", str(cfg), "--scheduler",
               DMX_SCHED[sched], "--seed", str(seed)]
        if neg:
            dmx += ["--negative-prompt", neg]
        if eta:
            dmx += ["--eta", str(eta)]
        if n > 1:
            dmx += ["--num-images", str(n)]
        J["cases"][name] = dict(width=W, height=H, scheduler=sched, noise_level=nl, steps=steps, guidance_scale=cfg,
                                negative_prompt=neg or "", eta=eta, num_images=n, seed=seed,
                                timesteps=[t for _, t, _ in store], dmx=dmx)
        if name == "upscale_seeded_dpmpp2m_nl0":
            z = latents / pipe.vae.config.scaling_factor
            with torch.no_grad():
                T["untiled.decode"] = pipe.vae.decode(z).sample.contiguous()
                pipe.vae.enable_tiling()
                pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = 64, 16
                T["tiled.decode"] = pipe.vae.decode(z).sample.contiguous()
                pipe.vae.disable_tiling()
            J["tiling"] = dict(case=name, tile_sample_min_size=pipe.vae.tile_sample_min_size,
                               tile_latent_min_size=pipe.vae.tile_latent_min_size,
                               tile_overlap_factor=pipe.vae.tile_overlap_factor,
                               seam_max_abs=float((T["tiled.decode"] - T["untiled.decode"]).abs().max()))
    pipe.scheduler = base
    # The cascade: one generator through both pipelines.
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline.from_pretrained(os.path.join(FIXTURES, "models", "test"), safety_checker=None,
                                                 requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    sd.scheduler = R.make_scheduler("ddim", sd.scheduler.config)
    g = R.gen(3101)
    with torch.no_grad():
        b = sd(PROMPT, negative_prompt=NEG, width=32, height=32, num_inference_steps=5, guidance_scale=7.5,
               generator=g, output_type="latent").images
        base_img = sd.image_processor.postprocess(sd.vae.decode(b / sd.vae.config.scaling_factor).sample,
                                                  output_type="pil")[0]
        store = []
        out = pipe(PROMPT, image=base_img, negative_prompt=NEG, num_inference_steps=4, guidance_scale=9.0,
                   noise_level=30, generator=g, output_type="np", callback=lambda i, t, l: store.append(l.clone()))
    T["cascade.base_latents"] = b.contiguous()
    T["cascade.base_image_u8"] = torch.from_numpy(np.asarray(base_img).copy())
    T["cascade.latents"] = store[-1].contiguous()
    T["cascade.image_u8"] = (torch.from_numpy(np.ascontiguousarray(out.images)) * 255).round().to(torch.uint8)
    J["cascade"] = dict(dmx=["generate", "--model", "data:models/test", "--prompt", PROMPT, "--negative-prompt", NEG,
                             "--width", "32", "--height", "32", "--steps", "5", "--guidance-scale", "7.5",
                             "--scheduler", "ddim", "--seed", "3101", "--upscale-model", "data:models/upscale_x4",
                             "--upscale-noise-level", "30", "--upscale-steps", "4", "--upscale-guidance-scale", "9"])
    J["tolerance"] = dict(latents=1e-3, image=3)
    J["versions"] = dict(torch=torch.__version__)
    save_file(T, os.path.join(args.out, "upscale_refs.safetensors"))
    with open(os.path.join(args.out, "upscale_refs.json"), "w") as f:
        json.dump(J, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
