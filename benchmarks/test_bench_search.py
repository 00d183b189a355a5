"""The threshold search: mono_quant's vectorized KL search vs per-candidate loops, and vs torch.ao.

Two groups per histogram length N:

- ``kl search N bins``: the same |x| histogram of N bins scored by ``kl_divergences`` (all candidates at
  once), by a per-candidate loop with numpy inside each candidate, and by the per-bin Python loop of
  TensorRT / ModelOpt entropy calibration (``entropy_loop.py``; only at the lengths in
  ``profile.python_loop_bins``, as it takes seconds to minutes). All must choose the same threshold.
- ``calculate_qparams N bins``: ``HistogramObserver(bins=N).calculate_qparams()`` of mono_quant for each
  method and qscheme, and of torch.ao (its ``_non_linear_param_search``), after observing the same tensor.
  mono_quant's ``bins=N`` is a resolution guarantee: it holds ``2 N + 2`` bins on its power-of-two grid.
"""

from __future__ import annotations

import functools

import common
import entropy_loop
import pytest
import torch

from mono_quant.core import search

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

NQ = 128  # int8, symmetric: 128 levels on one side
SEARCH_IMPLS = ("mono_quant-vectorized", "loop-numpy", "loop-python")
METHODS = ("kl", "mse", "percentile")
QSCHEMES = ("symmetric", "affine")


def cases(profile: common.Profile) -> list:
    params = []
    for bins in profile.search_bins:
        for impl in SEARCH_IMPLS:
            if impl != "loop-python" or bins in profile.python_loop_bins:
                params.append(pytest.param(("kl-search", bins, impl, None), id=f"kl-search-{bins}-{impl}"))
        for method in METHODS:
            for qscheme in QSCHEMES:
                params.append(
                    pytest.param(
                        ("qparams", bins, "mono_quant", (method, qscheme)),
                        id=f"qparams-{bins}-{method}-{qscheme}",
                    )
                )
        params.append(
            pytest.param(
                ("qparams", bins, "torch.ao", ("non-linear", "affine")), id=f"qparams-{bins}-torch.ao"
            )
        )
    return params


@functools.lru_cache(maxsize=4)
def _data(numel: int, device_name: str) -> torch.Tensor:
    return common.activation(numel, torch.float32, device_name, seed=1)


@functools.lru_cache(maxsize=4)
def _abs_histogram(numel: int, bins: int, device_name: str) -> torch.Tensor:
    """int64 ``(bins,)`` histogram of |x| over ``[0, max |x|]`` (torch.histc: counts < 2^24, exact)."""
    a = _data(numel, device_name).abs().flatten()
    return torch.histc(a, bins=bins, min=0, max=float(a.max())).to(torch.int64)


def _vectorized(h: torch.Tensor) -> tuple[int, torch.Tensor]:
    # ModelOpt's zero-bin rule, as search_range applies it, then every candidate at once
    hz = torch.cat([h[1:2], h[1:]])
    hi = search.symmetric_candidates(h.shape[0], h.device)
    scores = search.kl_divergences(hz, torch.zeros_like(hi), hi, NQ)
    return int(hi[search.last_argmin(scores)]), scores


def _test_search(benchmark, bins, impl, dev, profile):
    h = _abs_histogram(profile.search_numel, bins, str(dev))
    if impl == "mono_quant-vectorized":
        fn = lambda: _vectorized(h)
        rounds = None
    else:
        counts = h.cpu().numpy()
        loop = entropy_loop.loop_numpy if impl == "loop-numpy" else entropy_loop.loop_python
        fn = lambda: loop(counts, NQ)
        rounds = 3 if impl == "loop-python" else None
    candidates = bins - min(128, bins) + 1
    common.record(
        benchmark,
        case="kl-search",
        impl=impl,
        bins=bins,
        candidates=candidates,
        nq=NQ,
        numel=profile.search_numel,
        device=str(dev),
        peak_extra_bytes=common.peak_extra_bytes(fn, dev) if impl == "mono_quant-vectorized" else None,
    )
    threshold, _ = common.run_timed(benchmark, fn, dev=dev, rounds=rounds)
    expected, _ = _vectorized(h)
    benchmark.extra_info["threshold_bins"] = threshold
    # the same algorithm: the same threshold (ties between float64 sums could differ by a bin)
    assert abs(threshold - expected) <= 1, (impl, threshold, expected)


def _test_qparams(benchmark, bins, impl, variant, dev, profile):
    x = _data(profile.search_numel, str(dev))
    method, qscheme = variant
    if impl == "mono_quant":
        obs = common.mono_observer("histogram", "torch", bins=bins, method=method, qscheme=qscheme)
    else:
        obs = common.torch_ao_observer("histogram", bins=bins)
        if obs is None:
            pytest.skip("torch.ao.quantization is not importable in this torch")
    obs = obs.to(dev)
    obs(x)
    common.record(
        benchmark,
        case="calculate_qparams",
        impl=impl,
        method=method,
        qscheme=qscheme,
        bins=bins,
        numel=x.numel(),
        device=str(dev),
        peak_extra_bytes=common.peak_extra_bytes(obs.calculate_qparams, dev),
    )
    scale, zero_point = common.run_timed(benchmark, obs.calculate_qparams, dev=dev)
    benchmark.extra_info["scale"] = float(scale.flatten()[0])
    benchmark.extra_info["zero_point"] = int(zero_point.flatten()[0])
    assert float(scale.flatten()[0]) > 0


def test_search(benchmark, case, dev, profile):
    kind, bins, impl, variant = case
    if kind == "kl-search":
        benchmark.group = f"kl search {bins} bins"
        _test_search(benchmark, bins, impl, dev, profile)
    else:
        benchmark.group = f"calculate_qparams {bins} bins"
        _test_qparams(benchmark, bins, impl, variant, dev, profile)
