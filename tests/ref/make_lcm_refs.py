#!/usr/bin/env python3
"""References for dmx's LCM scheduler and few-step sampling (issue 20), from diffusers 0.27.2's LCMScheduler.

    lcm_scheduler       LCMScheduler alone, step by step (tests/test_lcm.cpp, LCMSchedulerGolden): the fixture
                        model's scheduler config through LCMScheduler.from_config and LCMScheduler's own defaults;
                        1 to 8 steps; epsilon, sample and v_prediction; clip_sample, thresholding, zero-SNR betas;
                        original_inference_steps (config and per call), timestep_scaling, custom timesteps, strength.
                        Model outputs are random tensors (eps.<case>.<i>); the noise every step but the last draws
                        comes from one torch.Generator('cpu').manual_seed(300) passed to every step(), as
                        StableDiffusionPipeline passes its generator.
    lcm_seeded_*        Whole pipelines from torch.Generator('cpu').manual_seed(seed), nothing injected, with the
                        dmx command line that must reproduce them (tests/test_lcm.cpp, LCMSeededGolden):
                        StableDiffusionPipeline + LCMScheduler.from_config(model's config), guidance 1 (no CFG
                        branch), with a synthetic LCM-LoRA (lcm_lora_sd15.safetensors, written here in the layout
                        of latent-consistency/lcm-lora-sdv1-5: diffusers' train_lcm_distill_lora_sd_wds.py
                        get_module_kohya_state_dict, lora_unet_<module with _>.{lora_down,lora_up}.weight + .alpha,
                        on every module that script targets: attention, proj_in/out, ff, resnet convs,
                        conv_shortcut, time_emb_proj, down/upsampler convs) loaded with pipe.load_lora_weights;
                        guidance 2 with a negative prompt on the test model; StableDiffusionImg2ImgPipeline at
                        strength 0.5. An LCM-distilled UNet (time_cond_proj_dim) through
                        LatentConsistencyModelPipeline and LatentConsistencyModelImg2ImgPipeline.

Usage, with the harness of ../shared/ref set up (its README):
    . ../shared/ref/env.sh && $REF_PY tests/ref/make_lcm_refs.py [--out DIR] [CASE ...]
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

CASES = {}
LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def u8(images_np):
    return (torch.from_numpy(np.ascontiguousarray(images_np)) * 255).round().to(torch.uint8)


def write_png(path, arr):
    import PIL.Image

    PIL.Image.fromarray(arr).save(path, format="PNG")
    return PIL.Image.open(path).convert("RGB")


# ----------------------------------------------------------------------------------------------------------
# The scheduler alone

SCHED_CASES = [
    # name, config over the base ("sd": the fixture model's scheduler_config.json; "default": LCMScheduler()),
    # set_timesteps keyword arguments, add_noise step index (or None)
    ("sd_4", "sd", {}, dict(num_inference_steps=4), 1),
    ("sd_1", "sd", {}, dict(num_inference_steps=1), None),
    ("default_8", "default", {}, dict(num_inference_steps=8), 3),
    ("v_zero_snr_6", "sd", dict(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                original_inference_steps=40), dict(num_inference_steps=6), None),
    ("sample_clip_scaling_5", "sd", dict(prediction_type="sample", clip_sample=True, clip_sample_range=0.5,
                                         timestep_scaling=5.0), dict(num_inference_steps=5), None),
    ("threshold_4", "default", dict(thresholding=True, sample_max_value=1.5, dynamic_thresholding_ratio=0.9,
                                    beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
     dict(num_inference_steps=4), None),
    ("orig_override_3", "sd", {}, dict(num_inference_steps=3, original_inference_steps=20), None),
    ("strength_half_4", "sd", {}, dict(num_inference_steps=4, strength=0.5), None),
    ("custom_4", "sd", {}, dict(timesteps=[999, 759, 499, 259]), None),
    ("custom_strength_7", "sd", {}, dict(timesteps=[999, 879, 759, 639, 499, 259, 19], strength=0.6), None),
]


@case
def lcm_scheduler(out):
    from diffusers import LCMScheduler

    sd_cfg = dict(R.Ctx(os.path.join(FIXTURES, "models", "sd15")).sched_config())
    T, J = {}, {"cases": []}
    for name, base, over, kwargs, noise_at in SCHED_CASES:
        cfg = dict(sd_cfg) if base == "sd" else {}
        cfg.update(over)
        s = LCMScheduler.from_config(cfg)
        s.set_timesteps(**kwargs)
        ts = [int(t) for t in s.timesteps]
        x = R.rand((2, 4, 4, 4), 11) * s.init_noise_sigma
        T[f"{name}.x_T"] = x.clone()
        g = torch.Generator("cpu").manual_seed(300)
        rec = R.RngRecorder()
        with rec:
            for i, t in enumerate(s.timesteps):
                eps = R.rand((2, 4, 4, 4), 1000 + i) * (0.6 if over.get("prediction_type") == "sample" else 1.0)
                T[f"{name}.eps.{i}"] = eps
                o = s.step(eps, t, x, generator=g)
                T[f"{name}.{i}.prev_sample"] = o.prev_sample
                T[f"{name}.{i}.denoised"] = o.denoised
                x = o.prev_sample
        for k, d in enumerate(rec.draws):
            T[f"{name}.rng.{k}"] = d
        if noise_at is not None:
            x0, nz = R.rand((2, 4, 4, 4), 21), R.rand((2, 4, 4, 4), 22)
            T[f"{name}.add_noise.x0"], T[f"{name}.add_noise.noise"] = x0, nz
            T[f"{name}.add_noise"] = s.add_noise(x0, nz, s.timesteps[noise_at:noise_at + 1])
        J["cases"].append(dict(name=name, config=R.sched_public_config(s), set_timesteps=kwargs, timesteps=ts,
                               num_inference_steps=s.num_inference_steps, draws=len(rec.draws),
                               add_noise_index=noise_at))
    J["notes"] = ("per case: x_T, eps.<i> (the model output at step i), <i>.prev_sample / <i>.denoised, rng.<k> (the "
                  "draws of generator seed 300, in order; every step but index num_inference_steps - 1 draws), "
                  "add_noise(x0, noise, timesteps[add_noise_index])")
    return T, J


# ----------------------------------------------------------------------------------------------------------
# Whole pipelines


def lcm_lora_state_dict(unet, rank, alpha, seed):
    """A random LoRA in the layout of latent-consistency/lcm-lora-sdv1-5 (get_module_kohya_state_dict of diffusers'
    train_lcm_distill_lora_sd_wds.py: the PEFT keys base_model.model.<module>.lora_A/B.weight renamed), on every
    module that script targets."""
    g = torch.Generator("cpu").manual_seed(seed)
    sd = {}
    for mod_name, mod in unet.named_modules():
        if not any(mod_name == t or mod_name.endswith("." + t) for t in LCM_LORA_TARGETS):
            continue
        if isinstance(mod, torch.nn.Conv2d):
            down = torch.randn((rank, mod.in_channels) + tuple(mod.kernel_size), generator=g) * 0.2
            up = torch.randn((mod.out_channels, rank, 1, 1), generator=g) * 0.05
        else:
            down = torch.randn((rank, mod.in_features), generator=g) * 0.2
            up = torch.randn((mod.out_features, rank), generator=g) * 0.05
        for peft_key, w in ((f"base_model.model.{mod_name}.lora_A.weight", down),
                            (f"base_model.model.{mod_name}.lora_B.weight", up)):
            k = peft_key.replace("base_model.model", "lora_unet").replace("lora_A", "lora_down")
            k = k.replace("lora_B", "lora_up")
            k = k.replace(".", "_", k.count(".") - 2)
            sd[k] = w.to(torch.float16).contiguous()  # the released files are float16
            if "lora_down" in k:
                sd[f'{k.split(".")[0]}.alpha'] = torch.tensor(alpha).to(torch.float16)
    return sd


def lcm_pipeline(out, name, variant, prompt, negative, steps, guidance, seed, lora=None, strength=None, image_seed=3):
    from diffusers import LCMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    ctx = R.Ctx(os.path.join(FIXTURES, "models", variant))
    comps = ctx.components(fresh=True)
    comps["scheduler"] = LCMScheduler.from_config(ctx.sched_config())
    cls = StableDiffusionImg2ImgPipeline if strength is not None else StableDiffusionPipeline
    pipe = cls(**comps)
    pipe.set_progress_bar_config(disable=True)
    T, J = {}, {}
    lora_arg = ""
    if lora:
        lora_file, rank, alpha = lora
        sd = lcm_lora_state_dict(pipe.unet, rank, alpha, seed=77)
        path = os.path.join(out, lora_file)
        save_file(sd, path)
        pipe.load_lora_weights(out, weight_name=lora_file, adapter_name="lcm")
        adapted = sum(1 for _, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "lcm" in m.lora_A)
        modules = sum(1 for k in sd if k.endswith(".alpha"))
        assert adapted == modules, f"diffusers adapted {adapted} modules of the file's {modules}"
        J.update(lora_file=lora_file, lora_rank=rank, lora_alpha=alpha, lora_modules=modules)
        lora_arg = f" --lora {lora_file}"
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, negative_prompt=negative or None,
                  output_type="latent")
    img_arg = ""
    if strength is not None:
        size = ctx.H
        img = write_png(os.path.join(out, name + ".image.png"), R.make_image(size, size, seed=image_seed))
        kwargs.update(image=img, strength=strength)
        img_arg = f" --init-image {name}.image.png --strength {strength}"
        J["image"] = name + ".image.png"
    rec = R.RngRecorder()
    g = torch.Generator("cpu").manual_seed(seed)
    with rec, torch.no_grad():
        o = pipe(prompt, generator=g, callback_on_step_end=R.step_recorder(T), **kwargs)
        latents = o.images
        dec = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        picture = pipe.image_processor.postprocess(dec, output_type="np")
    R.finish_steps(T, J)
    J["rng_shapes"] = [list(d.shape) for d in rec.draws]
    T["latents"] = latents
    T["image_u8"] = u8(picture)[0]
    if lora:  # the same run without the LoRA: how far the LoRA moves the result (the test must see it)
        pipe.unload_lora_weights()
        with torch.no_grad():
            base = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images
        J["max_abs_latents_diff_without_lora"] = float((base - latents).abs().max())
    neg_arg = f" --negative-prompt '{negative}'" if negative else ""
    J.update(case=name, model_dir=f"models/{variant}", prompt=prompt, negative_prompt=negative, steps=steps,
             guidance_scale=guidance, seed=seed, strength=strength, scheduler="LCMScheduler",
             scheduler_config=R.sched_public_config(pipe.scheduler),
             calls=(f"{cls.__name__}(scheduler=LCMScheduler.from_config(model's config))"
                    f"{'.load_lora_weights(' + lora[0] + ')' if lora else ''}(prompt, num_inference_steps={steps}, "
                    f"guidance_scale={guidance}, negative_prompt=neg"
                    f"{', image, strength=' + str(strength) if strength is not None else ''}, "
                    f"generator=torch.Generator('cpu').manual_seed({seed}))"),
             dmx=(f"dmx generate --model models/{variant} --prompt '{prompt}'{neg_arg}{lora_arg}{img_arg} "
                  f"--scheduler lcm --steps {steps} --guidance-scale {guidance} --seed {seed} "
                  f"--save-latents L.safetensors --output O.png"),
             notes="step.<i>.latents after step i; latents = the last; image_u8 = the picture as diffusers writes it")
    return T, J


@case
def lcm_seeded_sd15_lora(out):
    """sd15 128x128 with a synthetic LCM-LoRA (rank 4, alpha 8), 4 steps, guidance 1."""
    return lcm_pipeline(out, "lcm_seeded_sd15_lora", "sd15", "a red fox in the snow", "", 4, 1.0, 4242,
                        lora=("lcm_lora_sd15.safetensors", 4, 8))


@case
def lcm_seeded_test_cfg(out):
    """diffusers' test UNet, 6 steps, guidance 2 with a negative prompt (the CFG branch)."""
    return lcm_pipeline(out, "lcm_seeded_test_cfg", "test", "a lighthouse at dusk", "fog", 6, 2.0, 99)


