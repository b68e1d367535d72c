#!/usr/bin/env python3
"""Small seed-driven references for dmx's end-to-end golden tests: each case runs a whole diffusers 0.27.2
pipeline (or the community pipelines of that tag) from torch.Generator('cpu').manual_seed(seed) with nothing
injected, on a tiny fixture model of ../shared/fixtures/sd-tiny, and records what the matching dmx command must
reproduce, with that command line (JSON "dmx"; paths relative to the fixtures folder for models/..., to this
folder for the input pictures).

    diffedit_seeded_*   StableDiffusionDiffEditPipeline: generate_mask -> invert -> __call__, one generator
                        (tests/test_diffedit.cpp, DiffEditSeededGolden)
    blended_seeded_*    StableDiffusionInpaintPipeline with a 4-channel UNet (what `dmx generate --init-image
                        --mask` reproduces; tests/test_blended_latent.cpp, BlendedLatentSeededGolden)
    unclip_seeded_*     StableUnCLIPPipeline (prior -> noise augmentation -> decoder) and
    variations_seeded_* StableUnCLIPImg2ImgPipeline on the fixtures' models/unclip and models/unclip_img2img,
                        settings the fixtures lack: other prompts, sizes, noise levels, prior steps and guidance,
                        a negative prompt, 2 images, an ancestral sampler, no guidance (tests/test_stable_unclip.cpp,
                        StableUnCLIPSeededGolden)
    p2p_image_*         `dmx p2p --image`: DDIM inversion (DDIMInverseScheduler, guidance 1, posterior mean) or
                        null-text inversion (examples/community/pipeline_null_text_inversion.py, the authors'
                        null_optimization), then examples/community/pipeline_prompt2prompt.py from the inverted
                        latents, with the per-step null-text embeddings (tests/test_p2p.cpp, P2PSeededGolden)

Usage, with the harness of ../shared/ref set up (its README):
    . ../shared/ref/env.sh && $REF_PY tests/ref/make_seeded_refs.py [--out DIR] [CASE ...]
DIR defaults to this folder. The tiny sd15 UNet downsamples latents 3 times: below 128x128 pictures its deepest
GroupNorms see 1 or 2 positions and a 1e-6 change of the input moves the picture by tens of levels (measured), so
sd15 cases are 128 pixels or more and the smaller ones use the test model (VAE factor 2, one downsampling). Torch runs 2 threads (REF_THREADS=1 re-runs a case with 1 to measure the
reference's own float noise). Two runs give bit-identical files.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("DMX_SHARED_DIR", os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared")))
FIXTURES = os.path.join(SHARED, "fixtures", "sd-tiny")
sys.path.insert(0, os.path.join(SHARED, "ref"))
import reference as R  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

DIFFUSERS_GIT = os.environ.get("DIFFUSERS_GIT", "/work/.mirror/huggingface+diffusers/repo")
CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def write_png(path, arr):
    import PIL.Image

    PIL.Image.fromarray(arr).save(path, format="PNG")
    return PIL.Image.open(path).convert("RGB" if arr.ndim == 3 else "L")


def u8(images_np):  # [B, H, W, 3] float in [0, 1] (diffusers' output_type="np") -> uint8 as written to PNG
    return (torch.from_numpy(np.ascontiguousarray(images_np)) * 255).round().to(torch.uint8)


def community(name):
    """A community pipeline file of the pinned tag, loaded as a module."""
    import importlib.util

    src = os.path.join(os.environ.get("REFDEPS", ""), "community", name + ".py")
    if not os.path.exists(src):
        code = subprocess.check_output(["git", "--git-dir", DIFFUSERS_GIT, "show",
                                        "v0.27.2:examples/community/" + name + ".py"])
        src = os.path.join(tempfile.mkdtemp(prefix="refharness-"), name + ".py")
        with open(src, "wb") as f:
            f.write(code)
    spec = importlib.util.spec_from_file_location("refharness_" + name, src)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------------------------------------
# DiffEdit: the whole chain from one generator (as ../shared/ref/diffedit_seeded.py, other settings)


def diffedit(out, name, variant, W, H, steps, ratio, maps, seed, negative, image_seed, keep_inverted=True):
    from diffusers import StableDiffusionDiffEditPipeline

    src, tgt = "a cat sitting on a sofa", "a dog sitting on a sofa"
    img = write_png(os.path.join(out, name + ".image.png"), R.make_image(H, W, seed=image_seed))
    ctx = R.Ctx(os.path.join(FIXTURES, "models", variant))
    comps = ctx.components()
    comps["inverse_scheduler"] = R.make_scheduler("ddim_inverse", ctx.sched_config())
    pipe = StableDiffusionDiffEditPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    neg = negative or None
    T, J = {}, {}
    rec = R.RngRecorder()
    g = torch.Generator("cpu").manual_seed(seed)
    with rec, torch.no_grad():
        mask = pipe.generate_mask(image=img, source_prompt=src, target_prompt=tgt, num_inference_steps=steps,
                                  num_maps_per_mask=maps, source_negative_prompt=neg, target_negative_prompt=neg,
                                  generator=g)
        inv = pipe.invert(prompt=src, image=img, num_inference_steps=steps, inpaint_strength=ratio,
                          negative_prompt=neg, generator=g)
        o = pipe(prompt=tgt, mask_image=mask, image_latents=inv.latents, inpaint_strength=ratio,
                 negative_prompt=neg, num_inference_steps=steps, generator=g, output_type="latent")
        latents = o.images
        dec = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        picture = pipe.image_processor.postprocess(dec, output_type="np")  # = output_type="np"
    J["rng_shapes"] = [list(d.shape) for d in rec.draws]  # the draws themselves: replayed by the test
    T["mask"] = torch.from_numpy(np.asarray(mask)).float()
    if keep_inverted:  # the phase between the mask and the edit (left out where it would weigh tens of KB)
        T["inv_latents"] = inv.latents
    T["latents"] = latents
    T["image_u8"] = u8(picture)[0]
    neg_arg = f" --negative-prompt '{negative}'" if negative else ""
    J.update(case=name, model_dir=f"models/{variant}", image=name + ".image.png", source_prompt=src,
             target_prompt=tgt, negative_prompt=negative, width=W, height=H, steps=steps, encode_ratio=ratio,
             num_maps_per_mask=maps, seed=seed, mask_fraction=float(T["mask"].mean()),
             calls=(f"g = torch.Generator('cpu').manual_seed({seed}); mask = pipe.generate_mask(image, src, tgt, "
                    f"num_inference_steps={steps}, num_maps_per_mask={maps}, source_negative_prompt=neg, "
                    f"target_negative_prompt=neg, generator=g); inv = pipe.invert(prompt=src, image, "
                    f"num_inference_steps={steps}, inpaint_strength={ratio}, negative_prompt=neg, generator=g); "
                    f"pipe(prompt=tgt, mask_image=mask, image_latents=inv.latents, inpaint_strength={ratio}, "
                    f"negative_prompt=neg, num_inference_steps={steps}, generator=g); everything else at "
                    "diffusers' defaults (mask encode strength 0.5, threshold ratio 3, guidance 7.5 for all "
                    "three phases)"),
             dmx=(f"dmx diffedit --model models/{variant} --image {name}.image.png --source-prompt '{src}' "
                  f"--target-prompt '{tgt}'{neg_arg} --steps {steps} --encode-ratio {ratio} --num-maps {maps} "
                  f"--seed {seed} --save-latents L.safetensors --mask-output M.png --output O.png"),
             notes=("draws (rng_shapes): the mask's posterior noise, the mask's encode noise, the inversion's "
                    "posterior noise; the edit (DDIM, eta 0) draws nothing. inv_latents[0, k] noisiest first."))
    return T, J


@case
def diffedit_seeded_sd15_square_neg(out):
    """sd15 128x128, 2 maps, encode ratio 0.5, a negative prompt."""
    return diffedit(out, "diffedit_seeded_sd15_square_neg", "sd15", 128, 128, 10, 0.5, 2, 23, "blurry", 5,
                    keep_inverted=False)


@case
def diffedit_seeded_test_wide_neg(out):
    """diffusers' test UNet (VAE factor 2), 32x16, 10 maps, encode ratio 0.8, a negative prompt."""
    return diffedit(out, "diffedit_seeded_test_wide_neg", "test", 32, 16, 10, 0.8, 10, 3, "low quality", 9)


