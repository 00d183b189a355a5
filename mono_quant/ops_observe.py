"""Dispatch of the observer updates: min/max (per tensor, per channel), histogram and segmented (MoE)
updates, each choosing the Triton kernels or the torch reference per call (``ops_backend.resolve_backend``),
and each registered as a ``torch.ops.mono_quant.*`` custom op for torch.compile.

``_HAVE_CUSTOM_OPS`` and ``_compiling`` are shared with ``ops_training``.
"""

from __future__ import annotations

import torch

import mono_quant.ops_backend as ops_backend
import mono_quant.reference_segments as reference_segments
from mono_quant.ops_backend import _impl, resolve_backend
from mono_quant.state import HistogramState, RangeState, SegmentState

__all__ = [
    "histogram_segments_update_",
    "histogram_update_",
    "minmax_per_channel_update_",
    "minmax_segments_update_",
    "minmax_update_",
]


# --- torch.compile ---------------------------------------------------------------------------------------
# Under torch.compile each update is one registered custom op that mutates the state buffers in place and
# has a fake (meta) implementation, so dynamo traces observers without a graph break (fullgraph=True works)
# and the op body (this module's dispatch, then the kernels or the reference) runs as an opaque call. In
# eager mode the public functions call the implementation directly: the custom-op dispatcher would add tens
# of microseconds to every call.


def _minmax_op(
    x: torch.Tensor,
    running_min: torch.Tensor,
    running_max: torch.Tensor,
    seen: torch.Tensor,
    averaging_constant: float | None,
    backend: str,
    mask: torch.Tensor | None = None,
) -> None:
    state = RangeState(running_min, running_max, seen)
    _impl(x, backend).minmax_update_(x, state, averaging_constant, mask=mask)


def _minmax_per_channel_op(
    x: torch.Tensor,
    ch_axis: int,
    running_min: torch.Tensor,
    running_max: torch.Tensor,
    seen: torch.Tensor,
    averaging_constant: float | None,
    backend: str,
    mask: torch.Tensor | None = None,
) -> None:
    state = RangeState(running_min, running_max, seen)
    _impl(x, backend).minmax_per_channel_update_(x, ch_axis, state, averaging_constant, mask=mask)


def _histogram_op(
    x: torch.Tensor,
    running_min: torch.Tensor,
    running_max: torch.Tensor,
    seen: torch.Tensor,
    exponent: torch.Tensor,
    origin: torch.Tensor,
    counts: torch.Tensor,
    backend: str,
    mask: torch.Tensor | None = None,
) -> None:
    state = HistogramState(running_min, running_max, seen, exponent, origin, counts)
    _impl(x, backend).histogram_update_(x, state, mask=mask)


# op name -> (body, schema, mutated arguments); a state tuple is passed as its tensors, in field order
_SCHEMAS = {
    "minmax_update": (
        _minmax_op,
        "(Tensor x, Tensor(a!) running_min, Tensor(b!) running_max, Tensor(c!) seen, "
        "float? averaging_constant, str backend, Tensor? mask=None) -> ()",
        RangeState._fields,
    ),
    "minmax_per_channel_update": (
        _minmax_per_channel_op,
        "(Tensor x, int ch_axis, Tensor(a!) running_min, Tensor(b!) running_max, Tensor(c!) seen, "
        "float? averaging_constant, str backend, Tensor? mask=None) -> ()",
        RangeState._fields,
    ),
    "histogram_update": (
        _histogram_op,
        "(Tensor x, Tensor(a!) running_min, Tensor(b!) running_max, Tensor(c!) seen, Tensor(d!) exponent, "
        "Tensor(e!) origin, Tensor(f!) counts, str backend, Tensor? mask=None) -> ()",
        HistogramState._fields,
    ),
}


def _register_custom_ops() -> bool:
    """Register ``torch.ops.mono_quant.*`` for each update; False where this torch cannot."""
    try:
        for name, (fn, schema, mutated) in _SCHEMAS.items():
            op = torch.library.custom_op(f"mono_quant::{name}", fn, mutates_args=mutated, schema=schema)
            op.register_fake(lambda *args, **kwargs: None)
    except (AttributeError, TypeError, RuntimeError):  # torch < 2.5: no schema= (compile then graph-breaks)
        return False
    return True


# a plain bool and the torch.ops.mono_quant.* calls below: what Dynamo traces in every torch release
# (torch 2.11's Dynamo cannot trace ``bool(dict)``: seen on the H200 machine)
_HAVE_CUSTOM_OPS = _register_custom_ops()


def _compiling() -> bool:
    return _HAVE_CUSTOM_OPS and torch.compiler.is_compiling()


def minmax_update_(
    x: torch.Tensor,
    state: RangeState,
    averaging_constant: float | None = None,
    *,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    """See ``mono_quant.reference.minmax_update_``; ``backend`` as in ``resolve_backend``."""
    if _compiling():
        torch.ops.mono_quant.minmax_update(x, *state, averaging_constant, backend, mask)
        return
    if mask is None:
        _impl(x, backend).minmax_update_(x, state, averaging_constant)
    else:
        _impl(x, backend).minmax_update_(x, state, averaging_constant, mask=mask)


def minmax_per_channel_update_(
    x: torch.Tensor,
    ch_axis: int,
    state: RangeState,
    averaging_constant: float | None = None,
    *,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    """See ``mono_quant.reference.minmax_per_channel_update_``; ``backend`` as in ``resolve_backend``."""
    if _compiling():
        torch.ops.mono_quant.minmax_per_channel_update(x, ch_axis, *state, averaging_constant, backend, mask)
        return
    _impl(x, backend).minmax_per_channel_update_(x, ch_axis, state, averaging_constant, mask=mask)


def histogram_update_(
    x: torch.Tensor, state: HistogramState, *, mask: torch.Tensor | None = None, backend: str = "auto"
) -> None:
    """See ``mono_quant.reference.histogram_update_``; ``backend`` as in ``resolve_backend``."""
    if _compiling():
        torch.ops.mono_quant.histogram_update(x, *state, backend, mask)
        return
    _impl(x, backend).histogram_update_(x, state, mask=mask)


# --- segmented observation (MoE experts; mono_quant.reference_segments) ---------------------------------


def minmax_segments_update_(
    x: torch.Tensor,
    segments: torch.Tensor,
    state: SegmentState,
    averaging_constant: float | None = None,
    *,
    ch_axis: int | None = None,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    """See ``mono_quant.reference_segments.minmax_segments_update_``; ``backend`` as in
    ``resolve_backend`` (the kernel: ``mono_quant.kernels.segments``, one launch per call)."""
    impl = reference_segments if resolve_backend(x, backend) == "torch" else ops_backend._kernels()
    impl.minmax_segments_update_(x, segments, state, averaging_constant, ch_axis=ch_axis, mask=mask)


def histogram_segments_update_(
    x: torch.Tensor,
    segments: torch.Tensor,
    state: HistogramState,
    tokens_seen: torch.Tensor,
    invalid: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    """See ``mono_quant.reference_segments.histogram_segments_update_``; ``backend`` as in
    ``resolve_backend`` (the kernels: ``mono_quant.kernels.segment_histogram``, three launches a call, no
    host read)."""
    impl = reference_segments if resolve_backend(x, backend) == "torch" else ops_backend._kernels()
    impl.histogram_segments_update_(x, segments, state, tokens_seen, invalid, mask=mask)
