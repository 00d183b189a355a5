"""Model calibration: the engine (targets, hooks, batches), ``run_calibration`` on it, and MoE experts."""

from mono_quant.calibration.engine import call_model, capture_inputs, layer_input, move_batch, target_modules
from mono_quant.calibration.experts import expert_modules, expert_weight_qparams
from mono_quant.calibration.runner import CalibrationResult, run_calibration
from mono_quant.core.registry import ExperimentalWarning, create_observer

__all__ = [
    "CalibrationResult",
    "ExperimentalWarning",
    "call_model",
    "capture_inputs",
    "create_observer",
    "expert_modules",
    "expert_weight_qparams",
    "layer_input",
    "move_batch",
    "run_calibration",
    "target_modules",
]
