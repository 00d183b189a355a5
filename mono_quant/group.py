"""``ObserverGroup``: many observers updated from a list of tensors in one call; ``calibrate_weights``."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import nn

from mono_quant.core.base import ObserverBase

__all__ = ["calibrate_weights"]


def calibrate_weights(
    modules: Mapping[str, nn.Module] | nn.Module, make: Callable[[], ObserverBase]
) -> dict[str, ObserverBase]:
    """One observer per module's ``weight``, each fed that weight once: ``{name: observer}``.

    Args:
        modules: ``{name: module}``, or a model (then every ``nn.Linear`` / ``nn.Conv*`` of it).
        make: returns a fresh observer (``lambda: mq.PerChannelMinMaxObserver(ch_axis=0)``).
    """
    if isinstance(modules, nn.Module):
        from mono_quant.calibration.engine import target_modules

        modules = target_modules(modules)
    out = {}
    for name, m in modules.items():
        w = m.weight.detach()
        obs = make().to(w.device)
        obs(w)
        out[name] = obs
    return out
