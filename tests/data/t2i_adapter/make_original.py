# Makes the original-layout T2I-Adapter checkpoints of tests/test_t2i_adapter.cpp (T2IAdapterGolden.Original*):
# TencentARC's own Adapter and Adapter_light classes (github.com/TencentARC/T2I-Adapter, branch SD, commit
# c249e7f, ldm/modules/encoders/adapter.py: pass its path; it is loaded as it is, with stubs for its two ldm
# imports, and is not copied here), built as TencentARC's get_adapters builds the released adapters (sd15v2:
# ksize 1, sk True, use_conv False, 2 res blocks; colour: Adapter_light, 4 res blocks) at tiny widths, with
# random weights; each saved with torch.save as TencentARC saved them (a state dict), and what the original
# forward computes from a fixed picture.
#   . ../shared/ref/env.sh && $REF_PY tests/data/t2i_adapter/make_original.py ADAPTER_PY tests/data/t2i_adapter
# Outputs: full_sketch.pth (torch's zip format), light_color.pth (the legacy format,
# _use_new_zipfile_serialization=False), original_adapters.safetensors (x.<name>, <name>.feature.<k>),
# original_adapters.json (how each was made, sha256 of every file).
import hashlib
import importlib.util
import json
import os
import sys
import types

import torch
from safetensors.torch import save_file

adapter_py, out = sys.argv[1], sys.argv[2]
for name in ["ldm", "ldm.modules", "ldm.modules.extra_condition", "ldm.modules.diffusionmodules"]:
    sys.modules.setdefault(name, types.ModuleType(name))
api = types.ModuleType("ldm.modules.extra_condition.api")
api.ExtraCondition = None  # used by CoAdapterFuser only
util = types.ModuleType("ldm.modules.diffusionmodules.util")
util.zero_module = lambda m: m  # used by CoAdapterFuser only
sys.modules["ldm.modules.extra_condition.api"] = api
sys.modules["ldm.modules.diffusionmodules.util"] = util
spec = importlib.util.spec_from_file_location("tencentarc_adapter", adapter_py)
A = importlib.util.module_from_spec(spec)
spec.loader.exec_module(A)

torch.set_num_threads(1)
cases = {
    # sketch-style: one input channel (cin = 64 * 1), TencentARC's sd15v2 arguments
    "full_sketch": dict(cls="Adapter", args=dict(cin=64, channels=[8, 16, 16, 16], nums_rb=2, ksize=1, sk=True,
                                                 use_conv=False), x=(1, 1, 64, 64), seed=510, zip=True),
    # colour-style: RGB (cin = 64 * 3), Adapter_light (its last extractor keeps the width)
    "light_color": dict(cls="Adapter_light", args=dict(cin=192, channels=[8, 16, 16, 16], nums_rb=4),
                        x=(1, 3, 64, 64), seed=520, zip=False),
}
T, meta = {}, {"source": "TencentARC/T2I-Adapter SD c249e7f ldm/modules/encoders/adapter.py",
               "torch": torch.__version__, "cases": {}}
for name, c in cases.items():
    torch.manual_seed(c["seed"])
    model = getattr(A, c["cls"])(**c["args"]).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init, so every weight shows in the features
            p.mul_(3.0)
        x = torch.rand(c["x"], generator=torch.Generator().manual_seed(c["seed"] + 1))
        feats = model(x)
    path = os.path.join(out, name + ".pth")
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=c["zip"])
    T["x." + name] = x
    for k, f in enumerate(feats):
        T[f"{name}.feature.{k}"] = f.contiguous()
    meta["cases"][name] = {"class": c["cls"], "args": c["args"], "input": list(c["x"]), "seed": c["seed"],
                           "format": "zip" if c["zip"] else "legacy", "keys": list(model.state_dict().keys())}
save_file(T, os.path.join(out, "original_adapters.safetensors"))
meta["sha256"] = {f: hashlib.sha256(open(os.path.join(out, f), "rb").read()).hexdigest()
                  for f in sorted(os.listdir(out)) if f.endswith((".pth", ".safetensors"))}
with open(os.path.join(out, "original_adapters.json"), "w") as fp:
    json.dump(meta, fp, indent=1)
print("ok", {k: v.shape for k, v in T.items()})
