"""Shared test setup.

TRITON_INTERPRET is read when ``@triton.jit`` runs, so it is set here, before anything imports the
kernels: every kernel then runs in Triton's interpreter on CPU tensors (tests marked ``interpreter``).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import pkgutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Every kernel module is decorated now, under the interpreter: a test that turns TRITON_INTERPRET off for a
# moment (to check the error when the kernels cannot run) must not be the first to import one.
try:
    import mono_quant.kernels as _kernels
except ImportError:  # triton is not installed: the kernel tests skip
    _kernels = None
if _kernels is not None:
    for _module in pkgutil.iter_modules(_kernels.__path__):
        importlib.import_module(f"mono_quant.kernels.{_module.name}")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; runs in benchmarks/gpu_check.sh")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
