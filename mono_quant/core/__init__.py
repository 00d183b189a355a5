"""Observers, the quantization-parameter arithmetic and the threshold searches."""

from mono_quant.core import formats
from mono_quant.core.block_observer import BlockQParams, PerBlockObserver
from mono_quant.core.fake_quant import FakeQuantize
from mono_quant.core.observers import (
    AmaxHistoryObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    ObserverBase,
    PerChannelMinMaxObserver,
)
from mono_quant.core.qparams import QuantSpec, calculate_qparams, quant_range
from mono_quant.core.quantize import dequantize, fake_quantize, quantization_sqnr, quantize, sqnr
from mono_quant.core.registry import OBSERVERS, ExperimentalWarning, create_observer

__all__ = [
    "AmaxHistoryObserver",
    "BlockQParams",
    "PerBlockObserver",
    "formats",
    "OBSERVERS",
    "ExperimentalWarning",
    "FakeQuantize",
    "HistogramObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver",
    "ObserverBase",
    "PerChannelMinMaxObserver",
    "QuantSpec",
    "calculate_qparams",
    "create_observer",
    "dequantize",
    "fake_quantize",
    "quant_range",
    "quantization_sqnr",
    "quantize",
    "sqnr",
]
