"""The calibration engine: which layers are observed, how a model is fed, and the hooks around a run.

``run_calibration`` and the CLI's observer comparison both run through ``run_batches``: forward pre-hooks
on the target layers, the model in eval mode under ``torch.no_grad()``, its training flag restored and the
hooks removed on every exit path.
"""

from __future__ import annotations

import inspect
import itertools
import sys
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

__all__ = [
    "CALIBRATED_MODULES",
    "call_model",
    "capture_inputs",
    "channel_axis",
    "check_max_batches",
    "layer_input",
    "move_batch",
    "run_batches",
    "target_modules",
]

CALIBRATED_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)

# a hook factory: layer name -> forward pre-hook (module, args, kwargs)
HookFactory = Callable[[str], Callable]


def _named_root(model: nn.Module) -> nn.Module:
    """The module whose names are reported: a ``torch.compile``'d model's original (no ``_orig_mod.``)."""
    return getattr(model, "_orig_mod", model)


def target_modules(
    model: nn.Module, modules: tuple[type[nn.Module], ...] = CALIBRATED_MODULES
) -> dict[str, nn.Module]:
    """Name -> module for every module of ``model`` of one of the ``modules`` types, in model order.

    A model that is itself of such a type is its own single target, named ``""``.

    Raises:
        ValueError: the model has none.
    """
    root = _named_root(model)
    targets = {name: m for name, m in root.named_modules() if isinstance(m, modules) and name}
    if not targets and isinstance(root, modules):
        targets = {"": root}
    if not targets:
        kinds = ", ".join(t.__name__ for t in modules)
        raise ValueError(f"the model has no module of type {kinds} to calibrate")
    return targets


def channel_axis(module: nn.Module | None) -> int:
    """The channel axis of a layer's input: 1 for ``(N, C, ...)`` conv inputs, -1 for ``(..., C)``."""
    return 1 if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else -1


def _one_positional(model: nn.Module, batch: Mapping) -> bool:
    """Whether ``model`` takes a dict batch as its one argument (``forward(features)``) rather than as
    keywords: its forward has exactly one required positional parameter, and no key of the batch names it."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in params if p.kind in positional and p.default is inspect.Parameter.empty]
    return len(required) == 1 and required[0].name not in batch


def call_model(model: nn.Module, batch):
    """Feed one batch: a dict as keywords (``model(**batch)``), or as the one argument of a forward that
    takes one (``model(batch)``, as sentence-transformers models do); a tuple or list positionally
    (``model(*batch)``); anything else as the one argument."""
    if isinstance(batch, Mapping):
        return model(batch) if _one_positional(model, batch) else model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def move_batch(batch, device):
    """``batch`` with every tensor in it (nested in dicts, tuples and lists) moved to ``device``."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_batch(v, device) for v in batch)
    return batch


def layer_input(args: tuple, kwargs: dict | None = None) -> torch.Tensor | None:
    """The first floating-point tensor among a module call's arguments: what its observer watches."""
    for a in (*args, *(kwargs or {}).values()):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a
    return None


def check_max_batches(max_batches) -> int | None:
    """``max_batches`` if it is ``None`` or a positive int.

    Raises:
        ValueError: anything else (``0`` and negative numbers too).
    """
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches={max_batches!r} must be a positive int or None (no limit)")
    return max_batches


def _batch_hint(batch) -> str:
    if isinstance(batch, Mapping):
        return (
            "a dict batch goes in as keyword arguments (model(**batch)), or as the one argument of a forward "
            "that takes one (model(batch))"
        )
    if isinstance(batch, (tuple, list)):
        return "a tuple or list batch goes in as positional arguments (model(*batch))"
    return "a tensor batch goes in as the one argument (model(x))"


class _ObserverError(Exception):
    """An exception raised by a hook (an observer refusing its input): passed on as it is, not blamed on
    the model."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def _guarded(hook: Callable) -> Callable:
    """``hook`` with its errors marked as the observers' (not the model's), run eagerly: under
    ``torch.compile`` dynamo would otherwise trace the observers and guard on the identity of each input
    (shared inputs), recompiling on every batch until it gives up."""

    def run(*args, **kwargs):
        try:
            return hook(*args, **kwargs)
        except Exception as e:
            raise _ObserverError(e) from e

    return torch.compiler.disable(run)


def run_batches(
    model: nn.Module,
    batches: Iterable,
    hook_factory: HookFactory,
    *,
    modules: tuple[type[nn.Module], ...] = CALIBRATED_MODULES,
    device=None,
    max_batches: int | None = None,
    progress: bool = False,
    on_batch_end: Callable[[], None] | None = None,
    targets: Mapping[str, nn.Module] | None = None,
    on_batch_start: Callable[[object], None] | None = None,
) -> int:
    """Run ``batches`` through ``model`` with ``hook_factory(name)`` as forward pre-hook on each target layer.

    The model runs in eval mode under ``torch.no_grad()``; its training flag is restored and the hooks are
    removed on every exit path. At most ``max_batches`` batches are read from ``batches`` (an infinite
    generator is fine).

    Args:
        model: any ``nn.Module``. batches: an iterable of batches (``call_model``). hook_factory: layer
            name -> forward pre-hook ``(module, args, kwargs)``. modules: the target layer types.
        device: move each batch there first (the model is not moved). max_batches: ``None`` or >= 1.
        progress: a tqdm bar on stderr. on_batch_end: called after each batch.
        targets: name -> module to hook, in place of ``target_modules(model, modules)`` (the caller's own
            choice, e.g. linear layers and MoE expert modules). on_batch_start: called with each batch (moved
            to ``device``) before the model runs on it; what it raises is passed on as it is.

    Returns:
        The number of batches run.

    Raises:
        ValueError: no target layer, or a bad ``max_batches``.
        RuntimeError: the model raised on a batch (the message names the batch and how batches are fed).
    """
    check_max_batches(max_batches)
    if targets is None:
        targets = target_modules(model, modules)
    total = len(batches) if hasattr(batches, "__len__") else None
    if max_batches is not None:
        batches = itertools.islice(batches, max_batches)
        total = max_batches if total is None else min(total, max_batches)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        batches = bar = tqdm(
            batches, total=total, desc="calibrating", unit="batch", file=sys.stderr, leave=False
        )
    handles = [
        m.register_forward_pre_hook(_guarded(hook_factory(name)), with_kwargs=True)
        for name, m in targets.items()
    ]
    was_training = model.training
    n = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                batch = move_batch(batch, device)
                if on_batch_start is not None:
                    on_batch_start(batch)
                try:
                    call_model(model, batch)
                except _ObserverError as e:
                    raise e.error from None
                except Exception as e:  # the user's model and data: say which batch (and how it was fed)
                    hint = f" ({_batch_hint(batch)})" if isinstance(e, TypeError) else ""
                    raise RuntimeError(f"the model failed on batch {n}: {type(e).__name__}: {e}{hint}") from e
                n += 1
                if on_batch_end is not None:
                    on_batch_end()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        if bar is not None:
            bar.close()
    return n


def capture_inputs(
    model: nn.Module, batch, device=None, modules: tuple[type[nn.Module], ...] = CALIBRATED_MODULES
) -> dict[str, torch.Tensor]:
    """Every target layer's input activation on ``batch``: ``{layer: tensor}`` (the last call, if several)."""
    captured: dict[str, torch.Tensor] = {}

    def hook_factory(name: str):
        def hook(_module, args, kwargs):
            x = layer_input(args, kwargs)
            if x is not None:
                captured[name] = x.detach().clone()

        return hook

    run_batches(model, [batch], hook_factory, modules=modules, device=device)
    return captured
