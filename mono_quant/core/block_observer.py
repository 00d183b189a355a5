"""The per-block observer: the running amax of every block of a tensor, and the block scales of a format.

For the block-scaled formats of ``mono_quant.core.formats`` (MXFP8 / MXFP4, NVFP4, 128-blocked FP8): static
block scales of weights, and the per-tensor scale that NVFP4 needs from calibration.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from mono_quant.blockwise import block_grid
from mono_quant.core.base import RANGE_RULES, ObserverBase
from mono_quant.core.formats import (
    ROUNDINGS,
    check_block_size,
    get_format,
    scales_from_amax,
    tensor_scale_from_amax,
)
from mono_quant.ops import block_amax_update_

__all__ = ["BlockQParams", "PerBlockObserver"]


class BlockQParams(NamedTuple):
    """What ``PerBlockObserver.calculate_qparams`` returns: the block ``scales`` (the format's dtype,
    ``(RB, CB)``) and the per-tensor ``tensor_scale`` (float32 ``()``, NVFP4; else ``None``)."""

    scales: torch.Tensor
    tensor_scale: torch.Tensor | None


def _check_shape(shape) -> tuple[int, int] | None:
    """``shape`` (any rank >= 1) as its ``[-1, last]`` view ``(R, C)``; ``None`` stays ``None``."""
    if shape is None:
        return None
    ok = isinstance(shape, (tuple, list, torch.Size)) and len(shape) >= 1
    ok = ok and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    if not ok:
        raise ValueError(
            f"shape={shape!r} must be a tuple of positive ints (the observed tensor's shape) or None"
        )
    return math.prod(shape[:-1]), shape[-1]


class PerBlockObserver(ObserverBase):
    """Running max of ``|x|`` per block, over the finite values; the block scales of a block format.

    The input is viewed as ``[R, C] = x.reshape(-1, x.shape[-1])`` and tiled by the format's blocks:
    ``(1, k)`` along the last dimension (MX: k = 32, NVFP4: 16, ``fp8_block`` activations: 128) or
    ``(k, k)`` tiles (``fp8_block`` weights: ``(128, 128)``), a grid of ``ceil(R / br) x ceil(C / k)``
    blocks. Ragged edges: a last block that the tensor does not fill holds the elements that exist (as if
    zero-padded). Every batch must give the same grid (the same ``[R, C]`` in practice): the state is one
    amax per block position, a running max over the batches, so the result is the per-block amax of all
    the batches together whatever their order or split across ranks. NaN and +-Inf are left out and
    counted (``nonfinite_count``), as by every observer; ``min_val`` / ``max_val`` are the tensor's finite
    range.

    Merging: ``MERGE_RULES`` marks ``block_amax`` ``"max"``: ``merge_observers`` / ``sync_observers`` agree
    on its shape across the sources (an unsized one takes it) and take the elementwise max, exactly.

    Buffers: those of every observer (per-tensor ``running_min``, ``running_max``, ``seen``) and
    ``block_amax``: float32 ``(RB, CB)``, ``-inf`` where no finite value was seen, sized by the first
    batch (``(0, 0)`` before) or by ``shape`` at construction.

    Args:
        block_size: one of the format's block sizes (default: the format's own, ``(1, 32)`` for MX).
        format: ``"mxfp8_e4m3"`` (default), ``"mxfp8_e5m2"``, ``"mxfp4_e2m1"``, ``"nvfp4"`` or
            ``"fp8_block"`` (``mono_quant.core.formats.FORMATS``).
        rounding: how MX scales are rounded: ``"floor"`` (OCP, default) or ``"rceil"`` (NVIDIA's).
        shape: the observed tensor's shape, if known: the buffers are sized at construction (needed for
            ``torch.compile(fullgraph=True)`` of a fresh observer). ``None``: the first batch sizes them
            and ``reset()`` forgets the size.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (``mono_quant.ops``).

    Raises:
        ValueError: an unknown format (the message lists them), a block size the format does not take, an
            unknown rounding or a bad ``shape``.
    """

    MERGE_RULES = {**RANGE_RULES, "block_amax": "max"}
    SEGMENTED = False  # the blocks are positions in one tensor

    def __init__(
        self,
        block_size=None,
        format: str = "mxfp8_e4m3",
        rounding: str = "floor",
        shape=None,
        backend: str = "auto",
    ):
        fmt = get_format(format)
        self.format = fmt.name
        self.block_size = check_block_size(fmt, block_size)
        fmt.rule(rounding)  # validates it
        self.rounding = rounding
        self._shape2d = _check_shape(shape)
        self.shape = None if shape is None else tuple(shape)
        super().__init__(backend=backend)
        grid = (0, 0) if self._shape2d is None else block_grid(self._shape2d, self.block_size)
        self.register_buffer("block_amax", torch.full(grid, float("-inf")))

    def settings(self) -> dict:
        """The constructor keywords that rebuild this observer (``backend`` aside)."""
        return {
            "block_size": self.block_size,
            "format": self.format,
            "rounding": self.rounding,
            "shape": self.shape,
        }

    def _saved_settings(self) -> dict:
        # JSON keeps tuples as lists: save lists, so that a loaded state compares equal
        out = self.settings()
        out["block_size"] = list(out["block_size"])
        out["shape"] = None if out["shape"] is None else list(out["shape"])
        return out

    @property
    def amax(self) -> torch.Tensor | None:
        """float32 ``(RB, CB)``: each block's max of ``|x|`` (``-inf`` where nothing finite was seen);
        ``None`` before any data."""
        return self.block_amax if self._observed() else None

    # --- the interface -------------------------------------------------------------------------------
    def _observe(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        if x.dim() == 0:
            raise ValueError(
                "PerBlockObserver observes tensors of at least one dimension (viewed as [-1, last]), "
                "got a 0-d tensor"
            )
        r, c = x.numel() // x.shape[-1], x.shape[-1]
        grid = block_grid((r, c), self.block_size)
        sized_now = self.block_amax.numel() == 0
        if sized_now:  # the first batch fixes the grid: known on the host, nothing is read
            self.block_amax.resize_(grid).fill_(float("-inf"))
        elif tuple(self.block_amax.shape) != grid:
            fix = (
                f"shape={self.shape} was given"
                if self.shape is not None
                else "reset() forgets the grid, to observe another tensor"
            )
            raise ValueError(
                f"PerBlockObserver has a {self.block_amax.shape[0]} x {self.block_amax.shape[1]} grid of "
                f"{self.block_size} blocks, got a tensor of shape {tuple(x.shape)} ([{r}, {c}] as 2-D) "
                f"with {grid[0]} x {grid[1]}; {fix}"
            )
        try:
            block_amax_update_(
                x, self.block_size, self.range_state(), self.block_amax, mask=mask, backend=self.backend
            )
        except BaseException:
            if sized_now:  # a failed first observation does not fix the grid
                self.block_amax.resize_(0, 0)
            raise

    def calculate_qparams(self) -> BlockQParams:
        """The block scales of the format from the blocks' amaxes (and NVFP4's per-tensor scale).

        Returns:
            ``BlockQParams(scales, tensor_scale)``: ``scales`` ``(RB, CB)`` in the format's scale dtype
            (``float8_e8m0fnu`` for MX, ``float8_e4m3fn`` for NVFP4, float32 for ``fp8_block``; for
            ``(1, k)`` blocks of an N-D tensor, ``scales.reshape(*x.shape[:-1], -1)`` is the layout of
            ``formats.quantize``); ``tensor_scale`` float32 ``()`` (``amax / 2688``) or ``None``.

        Raises:
            RuntimeError: nothing was observed, nothing finite was, or some block saw no finite value.
        """
        self._check_finite_seen()
        empty = torch.nonzero(self.block_amax.reshape(-1) == float("-inf")).flatten().tolist()
        if empty:
            cb = self.block_amax.shape[1]
            shown = ", ".join(f"({i // cb}, {i % cb})" for i in empty[:8]) + (
                ", ..." if len(empty) > 8 else ""
            )
            raise RuntimeError(
                f"PerBlockObserver: {len(empty)} of {self.block_amax.numel()} blocks saw no finite value "
                f"(blocks {shown}), so they have no scale"
            )
        tensor_scale = tensor_scale_from_amax(self.block_amax.max(), self.format)
        scales = scales_from_amax(
            self.block_amax, self.format, rounding=self.rounding, tensor_scale=tensor_scale
        )
        return BlockQParams(scales, tensor_scale)

    def reset(self) -> None:
        """Forget every statistic (without ``shape``, also the grid); the configuration stays."""
        super().reset()
        if self._shape2d is None:
            self.block_amax.resize_(0, 0)
        self.block_amax.fill_(float("-inf"))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        saved = state_dict.get(prefix + "block_amax")
        if (
            isinstance(saved, torch.Tensor)
            and self.block_amax.numel() == 0
            and self._shape2d is None
            and saved.dim() == 2
            and saved.dtype == self.block_amax.dtype
        ):
            self.block_amax.resize_(saved.shape)  # an unsized observer takes its grid from the state
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def extra_repr(self) -> str:
        parts = [f"format={self.format!r}", f"block_size={self.block_size}"]
        if self.rounding != ROUNDINGS[0]:
            parts.append(f"rounding={self.rounding!r}")
        if self.shape is not None:
            parts.append(f"shape={self.shape}")
        parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)
