"""Shared test setup.

TRITON_INTERPRET is read when ``@triton.jit`` runs, so it is set here, before anything imports the
kernels: every kernel then runs in Triton's interpreter on CPU tensors (tests marked ``interpreter``).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; runs in benchmarks/gpu_check.sh")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
