"""``run_calibration``: one observer on the input of every matching layer of a model.

Layers that read the same input tensor (the q / k / v projections of an attention block, the gate / up
projections of a gated MLP) share one observer: the input is observed once and the layers get one set of
qparams, the single input scale that fused kernels need. Which layers share is found on the first batch, by
tensor identity in the hooks (a weak reference: no activation is kept), and checked on every later batch.

Token masks (``mask_key``): a dict batch's ``batch[mask_key]`` (Hugging Face's ``attention_mask``: 1 for a
real token, 0 for padding) is turned into a bool mask and every observed activation whose leading dims
are the mask's shape (``[batch, seq, hidden]`` under a ``[batch, seq]`` mask) is observed under it, as is one
whose first dim is the flattened tokens (``[batch * seq, hidden]``: what a MoE block hands its experts and
shared expert); other activations are observed whole. ``CalibrationResult.masked`` says which were which.

MoE experts (``mono_quant.calibration.experts``): each fused experts module of transformers 5.x gets two
segmented observers, one set of statistics per expert, under the names ``<experts>.gate_up_proj`` and
``<experts>.down_proj``.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from mono_quant.calibration import experts as moe
from mono_quant.calibration.engine import (
    CALIBRATED_MODULES,
    channel_axis,
    layer_input,
    run_batches,
    target_modules,
)
from mono_quant.core.base import ObserverBase
from mono_quant.core.registry import create_observer
from mono_quant.distributed import sync_observers

__all__ = ["CalibrationResult", "run_calibration"]


@dataclass
class CalibrationResult(Mapping):
    """Module name -> observer of that module's input, in model order.

    ``result.qparams()`` gives ``{name: (scale, zero_point)}``; ``result.batches`` the batches run;
    ``result.groups()`` the layers that share an observer (and so their qparams) because they read the same
    input tensor; ``result.masked`` / ``masked_layers()`` / ``unmasked_layers()`` which layers were observed
    under the batches' token mask; ``result.experts`` the layers of MoE experts (segmented observers, one set
    of statistics per expert) and ``empty_experts()`` the experts that saw no token.
    """

    observers: dict[str, ObserverBase] = field(default_factory=dict)
    batches: int = 0
    shared: dict[str, str] = field(default_factory=dict)  # layer -> the layer whose observer it shares
    # layer -> True: observed under the token mask in every batch that had one; False: observed whole in
    # some batch that had one (its activation's shape did not match); None: no batch had a mask
    masked: dict[str, bool | None] = field(default_factory=dict)
    experts: dict[str, int] = field(default_factory=dict)  # expert layer -> its number of experts

    def groups(self) -> dict[str, list[str]]:
        """``{first layer: [the layers reading its input, itself first]}`` for every shared input."""
        out: dict[str, list[str]] = {}
        for member, leader in self.shared.items():
            out.setdefault(leader, [leader]).append(member)
        return out

    def masked_layers(self) -> list[str]:
        """The layers observed under the token mask in every batch that had one."""
        return [name for name, m in self.masked.items() if m is True]

    def unmasked_layers(self) -> list[str]:
        """The layers observed whole (every token, padding included) in some batch that had a mask."""
        return [name for name, m in self.masked.items() if m is False]

    def empty_experts(self) -> dict[str, list[int]]:
        """``{expert layer: [experts that saw no finite value]}`` for the expert layers with any (reads the
        device): no token was routed to them, or only NaN / +-Inf ones."""
        out = {name: moe.empty_segments(self.observers[name], e) for name, e in self.experts.items()}
        return {name: ids for name, ids in out.items() if ids}

    def __getitem__(self, name: str) -> ObserverBase:
        return self.observers[name]

    def __iter__(self):
        return iter(self.observers)

    def __len__(self) -> int:
        return len(self.observers)

    def qparams(self, empty: str = "error") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module name: (scale, zero_point)}`` for every observer that saw finite data.

        Expert layers get ``[E]`` (per channel ``[E, C]``) qparams, one per expert; ``empty`` decides for the
        experts that saw no finite value (``empty_experts()``):

        - ``"error"``: a ``ValueError`` naming the layer and the experts;
        - ``"skip"``: their scale and zero point are 0 (a real scale is never 0: it is at least ``eps``), so
          ``scale == 0`` marks them, with no NaN;
        - ``"share"``: the qparams of the union range of the other experts of the same layer (the same block
          and projection).

        An expert layer where no expert saw data is left out, as any observer without data.

        Raises:
            ValueError: ``empty="error"`` with empty experts, or an unknown ``empty`` (checked first).
        """
        if empty not in moe.EMPTY_POLICIES:
            raise ValueError(f"empty={empty!r} is not one of {', '.join(map(repr, moe.EMPTY_POLICIES))}")
        out = {}
        for name, obs in self.observers.items():
            if name in self.experts:
                qp = moe.segment_qparams(name, obs, self.experts[name], empty)
                if qp is not None:
                    out[name] = qp
            elif obs._has_finite():
                out[name] = obs.calculate_qparams()
        return out


