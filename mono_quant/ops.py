"""Dispatch: one function per statistic, each choosing the Triton kernels or the torch reference per call.

This is the only module that decides. For each call it looks at the tensor's device, whether triton
imports, whether the Triton interpreter is on (``TRITON_INTERPRET=1``, which runs kernels on CPU
tensors) and the observer's ``backend``:

    "torch"   always ``mono_quant.reference``.
    "triton"  always ``mono_quant.kernels``; where they cannot run, a clear error (never a fallback).
    "auto"    the value of ``MONO_QUANT_BACKEND`` when that is set ("torch" or "triton"); otherwise the
              kernels for CUDA tensors when triton imports, the torch reference for everything else.

Where it lives (this module re-exports it all; import from here):

    ``ops_backend``   the backend selection above (``resolve_backend``, ``triton_available``)
    ``ops_observe``   min/max, per-channel, histogram and segmented updates
    ``ops_training``  the amax history and fake quantization, fused or not
    ``ops_blocks``    the block formats: per-block amax and block fake-quantize
"""

from __future__ import annotations

from mono_quant.ops_backend import (
    BACKENDS,
    ENV_BACKEND,
    check_backend,
    resolve_backend,
    triton_available,
)
from mono_quant.ops_backend import BackendFallbackWarning as BackendFallbackWarning
from mono_quant.ops_blocks import block_amax_update_, block_fake_quantize
from mono_quant.ops_observe import (
    histogram_segments_update_,
    histogram_update_,
    minmax_per_channel_update_,
    minmax_segments_update_,
    minmax_update_,
)
from mono_quant.ops_training import (
    amax_history_fake_quantize_,
    amax_history_update_,
    fake_quantize_,
    observe_fake_quantize_,
)

__all__ = [
    "BACKENDS",
    "ENV_BACKEND",
    "amax_history_fake_quantize_",
    "amax_history_update_",
    "block_amax_update_",
    "block_fake_quantize",
    "check_backend",
    "fake_quantize_",
    "histogram_segments_update_",
    "histogram_update_",
    "minmax_per_channel_update_",
    "minmax_segments_update_",
    "minmax_update_",
    "observe_fake_quantize_",
    "resolve_backend",
    "triton_available",
]
