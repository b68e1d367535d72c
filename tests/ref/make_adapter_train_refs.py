#!/usr/bin/env python3
"""diffusers 0.27.2 on T2I-Adapters that `dmx train adapter` wrote: T2IAdapter.from_pretrained must load the folder
as it is (config.json + diffusion_pytorch_model.safetensors), and its features on a control picture must equal
dmx's within 1e-5 (AdapterParityUnit in tests/test_adapter_recipe.cpp reads what this writes and runs dmx on the
same picture).

    emoji_canny   models/emoji-adapter-canny (the bundled Canny adapter: full_adapter, 1 input channel, channels
                  64/128/192, downscale 4; fp16 as shipped), on a 32x32 picture and a 96x64 one
    tiny_light    tests/ref/adapter_train_light (a light_adapter, 3 input channels, channels 32/64/64, downscale 8,
                  float32, trained 3 steps by `dmx train adapter` on the tiny sd15 test model; its command line is in
                  its dmx_train.txt), on a 64x64 picture

For each case: <case>.safetensors with input_<i> ([1, C, H, W] float32 in [0, 1], the picture drawn here with
torch.Generator().manual_seed(seed)) and feature_<i>_<k> (the adapter's k-th feature on it, float32), and
<case>.json with the shapes, the folder, the adapter's parameter count and the config diffusers read.

Usage, with the harness of ../shared/ref set up (its README):
    . ../shared/ref/env.sh && $REF_PY tests/ref/make_adapter_train_refs.py [--out DIR] [CASE ...]
DIR defaults to this folder. Two runs give bit-identical files.
"""
import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
SHARED = os.environ.get("DMX_SHARED_DIR", os.path.normpath(os.path.join(REPO, "..", "shared")))
sys.path.insert(0, os.path.join(SHARED, "ref"))
from diffusers import T2IAdapter  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

CASES = {
    "emoji_canny": (os.path.join(REPO, "models", "emoji-adapter-canny"), [(32, 32, 1), (96, 64, 2)]),
    "tiny_light": (os.path.join(HERE, "adapter_train_light"), [(64, 64, 3)]),
}


def run(name, out):
    folder, pictures = CASES[name]
    adapter = T2IAdapter.from_pretrained(folder)  # float32 model (fp16 files are upcast on load)
    adapter.eval()
    cfg = dict(adapter.config)
    T, J = {}, {"folder": os.path.relpath(folder, REPO), "config": {k: v for k, v in cfg.items()
                                                                     if not k.startswith("_")},
                "parameters": sum(p.numel() for p in adapter.parameters()), "inputs": []}
    for i, (w, h, seed) in enumerate(pictures):
        g = torch.Generator().manual_seed(seed)
        x = torch.rand((1, cfg["in_channels"], h, w), generator=g)
        x = (x * 255).round() / 255  # 8-bit values, as a picture gives
        with torch.no_grad():
            feats = adapter(x)
        T[f"input_{i}"] = x.contiguous()
        for k, f in enumerate(feats):
            T[f"feature_{i}_{k}"] = f.float().contiguous()
        J["inputs"].append({"width": w, "height": h, "seed": seed, "features": [list(f.shape) for f in feats]})
    save_file(T, os.path.join(out, f"adapter_train_{name}.safetensors"))
    with open(os.path.join(out, f"adapter_train_{name}.json"), "w") as f:
        json.dump(J, f, indent=1, sort_keys=True)
        f.write("\n")
    print(name, J["parameters"], "parameters;", [j["features"] for j in J["inputs"]])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=HERE)
    ap.add_argument("cases", nargs="*")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("REF_THREADS", "2")))
    for name in a.cases or sorted(CASES):
        run(name, a.out)


if __name__ == "__main__":
    main()
