#!/usr/bin/env python3
"""Writes the seed corpus for fuzz_safetensors: one small valid file per dtype, files with
metadata, empty and zero-sized tensors, and malformed ones (see fuzz/README.md)."""
import json
import struct
import sys
from pathlib import Path

SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
         "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def build(tensors, metadata=None, pad=True):
    """tensors: list of (name, dtype, shape); data is a byte pattern."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape in tensors:
        n = SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + n]}
        data += bytes((i * 7 + 3) & 0xFF for i in range(n))
    h = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def main(out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for dt in SIZES:
        files[f"valid_{dt.lower()}.safetensors"] = build([("w", dt, [2, 3])])
    files["valid_multi.safetensors"] = build(
        [("a.weight", "F32", [4, 2]), ("a.bias", "F16", [4]), ("b", "I64", [1]), ("scalar", "F32", [])],
        metadata={"format": "pt", "note": "caf\u00e9"})
    files["valid_empty_tensor.safetensors"] = build([("e", "F32", [0, 5]), ("x", "U8", [3])])
    files["valid_no_tensors.safetensors"] = build([], metadata={})
    files["valid_unpadded.safetensors"] = build([("w", "BF16", [3])], pad=False)
    good = build([("w", "F32", [2, 2])])
    n = struct.unpack("<Q", good[:8])[0]
    files["bad_truncated_data.safetensors"] = good[:-3]
    files["bad_header_past_end.safetensors"] = struct.pack("<Q", n + 100) + good[8:]
    files["bad_short.safetensors"] = good[:5]
    hdr = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 64]}}
    h = json.dumps(hdr).encode()
    files["bad_offsets_outside.safetensors"] = struct.pack("<Q", len(h)) + h + bytes(16)
    hdr = {"w": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}}
    h = json.dumps(hdr).encode()
    files["bad_shape_mismatch.safetensors"] = struct.pack("<Q", len(h)) + h + bytes(16)
    hdr = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    h = json.dumps(hdr).encode()
    files["bad_overlap.safetensors"] = struct.pack("<Q", len(h)) + h + bytes(12)
    hdr = {"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}
    h = json.dumps(hdr).encode()
    files["bad_dtype.safetensors"] = struct.pack("<Q", len(h)) + h + bytes(2)
    h = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'
    files["bad_json.safetensors"] = struct.pack("<Q", len(h)) + h + bytes(4)
    for name, data in files.items():
        (out / name).write_bytes(data)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "corpus/safetensors")
