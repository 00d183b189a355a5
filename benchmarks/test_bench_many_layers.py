"""The many-layers case: one calibration step for each of ``profile.layers`` observers.

An LLM-like set of activations, ``layers`` tensors ``[tokens, hidden]`` (different values each), as one
calibration batch through a model with that many linear layers would give. Each round makes fresh
observers (outside the timing) and times one ``forward`` on every layer; the ``qparams`` cases then time
``calculate_qparams`` of every layer's observer. Per-layer overhead (Python, dispatch, small kernels)
shows here where the single-tensor benchmarks hide it.
"""

from __future__ import annotations

import functools

import common
import pytest
import torch

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

KINDS = ("minmax", "histogram", "per_channel")
IMPLS = ("mono_quant-torch", "mono_quant-triton", "torch.ao")
FORWARD_ROUNDS = 7  # a round is ~0.2 s on 2 CPU cores; the median of 7 rides out a busy neighbour
QPARAMS_ROUNDS = 3  # a round is ~1 s


def cases(profile: common.Profile) -> list:
    params = []
    for dtype in profile.dtypes:
        name = str(dtype).removeprefix("torch.")
        for kind in KINDS:
            for impl in IMPLS:
                params.append(
                    pytest.param(("forward", dtype, kind, impl), id=f"forward-{name}-{kind}-{impl}")
                )
    for impl in IMPLS:
        params.append(
            pytest.param(("qparams", torch.float32, "histogram", impl), id=f"qparams-histogram-{impl}")
        )
    return params


@functools.lru_cache(maxsize=1)
def _layers(
    layers: int, tokens: int, hidden: int, dtype: torch.dtype, device_name: str
) -> list[torch.Tensor]:
    return [
        common.activation(tokens * hidden, dtype, device_name, seed=i, hidden=hidden) for i in range(layers)
    ]


def _make(kind: str, impl: str, dev: torch.device, count: int) -> list:
    if impl == "torch.ao":
        if common.torch_ao() is None:
            pytest.skip("torch.ao.quantization is not importable in this torch")
        return [common.torch_ao_observer(kind).to(dev) for _ in range(count)]
    backend = impl.removeprefix("mono_quant-")
    if backend == "triton" and (reason := common.triton_skip_reason(dev)):
        pytest.skip(reason)
    return [common.mono_observer(kind, backend).to(dev) for _ in range(count)]


def _step(observers: list, xs: list[torch.Tensor]) -> list:
    for obs, x in zip(observers, xs, strict=True):
        obs(x)
    return observers


def test_many_layers(benchmark, case, dev, profile):
    what, dtype, kind, impl = case
    tokens, hidden = profile.layer_shape
    xs = _layers(profile.layers, tokens, hidden, dtype, str(dev))
    numel = sum(x.numel() for x in xs)
    nbytes = sum(x.nbytes for x in xs)
    benchmark.group = f"{profile.layers} layers {what} {str(dtype).removeprefix('torch.')}"
    info = dict(
        case=f"many-layers {what}",
        kind=kind,
        impl=impl,
        dtype=str(dtype).removeprefix("torch."),
        layers=profile.layers,
        layer_shape=[tokens, hidden],
        numel=numel,
        bytes=nbytes,
        device=str(dev),
    )
    if what == "forward":
        ceiling = common.median_seconds(lambda: [x.sum() for x in xs], dev, rounds=profile.ceiling_rounds)
        common.record(benchmark, **info, ceiling_sum_s=ceiling)
        make = lambda: _make(kind, impl, dev, len(xs))
        try:
            _step(_make(kind, impl, dev, 1), xs[:1])
        except (RuntimeError, TypeError, NotImplementedError) as exc:
            pytest.skip(f"{impl} cannot observe a {info['dtype']} tensor: {exc}")
        observers = common.run_timed(
            benchmark, lambda obs: _step(obs, xs), dev=dev, setup=make, rounds=FORWARD_ROUNDS, warmup=0
        )
        assert all(float(o.max_val.max()) == float(x.max()) for o, x in zip(observers, xs, strict=True))
    else:
        observers = _step(_make(kind, impl, dev, len(xs)), xs)
        info.pop("bytes")  # the search reads histograms, not the tensors
        common.record(benchmark, **info)
        qparams = common.run_timed(
            benchmark,
            lambda: [o.calculate_qparams() for o in observers],
            dev=dev,
            rounds=QPARAMS_ROUNDS,
            warmup=0,
        )
        assert all(float(scale.flatten()[0]) > 0 for scale, _ in qparams)
