"""The observers' state, named once: the tuples that travel through ``ops``, ``reference`` and the kernels,
and the exact merge of two histograms.

An observer keeps its statistics in registered buffers; a state tuple is a set of views of those buffers,
handed to an update that changes them in place (``ops.minmax_update_(x, obs.range_state(), ...)``). The
kernels receive the same tuple and pass its tensors to their kernels as plain pointers.

``seen`` is int64 ``(4,)`` with the named slots of ``Seen``: finite values, non-finite values (NaN and
+-Inf, all channels together), batches observed (every batch with a value outside the mask, also one with
nothing finite) and values masked out (``forward(x, mask)``: under ``False``, left out of every statistic).
A segmented observer (``forward(x, segments=idx, num_segments=E)``) holds one such row per segment:
``(E, 4)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mono_quant.grid import E_MIN, regrid_to_range

__all__ = ["HistogramState", "RangeState", "SegmentState", "Seen", "merge_histograms"]


class Seen:
    """Slots of the int64 ``seen`` buffer (its last dimension)."""

    FINITE = 0
    NONFINITE = 1
    BATCHES = 2
    MASKED = 3  # from observer _version 3 on; a saved ``(3,)`` seen loads with 0 here
    SIZE = 4


class RangeState(NamedTuple):
    """The running range and what was seen.

    running_min, running_max: float32, ``()`` per tensor or ``(C,)`` per channel; ``+inf`` / ``-inf`` until a
    finite value has been seen (per channel: in that channel). seen: int64 ``(4,)`` (``Seen``).
    Segmented (``E`` segments): running min/max ``(E,)`` or ``(E, C)``, seen ``(E, 4)``.
    """

    running_min: torch.Tensor
    running_max: torch.Tensor
    seen: torch.Tensor

    @staticmethod
    def empty(shape: tuple[int, ...] = (), device=None, segments: tuple[int, ...] = ()) -> RangeState:
        """A state that has seen nothing, on ``device``; ``segments``: ``(E,)`` for a segmented one (the
        range then ``(E, *shape)``)."""
        return RangeState(
            torch.full((*segments, *shape), float("inf"), device=device),
            torch.full((*segments, *shape), float("-inf"), device=device),
            torch.zeros((*segments, Seen.SIZE), dtype=torch.int64, device=device),
        )


class SegmentState(NamedTuple):
    """A segmented range state (``forward(x, segments=idx, num_segments=E)``): E sets of statistics.

    running_min, running_max: float32 ``(E,)`` per tensor or ``(E, C)`` per channel; seen: int64 ``(E, 4)``;
    tokens_seen: int64 ``(E,)``, the rows routed to each segment that were not wholly masked; invalid:
    int64 ``()``, the routing entries outside ``[0, E)`` that were dropped (counted where no host may read
    them, on CUDA; on the CPU such an entry is an error before anything changes).
    """

    running_min: torch.Tensor
    running_max: torch.Tensor
    seen: torch.Tensor
    tokens_seen: torch.Tensor
    invalid: torch.Tensor

    @staticmethod
    def empty(num_segments: int, shape: tuple[int, ...] = (), device=None) -> SegmentState:
        """A segmented state of ``num_segments`` segments that has seen nothing."""
        return SegmentState(
            *RangeState.empty(shape, device, (num_segments,)),
            torch.zeros(num_segments, dtype=torch.int64, device=device),
            torch.zeros((), dtype=torch.int64, device=device),
        )

    @property
    def range(self) -> RangeState:
        """The range part: ``(E, ...)`` running min/max and ``(E, 4)`` seen (views of the same tensors)."""
        return RangeState(self.running_min, self.running_max, self.seen)


class HistogramState(NamedTuple):
    """A canonical-grid histogram (``mono_quant.grid``) with its range and what was seen.

    running_min, running_max: float32 ``()``; seen: int64 ``(4,)``; exponent, origin: int64 ``()``, the grid
    (bin ``j`` covers ``[(origin + j) * 2**exponent, (origin + j + 1) * 2**exponent)``); counts: int64
    ``(B,)``.
    """

    running_min: torch.Tensor
    running_max: torch.Tensor
    seen: torch.Tensor
    exponent: torch.Tensor
    origin: torch.Tensor
    counts: torch.Tensor

    @staticmethod
    def empty(num_bins: int, device=None) -> HistogramState:
        """A histogram of ``num_bins`` internal bins that has seen nothing, on the finest grid."""
        return HistogramState(
            *RangeState.empty((), device),
            torch.full((), E_MIN, dtype=torch.int64, device=device),
            torch.zeros((), dtype=torch.int64, device=device),
            torch.zeros(num_bins, dtype=torch.int64, device=device),
        )

    @property
    def range(self) -> RangeState:
        """The range part (views of the same tensors)."""
        return RangeState(self.running_min, self.running_max, self.seen)

    # the names of the first release, kept for now
    @property
    def min_val(self) -> torch.Tensor:
        return self.running_min

    @property
    def max_val(self) -> torch.Tensor:
        return self.running_max

    @property
    def nonfinite(self) -> torch.Tensor:
        return self.seen[Seen.NONFINITE]


def merge_histograms(a: HistogramState, b: HistogramState) -> HistogramState:
    """The state one histogram would hold after seeing the data of both (exact, order-free).

    Both are moved onto the canonical grid of their combined range (``grid.regrid_to_range``) and their
    counts and ``seen`` are added.

    Raises:
        ValueError: if the two hold a different number of bins.
    """
    if a.counts.shape != b.counts.shape:
        raise ValueError(
            f"cannot merge histograms of {a.counts.shape[0]} and {b.counts.shape[0]} internal bins; "
            "observers must be created with the same `bins`"
        )
    mn = torch.minimum(a.running_min, b.running_min)
    mx = torch.maximum(a.running_max, b.running_max)
    e, o, counts_a = regrid_to_range(a.counts, a.exponent, a.origin, mn, mx)
    counts_b = regrid_to_range(b.counts, b.exponent, b.origin, mn, mx)[2]
    return HistogramState(mn, mx, a.seen + b.seen, e, o, counts_a + counts_b)
