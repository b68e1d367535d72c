#!/usr/bin/env python3
"""Seed-driven outputs of a fixed set of runs, recorded and compared bit for bit.

A refactor of the generation core must not change what a seed produces. This records the final latents
(--save-latents) and the PNGs of a fixed set of `dmx` runs on the tiny sd15 fixture model (txt2img with
several schedulers, LoRA, one and two ControlNets, img2img, blended editing, Prompt-to-Prompt with and
without (null-text) inversion, DiffEdit), plus, when the test binary is given, the in-process tensors of
`BitIdentityDumpGolden.*` (Prompt-to-Prompt latents and null-text embeddings, which the CLI does not write),
then compares two such recordings: every tensor must have max abs diff 0 and every PNG the same bytes.

  scripts/bit_identity.py record OUT_DIR [--dmx build/dmx] [--tests build/dmx_tests]
  scripts/bit_identity.py compare BEFORE_DIR AFTER_DIR

Runs use one thread (--threads 1), so float summation orders do not depend on the machine's cores.
Python standard library only (the safetensors reader is below).
"""
import argparse
import json
import os
import struct
import subprocess
import sys
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def shared_dir():
    return os.environ.get("DMX_SHARED_DIR", os.path.join(REPO, "..", "shared"))


def write_png_gray(path, width, height, pixel):
    """8-bit grayscale PNG, pixel(x, y) -> 0..255."""
    raw = b"".join(b"\x00" + bytes(pixel(x, y) for x in range(width)) for y in range(height))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def runs(fx, out):
    """(name, argv) of every recorded run; outputs go under `out`."""
    model = os.path.join(fx, "models", "sd15")
    image = os.path.join(fx, "ref", "sd15", "diffedit_seeded.image.png")  # 192x128 RGB
    mask = os.path.join(out, "inputs", "mask.png")
    cn = os.path.join(model, "controlnet")
    cn_single = os.path.join(model, "ldm", "control_sd15.safetensors")
    lora = os.path.join(model, "lora")
    t = ["--threads", "1", "--quiet"]

    def gen(name, *args):
        o = os.path.join(out, name)
        return (name, ["generate", "--model", model, "--prompt", "a red apple on a table", "--output", o + ".png",
                       "--save-latents", o + ".safetensors", *t, *args])

    small = ["--width", "64", "--height", "64", "--steps", "5"]
    yield gen("txt2img_ddim", *small, "--scheduler", "ddim", "--seed", "1", "--negative-prompt", "blurry")
    yield gen("txt2img_ddim_eta_2img", *small, "--scheduler", "ddim", "--eta", "0.7", "--num-images", "2",
              "--seed", "2")
    yield gen("txt2img_euler_a_2img", *small, "--scheduler", "euler_a", "--num-images", "2", "--seed", "3")
    yield gen("txt2img_dpmpp_2m_clipskip", *small, "--scheduler", "dpmpp_2m", "--clip-skip", "1", "--seed", "4")
    yield gen("txt2img_model_scheduler", *small, "--seed", "5")
    yield gen("txt2img_euler_no_cfg", *small, "--scheduler", "euler", "--guidance-scale", "1", "--seed", "6")
    yield gen("txt2img_ddpm_bf16", *small, "--scheduler", "ddpm", "--dtype", "bf16", "--seed", "7")
    yield gen("txt2img_heun", *small, "--scheduler", "heun", "--seed", "8")
    yield gen("lora_merged", *small, "--scheduler", "ddim", "--seed", "9",
              "--lora", os.path.join(lora, "lora_diffusers.safetensors") + ":0.8")
    yield gen("lora_runtime_kohya", *small, "--scheduler", "euler_a", "--seed", "10", "--lora-mode", "runtime",
              "--lora", os.path.join(lora, "lora_kohya.safetensors") + ":0.6")
    yield gen("controlnet_one", *small, "--scheduler", "ddim", "--seed", "11", "--controlnet", cn,
              "--control-image", image, "--control-preprocess", "canny")
    yield gen("controlnet_two_schedule", *small, "--scheduler", "euler_a", "--seed", "12",
              "--controlnet", cn, "--control-image", image, "--control-scale", "0.7", "--control-start", "0",
              "--control-end", "0.6", "--controlnet", cn_single, "--control-image", image, "--control-scale", "0.5",
              "--control-start", "0.2", "--control-end", "1", "--control-preprocess", "canny")
    yield gen("controlnet_guess_euler", *small, "--scheduler", "euler", "--seed", "13", "--controlnet", cn,
              "--control-image", image, "--guess-mode", "--num-images", "2")
    yield gen("controlnet_default_size", "--steps", "3", "--scheduler", "dpmpp_2m", "--seed", "14",
              "--controlnet", cn, "--control-image", image)
    img = ["--init-image", image, "--steps", "6"]
    yield gen("img2img_ddim", *img, "--scheduler", "ddim", "--strength", "0.6", "--seed", "15")
    yield gen("img2img_euler_a_2img", *img, "--scheduler", "euler_a", "--strength", "0.75", "--num-images", "2",
              "--seed", "16")
    yield gen("img2img_dpmpp_2m", *img, "--scheduler", "dpmpp_2m", "--strength", "0.5", "--seed", "17")
    yield gen("blended_inpaint", *img, "--mask", mask, "--scheduler", "ddim", "--strength", "0.75", "--seed", "18")
    yield gen("blended_inpaint_full", *img, "--mask", mask, "--scheduler", "euler_a", "--seed", "19")
    yield gen("blended_legacy", *img, "--mask", mask, "--scheduler", "ddim", "--strength", "0.8",
              "--blend-variant", "legacy", "--eta", "0.5", "--seed", "20")
    yield gen("blended_rank", *img, "--mask", mask, "--scheduler", "ddim", "--num-images", "2", "--rank",
              "--mask-dilation", "1", "--blend-start", "0.25", "--background", "pixel", "--seed", "21")

    def p2p(name, *args):
        o = os.path.join(out, name)
        return (name, ["p2p", "--model", model, "--output", o + ".png", *t, *args])

    yield p2p("p2p_replace_local_blend", "--prompt", "a cat sitting on a sofa", "--edit-prompt",
              "a dog sitting on a sofa", "--local-blend", "cat,dog", "--steps", "5", "--width", "64", "--height", "64",
              "--seed", "22", "--save-attention-maps", os.path.join(out, "p2p_maps.png"))
    yield p2p("p2p_refine", "--prompt", "a cat", "--edit-prompt", "a fluffy cat", "--mode", "refine", "--steps", "4",
              "--width", "64", "--height", "64", "--seed", "23", "--negative-prompt", "blurry")
    yield p2p("p2p_image_ddim_inversion", "--prompt", "a cat sitting on a sofa", "--edit-prompt",
              "a dog sitting on a sofa", "--image", image, "--steps", "4", "--seed", "24")
    yield p2p("p2p_image_null_text", "--prompt", "a cat sitting on a sofa", "--edit-prompt",
              "a dog sitting on a sofa", "--image", image, "--steps", "4", "--null-text-inversion",
              "--null-text-inner-steps", "2", "--seed", "25")

    def diffedit(name, *args):
        o = os.path.join(out, name)
        return (name, ["diffedit", "--model", model, "--image", image, "--source-prompt", "a cat sitting on a sofa",
                       "--target-prompt", "a dog sitting on a sofa", "--output", o + ".png", "--save-latents",
                       o + ".safetensors", "--mask-output", o + "-mask.png", *t, *args])

    yield diffedit("diffedit", "--steps", "6", "--seed", "26")
    yield diffedit("diffedit_guided_inversion", "--steps", "5", "--encode-ratio", "0.6", "--num-maps", "3",
                   "--inversion-guidance-scale", "3", "--negative-prompt", "blurry", "--seed", "27")


