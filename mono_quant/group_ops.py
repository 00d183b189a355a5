"""Many per-tensor min/max (and moving-average) updates at once: the dispatch of ``ObserverGroup``'s fast
path and its torch twin.

On CUDA (or under ``TRITON_INTERPRET=1`` with ``backend="triton"``) the updates run as two kernel launches
whatever their number (``mono_quant.kernels.group_minmax``): the tensors and state buffers are reached
through one int64 table of addresses, copied to the device in one transfer. Elsewhere each update is
``reference.minmax_update_``, in order. Both give the state that ``ops.minmax_update_`` on each tensor
in turn gives, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mono_quant import reference
from mono_quant.ops import resolve_backend
from mono_quant.state import RangeState, Seen

__all__ = ["minmax_update_many_", "minmax_update_many_reference"]


def minmax_update_many_reference(
    xs: Sequence[torch.Tensor], states: Sequence[RangeState], averaging_constants: Sequence[float | None]
) -> None:
    """``reference.minmax_update_(x, state, c)`` for each triple, in order (empty tensors skipped)."""
    for x, state, c in zip(xs, states, averaging_constants, strict=True):
        if x.numel():
            reference.minmax_update_(x, state, c)


def _check(xs, states, averaging_constants) -> torch.device | None:
    if not len(xs) == len(states) == len(averaging_constants):
        raise ValueError(
            f"got {len(xs)} tensors, {len(states)} states and {len(averaging_constants)} averaging "
            "constants; one of each per update"
        )
    device = None
    slots = set()
    for i, (x, state) in enumerate(zip(xs, states, strict=True)):
        if device is None:
            device = x.device
        if x.device != device:
            raise ValueError(f"tensor {i} is on {x.device}, tensor 0 on {device}: one device per call")
        mn, mx, seen = state
        if mn.shape != () or mx.shape != () or mn.dtype != torch.float32 or mx.dtype != torch.float32:
            raise ValueError(f"state {i}: running_min / running_max must be float32 () (a per-tensor state)")
        if seen.shape != (Seen.SIZE,) or seen.dtype != torch.int64:
            raise ValueError(f"state {i}: seen must be int64 ({Seen.SIZE},)")
        if any(t.device != device for t in state):
            raise ValueError(f"state {i} is not on {device}, where its tensor is")
        if seen.data_ptr() in slots:
            raise ValueError(f"state {i} appears twice: each state is updated once a call")
        slots.add(seen.data_ptr())
    return device


def _table(xs, states, averaging_constants, device):
    """The kernels' table (``kernels.group_minmax``) on ``device``, the tensors it points at (to keep
    alive until the launches are queued), the number of tensors and of tiles."""
    from mono_quant.kernels import group_minmax as k

    kept, rows = [], []
    tile = 0
    for x, state, c in zip(xs, states, averaging_constants, strict=True):
        n = x.numel()
        if n == 0:
            continue
        x = x if x.is_contiguous() else x.contiguous()
        kept.append(x)
        bits = 0 if c is None else int(np.float32(c).view(np.int32))
        mn, mx, seen = state
        rows.append((x.data_ptr(), n, k.DTYPE_CODES[x.dtype], mn.data_ptr(), mx.data_ptr(), seen.data_ptr(),
                     bits, c is not None, tile))  # fmt: skip
        tile += -(-n // k.BLOCK)
    count = len(rows)
    host = torch.zeros((k.ROWS, count + 1), dtype=torch.int64)
    if count:
        host[:, :count] = torch.tensor(rows, dtype=torch.int64).T
    host[k.TILE0, count] = tile
    if device.type == "cuda":
        host = host.pin_memory().to(device, non_blocking=True)
    return host, kept, count, tile


def minmax_update_many_(
    xs: Sequence[torch.Tensor],
    states: Sequence[RangeState],
    averaging_constants: Sequence[float | None],
    *,
    backend: str = "auto",
) -> None:
    """Fold each tensor's finite min/max into its state, in place: ``ops.minmax_update_`` on each.

    Args:
        xs: [in] float tensors of any shape (fp32 / bf16 / fp16 / fp64), on one device; empty ones are
            skipped (as an observer skips them).
        states: [in, out] one per-tensor ``RangeState`` per tensor (float32 ``()`` min / max, int64 ``(3,)``
            ``seen``), on that device, each once.
        averaging_constants: per tensor ``None`` (min/max) or the moving average's constant.
        backend: ``"auto"`` (the kernels on CUDA), ``"torch"`` or ``"triton"`` (``ops.resolve_backend``,
            decided from the first tensor).

    Raises:
        ValueError: the sequences differ in length, tensors or states on different devices, a state of
            the wrong shape or dtype, or a state given twice (nothing is updated then).
    """
    device = _check(xs, states, averaging_constants)
    if device is None:
        return
    if resolve_backend(xs[0], backend) == "torch":
        minmax_update_many_reference(xs, states, averaging_constants)
        return
    from mono_quant.kernels import group_minmax

    table, kept, count, tiles = _table(xs, states, averaging_constants, device)
    group_minmax.minmax_update_many_(table, count, tiles)
    del kept  # queued: the caching allocator keeps stream order for the copies
