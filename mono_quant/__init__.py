"""mono_quant: calibration observers for int8/int4 quantization.

Observers watch tensors and turn what they saw into ``scale`` / ``zero_point``. On CUDA tensors the
statistics come from fused Triton kernels (``mono_quant.kernels``, optional); everywhere else from torch
ops, with the same results. ``import mono_quant`` needs neither triton nor matplotlib.
"""

from mono_quant._version import __version__
from mono_quant.calibration import CalibrationResult, ExperimentalWarning, create_observer, run_calibration
from mono_quant.core import (
    AmaxHistoryObserver,
    BlockQParams,
    FakeQuantize,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    ObserverBase,
    PerBlockObserver,
    PerChannelMinMaxObserver,
    QuantSpec,
    calculate_qparams,
    dequantize,
    fake_quantize,
    formats,
    quant_range,
    quantization_sqnr,
    quantize,
    sqnr,
)
from mono_quant.core.channel_stats import ChannelStatsObserver, smoothing_factors
from mono_quant.distributed import merge_observers, merge_state_dicts, sync_observers
from mono_quant.export import export  # the function; the module's names: from mono_quant.export import ...
from mono_quant.group import ObserverGroup, calibrate_weights
from mono_quant.qat import fake_quantizers, prepare_qat, remove_qat
from mono_quant.state import HistogramState, RangeState, merge_histograms

__all__ = [
    "AmaxHistoryObserver",
    "BlockQParams",
    "PerBlockObserver",
    "formats",
    "CalibrationResult",
    "ChannelStatsObserver",
    "ExperimentalWarning",
    "ObserverGroup",
    "FakeQuantize",
    "HistogramObserver",
    "HistogramState",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver",
    "ObserverBase",
    "PerChannelMinMaxObserver",
    "QuantSpec",
    "RangeState",
    "__version__",
    "calculate_qparams",
    "create_observer",
    "dequantize",
    "export",
    "fake_quantize",
    "fake_quantizers",
    "merge_histograms",
    "merge_observers",
    "merge_state_dicts",
    "prepare_qat",
    "quant_range",
    "quantization_sqnr",
    "quantize",
    "remove_qat",
    "calibrate_weights",
    "run_calibration",
    "smoothing_factors",
    "sqnr",
    "sync_observers",
]