def record(args):
    out = os.path.abspath(args.out)
    fx = os.path.join(shared_dir(), "fixtures", "sd-tiny")
    if not os.path.isdir(fx):
        sys.exit(f"fixtures not found at {fx} (set DMX_SHARED_DIR)")
    os.makedirs(os.path.join(out, "inputs"), exist_ok=True)
    # The mask: a filled ellipse, white = edit, at the image's size (192x128).
    write_png_gray(os.path.join(out, "inputs", "mask.png"), 192, 128,
                   lambda x, y: 255 if ((x - 100) / 60.0) ** 2 + ((y - 60) / 40.0) ** 2 <= 1 else 0)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name, argv in runs(fx, out):
        r = subprocess.run([args.dmx, *argv], capture_output=True, text=True, env=env)
        status = "ok" if r.returncode == 0 else f"FAILED ({r.returncode})"
        print(f"{name:32s} {status}", flush=True)
        if r.returncode != 0:
            sys.exit(r.stdout + r.stderr)
    if args.tests:
        dump = os.path.join(out, "inprocess")
        os.makedirs(dump, exist_ok=True)
        r = subprocess.run([args.tests, "--gtest_filter=BitIdentityDumpGolden.*"], capture_output=True, text=True,
                           env=dict(env, DMX_BIT_IDENTITY_DIR=dump))
        print(f"{'in-process (BitIdentityDumpGolden.*)':32s} {'ok' if r.returncode == 0 else 'FAILED'}", flush=True)
        if r.returncode != 0 or not os.listdir(dump):
            sys.exit(r.stdout + r.stderr)


