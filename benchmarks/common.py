"""Shared helpers of the benchmark suite: size profiles, cached test tensors, timing and metadata.

The measuring helpers themselves (``median_seconds``, ``ceiling_seconds``, ``peak_extra_bytes``,
``activation``, observer construction) live in ``mono_quant.bench`` so that ``mono-quant bench`` and this
suite time the same things; this module adds what only the pytest suite needs.

Profiles (``--bench-profile`` or ``MONO_QUANT_BENCH_PROFILE``; default ``gpu`` on a CUDA machine, else
``cpu``): ``tiny`` is the CI smoke run, ``cpu`` real sizes for a CPU (a full run takes minutes), ``gpu`` the
sizes that fill an H200.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from mono_quant.bench import activation, mono_observer, torch_ao, torch_ao_observer, triton_skip_reason
from mono_quant.timing import ceiling_seconds, median_seconds, peak_extra_bytes, synchronize

__all__ = [
    "PROFILES",
    "Profile",
    "activation",
    "ceiling_seconds",
    "device",
    "median_seconds",
    "mono_observer",
    "peak_extra_bytes",
    "record",
    "run_timed",
    "synchronize",
    "tensor_and_ceilings",
    "torch_ao",
    "torch_ao_observer",
    "triton_skip_reason",
]

ENV_PROFILE = "MONO_QUANT_BENCH_PROFILE"
ENV_THREADS = "MONO_QUANT_BENCH_THREADS"
ENV_DEVICE = "MONO_QUANT_BENCH_DEVICE"
ENV_KEEP_DATA = "MONO_QUANT_BENCH_KEEP_DATA"


@dataclass(frozen=True)
class Profile:
    """The sizes one run uses.

    sizes: element counts of the observer benchmarks (tensors ``[numel / 1000, 1000]``).
    dtypes: input dtypes.
    search_bins: histogram lengths of the threshold-search benchmarks.
    python_loop_bins: the lengths at which the per-bin Python loop (seconds to minutes) also runs.
    search_numel: elements fed to the histograms of the search benchmarks.
    layers, layer_shape: the many-layers case (``layers`` tensors ``[tokens, hidden]``).
    ceiling_rounds: calls behind each ceiling median.
    """

    sizes: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    search_bins: tuple[int, ...]
    python_loop_bins: tuple[int, ...]
    search_numel: int
    layers: int
    layer_shape: tuple[int, int]
    ceiling_rounds: int


PROFILES = {
    "tiny": Profile(
        sizes=(10_000,),
        dtypes=(torch.float32, torch.bfloat16),
        search_bins=(256,),
        python_loop_bins=(256,),
        search_numel=10_000,
        layers=4,
        layer_shape=(8, 64),
        ceiling_rounds=3,
    ),
    "cpu": Profile(
        sizes=(10_000, 100_000, 1_000_000, 10_000_000, 30_000_000),
        dtypes=(torch.float32, torch.bfloat16),
        search_bins=(2048, 8192),
        python_loop_bins=(2048,),
        search_numel=1_000_000,
        layers=200,
        layer_shape=(128, 2048),
        ceiling_rounds=15,
    ),
    "gpu": Profile(
        sizes=(10_000, 1_000_000, 10_000_000, 100_000_000, 1_000_000_000),
        dtypes=(torch.float32, torch.bfloat16),
        search_bins=(2048, 8192),
        python_loop_bins=(2048,),
        search_numel=10_000_000,
        layers=200,
        layer_shape=(2048, 4096),
        ceiling_rounds=25,
    ),
}


def device() -> torch.device:
    """The device benchmarked: ``MONO_QUANT_BENCH_DEVICE``, else CUDA when available, else the CPU."""
    name = os.environ.get(ENV_DEVICE) or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@functools.lru_cache(maxsize=2)
def tensor_and_ceilings(
    numel: int, dtype: torch.dtype, device_name: str, rounds: int
) -> tuple[torch.Tensor, float, float]:
    """The test tensor of ``numel`` elements and the medians of its ceilings ``x.sum()`` and ``x.clone()``.

    Cached (two entries, so the largest tensors do not pile up): every implementation of one case sees
    the same tensor and the same ceiling, measured once in the run.
    """
    x = activation(numel, dtype, device_name)
    return x, ceiling_seconds(x, "sum", rounds=rounds), ceiling_seconds(x, "clone", rounds=rounds)


def run_timed(benchmark, fn, *, dev: torch.device, setup=None, rounds: int | None = None, warmup: int = 1):
    """Time ``fn`` with pytest-benchmark, synchronizing the device after each call.

    Without ``rounds``, pytest-benchmark calibrates rounds itself (``--benchmark-min-rounds``,
    ``--benchmark-max-time``); with ``rounds`` (and for any ``setup``), pedantic mode runs exactly that
    many after ``warmup`` calls. Returns what ``fn`` returned.
    """

    def call(*args):
        out = fn(*args)
        synchronize(dev)
        return out

    if setup is None and rounds is None:
        return benchmark(call)
    pedantic_setup = None if setup is None else lambda: ((setup(),), {})
    return benchmark.pedantic(
        call, setup=pedantic_setup, rounds=rounds or 3, iterations=1, warmup_rounds=warmup
    )


def record(benchmark, **info) -> None:
    """Put ``info`` into the result's ``extra_info`` (so the JSON carries it), with the run's settings."""
    benchmark.extra_info.update(info)
    benchmark.extra_info.setdefault("threads", torch.get_num_threads())
    benchmark.extra_info.setdefault("torch", torch.__version__)
