#!/usr/bin/env python3
"""The PyTorch side of kiln's `pytorch_model.bin` tests (called by tests/kiln/pytorch.rs).

make-fixtures DIR        real `torch.save` files: plain.bin (f32, f16, bf16, f64, int, bool,
                         uint16, an empty tensor), views.bin (a transposed view, slices and a
                         row sharing one storage, a stride-0 expand, a Parameter), module.bin (an
                         nn.Module's state_dict, with its `_metadata`), single/ and sharded/
                         model directories (the latter with pytorch_model.bin.index.json),
                         legacy.bin (the pre-1.6 format) and corrupt_storage.bin (a flipped byte
                         in a storage). Each X.bin comes with X.reference.safetensors (what
                         `safetensors.torch.save_file` writes for it, see `reference`) and
                         X.f32.safetensors (every float tensor converted by torch to f32).
make-hostile DIR MARKER  zips shaped like torch files whose data.pkl would run `touch MARKER`
                         (os.system / builtins.eval / posix.system / subprocess.Popen through
                         GLOBAL, STACK_GLOBAL with memoized strings, INST), plus one whose
                         STACK_GLOBAL operands are not string literals. With --prove, each
                         executable pickle is first run by Python's own unpickler with another
                         marker, to show that it does execute.
check-convert IN OUT ... kiln's `convert` output OUT against what
                         `safetensors.torch.save_file(torch.load(IN, weights_only=True), ...)`
                         writes: names, dtypes and shapes (through safetensors.safe_open), raw
                         bytes, metadata, and values against torch.load itself.

Every failure exits non-zero with a message; success prints one JSON line.
"""

import argparse
import collections
import json
import os
import pickle
import shutil
import struct
import sys
import tempfile
import time
import zipfile

try:
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
except ImportError as e:  # the Rust side turns this into a failed test with this message
    print(f"torch_bin: needs torch and safetensors (pip install torch safetensors): {e}", file=sys.stderr)
    sys.exit(2)

FORMAT = {"format": "pt"}


def fail(message):
    print(f"torch_bin: {message}", file=sys.stderr)
    sys.exit(1)


def reference(state, path):
    """What safetensors.torch.save_file writes for `state`. It refuses non-contiguous tensors
    and tensors sharing memory, so for those it is given each tensor's contiguous copy, which
    is what a loader reading the file sees. Returns how the reference was made."""
    try:
        save_file(state, path, metadata=FORMAT)
        return "save_file"
    except (ValueError, RuntimeError):
        save_file({k: v.contiguous().clone() for k, v in state.items()}, path, metadata=FORMAT)
        return "save_file of contiguous clones"


def write_fixture(out, stem, state):
    path = os.path.join(out, f"{stem}.bin")
    torch.save(state, path)
    reference(torch.load(path, weights_only=True), os.path.join(out, f"{stem}.reference.safetensors"))
    floats = {k: v.float().contiguous().clone() for k, v in state.items() if v.is_floating_point()}
    save_file(floats, os.path.join(out, f"{stem}.f32.safetensors"))
    return path


def plain_state():
    g = torch.Generator().manual_seed(0)
    s = collections.OrderedDict()
    s["model.embed_tokens.weight"] = torch.randn(5, 4, generator=g)
    s["model.layers.0.self_attn.q_proj.weight"] = torch.randn(3, 4, generator=g).half()
    s["model.layers.0.input_layernorm.weight"] = torch.randn(4, generator=g).bfloat16()
    s["lm_head.weight"] = torch.randn(2, 4, generator=g).double()
    s["step"] = torch.tensor(12345, dtype=torch.int64)
    s["ids"] = torch.tensor([1, -2, 3], dtype=torch.int32)
    s["mask"] = torch.tensor([True, False, True])
    s["bytes"] = torch.tensor([0, 7, 255], dtype=torch.uint8)
    s["wide"] = torch.tensor([1, 65535], dtype=torch.uint16)
    s["empty"] = torch.zeros(0, 3)
    return s


def views_state():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 6, generator=g)
    s = collections.OrderedDict()
    s["base"] = base
    s["transposed"] = base.t()
    s["row"] = base[2]
    s["cols"] = base[:, 1:4]
    s["expanded"] = torch.arange(3.0).expand(2, 3)
    s["half_t"] = torch.randn(3, 5, generator=g).half().t()
    s["param"] = torch.nn.Parameter(torch.randn(2, 2, generator=g))
    return s


