#!/usr/bin/env python3
"""Generates the pickle test corpus (tests/data/pickle) and the fuzz seeds (fuzz/corpus/pickle).

Run with Debian's python3 (torch from python3-torch makes the real torch.save files):
    /usr/bin/python3 tests/data/pickle/make_corpus.py

valid_*   real torch.save files (zip and legacy formats, protocols 2, 4 and 5, every storage dtype, views,
          parameters, nested .ckpt layouts, int keys, BINFLOAT...) plus a zip64 re-pack; valid_<name>.json
          holds what Python loads from each (keys, dtypes, shapes, values), so the C++ test compares against
          Python's own reading without running Python.
evil_*    files that run code or exhaust resources when unpickled by Python. Every code-running payload tries
          to create /tmp/dmx-pickle-pwned-<name>; this script proves each one really does so under
          pickle.loads (then removes the marker), so a test that finds no marker after dmx refused the file
          shows that nothing ran. corpus.json lists every file, its kind, and the words dmx's refusal must
          contain.
Nothing here is needed at test time.
"""
import collections
import copyreg
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
import zlib

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
FUZZ = os.path.join(ROOT, "fuzz", "corpus", "pickle")
MARK = "/tmp/dmx-pickle-pwned-"

manifest = []


def write(name, data):
    assert len(data) < 12 * 1024, (name, len(data))
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(data)
    os.makedirs(FUZZ, exist_ok=True)
    with open(os.path.join(FUZZ, name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------- a tiny pickle assembler


class P:
    """Emits pickle opcodes by name (pickletools' names)."""

    def __init__(self, proto=2):
        self.b = bytearray()
        if proto is not None:
            self.b += bytes([0x80, proto])

    def op(self, code, arg=b""):
        self.b += bytes([code]) + arg
        return self

    def mark(self): return self.op(0x28)
    def stop(self): return self.op(0x2E)
    def none(self): return self.op(0x4E)
    def true(self): return self.op(0x88)
    def false(self): return self.op(0x89)
    def binint1(self, v): return self.op(0x4B, bytes([v]))
    def binint(self, v):
        if -2 ** 31 <= v < 2 ** 31:
            return self.op(0x4A, struct.pack("<i", v))
        return self.long1(v)
    def long1(self, v):
        n = (v.bit_length() + 8) // 8
        return self.op(0x8A, bytes([n]) + v.to_bytes(n, "little", signed=True))
    def binfloat(self, v): return self.op(0x47, struct.pack(">d", v))
    def uni(self, s):
        e = s.encode()
        return self.op(0x58, struct.pack("<I", len(e)) + e)
    def raw_uni8(self, n, payload=b""): return self.op(0x8D, struct.pack("<Q", n) + payload)
    def global_(self, m, n): return self.op(0x63, f"{m}\n{n}\n".encode())
    def stack_global(self): return self.op(0x93)
    def tuple(self): return self.op(0x74)
    def tuple1(self): return self.op(0x85)
    def tuple2(self): return self.op(0x86)
    def tuple3(self): return self.op(0x87)
    def empty_tuple(self): return self.op(0x29)
    def empty_list(self): return self.op(0x5D)
    def empty_dict(self): return self.op(0x7D)
    def append(self): return self.op(0x61)
    def appends(self): return self.op(0x65)
    def setitem(self): return self.op(0x73)
    def reduce(self): return self.op(0x52)
    def build(self): return self.op(0x62)
    def binpersid(self): return self.op(0x51)
    def binput(self, i): return self.op(0x71, bytes([i]))
    def long_binput(self, i): return self.op(0x72, struct.pack("<I", i))
    def binget(self, i): return self.op(0x68, bytes([i]))
    def long_binget(self, i): return self.op(0x6A, struct.pack("<I", i))
    def bytes(self): return bytes(self.b)

    def storage(self, typ, key, numel, location="cpu"):
        return self.mark().uni("storage").global_("torch", typ).uni(key).uni(location).binint(numel).tuple().binpersid()

    def tensor(self, typ, key, numel, size, stride, offset=0):
        self.global_("torch._utils", "_rebuild_tensor_v2").mark()
        self.storage(typ, key, numel).binint(offset)
        self.mark()
        for s in size:
            self.binint(s)
        self.tuple().mark()
        for s in stride:
            self.binint(s)
        self.tuple().false().global_("collections", "OrderedDict").empty_tuple().reduce().tuple().reduce()
        return self


def call(p, module, name, *str_args):
    """module.name(*str_args) as GLOBAL + REDUCE."""
    p.global_(module, name).mark()
    for a in str_args:
        p.uni(a)
    return p.tuple().reduce()


# ---------------------------------------------------------------- zip writing


def torch_zip(pkl, storages=(), folder="archive", compress=False):
    """A torch-style archive: <folder>/data.pkl, <folder>/data/<key>, <folder>/version."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        z.writestr(f"{folder}/data.pkl", pkl)
        for key, data in storages:
            z.writestr(f"{folder}/data/{key}", data)
        z.writestr(f"{folder}/version", b"3\n")
    return buf.getvalue()


def raw_zip(entries, zip64=False, lie=None):
    """Writes a stored zip by hand: entries = [(name, data)]. zip64 puts every size and offset in zip64
    extra fields (with 0xFFFFFFFF in the 32-bit fields) and adds the zip64 end records. lie(i, fields)
    may change the central directory fields of entry i."""
    out = bytearray()
    central = bytearray()
    for i, (name, data) in enumerate(entries):
        n = name.encode()
        crc = zlib.crc32(data)
        off = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if zip64 else 20, 0x800, 0, 0, 0x21, crc,
                           len(data), len(data), len(n), 0) + n + data
        f = dict(size=len(data), csize=len(data), offset=off, crc=crc, name=n)
        if lie:
            lie(i, f)
        if zip64:
            extra = struct.pack("<HHQQQ", 1, 24, f["size"], f["csize"], f["offset"])
            central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0x800, 0, 0, 0x21, f["crc"],
                                   0xFFFFFFFF, 0xFFFFFFFF, len(f["name"]), len(extra), 0, 0, 0, 0,
                                   0xFFFFFFFF) + f["name"] + extra
        else:
            central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0x800, 0, 0, 0x21, f["crc"],
                                   f["csize"], f["size"], len(f["name"]), 0, 0, 0, 0, 0, f["offset"]) + f["name"]
    cd_off = len(out)
    out += central
    if zip64:
        z64 = len(out)
        out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, len(entries), len(entries), len(central),
                           cd_off)
        out += struct.pack("<IIQI", 0x07064B50, 0, z64, 1)
        out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    else:
        out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), cd_off, 0)
    return bytes(out)


def zip_entries(data):
    z = zipfile.ZipFile(io.BytesIO(data))
    return [(i.filename, z.read(i.filename)) for i in z.infolist()]


# ---------------------------------------------------------------- valid files (real torch.save)


def describe(obj):
    """What Python loaded, as JSON the C++ test compares against."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return {"tensor": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
                "stride": list(t.stride()), "offset": t.storage_offset(),
                "values": t.flatten().to(torch.float64).tolist() if t.dtype != torch.bool else
                t.flatten().tolist()}
    if isinstance(obj, dict):
        return {"dict": [[k if isinstance(k, (int, str)) else repr(k), describe(v)] for k, v in obj.items()],
                "ordered": isinstance(obj, collections.OrderedDict)}
    if isinstance(obj, (list, tuple)):
        return {"list" if isinstance(obj, list) else "tuple": [describe(v) for v in obj]}
    if isinstance(obj, bytes):
        return {"bytes": obj.hex()}
    if isinstance(obj, int) and not isinstance(obj, bool) and not -2 ** 63 <= obj < 2 ** 63:
        return {"bigint": str(obj)}
    return obj  # None, bool, int, float, str


def save_valid(name, obj, **kw):
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    data = buf.getvalue()
    loaded = torch.load(io.BytesIO(data))
    write(name, data)
    ref = {"file": name, "value": describe(loaded)}
    with open(os.path.join(HERE, os.path.splitext(name)[0] + ".json"), "w") as f:
        json.dump(ref, f, indent=0, sort_keys=True)
        f.write("\n")
    manifest.append({"file": name, "kind": "valid", "what": kw.get("what", "")})
    return data


def valid_files():
    g = torch.Generator().manual_seed(17)
    base = torch.randn(4, 6, generator=g)
    dtypes = collections.OrderedDict()
    for dt in [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
               torch.int8, torch.uint8]:
        dtypes[str(dt).replace("torch.", "")] = (base * 10).to(dt)[:2, :3].clone()
    dtypes["bool"] = base > 0
    # views of one storage: a transpose, a slice with an offset, a column (strided), a scalar, an empty one
    views = collections.OrderedDict()
    views["base"] = base
    views["t"] = base.t()
    views["rows"] = base[1:3]
    views["col"] = base[:, 2]
    views["scalar"] = torch.tensor(3.5)
    views["empty"] = torch.zeros(0, 3)
    views["param"] = torch.nn.Parameter(torch.arange(4.0))
    save_valid("valid_dtypes.pt", dtypes)
    save_valid("valid_views.pth", views)
    # an SD-style .ckpt: the weights under "state_dict", next to training counters
    sd = collections.OrderedDict([("model.diffusion_model.w", torch.arange(6.0).reshape(2, 3)),
                                  ("first_stage_model.b", torch.ones(2, dtype=torch.float16))])
    save_valid("valid_nested.ckpt", {"epoch": 3, "global_step": 470000, "state_dict": sd,
                                     "meta": {"name": "tiny", "floats": [1.5, -2.25, 1e300], "flags": (True, False,
                                                                                                       None),
                                              7: "an int key", -3: b"\x00\x01\xff", "big": 2 ** 70,
                                              "empty_bytes": b""}})
    # an A1111 hypernetwork in small: int keys, tuples of OrderedDict state dicts (with _metadata), BINFLOAT lists
    lin = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Hardswish(), torch.nn.LayerNorm(8))
    save_valid("valid_hypernet.pt", {4: (lin.state_dict(), lin.state_dict()), "layer_structure": [1.0, 2.0, 1.0],
                                     "activation_func": "swish", "is_layer_norm": True, "optional_info": None})
    # protocols 4 and 5 (FRAME, SHORT_BINUNICODE, MEMOIZE, STACK_GLOBAL)
    save_valid("valid_protocol4.bin", collections.OrderedDict(a=torch.arange(3), b=[torch.ones(2), 2.5]),
               pickle_protocol=4)
    save_valid("valid_protocol5.pt", {"x": torch.eye(2, dtype=torch.float64), "y": "five"}, pickle_protocol=5)
    # the legacy (non-zip) format, with storage sharing
    save_valid("valid_legacy.pt", collections.OrderedDict(w=base, wt=base.t(), h=torch.ones(3, dtype=torch.half)),
               _use_new_zipfile_serialization=False)
    # zip64 re-pack of a torch archive (what torch writes past 4 GiB)
    data = open(os.path.join(HERE, "valid_dtypes.pt"), "rb").read()
    z64 = raw_zip(zip_entries(data), zip64=True)
    assert zipfile.ZipFile(io.BytesIO(z64)).testzip() is None
    assert torch.load(io.BytesIO(z64))["float32"].equal(dtypes["float32"])
    write("valid_zip64.pt", z64)
    with open(os.path.join(HERE, "valid_zip64.json"), "w") as f:
        f.write(open(os.path.join(HERE, "valid_dtypes.json")).read().replace("valid_dtypes.pt", "valid_zip64.pt"))
    manifest.append({"file": "valid_zip64.pt", "kind": "valid"})


