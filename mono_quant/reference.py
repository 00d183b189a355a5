"""The observers' statistics in plain torch: the CPU path, the test oracle and the benchmark baseline.

Each public function here has a Triton twin in ``mono_quant.kernels`` with the same signature and the
same result (min/max, counts and grids bit for bit; the EMA to float32 rounding). They update state
tensors in place (so a caller can hold the buffers of an ``nn.Module``); only the fake-quantize functions
return something, their output (and clipping mask).

State, shared with the kernels: a ``RangeState`` or a ``HistogramState`` (``mono_quant.state``).

Non-finite values (NaN, +-Inf) are excluded from every statistic and counted. Every update takes a
token ``mask`` (keyword; ``None``: every value): a bool tensor of the leading dims of ``x`` whose ``False``
entries leave their values out of every statistic; they are counted in ``seen[Seen.MASKED]`` and the batch
counts only if some value is kept (``mono_quant.rows``: no copy of ``x``, bounded temporaries). Statistics
are those of the float32 values: a float64 input is converted once (a copy), and its values beyond the
float32 range become +-inf, so they count as non-finite. On CUDA tensors nothing here reads a value on
the host; on CPU tensors the functions branch on values where that skips work (the non-finite filtering
of a batch that turned out finite) with identical results.

Where the twins live (this module re-exports them all, and ``mono_quant.ops`` dispatches to its names):

    ``reference_range``      finite min/max, per tensor and per channel; min/max and EMA range updates
    ``reference_histogram``  the canonical-grid histogram update
    ``reference_training``   the amax history (delayed scaling) and fake quantization, fused or not
    ``reference_blocks``     the block formats: per-block amax and block fake-quantize
    ``reference_segments``   segmented observation (MoE experts; imported from there, not re-exported)
"""

from __future__ import annotations

from mono_quant.reference_blocks import block_amax_update_, block_fake_quantize
from mono_quant.reference_histogram import histogram_update_
from mono_quant.reference_range import _update_range_ as _update_range_
from mono_quant.reference_range import (
    finite_minmax,
    finite_minmax_per_channel,
    minmax_per_channel_update_,
    minmax_update_,
)
from mono_quant.reference_training import AmaxHistoryStateView as AmaxHistoryStateView
from mono_quant.reference_training import amax_history_fake_quantize_ as amax_history_fake_quantize_
from mono_quant.reference_training import amax_history_update_ as amax_history_update_
from mono_quant.reference_training import fake_quantize_ as fake_quantize_
from mono_quant.reference_training import observe_fake_quantize_ as observe_fake_quantize_

__all__ = [
    "block_amax_update_",
    "block_fake_quantize",
    "finite_minmax",
    "finite_minmax_per_channel",
    "histogram_update_",
    "minmax_per_channel_update_",
    "minmax_update_",
]
