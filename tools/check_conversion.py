#!/usr/bin/env python3
"""The streamed conversion (libswarm/convert.py) against transformers' own GGUF reader, tensor
for tensor, on a known model's GGUF file (downloaded and checked like `swarmctl model get`) or a
local one; also each side's time and peak RSS (the reader's in a process of its own).

    python tools/check_conversion.py qwen2.5-coder-0.5b-instruct [--dtype float32]
    python tools/check_conversion.py /data/model.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

READER = """
import json, resource, sys, time, torch
from transformers import AutoModelForCausalLM
t0 = time.monotonic()
folder, file = sys.argv[1].rsplit("/", 1)
m = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=getattr(torch, sys.argv[3]))
seconds = time.monotonic() - t0
torch.save({k: v.clone() for k, v in m.state_dict().items()}, sys.argv[2])
print(json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a known model's short name, or a GGUF file")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--cache", default=os.path.join(os.path.dirname(HERE), ".cache", "gguf"))
    a = ap.parse_args()
    import torch

    from libswarm.checkpoint import Checkpoint
    from libswarm.models import fetch_gguf

    path = a.model if os.path.isfile(a.model) else fetch_gguf(a.model, a.cache, lambda s: print(s, flush=True))
    with tempfile.TemporaryDirectory() as tmp:
        ref = os.path.join(tmp, "reference.pt")
        r = subprocess.run([sys.executable, "-c", READER, path, ref, a.dtype], capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-2000:], file=sys.stderr)
            return 1
        theirs = json.loads(r.stdout.strip().splitlines()[-1])
        out = os.path.join(tmp, "converted")
        os.makedirs(out)
        code = ("import json, resource, sys; from libswarm.convert import convert_gguf; "
                "d = convert_gguf(sys.argv[1], sys.argv[2], sys.argv[3]); "
                "d['peak_rss'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024; print(json.dumps(d))")
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-c", code, path, out, a.dtype], capture_output=True, text=True,
                           cwd=os.path.dirname(HERE))
        if r.returncode != 0:
            print(r.stderr[-2000:], file=sys.stderr)
            return 1
        ours = json.loads(r.stdout.strip().splitlines()[-1])
        ours["seconds"] = time.monotonic() - t0
        want = torch.load(ref)
        c = Checkpoint(out)
        tied = {k for k in want if k.endswith("lm_head.weight") and k not in c.index}
        unequal = [k for k in sorted(c.index) if not torch.equal(c.read([k])[k], want[k])]
        missing = sorted(set(want) - set(c.index) - tied)
        extra = sorted(set(c.index) - set(want))
    print(f"{os.path.basename(path)}, {a.dtype}: {len(c.index)} tensors compared ({len(tied)} tied to the "
          f"embeddings), {len(unequal)} unequal, {len(missing)} missing, {len(extra)} extra")
    for name, d in (("transformers' reader", theirs), ("streamed conversion", ours)):
        print(f"  {name:22s} {d['seconds']:6.0f} s   peak RSS {d['peak_rss'] / 2**30:5.2f} GiB")
    for k in (unequal + missing + extra)[:10]:
        print("  differs:", k)
    return 0 if not (unequal or missing or extra) else 1


if __name__ == "__main__":
    sys.exit(main())
