"""Placing ``FakeQuantize`` modules in a model for quantization-aware training, and taking them out again.

Not a training framework: ``prepare_qat`` only puts a ``FakeQuantize`` on the input (a forward pre-hook) and
on the weight (a ``torch.nn.utils.parametrize`` parametrization, so the gradient reaches the original
weight through the straight-through estimator) of each chosen layer; ``remove_qat`` restores the model.

::

    model = mq.prepare_qat(model)                      # every nn.Linear / nn.Conv*d
    for x, y in batches:                               # an ordinary training loop
        loss = loss_fn(model(x), y); loss.backward(); opt.step(); opt.zero_grad()
    qparams = {name: fq.calculate_qparams() for name, fq in mq.fake_quantizers(model).items()}
    mq.remove_qat(model)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from mono_quant.core.fake_quant import FakeQuantize

__all__ = ["DEFAULT_ACTIVATION", "DEFAULT_WEIGHT", "fake_quantizers", "prepare_qat", "remove_qat"]

# torch.ao's default QAT choices: a moving average per tensor for activations, per-channel symmetric weights
DEFAULT_ACTIVATION = {"observer": "moving_average"}
DEFAULT_WEIGHT = {"observer": "moving_average_per_channel", "qscheme": "symmetric"}
_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_HOOK = "_mono_quant_qat_hook"  # the handle of the input pre-hook, kept on the layer


def _factory(spec, what: str) -> Callable[[], FakeQuantize] | None:
    """``spec`` as a function that makes one ``FakeQuantize``: ``None``, a dict of its keywords, an observer
    name, or a callable returning a ``FakeQuantize``.

    Raises:
        TypeError: anything else.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        return lambda: FakeQuantize(spec)
    if isinstance(spec, dict):
        return lambda: FakeQuantize(**spec)
    if callable(spec):
        return spec
    raise TypeError(
        f"{what}={spec!r} must be None, an observer name, a dict of FakeQuantize keywords or a callable "
        "returning a FakeQuantize"
    )


def _input_hook(module: nn.Module, args: tuple):
    if not args:
        return None
    return (module.input_fake_quant(args[0]), *args[1:])


def prepare_qat(
    model: nn.Module,
    activation=DEFAULT_ACTIVATION,
    weight=DEFAULT_WEIGHT,
    modules: tuple[type[nn.Module], ...] = _MODULES,
) -> nn.Module:
    """Put ``FakeQuantize`` modules on the inputs and weights of the chosen layers of ``model``, in place.

    Each chosen layer gets ``layer.input_fake_quant`` (applied to its first positional input by a forward
    pre-hook) and a parametrization of ``layer.weight`` by a ``FakeQuantize`` (reachable as
    ``layer.parametrizations.weight[0]``). They live on the layer's device; ``state_dict`` holds them.

    Args:
        model: the model (its layers are found with ``named_modules``).
        activation, weight: for the inputs and the weights: ``None`` (none), an observer name, a dict of
            ``FakeQuantize`` keywords, or a callable returning a new ``FakeQuantize``. Defaults:
            ``DEFAULT_ACTIVATION`` (moving average, int8 affine per tensor) and ``DEFAULT_WEIGHT`` (moving
            average per output channel, int8 symmetric).
        modules: the layer types to prepare (default ``nn.Linear`` and ``nn.Conv1d/2d/3d``).

    Returns:
        ``model``.

    Raises:
        TypeError: a bad ``activation`` / ``weight`` / ``modules``.
        ValueError: a layer already prepared (``remove_qat`` first).
    """
    make_act, make_w = _factory(activation, "activation"), _factory(weight, "weight")
    if not isinstance(modules, tuple) or not all(isinstance(m, type) for m in modules):
        raise TypeError(f"modules={modules!r} must be a tuple of nn.Module classes")
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, modules):
            continue
        if hasattr(layer, _HOOK) or parametrize.is_parametrized(layer, "weight"):
            raise ValueError(
                f"layer {name!r} is prepared already (or its weight parametrized); remove_qat first"
            )
        device = next(iter(layer.parameters()), torch.empty(0)).device
        if make_act is not None:
            layer.input_fake_quant = make_act().to(device)
            setattr(layer, _HOOK, layer.register_forward_pre_hook(_input_hook))
        if make_w is not None and isinstance(getattr(layer, "weight", None), nn.Parameter):
            # unsafe=True: no trial call at registration (it would observe the weight once more)
            parametrize.register_parametrization(layer, "weight", make_w().to(device), unsafe=True)
    return model


def remove_qat(model: nn.Module) -> nn.Module:
    """Take out what ``prepare_qat`` put in, in place: the weights become plain parameters again (the trained
    values, not fake-quantized) and the input hooks and modules go. Returns ``model``."""
    for layer in model.modules():
        handle = layer.__dict__.pop(_HOOK, None)
        if handle is not None:
            handle.remove()
            del layer.input_fake_quant
        if parametrize.is_parametrized(layer, "weight") and any(
            isinstance(p, FakeQuantize) for p in layer.parametrizations.weight
        ):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    return model


def fake_quantizers(model: nn.Module) -> dict[str, FakeQuantize]:
    """Every ``FakeQuantize`` in ``model`` by module path (``"fc1.input_fake_quant"``,
    ``"fc1.parametrizations.weight.0"``), e.g. to read ``calculate_qparams()`` per layer or to switch
    observers off (``fq.disable_observer()``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantize)}
