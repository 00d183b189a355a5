"""What observers check: their inputs (tensors, token masks) and the invariants of a saved range state.

Below ``core.base`` (which re-exports these names): errors that name the bad value, raised before any state
changes.
"""

from __future__ import annotations

import json

import torch

from mono_quant.state import Seen

__all__ = ["StateError", "check_input", "check_mask", "check_range_state"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_range_state(b: dict) -> None:
    """The invariants of a plain range state ``b`` (buffer name -> CPU tensor): ``seen`` counts that batches
    can give, and a range either finite with ``min <= max`` or ``+inf`` / ``-inf``, consistent with ``seen``.

    Raises:
        StateError: what is wrong, and in which buffer (``key``).
    """
    seen = b["seen"]
    if seen.shape != (Seen.SIZE,):
        raise StateError("seen", f"must have shape ({Seen.SIZE},), got {tuple(seen.shape)}")
    finite, nonfinite, batches, masked = (int(v) for v in seen)
    if min(finite, nonfinite, batches, masked) < 0:
        raise StateError("seen", f"counts of values and batches must be >= 0, got {seen.tolist()}")
    if finite + nonfinite < batches or (finite + nonfinite > 0) != (batches > 0):
        raise StateError(
            "seen",
            f"{finite} finite + {nonfinite} non-finite values cannot come from {batches} non-empty batches",
        )
    lo, hi = b["running_min"], b["running_max"]
    if lo.shape != hi.shape:
        raise StateError("running_min/running_max", f"{lo.numel()} and {hi.numel()} channels")
    for name, t in (("running_min", lo), ("running_max", hi)):
        if torch.isnan(t).any():
            raise StateError(name, "holds NaN; a range is finite, or +inf / -inf before data")
    empty = (lo == float("inf")) & (hi == float("-inf"))
    ranged = torch.isfinite(lo) & torch.isfinite(hi) & (lo <= hi)
    bad = torch.nonzero(~(empty | ranged).reshape(-1)).flatten()
    if bad.numel():
        i = int(bad[0])
        at = f" (channel {i})" if lo.dim() else ""
        raise StateError(
            "running_min/running_max",
            f"min {float(lo.reshape(-1)[i])} and max {float(hi.reshape(-1)[i])}{at}: either both finite "
            "with min <= max, or +inf and -inf (nothing finite seen)",
        )
    if (finite == 0) != bool(empty.all()) and lo.numel():
        has = "no finite value" if finite == 0 else f"{finite} finite values"
        raise StateError(
            "seen", f"counts {has} but running_min/max show {'a' if finite == 0 else 'no'} range"
        )


class StateError(ValueError):
    """A state that breaks what an observer's state always holds; ``key`` names the buffer(s), ``reason``
    what is wrong."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


def _encode(obj: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(obj, sort_keys=True).encode()), dtype=torch.uint8)


def _decode(state) -> dict:
    """The dict ``_encode`` wrote (or a dict as it is).

    Raises:
        ValueError: anything else.
    """
    obj = state
    if isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.dim() == 1:
        try:
            obj = json.loads(bytes(state.tolist()).decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            obj = None
    if not isinstance(obj, dict) or not isinstance(obj.get("settings"), dict):
        raise ValueError("cannot load this observer state: its _extra_state is not what an observer saved")
    return obj


def check_mask(x: torch.Tensor, mask) -> None:
    """Check a token ``mask`` for ``x``: a bool tensor of ``x``'s leading dims, on its device.

    Raises:
        TypeError: ``mask`` is not a bool tensor.
        ValueError: its shape is not ``x.shape[:mask.dim()]``, or it is on another device.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"mask must be a bool tensor, got {mask.dtype}; pass mask.bool() (an attention mask of 0 / 1: "
            "attention_mask.bool())"
        )
    if mask.dim() > x.dim() or tuple(mask.shape) != tuple(x.shape[: mask.dim()]):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not match x of shape {tuple(x.shape)}: a mask covers "
            f"the leading dims of x (mask.shape == x.shape[:mask.dim()], e.g. {tuple(x.shape[:-1])})"
        )
    if mask.device != x.device:
        raise ValueError(f"mask is on {mask.device} but x is on {x.device}; move it with mask.to(x.device)")


def check_input(x) -> None:
    """Check that ``x`` is a dense float tensor with values.

    Raises:
        TypeError: it is not.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"observers take a torch.Tensor, got {type(x).__name__}")
    if x.is_nested or x.layout != torch.strided:
        kind = "a nested" if x.is_nested else f"a {x.layout} (sparse)"
        raise TypeError(f"observers take dense tensors, got {kind} tensor; convert it with .to_dense()")
    if x.is_meta:
        raise TypeError("observers take tensors with values, got a tensor on the meta device")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"cannot observe a tensor of dtype {x.dtype}; observers take float16, bfloat16, float32 "
            "or float64 tensors"
        )
