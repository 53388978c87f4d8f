#!/usr/bin/env python3
"""Compare the stage tensors `blip2 inspect` wrote with a reference safetensors file, stage by stage.

Usage: scripts/compare.py OURS.safetensors REFERENCE.safetensors [--prefix CASE/] [--logits-as NAME]

The reference can be the fixtures' reference.safetensors (names prefixed by the case, e.g. `caption/`) or
a file written from Hugging Face transformers (see README, "Checking against transformers"). Prints the
relative error ||ours - ref|| / ||ref|| and the largest absolute difference for every tensor both files
hold; exits 1 if any relative error exceeds --tolerance (default 1e-4). Standard library only.
"""
import argparse
import array
import json
import math
import struct
import sys


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            continue
        begin, end = info["data_offsets"]
        values = array.array("f")
        values.frombytes(data[base + begin : base + end])
        if sys.byteorder != "little":
            values.byteswap()
        out[name] = (info["shape"], values)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ours")
    p.add_argument("reference")
    p.add_argument("--prefix", default="", help="name prefix in the reference file, e.g. caption/")
    p.add_argument("--logits-as", default="logits", help="reference name of our `logits` (e.g. forced_logits)")
    p.add_argument("--tolerance", type=float, default=1e-4)
    a = p.parse_args()
    ours, ref = read_safetensors(a.ours), read_safetensors(a.reference)
    worst = 0.0
    compared = 0
    for name, (shape, values) in ours.items():
        ref_name = a.prefix + (a.logits_as if name == "logits" else name)
        if ref_name not in ref:
            print(f"{name:28s} (no {ref_name} in reference)")
            continue
        rshape, rvalues = ref[ref_name]
        if rshape != shape:
            print(f"{name:28s} shape {shape} != reference {rshape}")
            worst = math.inf
            continue
        num = sum((x - y) ** 2 for x, y in zip(values, rvalues))
        den = sum(y * y for y in rvalues) or 1e-30
        mx = max((abs(x - y) for x, y in zip(values, rvalues)), default=0.0)
        rel = math.sqrt(num / den)
        worst = max(worst, rel)
        compared += 1
        print(f"{name:28s} {str(shape):18s} rel {rel:.3g}  max_abs {mx:.3g}")
    if compared == 0:
        print("no tensors in common")
        return 1
    return 0 if worst <= a.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
