#!/usr/bin/env python3
"""References for dmx's Palette (tests/test_palette.cpp, PaletteRefUnit) computed by the unofficial Palette code,
Janspiry/Palette-Image-to-Image-Diffusion-Models (commit 136b29f), imported from its git mirror:

  schedule.*          make_beta_schedule for the configs' train (linear, 2000, 1e-6..0.01) and test (linear, 1000,
                      1e-4..0.09) schedules and, at 50 steps, quad / warmup10 / warmup50 / const / jsd / cosine;
                      the buffers of Network.set_new_noise_schedule (float32) for the test schedule
  embedding.*         guided_diffusion nn.gamma_embedding(gammas, 64) and the UNet's cond_embed
                      (Linear(64, 256), SiLU, Linear(256, 256), seeded weights saved with it)
  train_<task>_<loss> Network.forward with torch.randint / torch.rand patched to given t and u, the noise given, and
                      the denoiser replaced by eps_hat = tanh(0.5 cond + 0.7 y) (0.5 + gamma): the model's input, its
                      noise levels and the loss (masked for inpainting)
  step.*              p_sample at t = 999, 500, 1, 0 of the test schedule with a fixed y_t, the same denoiser and a
                      fixed noise (torch.randn_like patched)
  loop_<task>.*       Network.restoration on a 10-step linear schedule (1e-2..0.5) with the same denoiser, torch's
                      global generator seeded: inpainting (y_t = cond, the known region pasted back after each step)
                      and colorization (y_t = randn_like(cond))

Usage, with the harness of ../shared/ref set up (its README):
    . ../shared/ref/env.sh && $REF_PY tests/ref/make_palette_refs.py [--out DIR]
It reads the code from the mirror (DMX_PALETTE_MIRROR, default /work/.mirror/Janspiry+Palette-Image-to-Image-
Diffusion-Models/repo) into a temporary folder. DIR defaults to this folder. Two runs give bit-identical files.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("DMX_SHARED_DIR", os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared")))
sys.path.insert(0, os.path.join(SHARED, "ref", "shims"))
from safetensors.torch import save_file  # noqa: E402

MIRROR = os.environ.get("DMX_PALETTE_MIRROR",
                        "/work/.mirror/Janspiry+Palette-Image-to-Image-Diffusion-Models/repo")
COMMIT = "136b29f"


def import_palette(tmp):
    tar = subprocess.run(["git", "--git-dir", MIRROR, "archive", COMMIT, "models", "core"], check=True,
                         capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", tmp], input=tar, check=True)
    sys.path.insert(0, tmp)
    import models.network as network  # noqa: E402
    import models.guided_diffusion_modules.nn as gnn  # noqa: E402
    from models.guided_diffusion_modules.unet import UNet  # noqa: E402
    return network, gnn, UNet


def denoise(x, g):
    cond, y = x[:, :3], x[:, 3:]
    return torch.tanh(0.5 * cond + 0.7 * y) * (0.5 + g.reshape(-1, 1, 1, 1))


class Fn(torch.nn.Module):
    """A denoiser that is a plain function (Network.denoise_fn must be a Module)."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x, g):
        return self.f(x, g)


