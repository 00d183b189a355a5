"""The package itself: imports without optional dependencies, public names, version."""

import subprocess
import sys

import mono_quant


def test_import_without_triton_and_matplotlib():
    # a None entry in sys.modules makes `import triton` raise ImportError, as if it were not installed
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['matplotlib'] = None\n"
        "import torch, mono_quant\n"
        "from mono_quant import ops\n"
        "obs = mono_quant.HistogramObserver(); obs(torch.randn(100)); obs.calculate_qparams()\n"
        "assert not ops.triton_available()\n"
        "try:\n"
        "    mono_quant.MinMaxObserver(backend='triton')(torch.randn(3))\n"
        "except NotImplementedError as e:\n"
        "    assert 'pip install' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('backend=triton without triton must raise')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_public_api_is_listed():
    for name in mono_quant.__all__:
        assert hasattr(mono_quant, name), name
    assert mono_quant.__version__.count(".") >= 2
