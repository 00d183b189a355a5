"""The old home of the observer comparison and of saving and loading, kept for now.

New code imports ``mono_quant.compare`` (calibrate, score, tables, plots), ``mono_quant.io`` (save and
load qparams and state) and ``mono_quant.calibration`` (layers, hooks, batches).
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
    plot_comparison,
    score_observers,
    winner_line,
)
from mono_quant.io import load_qparams, load_state, observer_kwargs, save_qparams, save_state

OBSERVER_KINDS = COMPARED

__all__ = [
    "DTYPES",
    "OBSERVER_KINDS",
    "Comparison",
    "Score",
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
