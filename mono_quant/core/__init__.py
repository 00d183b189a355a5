"""Observers, the quantization-parameter arithmetic and the canonical-grid histogram."""

from mono_quant.core.histogram import HistogramState, merge_histograms
from mono_quant.core.observers import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    ObserverBase,
    PerChannelMinMaxObserver,
)
from mono_quant.core.qparams import (
    QuantSpec,
    calculate_qparams,
    dequantize,
    fake_quantize,
    quant_range,
    quantization_sqnr,
    quantize,
    sqnr,
)

__all__ = [
    "HistogramObserver",
    "HistogramState",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver",
    "ObserverBase",
    "PerChannelMinMaxObserver",
    "QuantSpec",
    "calculate_qparams",
    "dequantize",
    "fake_quantize",
    "merge_histograms",
    "quant_range",
    "quantization_sqnr",
    "quantize",
    "sqnr",
]
