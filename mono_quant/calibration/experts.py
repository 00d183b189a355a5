"""Mixture-of-experts modules of Hugging Face transformers 5.x: finding them, observing what experts read.

transformers 5.x keeps the experts of a MoE block in one module (``MixtralExperts``, ``Qwen2MoeExperts``,
``Qwen3MoeExperts``, ``OlmoeExperts`` and the other classes on the template of
``transformers.integrations.moe``), with stacked 3-D weights ``gate_up_proj [E, 2I, H]`` and
``down_proj [E, H, I]``, called as
``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``.
Whichever implementation runs the call (``config._experts_implementation``: ``eager``'s loop of ``F.linear``,
``grouped_mm``, ``batched_mm``), no ``nn.Linear`` sees an expert's input. A forward pre-hook on the experts
module sees the call's arguments, so it works under every implementation:

- the input of ``gate_up_proj`` is the routed hidden states: row ``t`` counts for each expert of
  ``top_k_index[t]``, one segmented observation ``obs(h, segments=top_k_index, num_segments=E)``;
- the input of ``down_proj``, ``act(gate) * up`` of every routed (token, expert) pair, is recomputed in the
  hook, expert by expert, observed in one segmented call and dropped: nothing is kept, and the model's own
  computation and outputs are untouched. The recomputation runs the eager implementation's arithmetic
  (``F.linear`` per expert, in the weights' dtype).

Layouts are read off the module as ``use_experts_implementation`` sets them: ``is_transposed`` (weights
``[E, in, out]``), ``has_gate`` (``up_proj`` alone, no gate half), ``has_bias`` (``<proj>_bias [E, out]``),
and the module's ``_apply_gate`` (the decorator's default splits the concatenated gate and up halves;
gpt-oss defines its own for interleaved ones). Expert ids outside ``[0, E)`` (the sentinels of expert
parallelism) count for no expert. Splitting the pairs by expert reads their counts on the host once per
call, as the eager implementation does.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.core.base import ObserverBase
from mono_quant.core.observers import PerChannelMinMaxObserver
from mono_quant.core.qparams import calculate_qparams
from mono_quant.state import Seen

__all__ = [
    "EMPTY_POLICIES",
    "down_inputs",
    "empty_segments",
    "expert_modules",
    "expert_pairs",
    "expert_weight_qparams",
    "is_experts",
    "projection_layers",
    "routed_inputs",
    "segment_qparams",
    "token_rows",
]

DOWN = "down_proj"
EMPTY_POLICIES = ("error", "skip", "share")


def _input_projection(module: nn.Module) -> str:
    """``"gate_up_proj"``, or ``"up_proj"`` for experts without a gate (``has_gate=False``)."""
    return "gate_up_proj" if isinstance(getattr(module, "gate_up_proj", None), torch.Tensor) else "up_proj"


def is_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a fused experts module: stacked 3-D ``gate_up_proj`` (or ``up_proj``) and
    ``down_proj`` weights with one leading expert dim."""
    up = getattr(module, _input_projection(module), None)
    down = getattr(module, DOWN, None)
    return (
        isinstance(up, torch.Tensor)
        and isinstance(down, torch.Tensor)
        and up.dim() == 3
        and down.dim() == 3
        and up.shape[0] == down.shape[0]
    )


def expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module for every fused experts module of ``model`` (``is_experts``), in model order; the
    names of a ``torch.compile``'d model are its original module's."""
    root = getattr(model, "_orig_mod", model)
    return {name: m for name, m in root.named_modules() if is_experts(m)}


def projection_layers(name: str, module: nn.Module) -> tuple[str, str]:
    """The layer names of an experts module's two projections: ``<name>.gate_up_proj`` (or ``.up_proj``)
    and ``<name>.down_proj``."""
    prefix = f"{name}." if name else ""
    return prefix + _input_projection(module), prefix + DOWN


def num_experts(module: nn.Module) -> int:
    """``E``: the leading dim of the stacked weights."""
    return int(getattr(module, DOWN).shape[0])


def routed_inputs(module: nn.Module, args: tuple, kwargs: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden_states [T, H], top_k_index [T, k])`` of an experts call, by position or by keyword.

    Raises:
        ValueError: the call does not have the experts' signature (what was found is named).
    """
    kwargs = kwargs or {}
    try:
        values = list(inspect.signature(module.forward).bind(*args, **kwargs).arguments.values())
    except (TypeError, ValueError):
        values = [*args, *kwargs.values()]
    if len(values) < 2:
        raise ValueError(
            f"{type(module).__name__} was called with {len(values)} arguments; an experts module takes "
            "(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])"
        )
    hidden, index = values[0], values[1]
    ok = (
        isinstance(hidden, torch.Tensor)
        and hidden.is_floating_point()
        and hidden.dim() == 2
        and isinstance(index, torch.Tensor)
        and not index.is_floating_point()
        and index.dim() in (1, 2)
        and index.shape[0] == hidden.shape[0]
    )
    if not ok:
        what = lambda t: f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(
            f"{type(module).__name__} got hidden_states {what(hidden)} and top_k_index {what(index)}; an "
            "experts module takes float hidden states [T, H] and integer expert ids [T, k] (or [T])"
        )
    return hidden, index


