"""Dispatch of the training-time statistics: the amax history of delayed scaling (``mono_quant.history``)
and fake quantization (``mono_quant.core.fake_quant``), alone and fused with the observer step, each
choosing the Triton kernels or the torch reference per call and registered as a custom op for
torch.compile (where ``ops_observe`` could register its own).
"""

from __future__ import annotations

import torch

from mono_quant.history import AmaxHistoryState
from mono_quant.ops_backend import _impl
from mono_quant.ops_observe import _HAVE_CUSTOM_OPS, _compiling
from mono_quant.state import RangeState

__all__ = [
    "amax_history_fake_quantize_",
    "amax_history_update_",
    "fake_quantize_",
    "observe_fake_quantize_",
]


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


# the ops of mono_quant.history and mono_quant.core.fake_quant, registered as those of ops_observe
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
