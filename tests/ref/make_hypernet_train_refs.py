#!/usr/bin/env python3
"""What Python's torch.load and AUTOMATIC1111's Hypernetwork.load make of the A1111 hypernetwork .pt that dmx
writes (`dmx train hypernetwork --output X.pt`, loaders::save_hypernetwork, io/torch_save.h).

Input: hypernet_dmx_written.pt in this folder, written by dmx's own torch.save writer (the unit test
HypernetworkSaveUnit.TheFileTorchLoadReadIsWhatDmxWrites writes it with DMX_UPDATE_REFS=1 and checks, every run,
that dmx still writes exactly these bytes): two widths (24, 16), layer_structure [1, 2, 1.5, 1], swish (Hardswish)
also on the output, LayerNorm after every Linear, dropout_structure [0, 0.3, 0.1, 0], parameters from a formula.

Output (what the unit test compares dmx's own reading with):
    hypernet_dmx_written.json              torch_load / a1111_load (did they succeed), the dict's key order and
                                           Python types as torch.load returned them, the fields' values, and what
                                           torch.load(weights_only=True) says of this file and of the same dict
                                           saved by Python's torch.save
    hypernet_dmx_written.torch.safetensors every tensor as torch.load returned it ("<width>.<k|v>.<key>"), and per
                                           module an input "input.<width>.<k|v>" [2, 5, width] (torch.Generator
                                           seed 0) with A1111's HypernetworkModule output on it at multiplier 0.7
                                           in eval mode ("a1111_output.<width>.<k|v>")

Extra .pt paths on the command line (e.g. models/emoji-hypernetwork-twitter.pt) are checked the same way and
reported on stdout only.

Usage, with the harness of ../shared/ref set up (its README):
    . ../shared/ref/env.sh && $REF_PY tests/ref/make_hypernet_train_refs.py [EXTRA.pt ...]
"""
import io
import json
import os
import sys
from collections import OrderedDict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("DMX_SHARED_DIR", os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared")))
sys.path.insert(0, os.path.join(SHARED, "ref"))
import hypernet_ref as HN  # noqa: E402  (A1111's Hypernetwork / HypernetworkModule, ported for the harness)
from safetensors.torch import save_file  # noqa: E402


def jsonable(v):
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def weights_only(path_or_bytes):
    try:
        if isinstance(path_or_bytes, bytes):
            torch.load(io.BytesIO(path_or_bytes), map_location="cpu", weights_only=True)
        else:
            torch.load(path_or_bytes, map_location="cpu", weights_only=True)
        return "loaded"
    except Exception as e:  # noqa: BLE001  (the message is the record)
        msg = str(e)
        if "WeightsUnpickler error:" in msg:  # the reason, after torch's generic advice
            msg = msg.split("WeightsUnpickler error:")[1].strip() + " (71 = BINFLOAT)" * ("operand 71" in msg)
        return f"refused: {type(e).__name__}: {msg.splitlines()[0][:200]}"


def check(path):
    """torch.load, the layout A1111 expects, Hypernetwork.load; returns (report, tensors)."""
    sd = torch.load(path, map_location="cpu")
    assert type(sd) is dict, type(sd)
    rep = {"torch_version": torch.__version__, "torch_load": True}
    rep["key_order"] = list(sd.keys())
    rep["types"] = {str(k): type(v).__name__ for k, v in sd.items()}
    tensors = {}
    widths = [k for k in sd if type(k) == int]  # noqa: E721  (A1111's own test)
    for w in widths:
        pair = sd[w]
        assert isinstance(pair, tuple) and len(pair) == 2, (w, type(pair))
        for tag, state in zip(("k", "v"), pair):
            assert type(state) is OrderedDict, (w, tag, type(state))
            for key, t in state.items():
                assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and not t.requires_grad
                tensors[f"{w}.{tag}.{key}"] = t.contiguous()
    rep["fields"] = {k: jsonable(v) for k, v in sd.items() if type(k) != int}  # noqa: E721
    rep["field_types"] = {k: ([type(x).__name__ for x in v] if isinstance(v, list) else type(v).__name__)
                          for k, v in sd.items() if type(k) != int}  # noqa: E721
    rep["weights_only"] = weights_only(path)
    buf = io.BytesIO()
    torch.save(sd, buf)  # the same dict written by Python's torch.save
    rep["weights_only_python_saved"] = weights_only(buf.getvalue())
    hn = HN.Hypernetwork.load(path)  # strict load_state_dict into A1111's modules
    rep["a1111_load"] = True
    rep["a1111_widths"] = sorted(hn.layers.keys())
    hn.set_multiplier(0.7)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in widths:
            for i, tag in enumerate(("k", "v")):
                x = torch.randn(2, 5, w, generator=g)
                tensors[f"input.{w}.{tag}"] = x
                tensors[f"a1111_output.{w}.{tag}"] = hn.layers[w][i](x).contiguous()
    return rep, tensors


def main():
    src = os.path.join(HERE, "hypernet_dmx_written.pt")
    rep, tensors = check(src)
    with open(os.path.join(HERE, "hypernet_dmx_written.json"), "w") as f:
        json.dump(rep, f, indent=1, sort_keys=False)
        f.write("\n")
    save_file(tensors, os.path.join(HERE, "hypernet_dmx_written.torch.safetensors"))
    print(json.dumps({k: rep[k] for k in ("torch_load", "a1111_load", "weights_only", "weights_only_python_saved")}))
    for extra in sys.argv[1:]:
        r, t = check(extra)
        n = sum(v.numel() for k, v in t.items() if not k.startswith(("input.", "a1111_output.")))
        print(extra, json.dumps({"torch_load": r["torch_load"], "a1111_load": r["a1111_load"],
                                 "widths": r["a1111_widths"], "parameters": n, "weights_only": r["weights_only"],
                                 "fields": r["fields"]}))


if __name__ == "__main__":
    main()