DTYPES = {"F32": ("f", 4), "F64": ("d", 8), "F16": ("e", 2), "I64": ("q", 8), "I32": ("i", 4), "U8": ("B", 1)}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        out[k] = (v["dtype"], tuple(v["shape"]), body[a:b])
    return out


def values(dtype, raw):
    if dtype == "BF16":  # upper half of a float32
        return [struct.unpack("<f", b"\x00\x00" + raw[i : i + 2])[0] for i in range(0, len(raw), 2)]
    code, size = DTYPES[dtype]
    return list(struct.unpack("<" + code * (len(raw) // size), raw))


def compare(args):
    rows, bad = [], 0
    files = []
    for root, _, names in os.walk(args.before):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), args.before)
            if not rel.startswith("inputs"):
                files.append(rel)
    after_files = set()
    for root, _, names in os.walk(args.after):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), args.after)
            if not rel.startswith("inputs"):
                after_files.add(rel)
    for rel in sorted(set(files) - after_files):
        rows.append((rel, "-", "missing after"))
        bad += 1
    for rel in sorted(after_files - set(files)):
        rows.append((rel, "-", "new after"))
        bad += 1
    for rel in sorted(set(files) & after_files):
        a, b = os.path.join(args.before, rel), os.path.join(args.after, rel)
        if rel.endswith(".safetensors"):
            ta, tb = read_safetensors(a), read_safetensors(b)
            if set(ta) != set(tb):
                rows.append((rel, "-", "different tensor names"))
                bad += 1
                continue
            for k in sorted(ta):
                (da, sa, ra), (db, sb, rb) = ta[k], tb[k]
                if da != db or sa != sb:
                    rows.append((f"{rel}:{k}", "-", f"dtype/shape {da}{list(sa)} vs {db}{list(sb)}"))
                    bad += 1
                    continue
                if ra == rb:
                    diff = 0.0
                else:
                    diff = max(abs(x - y) for x, y in zip(values(da, ra), values(db, rb)))
                bad += diff != 0 or ra != rb
                rows.append((f"{rel}:{k}", f"{list(sa)}", f"max abs diff {diff:g}" + ("" if ra == rb else " (bytes differ)")))
        else:
            with open(a, "rb") as fa, open(b, "rb") as fb:
                same = fa.read() == fb.read()
            bad += not same
            rows.append((rel, "", "same bytes" if same else "BYTES DIFFER"))
    w = max(len(r[0]) for r in rows) if rows else 10
    for r in rows:
        print(f"{r[0]:{w}s}  {r[1]:18s} {r[2]}")
    print(f"\n{len(rows)} outputs compared, {bad} different")
    return 1 if bad else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("out")
    r.add_argument("--dmx", default=os.path.join(REPO, "build", "dmx"))
    r.add_argument("--tests", default="", help="dmx_tests binary: also record BitIdentityDumpGolden.* (in-process)")
    c = sub.add_parser("compare")
    c.add_argument("before")
    c.add_argument("after")
    a = ap.parse_args()
    if a.cmd == "record":
        record(a)
        return 0
    return compare(a)


if __name__ == "__main__":
    sys.exit(main())