# ---------------------------------------------------------------- hostile files


def runs_code(name, pkl):
    """Proves that Python's own unpickler runs the payload: the marker appears, then is removed."""
    marker = MARK + name
    if os.path.exists(marker):
        os.remove(marker)
    subprocess.run([sys.executable, "-c", "import pickle,sys; pickle.loads(sys.stdin.buffer.read())"], input=pkl,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    ok = os.path.exists(marker)
    if ok:
        os.remove(marker)
    return ok


def evil(name, data, expect, what, pkl=None, code=False):
    """data: the file; pkl: its pickle stream (to prove it runs code); expect: words of dmx's refusal."""
    if code:
        assert runs_code(name.split(".")[0], pkl), f"{name}: the payload does not run under pickle.loads"
    write(name, data)
    manifest.append({"file": name, "kind": "evil", "what": what, "expect": expect,
                     "marker": MARK + name.split(".")[0] if code else None, "proved_by_python": code})


def touch(name):
    return f"touch {MARK}{name}"


def evil_files():
    # 1. __reduce__ -> os.system, as pickle writes it on Linux (posix.system)
    class System:
        def __reduce__(self):
            return (os.system, (touch("evil_os_system"),))
    pkl = pickle.dumps({"state_dict": {"w": System()}}, protocol=2)
    evil("evil_os_system.ckpt", torch_zip(pkl), ["global 'posix.system'", "nothing was executed"],
         "__reduce__ returning os.system", pkl, code=True)
    # 2. the same spelled os.system (GLOBAL 'os system')
    pkl = call(P(), "os", "system", touch("evil_os_system_named")).stop().bytes()
    evil("evil_os_system_named.pt", torch_zip(pkl), ["global 'os.system'"], "GLOBAL os.system + REDUCE", pkl, True)
    # 3. builtins.eval (protocol 2 spells it __builtin__.eval)
    class Eval:
        def __reduce__(self):
            return (eval, (f"__import__('os').system('{touch('evil_eval')}')",))
    pkl = pickle.dumps([Eval()], protocol=2)
    evil("evil_eval.pth", torch_zip(pkl), ["global '__builtin__.eval'"], "__reduce__ returning eval", pkl, True)
    # 4. builtins.exec through STACK_GLOBAL (protocol 4)
    class Exec:
        def __reduce__(self):
            return (exec, (f"import os; os.system('{touch('evil_exec')}')",))
    pkl = pickle.dumps(Exec(), protocol=4)
    evil("evil_exec.bin", torch_zip(pkl), ["global 'builtins.exec'"], "__reduce__ returning exec (STACK_GLOBAL)",
         pkl, True)
    # 5. subprocess.Popen
    import subprocess as sp
    class Popen:
        def __reduce__(self):
            return (sp.Popen, (["touch", MARK + "evil_popen"],))
    pkl = pickle.dumps(Popen(), protocol=2)
    evil("evil_popen.pt", torch_zip(pkl), ["global 'commands.Popen'", "(Python 3: subprocess.Popen)"], "__reduce__ returning subprocess.Popen",
         pkl, True)
    # 6. getattr chain: getattr(__import__('os'), 'system')(cmd)
    p = P()
    p.global_("builtins", "getattr").mark()
    call(p, "builtins", "__import__", "os")
    p.uni("system").tuple().reduce().mark().uni(touch("evil_getattr")).tuple().reduce().stop()
    evil("evil_getattr.pt", torch_zip(p.bytes()), ["global 'builtins.getattr'"], "builtins.getattr chain",
         p.bytes(), True)
    # 7. __import__ then system through STACK_GLOBAL-built names
    p = P(4)
    p.uni("builtins").uni("__import__").stack_global().uni("os").tuple1().reduce()
    p.stop()
    pkl_import = p.bytes()
    p = P(4)
    p.uni("os").uni("system").stack_global().uni(touch("evil_stack_global")).tuple1().reduce().stop()
    evil("evil_import.pt", torch_zip(pkl_import), ["global 'builtins.__import__'"], "builtins.__import__",
         pkl_import)
    evil("evil_stack_global.pt", torch_zip(p.bytes()), ["global 'os.system'"], "STACK_GLOBAL os.system",
         p.bytes(), True)
    # 8. INST (protocol 0): instantiate os.system with an argument
    pkl = P().mark().uni(touch("evil_inst")).op(0x69, b"os\nsystem\n").stop().bytes()
    evil("evil_inst.pt", torch_zip(pkl), ["INST", "os.system"], "INST opcode", pkl, True)
    # 9. OBJ: class and arguments after a MARK (refused at the opcode even for an allowed class)
    pkl = P().mark().global_("collections", "OrderedDict").op(0x6F).stop().bytes()
    evil("evil_obj.pt", torch_zip(pkl), ["opcode OBJ"], "OBJ opcode on an allowed class")
    pkl = b"(cos\nsystem\nS'" + touch("evil_obj_system").encode() + b"'\no."
    evil("evil_obj_system.pt", torch_zip(pkl), ["global 'os.system'"], "OBJ of os.system", pkl, True)
    # 10. NEWOBJ / NEWOBJ_EX of arbitrary classes
    class Evil:
        def __reduce_ex__(self, proto):
            return (copyreg.__newobj__, (Evil,))
    globals()["Evil"] = Evil
    Evil.__module__ = "__main__"
    Evil.__qualname__ = "Evil"
    pkl = pickle.dumps(Evil(), protocol=2)
    evil("evil_newobj_class.pt", torch_zip(pkl), ["global '__main__.Evil'"], "NEWOBJ of a user class")
    pkl = P().global_("collections", "OrderedDict").empty_tuple().op(0x81).stop().bytes()
    evil("evil_newobj.pt", torch_zip(pkl), ["opcode NEWOBJ"], "NEWOBJ opcode")
    pkl = P(4).global_("collections", "OrderedDict").empty_tuple().empty_dict().op(0x92).stop().bytes()
    evil("evil_newobj_ex.pt", torch_zip(pkl), ["opcode NEWOBJ_EX"], "NEWOBJ_EX opcode")
    # 11. torch functions that are not rebuild functions
    p = P()
    p.global_("torch", "load").mark().uni("/etc/passwd").tuple().reduce().stop()
    evil("evil_torch_load.pt", torch_zip(p.bytes()), ["global 'torch.load'"], "torch.load as a global")
    p = P(4).uni("torch._ops").uni("ops").stack_global().stop()
    evil("evil_torch_ops.pt", torch_zip(p.bytes()), ["global 'torch._ops.ops'"], "torch.ops")
    p = P().global_("torch._utils", "_rebuild_tensor").stop()
    evil("evil_torch_rebuild_v1.pt", torch_zip(p.bytes()), ["global 'torch._utils._rebuild_tensor'"],
         "a torch._utils function outside the allowlist")
    p = P().global_("numpy.core.multiarray", "_reconstruct").stop()
    evil("evil_numpy.ckpt", torch_zip(p.bytes()), ["global 'numpy.core.multiarray._reconstruct'"],
         "numpy reconstruction (common in training checkpoints)")
    # 12. EXT1: a global from the copyreg extension registry
    copyreg.add_extension("posix", "system", 0xF0)
    class Ext:
        def __reduce__(self):
            return (os.system, (touch("evil_ext"),))
    pkl = pickle.dumps(Ext(), protocol=2)
    copyreg.remove_extension("posix", "system", 0xF0)
    assert b"\x82\xf0" in pkl
    evil("evil_ext.pt", torch_zip(pkl), ["opcode EXT1"], "EXT1 (copyreg extension registry)")
    # 13. PERSID (text) and sets
    evil("evil_persid.pt", torch_zip(P().op(0x50, b"0\n").stop().bytes()), ["opcode PERSID"], "text PERSID")
    evil("evil_set.pt", torch_zip(pickle.dumps({1, 2}, protocol=4)), ["EMPTY_SET", "sets are not allowed"], "a set")
    # 14. BUILD on something else than an OrderedDict; backward hooks on a tensor
    p = P().tensor("FloatStorage", "0", 1, [1], [1]).empty_dict().uni("x").binint1(1).setitem().build().stop()
    evil("evil_build_tensor.pt", torch_zip(p.bytes(), [("0", b"\0" * 4)]), ["BUILD", "only allowed on an OrderedDict"],
         "BUILD (setstate) on a tensor")
    p = P().global_("torch._utils", "_rebuild_tensor_v2").mark().storage("FloatStorage", "0", 1).binint(0)
    p.binint1(1).tuple1().binint1(1).tuple1().false().global_("collections", "OrderedDict").empty_tuple().reduce()
    p.binint1(0).global_("collections", "OrderedDict").empty_tuple().reduce().setitem()  # hooks = {0: OrderedDict}
    p.tuple().reduce().stop()
    evil("evil_hooks.pt", torch_zip(p.bytes(), [("0", b"\0" * 4)]), ["backward hooks are not allowed"],
         "a tensor with backward hooks")
    # 15. deep nesting and stack bombs
    evil("evil_marks.pt", torch_zip(P().mark().bytes() * 1 + b"(" * 3000 + b"."), ["nested MARKs", "1000"],
         "3000 nested MARKs")
    evil("evil_deep_tuple.pt", torch_zip(P().none().bytes() + b"\x85" * 5000 + b"."), ["nest deeper than 1000"],
         "5000 nested 1-tuples (recursion bomb)")
    evil("evil_deep_list.pt", torch_zip(P().bytes() + b"]" * 2000 + b"a" * 1999 + b"."), ["nest deeper than 1000"],
         "2000 nested lists")
    p = P().empty_list().binput(0).binget(0).append().stop()
    evil("evil_cycle.pt", torch_zip(p.bytes()), ["contains itself"], "a list that contains itself")
    # 16. billion laughs: 9 levels of lists holding the previous level 10 times (10^9 leaves)
    p = P().uni("lol").binput(0).op(0x30)
    for level in range(1, 10):
        p.empty_list().mark()
        for _ in range(10):
            p.binget(level - 1)
        p.appends().binput(level)
        if level < 9:
            p.op(0x30)  # POP: only the last level stays on the stack
    p.stop()
    evil("evil_billion_laughs.pt", torch_zip(p.bytes()), ["expands to more than", "billion laughs"],
         "billion laughs through the memo")
    # 17. huge declared lengths
    evil("evil_huge_string.pt", torch_zip(P().raw_uni8(2 ** 62, b"abc").bytes()),
         ["BINUNICODE8", "4611686018427387904 bytes"], "a string of 2^62 bytes")
    evil("evil_huge_bytes.pt", torch_zip(P().op(0x8E, struct.pack("<Q", 2 ** 62)).bytes()),
         ["BINBYTES8", "4611686018427387904"], "bytes of 2^62 bytes")
    evil("evil_huge_long.pt", torch_zip(P().op(0x8B, struct.pack("<i", 2 ** 31 - 1)).bytes()),
         ["LONG4", "2147483647 bytes exceeds"], "a LONG4 integer of 2 GB")
    evil("evil_frame.pt", torch_zip(P(4).op(0x95, struct.pack("<Q", 2 ** 40)).bytes()), ["FRAME", "runs past"],
         "a FRAME longer than the file")
    # 18. tensors that do not fit their storage, storages whose size overflows
    p = P().tensor("FloatStorage", "0", 4, [1000, 1000], [1000, 1]).stop()
    evil("evil_tensor_too_big.pt", torch_zip(p.bytes(), [("0", b"\0" * 16)]), ["larger than its storage"],
         "a 1000x1000 tensor on a 4-element storage")
    p = P().tensor("FloatStorage", "0", 4, [2, 2], [100, 1]).stop()
    evil("evil_tensor_stride.pt", torch_zip(p.bytes(), [("0", b"\0" * 16)]), ["reaches element 101"],
         "a strided view past the end of its storage")
    p = P().tensor("FloatStorage", "0", 4, [2], [1], offset=2 ** 63 - 1).stop()
    evil("evil_tensor_offset.pt", torch_zip(p.bytes(), [("0", b"\0" * 16)]), ["overflows"],
         "an offset that overflows the index arithmetic")
    p = P().tensor("DoubleStorage", "0", 0, [], []).stop()
    p = P().global_("torch._utils", "_rebuild_tensor_v2").mark()
    p.mark().uni("storage").global_("torch", "DoubleStorage").uni("0").uni("cpu").long1(2 ** 62).tuple().binpersid()
    p.binint(0).binint1(1).tuple1().binint1(1).tuple1().false().global_("collections", "OrderedDict")
    p.empty_tuple().reduce().tuple().reduce().stop()
    evil("evil_storage_overflow.pt", torch_zip(p.bytes(), [("0", b"\0" * 8)]), ["overflows int64"],
         "a storage of 2^62 doubles")
    p = P().tensor("FloatStorage", "0", 1000000, [4], [1]).stop()
    evil("evil_storage_size.pt", torch_zip(p.bytes(), [("0", b"\0" * 16)]), ["4000000 bytes", "holds 16 bytes"],
         "a storage entry smaller than its declared size")
    # one 4 KB storage reached through 100 x 100 paths: `dmx convert` would write it 10,000 times (40 MB)
    p = P().tensor("FloatStorage", "0", 1024, [1024], [1]).binput(0).op(0x30).empty_list().mark()
    for _ in range(100):
        p.binget(0)
    p.appends().binput(1).op(0x30).empty_dict().uni("w").empty_list().mark()
    for _ in range(100):
        p.binget(1)
    p.appends().setitem().stop()
    evil("evil_tensor_repeat.pt", torch_zip(p.bytes(), [("0", b"\0" * 4096)]), ["add up to more than"],
         "one storage repeated through 10,000 paths")
    p = P().tensor("BoolStorage", "0", 4, [4], [1]).stop()
    evil("evil_bool.pt", torch_zip(p.bytes(), [("0", b"\0\1\2\1")]), ["bools must be 0 or 1"],
         "a bool storage holding 2")
    # 19. zip structure: lying sizes, overlapping entries (a zip bomb without compression), compression
    ok = P().tensor("FloatStorage", "0", 4, [4], [1]).stop().bytes()
    entries = [("archive/data.pkl", ok), ("archive/data/0", b"\0" * 16), ("archive/version", b"3\n")]

    def lie_size(i, f):
        if i == 1:
            f["size"] = f["csize"] = 1 << 31
    evil("evil_zip_lying_size.pt", raw_zip(entries, lie=lie_size), ["declares 2147483648 bytes"],
         "a zip entry whose size is larger than the file")

    def lie_offset(i, f):
        if i == 1:
            f["offset"] = 1 << 40
    evil("evil_zip_lying_offset.pt", raw_zip(entries, zip64=True, lie=lie_offset), ["local header offset"],
         "a zip64 entry whose offset lies outside the file")

    def overlap(i, f):
        if i == 2:  # 'version' points at data.pkl's local header: shared bytes
            f["offset"] = 0
    evil("evil_zip_overlap.pt", raw_zip(entries + [("archive/pad", b"x")], lie=overlap),
         ["the local header does not match"], "a central entry pointing at another entry's header")
    # the overlapping-entries zip bomb (stored, no compression): local headers H0 H1 ... H59 then a kernel;
    # entry i stores everything after its own header, so the entries add up to far more than the file
    # (quadratic in the entry count; Fifield's construction without DEFLATE)
    names = [f"archive/data/{i}".encode() for i in range(60)]
    blob, dirs = b"\0" * 1024, []
    for i in reversed(range(len(names))):
        crc = zlib.crc32(blob)
        dirs.append((names[i], crc, len(blob)))
        blob = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0x21, crc, len(blob), len(blob),
                           len(names[i]), 0) + names[i] + blob
    dirs.reverse()
    central, off = bytearray(), 0
    for name, crc, size in dirs:
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0x21, crc, size, size, len(name),
                               0, 0, 0, 0, 0, off) + name
        off += 30 + len(name)
    bomb = blob + central + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(dirs), len(dirs), len(central),
                                        len(blob), 0)
    total = sum(d[2] for d in dirs)
    try:  # Python's own zipfile (3.11.2+) refuses it the same way
        zipfile.ZipFile(io.BytesIO(bomb)).read("archive/data/0")
        raise AssertionError("zipfile read the overlapping archive")
    except zipfile.BadZipFile as e:
        assert "Overlapped entries" in str(e)
    evil("evil_zip_bomb.pt", bomb, ["zip entries overlap"],
         f"overlapping stored entries: {len(bomb)} bytes that unzip to {total}")
    comp = torch_zip(b"\x80\x02" + b"(" * (5 << 20), compress=True)  # 5 MiB deflated to a few KB
    evil("evil_zip_deflate.pt", comp, ["is compressed (method 8)"], "a deflated entry of 5 MiB in a few KB (a classic zip bomb)")
    crc = bytearray(raw_zip(entries))
    crc[crc.index(b"archive/data/0") + len("archive/data/0")] ^= 1  # flip a data byte of storage 0
    evil("evil_zip_crc.pt", bytes(crc), ["CRC-32 mismatch"], "a corrupted storage (CRC-32)")
    evil("evil_zip_truncated.pt", raw_zip(entries)[:-30], ["no zip end-of-central-directory"], "a truncated archive")
    # 20. the legacy format, with a payload in the object pickle
    head = (pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2) +
            pickle.dumps({"protocol_version": 1001, "little_endian": True,
                          "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2))
    class LegacySystem:
        def __reduce__(self):
            return (os.system, (touch("evil_legacy"),))
    pkl = pickle.dumps(collections.OrderedDict(w=LegacySystem()), protocol=2)
    evil("evil_legacy.pt", head + pkl + pickle.dumps([], protocol=2), ["global 'posix.system'", "legacy"],
         "legacy torch.save format with os.system", pkl, True)
    evil("evil_legacy_magic.pt", pickle.dumps(12345, protocol=2) + pkl, ["legacy magic number"],
         "a bare pickle without torch's magic number")
    # a payload in the legacy header pickles
    class HeadSystem:
        def __reduce__(self):
            return (os.system, (touch("evil_legacy_header"),))
    hp = pickle.dumps(HeadSystem(), protocol=2)
    evil("evil_legacy_header.pt", hp, ["global 'posix.system'"], "os.system in the first (magic) pickle", hp, True)


def main():
    for f in os.listdir(HERE):
        if f.startswith(("valid_", "evil_")):
            os.remove(os.path.join(HERE, f))
    if os.path.isdir(FUZZ):
        for f in os.listdir(FUZZ):
            os.remove(os.path.join(FUZZ, f))
    valid_files()
    evil_files()
    # bare data.pkl streams as fuzz seeds (the fuzzer reaches the pickle machine directly through them)
    for name in ["valid_dtypes.pt", "valid_nested.ckpt", "valid_hypernet.pt", "valid_protocol4.bin"]:
        z = zipfile.ZipFile(os.path.join(HERE, name))
        pkl = next(i for i in z.namelist() if i.endswith("data.pkl"))
        with open(os.path.join(FUZZ, "pkl_" + os.path.splitext(name)[0]), "wb") as f:
            f.write(z.read(pkl))
    with open(os.path.join(HERE, "corpus.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    kinds = {}
    for m in manifest:
        kinds[m["kind"]] = kinds.get(m["kind"], 0) + 1
    print(kinds, "proved by pickle.loads:", sum(1 for m in manifest if m.get("proved_by_python")))


if __name__ == "__main__":
    main()
