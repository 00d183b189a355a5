"""Block formats: the per-block amax of an observer step and the fused fake-quantize, against the plain torch
expression, torchao and the ceiling ``x.sum()``, on the same tensors in the same run.

Two tensor sets per profile: a layer set of weights (``gpu``: the 224 Linear weights of a Llama-7B, 32
layers of four ``[4096, 4096]``, two ``[11008, 4096]`` and one ``[4096, 11008]``; ``cpu``: one
``[4096, 4096]``; ``tiny``: small) and activations ``[tokens, 4096]`` of the
profile's sizes. Implementations:

- ``ceiling``: ``x.sum()`` of every tensor (one read);
- ``torch``: the plain expression ``x.abs().view(-1, 32).amax(-1)`` (NaN-propagating, no bookkeeping);
- ``mono_quant-torch`` / ``mono_quant-triton``: a ``PerBlockObserver`` step per tensor (finite amax folded
  into the running state, counts, range); ``fake_quantize`` for the fake-quantize cases;
- ``torchao``: ``to_mx`` (scales and elements: torchao has no amax-only path) and, for fake-quantize,
  ``to_mx`` then ``to_dtype`` back to the input dtype.

MXFP8 e4m3 (blocks of 32) throughout; fake-quantize also NVFP4 (blocks of 16, torchao's
``nvfp4_quantize`` then the dequantize). Medians of the rounds; alternate and repeat runs on a shared
machine.
"""

from __future__ import annotations

import functools
import warnings

import common
import pytest
import torch

from mono_quant.core import formats as F
from mono_quant.core.block_observer import PerBlockObserver

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

_LAYER = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
WEIGHTS = {"tiny": [(64, 256), (96, 128)], "cpu": [(4096, 4096)], "gpu": _LAYER * 32}
HIDDEN = 4096
ROUNDS = 5


def _profile_name(profile: common.Profile) -> str:
    return next(name for name, p in common.PROFILES.items() if p == profile)


def cases(profile: common.Profile) -> list:
    sets = ["weights"] + [f"act{n:.0e}" for n in profile.sizes if n >= HIDDEN * 2]
    params = []
    for dtype in profile.dtypes:
        dname = str(dtype).removeprefix("torch.")
        for tset in sets:
            for impl in ("ceiling", "torch", "mono_quant-torch", "mono_quant-triton", "torchao"):
                params.append(
                    pytest.param(("amax", tset, dtype, "mxfp8_e4m3", impl), id=f"amax-{tset}-{dname}-{impl}")
                )
            for fmt in ("mxfp8_e4m3", "nvfp4"):
                for impl in ("mono_quant-torch", "mono_quant-triton", "torchao"):
                    params.append(
                        pytest.param(
                            ("fake_quantize", tset, dtype, fmt, impl), id=f"fq-{fmt}-{tset}-{dname}-{impl}"
                        )
                    )
    return params


@functools.lru_cache(maxsize=1)
def _tensors(tset: str, profile_name: str, dtype: torch.dtype, device_name: str) -> list[torch.Tensor]:
    if tset == "weights":
        out = []
        g = torch.Generator(device=device_name).manual_seed(0)  # on the device: 6.5e9 values on a GPU
        for o, k in WEIGHTS[profile_name]:
            w = torch.randn(o, k, generator=g, device=device_name, dtype=torch.float32)
            out.append(w.div_(k**0.5).to(dtype))
        return out
    return [common.activation(int(float(tset.removeprefix("act"))), dtype, device_name, hidden=HIDDEN)]


def _torchao():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx
            from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor
        except Exception:  # noqa: BLE001 - any failure: no torchao baseline
            return None
    return to_mx, to_dtype, NVFP4Tensor


def _impl(what, fmt, impl, xs, dev):
    """The function to time, and a check of its result run once after timing."""
    if impl == "ceiling":
        return lambda: [x.sum() for x in xs], None
    if impl == "torch":
        return lambda: [x.abs().view(-1, 32).amax(-1) for x in xs], None
    if impl == "torchao":
        ao = _torchao()
        if ao is None:
            pytest.skip("torchao.prototype.mx_formats does not import")
        to_mx, to_dtype, nvfp4 = ao
        if xs[0].dtype == torch.float16:
            pytest.skip("torchao's to_mx takes float32 and bfloat16")
        if what == "amax":
            return lambda: [to_mx(x, torch.float8_e4m3fn, 32) for x in xs], None
        if fmt == "nvfp4":

            def nv():
                out = []
                for x in xs:
                    t = x.abs().amax().float() / 2688
                    out.append(nvfp4.to_nvfp4(x, per_tensor_scale=t).dequantize(x.dtype))
                return out

            return nv, None

        def mx():
            out = []
            for x in xs:
                s, d = to_mx(x, torch.float8_e4m3fn, 32)
                out.append(to_dtype(d, s, torch.float8_e4m3fn, 32, x.dtype))
            return out

        return mx, None
    backend = impl.removeprefix("mono_quant-")
    if backend == "triton" and (reason := common.triton_skip_reason(dev)):
        pytest.skip(reason)
    if what == "amax":
        observers = [PerBlockObserver(format=fmt, backend=backend).to(dev) for _ in xs]
        for obs, x in zip(observers, xs, strict=True):
            obs(x)  # sizes the buffers
        fn = lambda: [obs(x) for obs, x in zip(observers, xs, strict=True)]

        def check():
            for obs, x in zip(observers, xs, strict=True):
                want = x.float().abs().reshape(-1, 32).amax(-1).reshape(obs.block_amax.shape)
                assert torch.equal(obs.block_amax, want)

        return fn, check
    fn = lambda: [F.fake_quantize(x, fmt, backend=backend) for x in xs]
    return fn, None


def test_blocks(benchmark, case, dev, profile):
    what, tset, dtype, fmt, impl = case
    xs = _tensors(tset, _profile_name(profile), dtype, str(dev))
    dname = str(dtype).removeprefix("torch.")
    benchmark.group = f"{what} {fmt} {tset} {dname}"
    numel = sum(x.numel() for x in xs)
    nbytes = sum(x.nbytes for x in xs) * (2 if what == "fake_quantize" else 1)  # a read (and a write)
    ceiling = common.median_seconds(lambda: [x.sum() for x in xs], dev, rounds=profile.ceiling_rounds)
    common.record(
        benchmark, case=what, format=fmt, tensors=tset, impl=impl, dtype=dname, numel=numel, bytes=nbytes,
        tensor_count=len(xs), device=str(dev), ceiling_sum_s=ceiling,
    )  # fmt: skip
    fn, check = _impl(what, fmt, impl, xs, dev)
    common.run_timed(benchmark, fn, dev=dev, rounds=ROUNDS, warmup=1)
    if check is not None:
        check()
