"""A segmented observation (MoE experts) against one plain observer per expert: the time of one call.

``x`` is ``[tokens, hidden]`` (random normal, as the routed hidden states of an MoE block), routed top-k to
``E`` experts at random. For each kind (MinMax, per channel, histogram, channel statistics), rows:

- ``segmented``: one observer, ``obs(x, segments=idx, num_segments=E)`` (on CUDA the kernels);
- ``segmented, torch``: the same with ``backend="torch"`` (CUDA only: the torch twin, also sync-free);
- ``per expert``: what one writes without segments: per expert, its rows (``nonzero`` of the routing, a
  host read each) gathered and fed to its own plain observer.

Times are medians of ``mono_quant.timing.time_calls`` (synchronized) of one whole call; ``speedup`` is
``per expert`` over the row's time.

    python benchmarks/segments_bench.py [--device cuda] [--configs 8x2,64x8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from mono_quant.core.registry import create_observer
from mono_quant.timing import time_calls

KINDS = {"minmax": {}, "per_channel": {"ch_axis": -1}, "histogram": {}, "channel_stats": {}}


def _per_expert(kind: str, x: torch.Tensor, idx: torch.Tensor, experts: int, backend: str):
    observers = [create_observer(kind, backend=backend, **KINDS[kind]).to(x.device) for _ in range(experts)]

    def call():
        for e, obs in enumerate(observers):
            rows = torch.nonzero((idx == e).any(1)).flatten()
            if rows.numel():
                obs(x.index_select(0, rows))

    return call


def measure(device, tokens: int, hidden: int, experts: int, topk: int, dtype, min_seconds: float) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    idx = torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(tokens)]).to(device)
    backends = ["auto", "torch"] if device.type == "cuda" else ["auto"]
    rows = {}
    for kind in KINDS:
        timed = {}
        for backend in backends:
            obs = create_observer(kind, backend=backend, **KINDS[kind]).to(device)
            name = "segmented" if backend == "auto" else "segmented, torch"
            timed[name] = time_calls(
                lambda obs=obs: obs(x, segments=idx, num_segments=experts), device, min_seconds=min_seconds
            )
        timed["per expert"] = time_calls(
            _per_expert(kind, x, idx, experts, "auto"), device, min_seconds=min_seconds
        )
        base = timed["per expert"].median
        for name, t in timed.items():
            rows[f"{kind}, E={experts} top-{topk}, {name}"] = {
                "ms": 1e3 * t.median,
                "spread": t.spread,
                "calls": t.calls,
                "speedup": base / t.median,
            }
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--configs", default="8x2", help="experts x top-k, comma separated (e.g. 8x2,64x8)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--min-seconds", type=float, default=1.0)
    p.add_argument("--json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rows = {}
    for config in args.configs.split(","):
        experts, topk = (int(v) for v in config.lower().split("x"))
        rows.update(measure(device, args.tokens, args.hidden, experts, topk, dtype, args.min_seconds))
    print(f"x [{args.tokens}, {args.hidden}] {args.dtype} on {device}")
    print("| kind, routing, how | ms a call | spread | vs per expert |")
    print("|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['ms']:.2f} | {r['spread']:.2f} | {r['speedup']:.2f}x |")
    if args.json:
        machine = {
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
        if device.type == "cuda":
            machine["gpu"] = torch.cuda.get_device_name(device)
        with open(args.json, "w") as f:
            json.dump(
                {"device": str(device), "args": vars(args), "machine": machine, "rows": rows}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