def _make(observer, kwargs: dict, module: nn.Module | None) -> ObserverBase:
    if isinstance(observer, type) and issubclass(observer, ObserverBase):
        obs = observer(**kwargs)
    else:
        obs = create_observer(observer, **kwargs)
    if obs.ch_axis is not None and "ch_axis" not in kwargs:  # per channel: the layer's channel axis
        obs = type(obs)(**{**obs.settings(), "ch_axis": channel_axis(module), "backend": obs.backend})
    return obs


def check_mask_key(mask_key) -> None:
    """``mask_key`` is ``None`` or a non-empty str.

    Raises:
        ValueError: anything else.
    """
    if mask_key is not None and (not isinstance(mask_key, str) or not mask_key):
        raise ValueError(
            f"mask_key={mask_key!r} must be the key of the token mask in dict batches (a non-empty str, such "
            "as 'attention_mask'), or None to observe every token"
        )


def batch_mask(batch, mask_key: str | None) -> torch.Tensor | None:
    """The bool token mask of a batch: ``batch[mask_key] != 0`` when ``batch`` is a dict holding the key.

    Raises:
        TypeError: the value is not a tensor of bool or an integer dtype.
        ValueError: an integer mask holds values other than 0 and 1.
    """
    if mask_key is None or not isinstance(batch, Mapping) or mask_key not in batch:
        return None
    mask = batch[mask_key]
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"batch[{mask_key!r}] is a {type(mask).__name__}; a token mask is a bool or 0/1 tensor"
        )
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(
            f"batch[{mask_key!r}] is a {mask.dtype} tensor; a token mask is bool or integer 0/1 (1: a real "
            "token), not an additive float mask; pass mask_key=None to observe every token"
        )
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(
            f"batch[{mask_key!r}] holds values other than 0 and 1 (min {int(mask.min())}, max "
            f"{int(mask.max())}); a token mask has 1 for a real token and 0 for padding"
        )
    return mask != 0


