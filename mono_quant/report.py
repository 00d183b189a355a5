"""The old home of the observer comparison and of saving and loading, kept for now.

New code imports ``mono_quant.compare`` (calibrate, score, tables), ``mono_quant.plot`` (the plot),
``mono_quant.io`` (save and load qparams and state) and ``mono_quant.calibration`` (layers, hooks,
batches).
"""

from mono_quant.calibration.engine import capture_inputs
from mono_quant.calibration.engine import target_modules as target_layers
from mono_quant.compare import (
    COMPARED,
    DTYPES,
    Comparison,
    Score,
    calibrate_observers,
    compare_observers,
    format_summary,
    format_table,
    make_observer,
    score_observers,
    winner_line,
)
from mono_quant.io import StateFileError, load_qparams, load_state, observer_kwargs, save_qparams, save_state
from mono_quant.plot import plot_comparison

OBSERVER_KINDS = COMPARED

__all__ = [
    "DTYPES",
    "OBSERVER_KINDS",
    "Comparison",
    "Score",
    "StateFileError",
    "calibrate_observers",
    "capture_inputs",
    "compare_observers",
    "format_summary",
    "format_table",
    "load_qparams",
    "load_state",
    "make_observer",
    "observer_kwargs",
    "plot_comparison",
    "save_qparams",
    "save_state",
    "score_observers",
    "target_layers",
    "winner_line",
]
