"""One ``ObserverGroup`` call against one call per observer: the time to update many per-tensor observers.

Two sets of tensors, each observed by one ``MinMaxObserver`` per tensor (and by a moving average, in a
second pair of rows):

- ``llama weights``: the ``nn.Linear`` weights of the Llama-like model of ``llm_calibration.py`` (4 layers,
  hidden 512 by default: 29 tensors, 4 to 16 M values);
- ``small tensors``: 281 tensors of 4096 values (the layer count of a 40-layer model; host-bound).

Rows: ``per observer`` (``obs(x)`` for each, in a Python loop) and ``group`` (one ``ObserverGroup``
call); times are medians of ``mono_quant.timing.time_calls`` (synchronized), per call of the whole set. On
the CPU a group calls its observers in turn (the two rows differ by the group's checks); on CUDA it makes
two kernel launches for the whole set.

    python benchmarks/group_calls.py [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

import mono_quant as mq
from mono_quant.timing import time_calls

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from llm_calibration import build_model  # noqa: E402


def tensor_sets(device, layers: int, hidden: int) -> dict[str, list[torch.Tensor]]:
    model = build_model(layers, hidden, 32000, device, torch.float32, "plain")
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    g = torch.Generator().manual_seed(0)
    small = [torch.randn(4096, generator=g).to(device) for _ in range(281)]
    return {"llama weights": weights, "small tensors": small}


def measure(device, layers: int, hidden: int, min_seconds: float) -> dict:
    rows = {}
    for set_name, xs in tensor_sets(device, layers, hidden).items():
        for kind, make in (("minmax", mq.MinMaxObserver), ("ema", mq.MovingAverageMinMaxObserver)):
            observers = [make().to(device) for _ in xs]
            group = mq.ObserverGroup(observers)

            def one_by_one(observers=observers, xs=xs):
                for obs, x in zip(observers, xs, strict=True):
                    obs(x)

            loop = time_calls(one_by_one, device, min_seconds=min_seconds)
            grouped = time_calls(lambda group=group, xs=xs: group(xs), device, min_seconds=min_seconds)
            values = sum(x.numel() for x in xs)
            for row, t in (("per observer", loop), ("group", grouped)):
                rows[f"{set_name}, {kind}, {row}"] = {
                    "tensors": len(xs),
                    "values": values,
                    "ms": 1e3 * t.median,
                    "us_per_tensor": 1e6 * t.median / len(xs),
                    "spread": t.spread,
                    "calls": t.calls,
                }
            rows[f"{set_name}, {kind}, group"]["speedup"] = loop.median / grouped.median
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--min-seconds", type=float, default=1.0)
    p.add_argument("--json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = measure(device, args.layers, args.hidden, args.min_seconds)
    print("| set, observer, how | tensors | ms a call | us a tensor | spread | vs per observer |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        cells = (
            name,
            r["tensors"],
            f"{r['ms']:.2f}",
            f"{r['us_per_tensor']:.1f}",
            f"{r['spread']:.2f}",
            speed,
        )
        print("| " + " | ".join(map(str, cells)) + " |")
    if args.json:
        machine = {
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "machine": machine, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
