"""Dispatch of the block formats (issue 16): the per-block amax update (an observer step, in place) and
the fused fake-quantize of a block format (a new tensor), each choosing the Triton kernels or the torch
reference per call, with the same torch.compile custom-op treatment as ``ops_observe``.
"""

from __future__ import annotations

import torch

from mono_quant.blockwise import BlockRule
from mono_quant.minifloat import E2M1, E4M3, E5M2
from mono_quant.ops_backend import _impl
from mono_quant.state import RangeState

__all__ = ["block_amax_update_", "block_fake_quantize"]

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