@case
def diffedit_seeded_test_square(out):
    """diffusers' test UNet, 16x16, 10 maps, encode ratio 0.5, no negative prompt."""
    return diffedit(out, "diffedit_seeded_test_square", "test", 16, 16, 8, 0.5, 10, 7, "", 6)


# ----------------------------------------------------------------------------------------------------------
# Blended editing: StableDiffusionInpaintPipeline with a 4-channel UNet, from a seed


def blended(out, name, variant, size, steps, strength, seed, scheduler, n, negative):
    from diffusers import StableDiffusionInpaintPipeline

    prompt = "a bowl of fruit on a wooden table"
    img = write_png(os.path.join(out, name + ".image.png"), R.make_image(size, size, seed=2))
    mask = write_png(os.path.join(out, name + ".mask.png"), R.make_mask(size, size))
    model_dir = os.path.join(FIXTURES, "models", variant)
    ctx = R.Ctx(model_dir)
    comps = ctx.components()
    if scheduler:
        comps["scheduler"] = R.make_scheduler(scheduler, ctx.sched_config())
    else:  # the model's own scheduler, as `dmx generate` without --scheduler
        import diffusers

        cls = getattr(diffusers, ctx.sched_config()["_class_name"])
        comps["scheduler"] = cls.from_config(ctx.sched_config())
    pipe = StableDiffusionInpaintPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    T, J = {}, {}
    rec = R.RngRecorder()
    g = torch.Generator("cpu").manual_seed(seed)
    with rec, torch.no_grad():
        o = pipe(prompt, image=img, mask_image=mask, height=size, width=size, strength=strength,
                 num_inference_steps=steps, guidance_scale=7.5, negative_prompt=negative or None,
                 num_images_per_prompt=n, generator=g, output_type="latent")
        latents = o.images
        dec = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        picture = pipe.image_processor.postprocess(dec, output_type="np")
    J["rng_shapes"] = [list(d.shape) for d in rec.draws]
    T["latents"] = latents
    T["image_u8"] = u8(picture)
    sched_arg = f" --scheduler {scheduler}" if scheduler else ""
    neg_arg = f" --negative-prompt '{negative}'" if negative else ""
    J.update(case=name, model_dir=f"models/{variant}", image=name + ".image.png", mask=name + ".mask.png",
             prompt=prompt, negative_prompt=negative, size=size, steps=steps, strength=strength, seed=seed,
             num_images=n, scheduler=scheduler or type(pipe.scheduler).__name__,
             calls=(f"StableDiffusionInpaintPipeline(4-channel UNet, {type(pipe.scheduler).__name__})(prompt, image, "
                    f"mask_image, height={size}, width={size}, strength={strength}, num_inference_steps={steps}, "
                    f"guidance_scale=7.5, negative_prompt=neg, num_images_per_prompt={n}, "
                    f"generator=torch.Generator('cpu').manual_seed({seed}))"),
             dmx=(f"dmx generate --model models/{variant} --prompt '{prompt}'{neg_arg} --init-image "
                  f"{name}.image.png --mask {name}.mask.png --strength {strength} --steps {steps}{sched_arg} "
                  f"--num-images {n} --seed {seed} --save-latents L.safetensors --output O.png"),
             notes=("latents after the final blend (what --save-latents holds), image_u8 [n, H, W, 3] the decoded "
                    "pictures (not re-composited). Draws: the image's posterior noise, the initial noise, the "
                    "masked image's posterior noise (unused by a 4-channel UNet), then the scheduler's."))
    return T, J


