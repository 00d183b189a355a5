"""The amax-history state of ``AmaxHistoryObserver`` (TransformerEngine's delayed scaling), named once.

Like ``mono_quant.state``: the tuple of buffer views that travels through ``ops``, ``reference`` and the
kernels (``ops.amax_history_update_(x, obs.history_state(), ...)``). Fields, in order:

- ``running_min``, ``running_max``: float32 ``()``, the finite range seen (as every per-tensor observer);
- ``seen``: int64 ``(4,)`` (``mono_quant.state.Seen``);
- ``amax_history``: float32 ``(history_len,)``, the batches' amaxes, most recent first, 0 in the slots no
  batch has filled yet (a batch's amax is ``max(|finite values|)``, 0 if it has none);
- ``scale``: float32 ``()``, the scale computed from the history after the latest batch (the next step's);
- ``delayed_scale``: float32 ``()``, the scale from before the latest batch (the one delayed scaling
  quantized that batch with);
- ``ticket``: int32 ``(1,)``, scratch of the kernels (a counter of finished programs, back to 0 after each
  launch); the torch twin leaves it alone. Not saved in state dicts.

One update, for a batch with amax ``a`` (``reference.amax_history_update_``)::

    amax_history = roll(amax_history, 1); amax_history[0] = a
    amax = max(amax_history)  |  amax_history[0]  |  fn(amax_history)       # "max", "most_recent", callable
    delayed_scale = scale
    scale = clamp(amax * multiplier / divisor, eps, float32 max)  where amax > 0 and finite, else scale

(``multiplier`` is ``2**margin``, ``divisor`` is ``fp8_max`` for FP8 and ``(qmax - qmin) / 2`` for the
integer types; where ``amax * multiplier`` overflows, ``amax / divisor * multiplier``.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mono_quant.state import RangeState

__all__ = ["AMAX_ALGOS", "F32_MAX", "AmaxHistoryState", "amax_scale"]

# the amax of the history the kernels compute themselves; "none": only roll (a callable takes it from there)
AMAX_ALGOS = ("max", "most_recent")
F32_MAX = torch.finfo(torch.float32).max


def amax_scale(
    amax: torch.Tensor, scale: torch.Tensor, multiplier: float, divisor: float, eps: float
) -> torch.Tensor:
    """The scale of ``amax``: ``clamp(amax * multiplier / divisor, eps, float32 max)`` where ``amax > 0`` and
    finite, ``scale`` (the previous one) elsewhere; float32, in that order of operations (where
    ``amax * multiplier`` overflows, ``amax / divisor * multiplier``). Shapes broadcast; no host read."""
    t = amax * multiplier / divisor
    t = torch.where(torch.isinf(t), amax / divisor * multiplier, t).clamp(eps, F32_MAX)
    return torch.where((amax > 0) & torch.isfinite(amax), t, scale)


class AmaxHistoryState(NamedTuple):
    """Views of an ``AmaxHistoryObserver``'s buffers (see the module docstring for each field)."""

    running_min: torch.Tensor
    running_max: torch.Tensor
    seen: torch.Tensor
    amax_history: torch.Tensor
    scale: torch.Tensor
    delayed_scale: torch.Tensor
    ticket: torch.Tensor

    @staticmethod
    def empty(history_len: int, device=None) -> AmaxHistoryState:
        """A state that has seen nothing: an all-zero history and scales of 1.0."""
        return AmaxHistoryState(
            *RangeState.empty((), device),
            torch.zeros(history_len, dtype=torch.float32, device=device),
            torch.ones((), dtype=torch.float32, device=device),
            torch.ones((), dtype=torch.float32, device=device),
            torch.zeros(1, dtype=torch.int32, device=device),
        )

    @property
    def range(self) -> RangeState:
        """The range part (views of the same tensors)."""
        return RangeState(self.running_min, self.running_max, self.seen)