def module_state():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    model.register_buffer("scale", torch.tensor([0.5, 2.0]))
    return model.state_dict()


def storage_data_offset(path, entry):
    """Where the bytes of zip entry `entry` start in `path` (after its local header)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(entry)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def make_fixtures(args):
    out = args.dir
    os.makedirs(out, exist_ok=True)
    plain = write_fixture(out, "plain", plain_state())
    write_fixture(out, "views", views_state())
    write_fixture(out, "module", module_state())

    single = os.path.join(out, "single")
    os.makedirs(single, exist_ok=True)
    shutil.copy(plain, os.path.join(single, "pytorch_model.bin"))

    sharded = os.path.join(out, "sharded")
    os.makedirs(sharded, exist_ok=True)
    state = plain_state()
    names = list(state)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        torch.save(collections.OrderedDict((k, state[k]) for k in shard), os.path.join(sharded, file))
        weight_map.update({k: file for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    with open(os.path.join(sharded, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

    torch.save(plain_state(), os.path.join(out, "legacy.bin"), _use_new_zipfile_serialization=False)

    corrupt = os.path.join(out, "corrupt_storage.bin")
    shutil.copy(plain, corrupt)
    with zipfile.ZipFile(corrupt) as z:
        storage = next(n for n in z.namelist() if n.endswith("/data/0"))
    at = storage_data_offset(corrupt, storage)
    with open(corrupt, "r+b") as f:
        f.seek(at + 1)
        byte = f.read(1)
        f.seek(at + 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    print(json.dumps({"dir": out, "tensors": {k: list(v.shape) for k, v in plain_state().items()}}))


# --- hostile pickles -------------------------------------------------------------------------


def unicode(text):
    """BINUNICODE: a length-prefixed UTF-8 string."""
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def in_state_dict(call):
    """A protocol 2 dict {"weight": <call>}: the call hides where a tensor would be."""
    return b"\x80\x02}q\x00(" + unicode("weight") + call + b"u."


def hostile_pickles(marker):
    cmd = f"touch {marker}"
    eval_src = f"__import__('os').system({cmd!r})"
    arg = unicode(cmd) + b"\x85"  # (cmd,)
    popen_arg = b"(" + unicode("touch") + unicode(marker) + b"l\x85"  # (["touch", marker],)
    return {
        # name: (pickle bytes, the global the error must name, whether Python executes it)
        "global_os_system": (in_state_dict(b"cos\nsystem\n" + arg + b"R"), "os.system", True),
        "global_builtins_eval": (
            in_state_dict(b"cbuiltins\neval\n" + unicode(eval_src) + b"\x85R"),
            "builtins.eval",
            True,
        ),
        "global_subprocess_popen": (
            in_state_dict(b"csubprocess\nPopen\n" + popen_arg + b"R"),
            "subprocess.Popen",
            True,
        ),
        # Protocol 4: the module and name are memoized (MEMOIZE), dropped, and fetched back.
        "stack_global_memoize_posix": (
            b"\x80\x04\x8c\x05posix\x94\x8c\x06system\x94" + b"00" + b"h\x00h\x01\x93" + arg + b"R.",
            "posix.system",
            True,
        ),
        # BINPUT / LONG_BINGET at odd memo slots, with a decoy string pushed in between.
        "stack_global_binput_eval": (
            b"\x80\x04" + unicode("builtins") + b"q\x05" + unicode("eval") + b"q\x09" + b"00"
            + unicode("collections") + b"0"
            + b"j\x05\x00\x00\x00j\x09\x00\x00\x00\x93" + unicode(eval_src) + b"\x85R.",
            "builtins.eval",
            True,
        ),
        # Plain string operands, nested in a state dict.
        "stack_global_os_system": (
            in_state_dict(b"\x8c\x02os\x8c\x06system\x93" + arg + b"R"),
            "os.system",
            True,
        ),
        # Protocol 0 INST: MARK, the arguments, then the class named inline.
        "inst_os_system": (b"(V" + cmd.encode() + b"\nios\nsystem\n.", "os.system", True),
        # The operands come out of an allowed call, not string literals: kiln cannot see what
        # they are (pytorch-reader would pass the first argument of _rebuild_parameter through).
        "stack_global_unverifiable": (
            b"\x80\x04ctorch._utils\n_rebuild_parameter\nq\x00"
            + b"(\x8c\x02os\x89}tR" + b"h\x00(\x8c\x06system\x89}tR" + b"\x93" + arg + b"R.",
            "cannot be verified",
            False,
        ),
    }


def write_torch_zip(path, pickle_bytes):
    """A zip laid out like torch.save's: archive/data.pkl and the small text entries."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        z.writestr("archive/.data/serialization_id", "0" * 40)


