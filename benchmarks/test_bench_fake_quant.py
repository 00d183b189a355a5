"""Training-time calibration: FakeQuantize forward + backward against torch.ao's
``FusedMovingAvgObsFakeQuantize``, and the AmaxHistoryObserver step against the MinMax update.

One group per (case, size, dtype), every implementation on the same ``[numel / 1000, 1000]`` tensor in the
same run, with ``x.clone()`` of it as the ceiling (one read and one write, what a fake quantization must
at least move). Sizes: the profile's from 1e6 up (the smallest for ``tiny``).

- ``fq-per_tensor``: an int8 moving average per tensor (affine; torch.ao's default), a step is
  ``y = fq(x)`` then ``torch.autograd.grad(y, x, g)``; mono_quant with ``delayed=False``, ``delayed=True``
  and ``delayed=True, fused=True``.
- ``fq-per_channel``: int8 symmetric moving average per channel along axis 0 (the only per-channel axis of
  torch.ao's fused op), ``C = numel / 1000`` channels.
- ``fq-forward``: the per-tensor forward alone (no autograd), for the issue's x.clone() comparison.
- ``amax``: one observer step, ``AmaxHistoryObserver`` (history of 1024) against ``MinMaxObserver``.
"""

from __future__ import annotations

import warnings

import common
import pytest
import torch

import mono_quant as mq

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

BACKENDS = ("torch", "triton")
FQ_IMPLS = (
    *(f"mono_quant-{b}{v}" for b in BACKENDS for v in ("", "-delayed", "-fused")),
    "torch.ao-fused",
    "ceiling-clone",
)
AMAX_IMPLS = (*(f"{k}-{b}" for k in ("amax_history", "minmax") for b in BACKENDS), "ceiling-sum")


def _sizes(profile: common.Profile) -> list[int]:
    big = [n for n in profile.sizes if n >= 1_000_000]
    return big or [min(profile.sizes)]


def cases(profile: common.Profile) -> list:
    params = []
    for numel in _sizes(profile):
        for dtype in profile.dtypes:
            tag = f"{numel:.0e}-{str(dtype).removeprefix('torch.')}"
            for case in ("fq-per_tensor", "fq-per_channel", "fq-forward"):
                impls = list(FQ_IMPLS)
                if case == "fq-per_channel":  # fused=True is per tensor
                    impls = [i for i in impls if not (i.startswith("mono_quant") and i.endswith("-fused"))]
                if case == "fq-forward":
                    impls = [i for i in impls if "delayed" not in i]
                for impl in impls:
                    params.append(pytest.param((case, numel, dtype, impl), id=f"{case}-{tag}-{impl}"))
            for impl in AMAX_IMPLS:
                params.append(pytest.param(("amax", numel, dtype, impl), id=f"amax-{tag}-{impl}"))
    return params


def _fake_quantize(case: str, impl: str, dev: torch.device):
    per_channel = case == "fq-per_channel"
    if impl == "torch.ao-fused":
        ao = common.torch_ao()
        if ao is None:
            pytest.skip("torch.ao.quantization is not importable in this torch")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if per_channel:
                return ao.FusedMovingAvgObsFakeQuantize(
                    observer=ao.MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127,
                    dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0,
                ).to(dev)  # fmt: skip
            return ao.FusedMovingAvgObsFakeQuantize(quant_min=-128, quant_max=127, dtype=torch.qint8).to(dev)
    backend = impl.removeprefix("mono_quant-").split("-")[0]
    if backend == "triton" and (reason := common.triton_skip_reason(dev)):
        pytest.skip(reason)
    kw = {"ch_axis": 0, "qscheme": "symmetric"} if per_channel else {}
    return mq.FakeQuantize(
        "moving_average",
        backend=backend,
        delayed="delayed" in impl or "fused" in impl,
        fused="fused" in impl,
        **kw,
    ).to(dev)


def _observer(impl: str, dev: torch.device):
    kind, backend = impl.rsplit("-", 1)
    if backend == "triton" and (reason := common.triton_skip_reason(dev)):
        pytest.skip(reason)
    if kind == "amax_history":
        return mq.AmaxHistoryObserver(history_len=1024, backend=backend).to(dev)
    return mq.MinMaxObserver(backend=backend).to(dev)


def test_training_step(benchmark, case, dev, profile):
    kind, numel, dtype, impl = case
    x, sum_s, clone_s = common.tensor_and_ceilings(numel, dtype, str(dev), profile.ceiling_rounds)
    benchmark.group = f"{kind} {numel:.0e} {str(dtype).removeprefix('torch.')}"
    info = dict(case=kind, kind=kind, impl=impl, dtype=str(dtype).removeprefix("torch."), numel=x.numel(),
                shape=list(x.shape), bytes=x.nbytes, device=str(dev), ceiling_sum_s=sum_s,
                ceiling_clone_s=clone_s)  # fmt: skip
    common.record(benchmark, **info)
    if impl.startswith("ceiling"):
        common.run_timed(benchmark, x.clone if impl == "ceiling-clone" else x.sum, dev=dev)
        return
    if kind == "amax":
        obs = _observer(impl, dev)
        obs(x)
        common.run_timed(benchmark, lambda: obs(x), dev=dev)
        assert float(obs.max_val) == float(x.float().max())
        return
    fq = _fake_quantize(kind, impl, dev)
    xg = x.detach().clone().requires_grad_(kind != "fq-forward")
    g = torch.randn_like(xg)
    try:
        fq(xg)  # the first step sizes the state and sets the qparams
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        pytest.skip(f"{impl} cannot fake-quantize a {info['dtype']} tensor this way: {exc}")
    if kind == "fq-forward":
        fn = lambda: fq(xg)
    else:
        fn = lambda: torch.autograd.grad(fq(xg), xg, g)
    out = common.run_timed(benchmark, fn, dev=dev)
    y = out if kind == "fq-forward" else fq(xg.detach())
    assert y.shape == x.shape and y.dtype == x.dtype and bool(torch.isfinite(y).all())
