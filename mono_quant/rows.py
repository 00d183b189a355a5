"""Which values an observation keeps, in plain torch: token masks, and the pieces the torch twins walk.

A token mask is a bool tensor of the leading dims of ``x`` (``mask.shape == x.shape[:mask.dim()]``): ``x``
is then ``[M, inner]`` with ``M = mask.numel()`` mask entries, each covering ``inner = x.numel() // M``
values. The torch twins (``mono_quant.reference``) never copy ``x`` for a mask: they read it in pieces of
at most ``FILTER_CHUNK`` values beside the matching piece of the mask broadcast to ``x``'s shape (a view),
so their temporaries stay bounded whatever the size of ``x``. On CUDA nothing here reads a value on the
host; on the CPU the counts come back as Python ints (nothing stalls there).
"""

from __future__ import annotations

import torch

__all__ = ["FILTER_CHUNK", "keep_view", "kept_rows", "masked_values", "pieces"]

# Elements per piece of the non-finite filtering: a filtered copy, the mask and isfinite's own
# temporaries take about 13 bytes a value, so 13 MiB whatever the tensor size.
FILTER_CHUNK = 1 << 20


def keep_view(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mask`` broadcast to the shape of ``x``: a view (stride 0 over the dims it does not cover)."""
    return mask.reshape(*mask.shape, *(1,) * (x.dim() - mask.dim())).expand(x.shape)


def kept_rows(x: torch.Tensor, mask: torch.Tensor, limit: int = FILTER_CHUNK):
    """On the CPU, the values of the kept mask entries as pieces ``[k, *x.shape[mask.dim():]]`` (copies of
    at most about ``limit`` values each, gathered from the view ``[M, *inner]`` of ``x``), for the unmasked
    fast paths; ``None`` where ``x`` has no such view or is not on the CPU (the callers filter in place)."""
    if x.device.type != "cpu":
        return None
    inner = x.shape[mask.dim() :]
    try:
        rows = x.view(mask.numel(), *inner)
    except RuntimeError:
        return None
    idx = torch.nonzero(mask.reshape(-1)).flatten()
    step = max(limit // max(rows[0].numel() if rows.shape[0] else 1, 1), 1)
    return (rows.index_select(0, idx[s : s + step]) for s in range(0, idx.numel(), step))


def masked_values(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | int:
    """How many values of ``x`` lie under ``False``: an int on the CPU, an int64 ``()`` tensor elsewhere."""
    inner = x.numel() // max(mask.numel(), 1)
    off = mask.numel() - mask.sum()
    return int(off) * inner if mask.device.type == "cpu" else off * inner


def pieces(v: torch.Tensor, k: torch.Tensor | None = None, limit: int = FILTER_CHUNK):
    """Views ``(piece, keep, cols)`` of ``v`` (and of ``k``, its keep view, or ``None``) of at most ``limit``
    values each: slices along the leading dimensions, and along the last one once only it is left; ``cols``
    the slice of the last dimension each piece holds (the channels, when they are last)."""
    if v.numel() <= limit or v.dim() == 0:
        yield v, k, slice(None)
    elif v.dim() == 1:
        for start in range(0, v.shape[0], limit):
            s = slice(start, start + limit)
            yield v[s], None if k is None else k[s], s
    elif v[0].numel() > limit:
        for i in range(v.shape[0]):
            yield from pieces(v[i], None if k is None else k[i], limit)
    else:
        step = limit // v[0].numel()
        for start in range(0, v.shape[0], step):
            s = slice(start, start + step)
            yield v[s], None if k is None else k[s], slice(None)