def layer_mask(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """The mask for activation ``x``: the batch's own where it covers ``x``'s leading dims, flattened where
    ``x``'s first dim is the flattened tokens (2-D ``x``, a mask of 2 or more dims), else ``None``."""
    if mask is None:
        return None
    if mask.dim() <= x.dim() and tuple(x.shape[: mask.dim()]) == tuple(mask.shape):
        return mask
    if mask.dim() >= 2 and x.dim() == 2 and x.shape[0] == mask.numel():
        return mask.reshape(-1)
    return None


_TAKES_MASK: dict[type, bool] = {}


def _observe(obs: ObserverBase, x: torch.Tensor, mask: torch.Tensor | None, **segments) -> None:
    """``obs(x)``, under ``mask`` when there is one (checked once per class: its ``forward`` takes ``mask``).

    Raises:
        TypeError: a mask for an observer whose ``forward`` takes none.
    """
    if x.device != obs.seen.device:  # follow the activation (also parameter-free or offloaded)
        obs.to(x.device)
    if mask is None:
        obs(x, **segments)
        return
    cls = type(obs)
    if cls not in _TAKES_MASK:
        params = inspect.signature(obs.forward).parameters
        _TAKES_MASK[cls] = "mask" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    if not _TAKES_MASK[cls]:
        raise TypeError(
            f"{cls.__name__}.forward takes no mask, so the padding of a masked batch cannot be left out; "
            "pass mask_key=None to observe every token"
        )
    obs(x, mask=mask.to(x.device), **segments)


class _SharedInputs:
    """Observes each layer's input, once per tensor: a layer whose input is the very tensor another layer
    observed in this batch joins that layer's observer (decided on the first batch, checked afterwards).
    Also the batch's token mask, and what each layer made of it."""

    def __init__(self, observers: dict[str, ObserverBase], share: bool, mask_key: str | None):
        self.observers = observers
        self.share = share
        self.mask_key = mask_key
        self.leader: dict[str, str] = {}  # member -> leader, fixed after the first batch
        self.batch: dict[int, tuple[weakref.ref, str]] = {}  # id(x) -> (x, the layer that observed it)
        self.first = True
        self.mask: torch.Tensor | None = None
        self.masked: dict[str, bool | None] = {}

    def start_batch(self, batch) -> None:
        self.mask = batch_mask(batch, self.mask_key)

    def _record(self, name: str, masked: bool) -> None:
        if self.mask is None:
            self.masked.setdefault(name, None)
        else:
            self.masked[name] = masked and self.masked.get(name) is not False

    def observe(self, name: str, x: torch.Tensor) -> None:
        entry = self.batch.get(id(x)) if self.share else None
        same = entry[1] if entry is not None and entry[0]() is x else None
        if self.first and same is not None:
            self.leader[name] = same
            return
        if name in self.leader:
            if same != self.leader[name]:
                raise RuntimeError(
                    f"layers {self.leader[name]!r} and {name!r} read the same input tensor in the first "
                    "batch but not in this one, so they cannot share an observer; pass share_inputs=False"
                )
            return
        mask = layer_mask(self.mask, x)
        _observe(self.observers[name], x, mask)
        self._record(name, mask is not None)
        if self.share:
            self.batch[id(x)] = (weakref.ref(x), name)

    def observe_experts(self, layers: tuple[str, str], module: nn.Module, args: tuple, kwargs) -> None:
        """The two projections' inputs of an experts call, one segmented observation each."""
        hidden, index = moe.routed_inputs(module, args, kwargs)
        experts = moe.num_experts(module)
        rows = moe.token_rows(self.mask, hidden.shape[0])
        ids, tokens, counts = moe.expert_pairs(index, experts, rows)
        up, down = (self.observers[n] for n in layers)
        if bool(((index >= 0) & (index < experts)).all()):  # the routed rows as they are, one call
            _observe(up, hidden, rows, segments=index, num_segments=experts)
        else:  # sentinel ids (expert parallelism) count for no expert: the kept pairs, one row each
            _observe(up, hidden[tokens], None, segments=ids, num_segments=experts)
        down_x = moe.down_inputs(module, hidden, tokens, counts)  # the kept pairs only: no masked token
        _observe(down, down_x, None, segments=ids, num_segments=experts)
        for n in layers:
            self._record(n, rows is not None)

    def end_batch(self) -> None:
        self.batch.clear()
        self.first = False
        self.mask = None


def run_calibration(
    model: nn.Module,
    data: Iterable,
    observer: str | type[ObserverBase] = "minmax",
    *,
    modules: tuple[type[nn.Module], ...] = CALIBRATED_MODULES,
    observer_kwargs: dict | None = None,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    sync: bool = False,
    share_inputs: bool = True,
    mask_key: str | None = "attention_mask",
    experts: bool = True,
) -> CalibrationResult:
    """Run ``data`` through ``model`` and observe the input activation of every matching module.

    The model runs in eval mode under ``torch.no_grad()``; its training flag is restored afterwards, and
    the hooks are removed on every exit path (also when the model raises). Each observer is moved to the
    device of the activations it observes. A ``torch.compile``'d model is calibrated under its original
    module names.

    Args:
        model: any ``nn.Module``.
        data: an iterable of batches: a tensor (``model(x)``), a tuple/list (``model(*batch)``) or a dict
            (``model(**batch)``, or ``model(batch)`` when ``forward`` takes one argument the keys do not
            name); an infinite generator is fine with ``max_batches``.
        observer: a name for ``create_observer`` or an observer class. A per-channel observer without an
            explicit ``ch_axis`` watches each layer's channel axis (1 for conv inputs, -1 otherwise).
        modules: module types whose inputs are observed.
        observer_kwargs: keywords for each observer (``bins``, ``dtype``, ``qscheme``, ...).
        max_batches: stop after this many batches (``None``: all; else a positive int).
        device: move each batch there first (the model is not moved).
        progress: show a tqdm progress bar; ``None``: when stderr is a terminal and ``data`` has a length
            above 10.
        sync: merge every observer across ranks at the end (``mono_quant.distributed.sync_observers``)
            when a torch.distributed process group is initialized.
        share_inputs: layers that read the same input tensor share one observer (see the module
            docstring); ``False``: every layer observes its input itself.
        mask_key: the key of the token mask in dict batches (bool, or integer 0/1: 1 for a real token);
            activations of the mask's leading shape (or its flattened tokens) are observed under it, padding
            left out (``result.masked`` says which layers were); ``None``: every token is observed.
        experts: observe the experts of fused MoE modules (``mono_quant.calibration.experts``) under
            ``<experts>.gate_up_proj`` and ``<experts>.down_proj``, one set of statistics per expert.

    Returns:
        ``CalibrationResult``: module name -> observer.

    Raises:
        ValueError: no module of ``model`` matches ``modules`` (and it has no experts module), a bad
            ``max_batches`` or ``mask_key``; a mask of integers other than 0 and 1.
        TypeError: a batch's mask is not a bool or integer tensor, or the observer's ``forward`` takes no
            ``mask`` and a batch has one.
        NotImplementedError: the model has experts modules and the observer keeps no per-segment
            statistics (amax history, per block): pass ``experts=False``.
        RuntimeError: the model raised on a batch (the message names the batch), or layers that shared an
            input in the first batch read different ones later.
    """
    check_mask_key(mask_key)
    kwargs = dict(observer_kwargs or {})
    found = moe.expert_modules(model) if experts else {}
    try:
        targets = target_modules(model, modules)
    except ValueError:
        if not found:
            raise
        targets = {}
    hooked = {**targets, **found}
    order = {name: i for i, (name, _) in enumerate(getattr(model, "_orig_mod", model).named_modules())}
    hooked = dict(sorted(hooked.items(), key=lambda item: order.get(item[0], -1)))  # model order
    result = CalibrationResult()
    layers: dict[str, tuple[str, str]] = {}
    for name, module in hooked.items():
        if name not in found:
            result.observers[name] = _make(observer, kwargs, module)
            continue
        layers[name] = moe.projection_layers(name, module)
        for layer in layers[name]:
            obs = result.observers[layer] = _make(observer, kwargs, None)
            result.experts[layer] = moe.num_experts(module)
            if not getattr(obs, "SEGMENTED", True):
                raise NotImplementedError(
                    f"{type(obs).__name__} keeps no statistics per segment, so it cannot observe the experts "
                    f"of {name!r} one by one; pass experts=False (or an observer with segments, such as "
                    "'minmax' or 'histogram')"
                )
    inputs = _SharedInputs(result.observers, share_inputs, mask_key)

    def hook_factory(name: str):
        if name in layers:
            return lambda module, args, kwargs_=None: inputs.observe_experts(
                layers[name], module, args, kwargs_
            )

        def hook(_module, args, kwargs_=None):
            x = layer_input(args, kwargs_)
            if x is not None:
                inputs.observe(name, x)

        return hook

    if progress is None:
        total = len(data) if hasattr(data, "__len__") else 0
        progress = sys.stderr.isatty() and min(total, max_batches or total) > 10
    result.batches = run_batches(
        model,
        data,
        hook_factory,
        modules=modules,
        device=device,
        max_batches=max_batches,
        progress=progress,
        on_batch_end=inputs.end_batch,
        targets=hooked,
        on_batch_start=inputs.start_batch,
    )
    for member, leader in inputs.leader.items():  # members hold their group's observer
        result.observers[member] = result.observers[leader]
    result.shared = dict(inputs.leader)
    masked = {**inputs.masked, **{m: inputs.masked.get(lead) for m, lead in inputs.leader.items()}}
    result.masked = {name: masked[name] for name in result.observers if name in masked}
    if sync:
        sync_observers(result)
    return result