def prove_executes(name, build):
    """Runs `build(proof_marker)` through Python's unpickler and checks the marker appears."""
    with tempfile.TemporaryDirectory() as tmp:
        proof = os.path.join(tmp, "proof")
        try:
            pickle.loads(build(proof))
        except Exception:
            pass  # the call ran before the unpickler choked on what it returned (if it did)
        deadline = time.time() + 10  # Popen returns before its child has run
        while not os.path.exists(proof) and time.time() < deadline:
            time.sleep(0.05)
        if not os.path.exists(proof):
            fail(f"hostile fixture {name} does not execute under Python's unpickler")


def make_hostile(args):
    os.makedirs(args.dir, exist_ok=True)
    cases = {}
    for name, (data, expected, executes) in hostile_pickles(args.marker).items():
        if args.prove and executes:
            prove_executes(name, lambda proof, name=name: hostile_pickles(proof)[name][0])
        path = os.path.join(args.dir, f"{name}.bin")
        write_torch_zip(path, data)
        cases[name] = {"path": path, "expect": expected}
    if os.path.exists(args.marker):
        fail(f"{args.marker} exists after making the fixtures")
    print(json.dumps(cases))


# --- checking kiln's conversion ---------------------------------------------------------------


def raw_tensors(path):
    """Header metadata and name -> (dtype, shape, raw bytes), read straight off the file."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    start = 8 + n
    metadata = header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        tensors[name] = (info["dtype"], info["shape"], data[start + a : start + b])
    return metadata, tensors


def check_pair(source, converted):
    state = torch.load(source, weights_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        ref = os.path.join(tmp, "reference.safetensors")
        how = reference(state, ref)
        with safe_open(converted, framework="pt") as a, safe_open(ref, framework="pt") as b:
            if a.metadata() != b.metadata() or a.metadata() != FORMAT:
                fail(f"{converted}: metadata {a.metadata()}, reference {b.metadata()}")
            if sorted(a.keys()) != sorted(b.keys()):
                fail(f"{converted}: tensors {sorted(a.keys())}, reference {sorted(b.keys())}")
            for k in b.keys():
                sa, sb = a.get_slice(k), b.get_slice(k)
                if sa.get_dtype() != sb.get_dtype() or list(sa.get_shape()) != list(sb.get_shape()):
                    fail(f"{converted}: `{k}` is {sa.get_dtype()} {sa.get_shape()}, "
                         f"reference {sb.get_dtype()} {sb.get_shape()}")
        meta_a, raw_a = raw_tensors(converted)
        meta_b, raw_b = raw_tensors(ref)
        for k, (dtype, shape, data) in raw_b.items():
            if raw_a[k] != (dtype, shape, data):
                fail(f"{converted}: `{k}` bytes differ from the reference")
        loaded = load_file(converted)
        for k, v in state.items():
            if not torch.equal(loaded[k], v.contiguous()):
                fail(f"{converted}: `{k}` values differ from torch.load({source})")
        with open(converted, "rb") as f1, open(ref, "rb") as f2:
            identical = f1.read() == f2.read()
    return {"source": source, "tensors": len(state), "reference": how, "identical_file": identical}


def check_convert(args):
    if len(args.files) % 2:
        fail("check-convert takes IN OUT pairs")
    pairs = list(zip(args.files[::2], args.files[1::2]))
    print(json.dumps([check_pair(i, o) for i, o in pairs]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-fixtures")
    p.add_argument("dir")
    p.set_defaults(run=make_fixtures)
    p = sub.add_parser("make-hostile")
    p.add_argument("dir")
    p.add_argument("marker")
    p.add_argument("--prove", action="store_true")
    p.set_defaults(run=make_hostile)
    p = sub.add_parser("check-convert")
    p.add_argument("files", nargs="+", metavar="IN OUT")
    p.set_defaults(run=check_convert)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
