"""Backend selection: which implementation, the Triton kernels or the torch reference, observes a tensor.

For each call ``resolve_backend`` looks at the tensor's device, whether triton imports, whether the Triton
interpreter is on (``TRITON_INTERPRET=1``, which runs kernels on CPU tensors) and the observer's
``backend``:

    "torch"   always ``mono_quant.reference``.
    "triton"  always ``mono_quant.kernels``; where they cannot run, a clear error (never a fallback).
    "auto"    the value of ``MONO_QUANT_BACKEND`` when that is set ("torch" or "triton"); otherwise the
              kernels for CUDA tensors when triton imports, the torch reference for everything else.

The dispatch itself (one function per statistic, and its torch.compile custom op) is in ``ops_observe``,
``ops_training`` and ``ops_blocks``; ``mono_quant.ops`` re-exports it all.
"""

from __future__ import annotations

import functools
import os
import warnings
from types import ModuleType

import torch

import mono_quant.reference as reference

__all__ = [
    "BACKENDS",
    "ENV_BACKEND",
    "BackendFallbackWarning",
    "check_backend",
    "resolve_backend",
    "triton_available",
]

BACKENDS = ("auto", "torch", "triton")
ENV_BACKEND = "MONO_QUANT_BACKEND"


class BackendFallbackWarning(RuntimeWarning):
    """CUDA tensors are observed with torch ops because the Triton kernels cannot be imported."""


def check_backend(backend: str) -> str:
    """Validate a ``backend`` setting.

    Raises:
        ValueError: for anything but ``"auto"``, ``"torch"`` or ``"triton"``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(map(repr, BACKENDS))}")
    return backend


@functools.cache
def _kernels() -> ModuleType | None:
    try:
        import mono_quant.kernels as kernels
    except ImportError:
        return None
    return kernels


def triton_available() -> bool:
    """Whether ``mono_quant.kernels`` imports (triton installed and the kernels shipped)."""
    return _kernels() is not None


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _warn_fallback_once() -> None:
    warnings.warn(
        "triton is not importable, so observers on CUDA tensors use torch ops (several passes per call); "
        "install mono_quant[triton] for the fused kernels",
        BackendFallbackWarning,
        stacklevel=2,
    )


def resolve_backend(x: torch.Tensor, backend: str = "auto") -> str:
    """``"torch"`` or ``"triton"``: which implementation observes ``x`` under the ``backend`` setting.

    Raises:
        ValueError: unknown backend (here or in ``MONO_QUANT_BACKEND``).
        NotImplementedError: ``"triton"`` asked for but triton (or the kernels) cannot be imported.
        RuntimeError: ``"triton"`` asked for on a tensor the kernels cannot read (not CUDA, and the
            interpreter is off).
    """
    check_backend(backend)
    if backend == "auto" and os.environ.get(ENV_BACKEND):
        backend = os.environ[ENV_BACKEND].strip().lower()
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_BACKEND}={backend!r} is not one of {', '.join(map(repr, BACKENDS))}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if x.device.type != "cuda":
            return "torch"
        if _kernels() is None:
            _warn_fallback_once()
            return "torch"
        return "triton"
    if _kernels() is None:
        raise NotImplementedError(
            "backend='triton' needs triton and the mono_quant kernels: pip install 'mono_quant[triton]' "
            "(Linux), or use backend='torch'"
        )
    if x.device.type != "cuda" and not _interpreter_on():
        raise RuntimeError(
            f"backend='triton' runs on CUDA tensors, got a tensor on {x.device}; move it with .cuda(), "
            "use backend='torch', or set TRITON_INTERPRET=1 (before importing mono_quant) to run the "
            "kernels in Triton's interpreter"
        )
    return "triton"


def _impl(x: torch.Tensor, backend: str) -> ModuleType:
    return _kernels() if resolve_backend(x, backend) == "triton" else reference