@case
def blended_seeded_sd15(out):
    """sd15 128x128, the model's scheduler (PNDM), strength 0.75: noise added to the image's posterior sample."""
    return blended(out, "blended_seeded_sd15", "sd15", 128, 10, 0.75, 17, None, 1, "")


@case
def blended_seeded_test_euler_a(out):
    """test model 32x32, Euler ancestral (draws every step), strength 1 (--mask's default), 2 images."""
    return blended(out, "blended_seeded_test_euler_a", "test", 32, 6, 1.0, 5, "euler_a", 2, "low quality")


# ----------------------------------------------------------------------------------------------------------
# Prompt-to-Prompt on a real image: DDIM or null-text inversion, then the community P2P loop


def p2p_image(out, name, variant, size, steps, seed, null_text):
    from diffusers import DDIMScheduler

    prompt, edit = "a cat wearing a red hat", "a dog wearing a red hat"
    arr = R.make_image(size, size, seed=8)
    png = os.path.join(out, name + ".image.png")
    write_png(png, arr)
    model_dir = os.path.join(FIXTURES, "models", variant)
    ctx = R.Ctx(model_dir)
    T, J = {}, {}
    rec = R.RngRecorder()
    with rec:
        if null_text:
            mod = community("pipeline_null_text_inversion")
            comps = ctx.components(fresh=True)
            comps["scheduler"] = R.make_scheduler("ddim", ctx.sched_config())
            nt = mod.NullTextPipeline(**comps)
            nt.set_progress_bar_config(disable=True)
            with tempfile.TemporaryDirectory() as tmp:  # invert() caches the embeddings beside the image
                path = os.path.join(tmp, "image.png")
                write_png(path, arr)
                x_T, uncond = nt.invert(path, prompt, num_inner_steps=10, early_stop_epsilon=1e-5,
                                        num_inference_steps=steps)
            uncond = uncond.detach()  # [steps, 1, 77, D]
            with torch.no_grad():
                rec_latents = nt(prompt, uncond, x_T, num_inference_steps=steps, guidance_scale=7.5,
                                 output_type="latent").images
            T["null_text.reconstruction_latents"] = rec_latents
        else:
            inv = R.make_scheduler("ddim_inverse", ctx.sched_config())
            inv.set_timesteps(steps)
            unet, vae = ctx.unet(), ctx.vae()
            x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 127.5 - 1.0
            with torch.no_grad():
                z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
                emb = ctx.embeds([prompt])
                for t in inv.timesteps:
                    z = inv.step(unet(z, t, emb).sample, t, z).prev_sample
            x_T, uncond = z, None
        T["x_T"] = x_T
        mod = community("pipeline_prompt2prompt")
        comps = ctx.components(fresh=True)  # the pipeline installs its own attention processors
        comps["scheduler"] = R.make_scheduler("ddim", ctx.sched_config())
        pipe = mod.Prompt2PromptPipeline(**comps)
        pipe.set_progress_bar_config(disable=True)
        step = {"i": 0}
        if uncond is not None:  # the authors' loop: context = [uncond_embeddings[i] for both rows, text rows]
            forward = pipe.unet.forward

            def with_null_text(sample, t, encoder_hidden_states=None, **kw):
                e = encoder_hidden_states.clone()
                e[: e.shape[0] // 2] = uncond[step["i"]].expand(e.shape[0] // 2, -1, -1)
                return forward(sample, t, encoder_hidden_states=e, **kw)

            pipe.unet.forward = with_null_text

        def cb(i, t, latents):
            step["i"] = i + 1

        kw = {"edit_type": "replace", "n_cross_replace": 0.4, "n_self_replace": 0.4}
        with torch.no_grad():
            o = pipe(prompt=[prompt, edit], num_inference_steps=steps, guidance_scale=7.5,
                     latents=x_T.repeat(2, 1, 1, 1), cross_attention_kwargs=kw, output_type="np", height=size,
                     width=size, generator=torch.Generator("cpu").manual_seed(seed), callback=cb, callback_steps=1)
    assert step["i"] == steps, step
    J["rng_shapes"] = [list(d.shape) for d in rec.draws]
    assert not rec.draws, "with --image nothing is drawn: the seed must not matter"
    T["image_u8"] = u8(o.images)  # [source, edit]
    nt_arg = " --null-text-inversion" if null_text else ""
    J.update(case=name, model_dir=f"models/{variant}", image=name + ".image.png", prompt=prompt, edit_prompt=edit,
             size=size, steps=steps, seed=seed, null_text_inversion=null_text,
             calls=(("NullTextPipeline.invert(image, prompt, num_inner_steps=10, early_stop_epsilon=1e-5, "
                     f"num_inference_steps={steps}) -> x_T, per-step null-text embeddings; "
                     if null_text else
                     f"z0 = posterior mean * scaling; {steps} DDIMInverseScheduler steps at guidance 1 -> x_T; ") +
                    "Prompt2PromptPipeline(prompt=[prompt, edit], latents=x_T.repeat(2), edit_type='replace', "
                    f"n_cross_replace=0.4, n_self_replace=0.4, num_inference_steps={steps}, guidance_scale=7.5, "
                    f"generator=torch.Generator('cpu').manual_seed({seed}))" +
                    (" with the uncond rows of step i replaced by the i-th null-text embedding" if null_text else "")),
             dmx=(f"dmx p2p --model models/{variant} --image {name}.image.png --prompt '{prompt}' --edit-prompt "
                  f"'{edit}' --mode replace --cross-replace-steps 0.4 --self-replace-steps 0.4 --steps {steps} "
                  f"--seed {seed}{nt_arg} --output O.png"),
             notes="image_u8 = [source, edit] as the pipeline writes them; DDIM eta 0 draws nothing.")
    return T, J


@case
def p2p_image_ddim_test(out):
    """diffusers' test UNet 32x32, DDIM inversion then a word swap."""
    return p2p_image(out, "p2p_image_ddim_test", "test", 32, 10, 31, False)


@case
def p2p_image_null_text_test(out):
    """diffusers' test UNet 32x32, null-text inversion (10 inner steps) then a word swap."""
    return p2p_image(out, "p2p_image_null_text_test", "test", 32, 10, 31, True)


# ----------------------------------------------------------------------------------------------------------
# Stable unCLIP: text -> prior -> noised image embedding -> decoder, and image variations, one generator.

DMX_SCHEDULER = {"dpm2m": "dpmpp_2m", "dpm2m_karras": "dpmpp_2m_karras"}  # the harness's names -> dmx's


def _unclip_capture(pipe, cap):
    orig = pipe.noise_image_embeddings

    def hook(image_embeds, noise_level, noise=None, generator=None):
        cap["image_embeds"] = image_embeds.detach().clone()
        out = orig(image_embeds=image_embeds, noise_level=noise_level, noise=noise, generator=generator)
        cap["noised_image_embeds"] = out.detach().clone()
        return out

    pipe.noise_image_embeddings = hook


def _unclip_finish(pipe, rec, latents, T, J):
    with torch.no_grad():
        dec = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        picture = pipe.image_processor.postprocess(dec, output_type="np")
    J["rng_shapes"] = [list(d.shape) for d in rec.draws]
    T["latents"] = latents
    T["image_u8"] = u8(picture)


def unclip_seeded(out, name, prompt, neg, W, H, prior_steps, prior_cfg, noise_level, steps, cfg, n, seed, scheduler):
    from diffusers import StableUnCLIPPipeline

    pipe = StableUnCLIPPipeline.from_pretrained(os.path.join(FIXTURES, "models", "unclip"))
    pipe.set_progress_bar_config(disable=True)
    if scheduler:
        pipe.scheduler = R.make_scheduler(scheduler, pipe.scheduler.config)
    cap, T, J = {}, {}, {}
    _unclip_capture(pipe, cap)
    rec = R.RngRecorder()
    with rec, torch.no_grad():
        latents = pipe(prompt, negative_prompt=neg or None, height=H, width=W, num_inference_steps=steps,
                       guidance_scale=cfg, noise_level=noise_level, prior_num_inference_steps=prior_steps,
                       prior_guidance_scale=prior_cfg, num_images_per_prompt=n,
                       generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
    _unclip_finish(pipe, rec, latents, T, J)
    T["prior.image_embeds"] = cap["image_embeds"]
    T["noised_image_embeds"] = cap["noised_image_embeds"]
    sched_arg = f" --scheduler {DMX_SCHEDULER.get(scheduler, scheduler)}" if scheduler else ""
    neg_arg = f" --negative-prompt '{neg}'" if neg else ""
    J.update(case=name, model_dir="models/unclip", prompt=prompt, negative_prompt=neg, width=W, height=H,
             prior_steps=prior_steps, prior_guidance_scale=prior_cfg, noise_level=noise_level, steps=steps,
             guidance_scale=cfg, num_images=n, seed=seed, scheduler=scheduler or type(pipe.scheduler).__name__,
             calls=(f"StableUnCLIPPipeline({type(pipe.scheduler).__name__})(prompt, negative_prompt, height={H}, "
                    f"width={W}, num_inference_steps={steps}, guidance_scale={cfg}, noise_level={noise_level}, "
                    f"prior_num_inference_steps={prior_steps}, prior_guidance_scale={prior_cfg}, "
                    f"num_images_per_prompt={n}, generator=torch.Generator('cpu').manual_seed({seed}))"),
             dmx=(f"dmx generate --model models/unclip --prompt '{prompt}'{neg_arg} --width {W} --height {H} "
                  f"--prior-steps {prior_steps} --prior-guidance-scale {prior_cfg} --noise-level {noise_level} "
                  f"--steps {steps} --guidance-scale {cfg}{sched_arg} --num-images {n} --seed {seed} "
                  f"--save-latents L.safetensors --output O.png"),
             notes=("latents after the last decoder step (what --save-latents holds), image_u8 [n, H, W, 3]; "
                    "prior.image_embeds [n, 32] after post_process_latents, noised_image_embeds [n, 64] the "
                    "conditional class labels. Draws: prior latents [n,32], one per prior step with t > 0, the "
                    "embedding noise [n,32], the decoder latents, then the decoder scheduler's."))
    return T, J


@case
def unclip_seeded_neg_n2_euler_a(out):
    """96x64, 7 prior steps (guidance 3), noise level 250, Euler a (a draw per step), negative prompt, 2 images."""
    return unclip_seeded(out, "unclip_seeded_neg_n2_euler_a", "a lighthouse on a cliff at night, oil painting",
                         "blurry, low quality", 96, 64, 7, 3.0, 250, 5, 6.0, 2, 7301, "euler_a")


@case
def unclip_seeded_unguided_default(out):
    """64x96, the folder's scheduler (DDIM), 3 prior steps without prior guidance (1.0), decoder guidance 1
    (no zeros for an unconditional half), noise level 999 (the last the scheduler takes)."""
    return unclip_seeded(out, "unclip_seeded_unguided_default", "two red apples on a plate", "", 64, 96, 3, 1.0,
                         999, 4, 1.0, 1, 7302, None)


@case
def unclip_seeded_defaults(out):
    """Nothing but the prompt and the seed: diffusers' defaults (64x64, 25 prior steps, prior guidance 4, noise level
    0, 20 steps of the folder's DDIM, guidance 10), which `dmx generate` must use on an unCLIP folder."""
    from diffusers import StableUnCLIPPipeline

    name, prompt, seed = "unclip_seeded_defaults", "a small blue boat", 9001
    pipe = StableUnCLIPPipeline.from_pretrained(os.path.join(FIXTURES, "models", "unclip"))
    pipe.set_progress_bar_config(disable=True)
    cap, T, J = {}, {}, {}
    _unclip_capture(pipe, cap)
    rec = R.RngRecorder()
    with rec, torch.no_grad():
        latents = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
    _unclip_finish(pipe, rec, latents, T, J)
    T["prior.image_embeds"] = cap["image_embeds"]
    T["noised_image_embeds"] = cap["noised_image_embeds"]
    J.update(case=name, model_dir="models/unclip", prompt=prompt, num_images=1, seed=seed,
             calls=f"StableUnCLIPPipeline(prompt, generator=torch.Generator('cpu').manual_seed({seed})) (all defaults)",
             dmx=f"dmx generate --model models/unclip --prompt '{prompt}' --seed {seed} --save-latents L.safetensors "
                 f"--output O.png",
             notes="every other setting is the pipeline's default; draws: 1 + 24 prior, 1 embedding, 1 decoder latents")
    return T, J


def variations_seeded(out, name, img_w, img_h, prompt, neg, noise_level, steps, cfg, n, seed, scheduler):
    from diffusers import StableUnCLIPImg2ImgPipeline

    pipe = StableUnCLIPImg2ImgPipeline.from_pretrained(os.path.join(FIXTURES, "models", "unclip_img2img"))
    pipe.set_progress_bar_config(disable=True)
    if scheduler:
        pipe.scheduler = R.make_scheduler(scheduler, pipe.scheduler.config)
    img = write_png(os.path.join(out, name + ".image.png"), R.make_image(img_h, img_w, seed=5))
    cap, T, J = {}, {}, {}
    _unclip_capture(pipe, cap)
    rec = R.RngRecorder()
    with rec, torch.no_grad():
        latents = pipe(img, prompt=prompt or None, negative_prompt=neg or None, num_inference_steps=steps,
                       guidance_scale=cfg, noise_level=noise_level, num_images_per_prompt=n,
                       generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
    _unclip_finish(pipe, rec, latents, T, J)
    T["clip_image_embeds"] = cap["image_embeds"]
    T["noised_image_embeds"] = cap["noised_image_embeds"]
    sched_arg = f" --scheduler {DMX_SCHEDULER.get(scheduler, scheduler)}" if scheduler else ""
    prompt_arg = f" --prompt '{prompt}'" if prompt else ""
    neg_arg = f" --negative-prompt '{neg}'" if neg else ""
    J.update(case=name, model_dir="models/unclip_img2img", image=name + ".image.png", prompt=prompt,
             negative_prompt=neg, noise_level=noise_level, steps=steps, guidance_scale=cfg, num_images=n, seed=seed,
             scheduler=scheduler or type(pipe.scheduler).__name__, image_width=img_w, image_height=img_h,
             calls=(f"StableUnCLIPImg2ImgPipeline({type(pipe.scheduler).__name__})(image, prompt, negative_prompt, "
                    f"num_inference_steps={steps}, guidance_scale={cfg}, noise_level={noise_level}, "
                    f"num_images_per_prompt={n}, generator=torch.Generator('cpu').manual_seed({seed}))"),
             dmx=(f"dmx variations --model models/unclip_img2img --image {name}.image.png{prompt_arg}{neg_arg} "
                  f"--noise-level {noise_level} --steps {steps} --guidance-scale {cfg}{sched_arg} --num-images {n} "
                  f"--seed {seed} --save-latents L.safetensors --output O.png"),
             notes=("the picture's CLIP embedding is noised once ([1,32] noise) and repeated for the n images; "
                    "draws: the embedding noise, the decoder latents [n,4,8,8], then the scheduler's."))
    return T, J


@case
def variations_seeded_crop_n2_dpm(out):
    """An 80x56 picture (resized to 45x32 with PIL bicubic, centre-cropped), prompt and negative prompt, noise
    level 120, DPM-Solver++ 2M, 2 images."""
    return variations_seeded(out, "variations_seeded_crop_n2_dpm", 80, 56, "a watercolour of a harbour",
                             "dark, grainy", 120, 5, 5.0, 2, 7401, "dpm2m")


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
        J["made_by"] = "tests/ref/make_seeded_refs.py " + name
        with open(os.path.join(a.out, name + ".json"), "w") as f:
            json.dump(J, f, indent=1, sort_keys=True)
        print("wrote", os.path.join(a.out, name), {k: list(v.shape) for k, v in T.items()})


if __name__ == "__main__":
    main()