def make_network(network, n_timestep, start, end, schedule="linear"):
    unet = dict(in_channel=6, out_channel=3, inner_channel=32, channel_mults=[1], attn_res=[], res_blocks=1,
                image_size=8, num_head_channels=32)
    bs = {"schedule": schedule, "n_timestep": n_timestep, "linear_start": start, "linear_end": end}
    net = network.Network(unet, {"train": bs, "test": bs}, module_name="guided_diffusion")
    net.set_new_noise_schedule(device=torch.device("cpu"), phase="train")
    return net


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="palette-ref-")
    network, gnn, UNet = import_palette(tmp)
    T = {}
    meta = {"source": "Janspiry/Palette-Image-to-Image-Diffusion-Models@" + COMMIT, "cases": {}}

    # 1. Schedules.
    scheds = {"train": ("linear", 2000, 1e-6, 0.01), "test": ("linear", 1000, 1e-4, 0.09)}
    for kind in ["quad", "warmup10", "warmup50", "const", "jsd", "cosine"]:
        scheds[kind] = (kind, 50, 1e-4, 0.02)
    for name, (kind, n, s, e) in scheds.items():
        b = network.make_beta_schedule(kind, n, linear_start=s, linear_end=e)
        b = b if isinstance(b, torch.Tensor) else torch.from_numpy(b)
        T["schedule.%s.betas" % name] = b.to(torch.float64).contiguous()
        meta["cases"]["schedule." + name] = {"schedule": kind, "n_timestep": n, "linear_start": s, "linear_end": e}
    net = make_network(network, 1000, 1e-4, 0.09)
    for buf in ["gammas", "sqrt_recip_gammas", "sqrt_recipm1_gammas", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2"]:
        T["schedule.test." + buf] = getattr(net, buf).clone()

    # 2. The noise-level embedding and the conditioning MLP.
    g = torch.tensor([0.0, 1e-5, 0.01, 0.3, 0.5, 0.9, 0.9999, 1.0], dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    g = torch.cat([g, torch.rand(8, generator=gen)])
    T["embedding.gammas"] = g
    T["embedding.features"] = gnn.gamma_embedding(g, 64)
    torch.manual_seed(6)
    u = UNet(image_size=8, in_channel=6, inner_channel=64, out_channel=3, res_blocks=1, attn_res=[],
             channel_mults=[1])
    with torch.no_grad():
        for p in u.cond_embed.parameters():
            p.normal_(0, 0.2)
        T["embedding.linear_1.weight"] = u.cond_embed[0].weight.clone()
        T["embedding.linear_1.bias"] = u.cond_embed[0].bias.clone()
        T["embedding.linear_2.weight"] = u.cond_embed[2].weight.clone()
        T["embedding.linear_2.bias"] = u.cond_embed[2].bias.clone()
        T["embedding.emb"] = u.cond_embed(gnn.gamma_embedding(g, 64))

    # 3. Training steps (Network.forward), t and u given, the denoiser replaced.
    net = make_network(network, 2000, 1e-6, 0.01)
    B, H = 4, 16
    for task, masked in [("inpaint", True), ("colorize", False)]:
        for loss in ["l2", "l1"]:
            key = "train_%s_%s" % (task, loss)
            gen = torch.Generator().manual_seed(11)
            y0 = torch.rand(B, 3, H, H, generator=gen) * 2 - 1
            cond = torch.rand(B, 3, H, H, generator=gen) * 2 - 1
            noise = torch.randn(B, 3, H, H, generator=gen)
            t = torch.tensor([1, 2, 1000, 1999], dtype=torch.long)
            uu = torch.rand(B, 1, generator=gen)
            mask = (torch.rand(B, 1, H, H, generator=gen) > 0.5).float() if masked else None
            seen = {}

            def fn(x, gm):
                seen["x"], seen["g"] = x.clone(), gm.clone()
                return denoise(x, gm)

            net.denoise_fn = Fn(fn)
            net.set_loss(torch.nn.functional.mse_loss if loss == "l2" else torch.nn.functional.l1_loss)
            orig_randint, orig_rand = torch.randint, torch.rand
            torch.randint = lambda *a, **k: t.clone()
            torch.rand = lambda *a, **k: uu.clone()
            try:
                out = net(y0, cond, mask=mask, noise=noise)
            finally:
                torch.randint, torch.rand = orig_randint, orig_rand
            for k, v in [("y0", y0), ("cond", cond), ("noise", noise), ("t", t), ("u", uu.view(-1)),
                         ("model_input", seen["x"]), ("gammas", seen["g"].view(-1)), ("loss", out.reshape(1))]:
                T[key + "." + k] = v.contiguous()
            if masked:
                T[key + ".mask"] = mask
            meta["cases"][key] = {"task": task, "loss": loss}

    # 4. One sampler step at several t of the test schedule.
    net = make_network(network, 1000, 1e-4, 0.09)
    net.denoise_fn = Fn(denoise)
    gen = torch.Generator().manual_seed(21)
    y_t = torch.randn(2, 3, 8, 8, generator=gen)
    cond = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
    z = torch.randn(2, 3, 8, 8, generator=gen)
    T["step.y_t"], T["step.cond"], T["step.noise"] = y_t, cond, z
    orig = torch.randn_like
    torch.randn_like = lambda x: z.clone()
    try:
        for ti in [999, 500, 1, 0]:
            tt = torch.full((2,), ti, dtype=torch.long)
            T["step.out_%d" % ti] = net.p_sample(y_t, tt, y_cond=cond)
    finally:
        torch.randn_like = orig

    # 5. Whole restoration loops on a short schedule, torch's global generator seeded.
    net = make_network(network, 10, 1e-2, 0.5)
    net.denoise_fn = Fn(denoise)
    for task in ["inpaint", "colorize"]:
        gen = torch.Generator().manual_seed(31)
        known = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
        mask = torch.zeros(2, 1, 8, 8)
        mask[:, :, 2:6, 1:7] = 1
        if task == "inpaint":
            cond = known * (1 - mask) + mask * torch.randn(2, 3, 8, 8, generator=gen)
            torch.manual_seed(77)
            out, _ = net.restoration(cond, y_t=cond, y_0=known, mask=mask, sample_num=2)
            T["loop_inpaint.mask"] = mask
        else:
            cond = known.mean(1, keepdim=True).expand(2, 3, 8, 8).contiguous()
            torch.manual_seed(77)
            out, _ = net.restoration(cond, sample_num=2)
        T["loop_%s.known" % task], T["loop_%s.cond" % task], T["loop_%s.out" % task] = known, cond, out
        meta["cases"]["loop_" + task] = {"seed": 77, "schedule": "linear", "n_timestep": 10, "linear_start": 1e-2,
                                         "linear_end": 0.5}

    os.makedirs(args.out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sorted(T.items())}, os.path.join(args.out, "palette_refs.safetensors"))
    with open(os.path.join(args.out, "palette_refs.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.write("\n")
    print("wrote", os.path.join(args.out, "palette_refs.*"), len(T), "tensors")


if __name__ == "__main__":
    main()