@case
def lcm_seeded_sd15_img2img(out):
    """sd15 img2img (StableDiffusionImg2ImgPipeline), 4 steps at strength 0.5: the last 2 of the 4 timesteps."""
    return lcm_pipeline(out, "lcm_seeded_sd15_img2img", "sd15", "a watercolour of a harbour", "", 4, 1.0, 31,
                        strength=0.5)


def distilled_test_unet(ctx, comps):
    """diffusers' test UNet with time_cond_proj_dim 8 and a seeded cond_proj (the weight is returned too)."""
    from diffusers import UNet2DConditionModel

    base = comps["unet"]
    cfg = dict(base.config)
    cfg["time_cond_proj_dim"] = 8
    unet = UNet2DConditionModel.from_config(cfg)
    res = unet.load_state_dict(base.state_dict(), strict=False)
    assert res.missing_keys == ["time_embedding.cond_proj.weight"] and not res.unexpected_keys, res
    g = torch.Generator("cpu").manual_seed(8)
    w = torch.randn(unet.time_embedding.cond_proj.weight.shape, generator=g) * 0.05
    with torch.no_grad():
        unet.time_embedding.cond_proj.weight.copy_(w)
    return unet.eval(), w


@case
def lcm_seeded_test_distilled_img2img(out):
    """The LCM-distilled test UNet of lcm_seeded_test_distilled (the same cond_proj weight) run by
    LatentConsistencyModelImg2ImgPipeline: LCMScheduler.set_timesteps(steps, strength=...) picks the timesteps (not
    the img2img pipelines' get_timesteps), the picture's latents are sampled from the VAE posterior and noised to the
    first of them; 4 steps at strength 0.6, guidance 8.5, no negative prompt."""
    from diffusers import LatentConsistencyModelImg2ImgPipeline, LCMScheduler

    ctx = R.Ctx(os.path.join(FIXTURES, "models", "test"))
    comps = ctx.components(fresh=True)
    unet, w = distilled_test_unet(ctx, comps)
    pipe = LatentConsistencyModelImg2ImgPipeline(vae=comps["vae"], text_encoder=comps["text_encoder"],
                                                 tokenizer=comps["tokenizer"], unet=unet,
                                                 scheduler=LCMScheduler.from_config(ctx.sched_config()),
                                                 safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    name = "lcm_seeded_test_distilled_img2img"
    prompt, steps, guidance, seed, strength = "a paper lantern on a river", 4, 8.5, 77, 0.6
    img = write_png(os.path.join(out, name + ".image.png"), R.make_image(ctx.H, ctx.H, seed=5))
    T, J = {}, {}
    rec = R.RngRecorder()
    with rec, torch.no_grad():
        o = pipe(prompt, image=img, strength=strength, num_inference_steps=steps, guidance_scale=guidance,
                 output_type="latent", generator=torch.Generator("cpu").manual_seed(seed),
                 callback_on_step_end=R.step_recorder(T))
        latents = o.images
        dec = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        picture = pipe.image_processor.postprocess(dec, output_type="np")
    R.finish_steps(T, J)
    J["rng_shapes"] = [list(d.shape) for d in rec.draws]
    J["timesteps"] = [int(t) for t in pipe.scheduler.timesteps]
    T["latents"] = latents
    T["image_u8"] = u8(picture)[0]
    T["cond_proj_weight"] = w
    J.update(case=name, model_dir="models/test", prompt=prompt, steps=steps, guidance_scale=guidance, seed=seed,
             strength=strength, image=name + ".image.png", time_cond_proj_dim=8, scheduler="LCMScheduler",
             scheduler_config=R.sched_public_config(pipe.scheduler),
             calls=(f"LatentConsistencyModelImg2ImgPipeline(unet with time_cond_proj_dim 8, LCMScheduler.from_config("
                    f"model's config))(prompt, image, strength={strength}, num_inference_steps={steps}, "
                    f"guidance_scale={guidance}, generator=torch.Generator('cpu').manual_seed({seed}))"),
             dmx=(f"dmx generate --model M --prompt '{prompt}' --init-image {name}.image.png --strength {strength} "
                  f"--steps {steps} --guidance-scale {guidance} --seed {seed} --save-latents L.safetensors "
                  f"--output O.png"),
             notes="step.<i>.latents after step i; latents = the last; timesteps = the scheduler's after the call")
    return T, J


@case
def lcm_seeded_test_distilled(out):
    """An LCM-distilled UNet (time_cond_proj_dim 8: the guidance embedding w = guidance - 1 through the time
    embedding's cond_proj) run by LatentConsistencyModelPipeline: diffusers' test model with cond_proj added
    (cond_proj_weight below, seeded), LCMScheduler.from_config(model's config), 4 steps, guidance 8.5 (the pipeline's
    default), no negative prompt and no CFG branch. The test rebuilds the folder from the fixture and this weight."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    ctx = R.Ctx(os.path.join(FIXTURES, "models", "test"))
    comps = ctx.components(fresh=True)
    unet, w = distilled_test_unet(ctx, comps)
    pipe = LatentConsistencyModelPipeline(vae=comps["vae"], text_encoder=comps["text_encoder"],
                                          tokenizer=comps["tokenizer"], unet=unet,
                                          scheduler=LCMScheduler.from_config(ctx.sched_config()),
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompt, steps, guidance, seed = "a paper lantern on a river", 4, 8.5, 2024
    T, J = {}, {}
    rec = R.RngRecorder()
    with rec, torch.no_grad():
        o = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                 generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=R.step_recorder(T))
        latents = o.images
        dec = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        picture = pipe.image_processor.postprocess(dec, output_type="np")
        # The embedding matters: the same run at guidance 1 (w = 0) ends elsewhere.
        w0 = pipe(prompt, num_inference_steps=steps, guidance_scale=1.0, output_type="latent",
                  generator=torch.Generator("cpu").manual_seed(seed)).images
        emb = pipe.get_guidance_scale_embedding(torch.tensor([guidance - 1.0, 0.0, 3.25]), embedding_dim=8)
    R.finish_steps(T, J)
    J["rng_shapes"] = [list(d.shape) for d in rec.draws]
    T["latents"] = latents
    T["image_u8"] = u8(picture)[0]
    T["cond_proj_weight"] = w
    T["w_embedding"] = emb
    J["w_embedding_of"] = [guidance - 1.0, 0.0, 3.25]
    J["max_abs_latents_diff_guidance_1"] = float((w0 - latents).abs().max())
    J.update(case="lcm_seeded_test_distilled", model_dir="models/test", prompt=prompt, steps=steps,
             guidance_scale=guidance, seed=seed, time_cond_proj_dim=8, scheduler="LCMScheduler",
             scheduler_config=R.sched_public_config(pipe.scheduler),
             calls=(f"LatentConsistencyModelPipeline(unet with time_cond_proj_dim 8, LCMScheduler.from_config(model's "
                    f"config))(prompt, num_inference_steps={steps}, guidance_scale={guidance}, "
                    f"generator=torch.Generator('cpu').manual_seed({seed}))"),
             dmx=(f"dmx generate --model M --prompt '{prompt}' --steps {steps} --guidance-scale {guidance} "
                  f"--seed {seed} --save-latents L.safetensors --output O.png"),
             notes="step.<i>.latents after step i; latents = the last (the denoised sample); image_u8 = the picture "
                   "as diffusers writes it; w_embedding = get_guidance_scale_embedding(w_embedding_of, 8)")
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
        T = {k: v.contiguous() for k, v in T.items()}
        save_file(T, os.path.join(a.out, name + ".safetensors"))
        J["made_by"] = "tests/ref/make_lcm_refs.py " + name
        with open(os.path.join(a.out, name + ".json"), "w") as f:
            json.dump(J, f, indent=1, sort_keys=True)
        print("wrote", os.path.join(a.out, name), {k: list(v.shape) for k, v in T.items()})


if __name__ == "__main__":
    main()
