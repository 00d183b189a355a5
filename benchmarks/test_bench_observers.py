"""Observer throughput: mono_quant (torch path, Triton path on CUDA) vs torch.ao, on the same tensors.

One group per (size, dtype): every observer kind on every implementation, plus the two ceilings of that
tensor (``x.sum()``: one read; ``x.clone()``: a read and a write), all in the same run. Each observer is
called once before timing, so the numbers are steady-state calibration steps (for the histogram: the
grid already fits the data).
"""

from __future__ import annotations

import common
import pytest
import torch

from mono_quant.bench import KINDS

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

IMPLS = ("mono_quant-torch", "mono_quant-triton", "torch.ao")
CEILINGS = ("sum", "clone")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cases(profile: common.Profile) -> list:
    """(numel, dtype, kind, impl), largest loop outermost so that the cached tensor is reused."""
    params = []
    for numel in profile.sizes:
        for dtype in profile.dtypes:
            tag = f"{numel:.0e}-{_dtype_name(dtype)}"
            params += [
                pytest.param((numel, dtype, "ceiling", op), id=f"{tag}-ceiling-{op}") for op in CEILINGS
            ]
            for kind in KINDS:
                for impl in IMPLS:
                    params.append(pytest.param((numel, dtype, kind, impl), id=f"{tag}-{kind}-{impl}"))
    return params


def _observer(kind: str, impl: str, dev: torch.device):
    if impl == "mono_quant-torch":
        return common.mono_observer(kind, "torch").to(dev)
    if impl == "mono_quant-triton":
        reason = common.triton_skip_reason(dev)
        if reason:
            pytest.skip(reason)
        return common.mono_observer(kind, "triton").to(dev)
    obs = common.torch_ao_observer(kind)
    if obs is None:
        pytest.skip("torch.ao.quantization is not importable in this torch")
    return obs.to(dev)


def _check(kind: str, obs, x: torch.Tensor) -> None:
    """A benchmark of a wrong result is worth nothing: check what is cheap to check."""
    ref = x.float()
    if kind in ("minmax", "histogram"):
        assert float(obs.min_val) == float(ref.min()) and float(obs.max_val) == float(ref.max())
    if kind == "per_channel":
        assert torch.equal(obs.min_val.float().cpu(), ref.amin(0).cpu())
    if kind == "histogram" and hasattr(obs, "seen"):
        assert int(obs.counts.sum()) == int(obs.seen[0])


def test_forward(benchmark, case, dev, profile):
    numel, dtype, kind, impl = case
    x, sum_s, clone_s = common.tensor_and_ceilings(numel, dtype, str(dev), profile.ceiling_rounds)
    benchmark.group = f"forward {numel:.0e} {_dtype_name(dtype)}"
    info = dict(
        case="forward",
        kind=kind,
        impl=impl,
        dtype=_dtype_name(dtype),
        numel=x.numel(),
        shape=list(x.shape),
        bytes=x.nbytes,
        device=str(dev),
        ceiling_sum_s=sum_s,
        ceiling_clone_s=clone_s,
    )
    if kind == "ceiling":
        fn = x.sum if impl == "sum" else x.clone
        obs = None
    else:
        obs = _observer(kind, impl, dev)
        try:
            obs(x)  # first observation: sizes per-channel state, sets the histogram's grid
        except (RuntimeError, TypeError, NotImplementedError) as exc:
            pytest.skip(f"{impl} cannot observe a {_dtype_name(dtype)} tensor: {exc}")
        fn = lambda: obs(x)
    peak = common.peak_extra_bytes(fn, dev)
    common.record(
        benchmark,
        **info,
        peak_extra_bytes=peak,
        memory_note="cuda max_memory_allocated" if dev.type == "cuda" else "torch.profiler allocation events",
    )
    common.run_timed(benchmark, fn, dev=dev)
    if obs is not None:
        _check(kind, obs, x)
