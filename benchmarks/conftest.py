"""pytest setup of the benchmark suite (run with ``pytest benchmarks/``; see ``benchmarks/README.md``).

Adds ``--bench-profile {tiny,cpu,gpu}``, parametrizes each benchmark from its module's ``cases(profile)``,
sets the thread count from ``MONO_QUANT_BENCH_THREADS``, and completes the JSON written by
``--benchmark-json``: each result gets its median, throughput and fraction of the ceiling in
``extra_info``, the machine info gets the CPU model, thread count and load average, and the per-round
times are dropped (set ``MONO_QUANT_BENCH_KEEP_DATA=1`` to keep them).
"""

from __future__ import annotations

import os
import platform

import common
import pytest
import torch

if os.environ.get(common.ENV_THREADS):
    torch.set_num_threads(int(os.environ[common.ENV_THREADS]))


def pytest_addoption(parser):
    parser.addoption(
        "--bench-profile",
        choices=sorted(common.PROFILES),
        default=None,
        help=f"benchmark sizes (default: ${common.ENV_PROFILE}, else gpu with CUDA, else cpu); tiny: CI",
    )


def profile_name(config) -> str:
    name = config.getoption("--bench-profile") or os.environ.get(common.ENV_PROFILE)
    if not name:
        name = "gpu" if common.device().type == "cuda" else "cpu"
    if name not in common.PROFILES:
        raise pytest.UsageError(f"{common.ENV_PROFILE}={name!r} is not one of {', '.join(common.PROFILES)}")
    return name


def pytest_report_header(config):
    dev = common.device()
    return (
        f"mono_quant benchmarks: profile {profile_name(config)}, device {dev}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        profile = common.PROFILES[profile_name(metafunc.config)]
        params = metafunc.module.cases(profile)
        metafunc.parametrize("case", params, ids=[p.id for p in params] if params else None)


@pytest.fixture
def profile(request) -> common.Profile:
    return common.PROFILES[profile_name(request.config)]


@pytest.fixture
def dev() -> torch.device:
    return common.device()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["cpu_model"] = _cpu_model()
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["torch"] = torch.__version__
    machine_info["bench_profile"] = profile_name(config)
    machine_info["device"] = str(common.device())
    if torch.cuda.is_available():
        machine_info["cuda_device"] = torch.cuda.get_device_name()
    if hasattr(os, "getloadavg"):
        machine_info["load_average_at_end"] = list(os.getloadavg())


def pytest_benchmark_update_json(config, benchmarks, output_json):
    keep_data = os.environ.get(common.ENV_KEEP_DATA, "0") not in ("", "0")
    for bench in output_json.get("benchmarks", []):
        info, stats = bench.setdefault("extra_info", {}), bench.get("stats") or {}
        if not keep_data:
            stats.pop("data", None)  # every round's time: megabytes for the fast cases
        median = stats.get("median")
        if not median:
            continue
        info["median_s"] = median
        if info.get("numel") and info.get("bytes"):
            info["elements_per_s"] = info["numel"] / median
            info["gb_per_s"] = info["bytes"] / median / 1e9
        if info.get("ceiling_sum_s"):
            info["fraction_of_ceiling"] = info["ceiling_sum_s"] / median