def token_rows(mask: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """The token mask for the ``rows`` flattened tokens an experts module reads (a MoE block flattens its
    ``[batch, seq, H]`` input with ``view(-1, H)``): ``mask.reshape(-1)`` when it has that many entries."""
    if mask is None or mask.dim() == 0 or mask.numel() != rows:
        return None
    return mask.reshape(-1)


def expert_pairs(
    index: torch.Tensor, experts: int, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The routed (token, expert) pairs sorted by expert.

    Args:
        index: int ``[T, k]`` (or ``[T]``) expert ids; ids outside ``[0, experts)`` count for none.
        experts: ``E``. rows: bool ``[T]``, the tokens to keep (``None``: all).

    Returns:
        ``(expert ids [S], token ids [S], pairs per expert: E ints)``, the pairs grouped by expert in token
        order; ``S`` the pairs kept.
    """
    k = index.shape[1] if index.dim() == 2 else 1
    flat = index.reshape(-1).long()
    keep = (flat >= 0) & (flat < experts)
    if rows is not None:
        keep &= rows.to(flat.device).repeat_interleave(k)
    pos = keep.nonzero().squeeze(1)
    pos = pos[torch.argsort(flat[pos], stable=True)]
    ids = flat[pos]
    counts = torch.bincount(ids, minlength=experts).tolist()
    return ids, pos // k, counts


def _activate(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """``act(gate) * up`` of the input projection's output ``y`` (``act(y)`` without a gate)."""
    if _input_projection(module) == "up_proj" or getattr(module, "has_gate", True) is False:
        return module.act_fn(y)
    apply = getattr(module, "_apply_gate", None)
    if apply is not None:
        return apply(y)
    gate, up = y.chunk(2, dim=-1)
    return module.act_fn(gate) * up


def down_inputs(
    module: nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, counts: list[int]
) -> torch.Tensor:
    """The input of ``down_proj`` for each routed pair: ``act(gate) * up`` of its token under its expert.

    Args:
        module: the experts module. hidden: ``[T, H]`` its hidden states. tokens: ``[S]`` the pairs' token
            ids and counts: pairs per expert, as ``expert_pairs`` gives them (grouped by expert).

    Returns:
        ``[S, I]`` in the weights' dtype, rows in the order of the pairs.
    """
    proj = _input_projection(module)
    weight = getattr(module, proj)
    bias = getattr(module, f"{proj}_bias", None) if getattr(module, "has_bias", True) else None
    transposed = bool(getattr(module, "is_transposed", False))
    x = hidden[tokens].to(weight.dtype)
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        xe, start = x[start : start + n], start + n
        y = xe @ weight[e] if transposed else F.linear(xe, weight[e])
        if isinstance(bias, torch.Tensor):
            y = y + bias[e]
        outs.append(_activate(module, y))
    if outs:
        return torch.cat(outs)
    down = getattr(module, DOWN)
    return x.new_empty((0, down.shape[1] if transposed else down.shape[2]))


# --- weights ------------------------------------------------------------------------------------------


def _stacked(module: nn.Module, proj: str) -> torch.Tensor:
    """A projection's stacked weight as ``[E, out, in]``."""
    w = getattr(module, proj).detach()
    return w.transpose(1, 2) if getattr(module, "is_transposed", False) else w


def expert_weight_qparams(
    model: nn.Module, dtype: torch.dtype = torch.qint8, qscheme: str = "symmetric"
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per expert and output channel qparams of every stacked expert weight of ``model``.

    Args:
        model: a model with fused experts modules (``expert_modules``). dtype, qscheme: of the weights.

    Returns:
        ``{layer: (scale [E, out] float32, zero_point [E, out] int32)}`` under the names of
        ``projection_layers`` (``model.layers.0.mlp.experts.gate_up_proj``: ``out = 2I``; ``.down_proj``:
        ``out = H``), from the min/max of each expert's output channel.

    Raises:
        ValueError: ``model`` has no experts module; an unsupported dtype or qscheme.
    """
    found = expert_modules(model)
    if not found:
        raise ValueError("the model has no fused experts module (stacked 3-D gate_up_proj / down_proj)")
    out = {}
    for name, module in found.items():
        for layer, proj in zip(
            projection_layers(name, module), (_input_projection(module), DOWN), strict=True
        ):
            w = _stacked(module, proj)
            experts, channels = w.shape[0], w.shape[1]
            obs = PerChannelMinMaxObserver(ch_axis=0, dtype=dtype, qscheme=qscheme).to(w.device)
            obs(w.reshape(experts * channels, -1))
            scale, zp = obs.calculate_qparams()
            out[layer] = (scale.reshape(experts, channels), zp.reshape(experts, channels))
    return out


# --- qparams of segmented observers, empty experts included ----------------------------------------------


def empty_segments(obs: ObserverBase, experts: int) -> list[int]:
    """The segments (experts) of a segmented observer of ``experts`` segments that saw no finite value: no
    token was routed to them, or only NaN / +-Inf ones (all of them when it never observed)."""
    if getattr(obs, "num_segments", None) is None:
        return list(range(experts))
    return torch.nonzero(obs.seen[:, Seen.FINITE] == 0).flatten().tolist()


def segment_qparams(
    name: str, obs: ObserverBase, experts: int, empty: str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(scale, zero_point)`` of a segmented observer, ``[E]`` (``[E, C]`` per channel), with ``empty``
    deciding for the segments that saw no finite value (see ``CalibrationResult.qparams``).

    Returns:
        The qparams; ``None`` when no segment saw a finite value (nothing to share: the layer is left out,
        as any observer without data).

    Raises:
        ValueError: ``empty="error"`` and some segments are empty (the message names the layer and the
            experts), or an unknown ``empty``.
    """
    if empty not in EMPTY_POLICIES:
        raise ValueError(f"empty={empty!r} is not one of {', '.join(map(repr, EMPTY_POLICIES))}")
    missing = set(empty_segments(obs, experts))
    if len(missing) == experts:
        return None
    if missing and empty == "error":
        ids = sorted(missing)
        shown = ", ".join(map(str, ids[:16])) + (", ..." if len(ids) > 16 else "")
        raise ValueError(
            f"layer {name!r}: {len(ids)} of {experts} experts saw no token with a finite value (experts "
            f"{shown}), so they have no range; calibrate on more data, or pass empty='skip' (scale 0 marks "
            "them) or empty='share' (the range of the other experts of this layer)"
        )
    pairs = {e: obs.segment(e).calculate_qparams() for e in range(experts) if e not in missing}
    if missing:
        some = next(iter(pairs.values()))
        if empty == "share":
            full = torch.tensor([e not in missing for e in range(experts)], device=obs.running_min.device)
            lo, hi = obs.running_min[full].amin(0), obs.running_max[full].amax(0)
            shared = calculate_qparams(lo, hi, obs.spec)
        else:  # skip: a scale of 0 (never a real one, which is >= eps) and a zero point of 0 mark them
            shared = (torch.zeros_like(some[0]), torch.zeros_like(some[1]))
        pairs.update(dict.fromkeys(missing, tuple(t.to(s.dtype) for t, s in zip(shared, some, strict=True))))
    scale = torch.stack([pairs[e][0] for e in range(experts)])
    zero_point = torch.stack([pairs[e][1] for e in range(experts)])
    return scale, zero_point
