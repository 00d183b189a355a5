"""Observers by name and model calibration."""

from mono_quant.calibration.runner import (
    CalibrationResult,
    ExperimentalWarning,
    create_observer,
    run_calibration,
)

__all__ = ["CalibrationResult", "ExperimentalWarning", "create_observer", "run_calibration"]
