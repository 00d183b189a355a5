"""Dispatch: one function per statistic, each choosing the Triton kernels or the torch reference per call.

This is the only module that decides. For each call it looks at the tensor's device, whether triton
imports, whether the Triton interpreter is on (``TRITON_INTERPRET=1``, which runs kernels on CPU
tensors) and the observer's ``backend``:

    "torch"   always ``mono_quant.reference``.
    "triton"  always ``mono_quant.kernels``; where they cannot run, a clear error (never a fallback).
    "auto"    the value of ``MONO_QUANT_BACKEND`` when that is set ("torch" or "triton"); otherwise the
              kernels for CUDA tensors when triton imports, the torch reference for everything else.
"""

from __future__ import annotations

import functools
import os
import warnings
from types import ModuleType

import torch

import mono_quant.reference as reference
import mono_quant.reference_segments as reference_segments
from mono_quant.state import HistogramState, RangeState, SegmentState

__all__ = [
    "BACKENDS",
    "ENV_BACKEND",
    "check_backend",
    "histogram_segments_update_",
    "histogram_update_",
    "minmax_per_channel_update_",
    "minmax_segments_update_",
    "minmax_update_",
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
    impl = reference_segments if resolve_backend(x, backend) == "torch" else _kernels()
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
    """See ``mono_quant.reference_segments.histogram_segments_update_``: per segment the histogram update of
    ``backend`` (``resolve_backend``) on the rows routed to it; the routing is read on the host."""
    update = _impl(x, backend).histogram_update_
    reference_segments.histogram_segments_update_(x, segments, state, tokens_seen, invalid, mask=mask,
                                                  update=update)  # fmt: skip


# --- amax history (mono_quant.history) ---------------------------------------------------------------------
from mono_quant.history import AmaxHistoryState  # noqa: E402

__all__ += ["amax_history_update_"]


def _amax_history_op(
    x: torch.Tensor,
    running_min: torch.Tensor,
    running_max: torch.Tensor,
    seen: torch.Tensor,
    amax_history: torch.Tensor,
    scale: torch.Tensor,
    delayed_scale: torch.Tensor,
    ticket: torch.Tensor,
    algo: str,
    multiplier: float,
    divisor: float,
    eps: float,
    backend: str,
    mask: torch.Tensor | None = None,
) -> None:
    state = AmaxHistoryState(running_min, running_max, seen, amax_history, scale, delayed_scale, ticket)
    _impl(x, backend).amax_history_update_(x, state, algo, multiplier, divisor, eps, mask=mask)


# the ops of mono_quant.history and mono_quant.core.fake_quant, registered as those above
_TRAINING_SCHEMAS = {
    "amax_history_update": (
        _amax_history_op,
        "(Tensor x, Tensor(a!) running_min, Tensor(b!) running_max, Tensor(c!) seen, "
        "Tensor(d!) amax_history, Tensor(e!) scale, Tensor(f!) delayed_scale, Tensor(g!) ticket, "
        "str algo, float multiplier, float divisor, float eps, str backend, Tensor? mask=None) -> ()",
        AmaxHistoryState._fields,
        None,
    ),
}


def _register_training_ops() -> bool:
    """Register ``torch.ops.mono_quant.*`` for the ops of ``_TRAINING_SCHEMAS``; False where torch cannot."""
    if not _HAVE_CUSTOM_OPS:
        return False
    try:
        for name, (fn, schema, mutated, fake) in _TRAINING_SCHEMAS.items():
            op = torch.library.custom_op(f"mono_quant::{name}", fn, mutates_args=mutated, schema=schema)
            op.register_fake(fake or (lambda *args, **kwargs: None))
    except (AttributeError, TypeError, RuntimeError):
        return False
    return True


def amax_history_update_(
    x: torch.Tensor,
    state: AmaxHistoryState,
    algo: str,
    multiplier: float,
    divisor: float,
    eps: float,
    *,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    """See ``mono_quant.reference.amax_history_update_``; ``backend`` as in ``resolve_backend``."""
    if _compiling() and _HAVE_TRAINING_OPS:
        torch.ops.mono_quant.amax_history_update(x, *state, algo, multiplier, divisor, eps, backend, mask)
        return
    _impl(x, backend).amax_history_update_(x, state, algo, multiplier, divisor, eps, mask=mask)


# --- fake quantization (mono_quant.core.fake_quant) ---------------------------------------------------------

__all__ += ["fake_quantize_"]


def _fake_quantize_op(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    fp8_dtype: torch.dtype | None,
    ch_axis: int | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, mask = _impl(x, backend).fake_quantize_(
        x, scale, zero_point, quant_min, quant_max, fp8_dtype, ch_axis
    )
    return out.contiguous(), mask.contiguous()  # the layout the fake implementation promises


def _fake_quantize_fake(x, scale, zero_point, quant_min, quant_max, fp8_dtype, ch_axis, backend):
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=torch.bool)


_TRAINING_SCHEMAS["fake_quantize"] = (
    _fake_quantize_op,
    "(Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max, ScalarType? fp8_dtype, "
    "int? ch_axis, str backend) -> (Tensor, Tensor)",
    (),
    _fake_quantize_fake,
)


def fake_quantize_(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    fp8_dtype: torch.dtype | None,
    ch_axis: int | None,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """See ``mono_quant.reference.fake_quantize_``; ``backend`` as in ``resolve_backend``."""
    if _compiling() and _HAVE_TRAINING_OPS:
        return torch.ops.mono_quant.fake_quantize(
            x, scale, zero_point, quant_min, quant_max, fp8_dtype, ch_axis, backend
        )
    return _impl(x, backend).fake_quantize_(x, scale, zero_point, quant_min, quant_max, fp8_dtype, ch_axis)


# --- delayed observe + fake-quantize (one read of x on CUDA) ------------------------------------------------

__all__ += ["amax_history_fake_quantize_", "observe_fake_quantize_"]


def _observe_fake_quantize_op(
    x, running_min, running_max, seen, averaging_constant, scale, zero_point, quant_min, quant_max, fp8_dtype,
    backend,
):  # fmt: skip
    state = RangeState(running_min, running_max, seen)
    out, mask = _impl(x, backend).observe_fake_quantize_(
        x, state, averaging_constant, scale, zero_point, quant_min, quant_max, fp8_dtype
    )
    return out.contiguous(), mask.contiguous()


def _amax_history_fake_quantize_op(
    x, running_min, running_max, seen, amax_history, scale, delayed_scale, ticket, algo, multiplier, divisor,
    eps, zero_point, quant_min, quant_max, fp8_dtype, backend,
):  # fmt: skip
    state = AmaxHistoryState(running_min, running_max, seen, amax_history, scale, delayed_scale, ticket)
    out, mask = _impl(x, backend).amax_history_fake_quantize_(
        x, state, algo, multiplier, divisor, eps, zero_point, quant_min, quant_max, fp8_dtype
    )
    return out.contiguous(), mask.contiguous()


def _two_outputs_fake(x, *args):
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=torch.bool)


_TRAINING_SCHEMAS["observe_fake_quantize"] = (
    _observe_fake_quantize_op,
    "(Tensor x, Tensor(a!) running_min, Tensor(b!) running_max, Tensor(c!) seen, float? averaging_constant, "
    "Tensor scale, Tensor zero_point, int quant_min, int quant_max, ScalarType? fp8_dtype, str backend) "
    "-> (Tensor, Tensor)",
    RangeState._fields,
    _two_outputs_fake,
)
_TRAINING_SCHEMAS["amax_history_fake_quantize"] = (
    _amax_history_fake_quantize_op,
    "(Tensor x, Tensor(a!) running_min, Tensor(b!) running_max, Tensor(c!) seen, Tensor(d!) amax_history, "
    "Tensor(e!) scale, Tensor(f!) delayed_scale, Tensor(g!) ticket, str algo, float multiplier, "
    "float divisor, float eps, Tensor zero_point, int quant_min, int quant_max, ScalarType? fp8_dtype, "
    "str backend) -> (Tensor, Tensor)",
    AmaxHistoryState._fields,
    _two_outputs_fake,
)


def observe_fake_quantize_(
    x: torch.Tensor,
    state: RangeState,
    averaging_constant: float | None,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    fp8_dtype: torch.dtype | None,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """See ``mono_quant.reference.observe_fake_quantize_``; ``backend`` as in ``resolve_backend``."""
    args = (averaging_constant, scale, zero_point, quant_min, quant_max, fp8_dtype)
    if _compiling() and _HAVE_TRAINING_OPS:
        return torch.ops.mono_quant.observe_fake_quantize(x, *state, *args, backend)
    return _impl(x, backend).observe_fake_quantize_(x, state, *args)


def amax_history_fake_quantize_(
    x: torch.Tensor,
    state: AmaxHistoryState,
    algo: str,
    multiplier: float,
    divisor: float,
    eps: float,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    fp8_dtype: torch.dtype | None,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """See ``mono_quant.reference.amax_history_fake_quantize_``; ``backend`` as in ``resolve_backend``."""
    args = (algo, multiplier, divisor, eps, zero_point, quant_min, quant_max, fp8_dtype)
    if _compiling() and _HAVE_TRAINING_OPS:
        return torch.ops.mono_quant.amax_history_fake_quantize(x, *state, *args, backend)
    return _impl(x, backend).amax_history_fake_quantize_(x, state, *args)


_HAVE_TRAINING_OPS = _register_training_ops()


# --- block formats (issue 16) -------------------------------------------------------------------------------
# The same dispatch and torch.compile treatment for the two block statistics: the per-block amax update (an
# observer step, in place) and the fused fake-quantize of a block format (a new tensor).

from mono_quant.blockwise import BlockRule  # noqa: E402
from mono_quant.minifloat import E2M1, E4M3, E5M2  # noqa: E402

__all__ += ["block_amax_update_", "block_fake_quantize"]

_ELEMENTS = {e.name: e for e in (E4M3, E5M2, E2M1)}


def _block_amax_op(
    x: torch.Tensor,
    block_rows: int,
    block_cols: int,
    running_min: torch.Tensor,
    running_max: torch.Tensor,
    seen: torch.Tensor,
    block_amax: torch.Tensor,
    backend: str,
    mask: torch.Tensor | None = None,
) -> None:
    state = RangeState(running_min, running_max, seen)
    _impl(x, backend).block_amax_update_(x, (block_rows, block_cols), state, block_amax, mask=mask)


def _block_fake_quantize_op(
    x: torch.Tensor,
    block_rows: int,
    block_cols: int,
    element: str,
    scale_rule: str,
    scales: torch.Tensor | None,
    tensor_scale: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    rule = BlockRule(_ELEMENTS[element], scale_rule)
    return _impl(x, backend).block_fake_quantize(x, (block_rows, block_cols), rule, scales, tensor_scale)


def _register_block_ops() -> bool:
    try:
        op = torch.library.custom_op(
            "mono_quant::block_amax_update",
            _block_amax_op,
            mutates_args=(*RangeState._fields, "block_amax"),
            schema="(Tensor x, int block_rows, int block_cols, Tensor(a!) running_min, "
            "Tensor(b!) running_max, Tensor(c!) seen, Tensor(d!) block_amax, str backend, "
            "Tensor? mask=None) -> ()",
        )
        op.register_fake(lambda *args, **kwargs: None)
        op = torch.library.custom_op(
            "mono_quant::block_fake_quantize",
            _block_fake_quantize_op,
            mutates_args=(),
            schema="(Tensor x, int block_rows, int block_cols, str element, str scale_rule, Tensor? scales, "
            "Tensor? tensor_scale, str backend) -> Tensor",
        )
        op.register_fake(lambda x, *args, **kwargs: torch.empty_like(x))
    except (AttributeError, TypeError, RuntimeError):  # torch < 2.5 (compile then graph-breaks)
        return False
    return True


_HAVE_BLOCK_OPS = _register_block_ops()


def block_amax_update_(
    x: torch.Tensor,
    block: tuple[int, int],
    state: RangeState,
    block_amax: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    """See ``mono_quant.reference.block_amax_update_``; ``backend`` as in ``resolve_backend``."""
    if _HAVE_BLOCK_OPS and torch.compiler.is_compiling():
        torch.ops.mono_quant.block_amax_update(x, *block, *state, block_amax, backend, mask)
        return
    _impl(x, backend).block_amax_update_(x, block, state, block_amax, mask=mask)


def block_fake_quantize(
    x: torch.Tensor,
    block: tuple[int, int],
    rule: BlockRule,
    scales: torch.Tensor | None = None,
    tensor_scale: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """See ``mono_quant.reference.block_fake_quantize``; ``backend`` as in ``resolve_backend``."""
    if _HAVE_BLOCK_OPS and torch.compiler.is_compiling():
        return torch.ops.mono_quant.block_fake_quantize(
            x, *block, rule.elem.name, rule.scale, scales, tensor_scale, backend
        )
    return _impl(x, backend).block_fake_quantize(x, block, rule, scales, tensor_scale)
