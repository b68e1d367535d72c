#!/usr/bin/env python3
"""References for dmx's VQModel (tests/test_scene.cpp, VQModelRefUnit), computed by diffusers 0.27.2's VQModel:

  vq_model_refs.json          the model's config (as save_pretrained writes it)
  vq_model_refs.safetensors   model.*: its seeded weights; x: the input [2, 12, 32, 32]; h: encode(x).latents;
                              indices: the VectorQuantizer's codes of h; quant: the quantized h; dec: decode(h);
                              dec_nq: decode(h, force_not_quantize=True)

Two levels of blocks (16, 32), 8 groups, latent 8, vq_embed_dim 4, 64 codes, the codebook drawn from N(0, 0.2) so
that the codes spread over the encoder's outputs. Usage, with the harness of ../shared/ref set up (its README):
    . ../shared/ref/env.sh && $REF_PY tests/ref/make_vq_refs.py [--out DIR]
"""
import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("DMX_SHARED_DIR", os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared")))
sys.path.insert(0, os.path.join(SHARED, "ref", "shims"))
from safetensors.torch import save_file  # noqa: E402
from diffusers import VQModel  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = VQModel(in_channels=12, out_channels=12, down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                    latent_channels=8, sample_size=32, num_vq_embeddings=64, norm_num_groups=8, vq_embed_dim=4,
                    scaling_factor=1.0).eval()
    with torch.no_grad():
        model.quantize.embedding.weight.normal_(0, 0.2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 32, 32, generator=g)
    with torch.no_grad():
        h = model.encode(x).latents
        quant, _, (_, _, idx) = model.quantize(h)
        dec = model.decode(h).sample
        dec_nq = model.decode(h, force_not_quantize=True).sample
    tensors = {"model." + k: v.contiguous() for k, v in model.state_dict().items()}
    tensors.update({"x": x, "h": h, "indices": idx.reshape(2, h.shape[2], h.shape[3]).to(torch.int64),
                    "quant": quant, "dec": dec, "dec_nq": dec_nq})
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(args.out, "vq_model_refs.safetensors"))
    cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    cfg["_class_name"] = "VQModel"
    with open(os.path.join(args.out, "vq_model_refs.json"), "w") as f:
        json.dump(cfg, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
