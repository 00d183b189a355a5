"""Which per-tensor scale for NVFP4 activations: amax, MSE-optimal or a percentile? On the demo model.

NVFP4 quantizes a tensor with one float32 scale ``t`` and an e4m3 scale per block of 16; only ``t`` is
static (calibrated), the block scales come from each block at run time. ``t = A / 2688`` for a calibrated
absolute maximum ``A``; this script compares, for the input of every ``nn.Linear`` of
``mono_quant.demo`` (LLM-like activations: heavy tails, outlier channels):

- ``amax``: ``A`` = max |x| over the calibration batches (``MinMaxObserver``'s range);
- ``mse``: ``A = c * amax`` with ``c`` chosen on the calibration batches to minimize the NVFP4
  fake-quantization MSE (a grid of 64 values of ``c`` from 2**-8 to 1, and 1.25, 1.5, 2);
- ``p99.9``, ``p99.99``, ``p99.999``: percentiles of |x| over the calibration batches;

and reports the SQNR (dB) of the NVFP4 fake-quantized activations on held-out batches, per layer and for
the model's logits with every Linear input quantized. Run: ``python benchmarks/nvfp4_activation_scale.py``
(about three minutes of CPU time).
"""

from __future__ import annotations

import math

import torch

from mono_quant.core import formats as F
from mono_quant.demo import demo_batches, demo_model

CALIB, EVAL = 8, 8
GRID = [2.0 ** (-8 * (1 - i / 63)) for i in range(64)] + [1.25, 1.5, 2.0]
PERCENTILES = (99.9, 99.99, 99.999)


def sqnr(x: torch.Tensor, y: torch.Tensor) -> float:
    noise = (x.double() - y.double()).square().sum()
    return float(10 * torch.log10(x.double().square().sum() / noise)) if noise > 0 else math.inf


def fq(x: torch.Tensor, amax: float) -> torch.Tensor:
    return F.fake_quantize(x.reshape(-1, x.shape[-1]), "nvfp4", tensor_scale=amax / 2688).reshape(x.shape)


def linear_inputs(model, batches) -> dict[str, torch.Tensor]:
    """Every Linear's input over ``batches``, concatenated: name -> ``[tokens, in_features]``."""
    seen: dict[str, list] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, n=name: seen.setdefault(n, []).append(args[0].detach()))
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return {n: torch.cat([t.reshape(-1, t.shape[-1]) for t in ts]) for n, ts in seen.items()}


def choices(x: torch.Tensor) -> dict[str, float]:
    """Calibrated absolute maxima of ``x`` (``[tokens, C]``) by each method."""
    amax = float(x.abs().max())
    mse = min(GRID, key=lambda c: float((fq(x, c * amax) - x).square().sum()))
    out = {"amax": amax, "mse": mse * amax}
    a = x.abs().reshape(-1).double()
    for p in PERCENTILES:
        k = max(1, math.ceil(a.numel() * p / 100))
        out[f"p{p}"] = float(a.kthvalue(k).values)
    return out


def main() -> None:
    torch.manual_seed(0)
    model = demo_model()
    batches = demo_batches(CALIB + EVAL)
    calib, held_out = batches[:CALIB], batches[CALIB:]
    acts_c, acts_e = linear_inputs(model, calib), linear_inputs(model, held_out)
    picked = {name: choices(x) for name, x in acts_c.items()}
    methods = list(next(iter(picked.values())))
    print(
        f"{'layer':22}" + "".join(f"{m:>10}" for m in methods) + f"{'mse c':>8}   (SQNR dB, held-out batches)"
    )
    per_method = {m: [] for m in methods}
    for name, x in acts_e.items():
        row = {m: sqnr(x, fq(x, a)) for m, a in picked[name].items()}
        for m in methods:
            per_method[m].append(row[m])
        c = picked[name]["mse"] / picked[name]["amax"]
        print(f"{name:22}" + "".join(f"{row[m]:10.2f}" for m in methods) + f"{c:8.3f}")
    print(f"{'mean':22}" + "".join(f"{sum(v) / len(v):10.2f}" for v in per_method.values()))

    with torch.no_grad():
        ref = torch.cat([model(b) for b in held_out])
    print("\nlogits SQNR (dB), every Linear input NVFP4-quantized with its calibrated scale:")
    for m in methods:
        hooks = [
            mod.register_forward_pre_hook(lambda _, args, a=picked[name][m]: (fq(args[0], a),))
            for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear)
        ]
        with torch.no_grad():
            out = torch.cat([model(b) for b in held_out])
        for h in hooks:
            h.remove()
        print(f"  {m:10} {sqnr(ref, out):7.2f}")


if __name__ == "__main__":
    main()
