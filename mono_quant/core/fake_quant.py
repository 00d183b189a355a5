"""``FakeQuantize``: an observer and the fake quantization of its qparams in one module, for QAT.

``forward(x)`` observes ``x`` (when the observer is enabled) and returns ``x`` fake-quantized with the
qparams (when fake quantization is enabled). The module keeps its own ``scale`` / ``zero_point`` buffers,
updated on the device from the observer's state after each observation (no host read), so a training step
never synchronizes:

- ``delayed=False`` (torch.ao's ``FakeQuantize``): observe, then fake-quantize with the updated qparams.
- ``delayed=True`` (TransformerEngine's delayed scaling): fake-quantize with the qparams from before this
  batch, then observe it. The first call, with no qparams yet, observes first.

The backward pass is the straight-through estimator with the clipping mask: the gradient passes where the
value was not clamped and is 0 where it was (and at NaN). For integer dtypes output and gradient are those
of ``torch.fake_quantize_per_tensor_affine`` / ``per_channel_affine`` with the same qparams, bit for bit
(``reference.fake_quantize_`` says where they differ by design: NaN stays NaN, ``+-inf`` saturates);
for FP8 the rule is the same against ``+-fp8_max``.

Differences from torch.ao's ``FusedMovingAvgObsFakeQuantize`` (one fused op that observes and
fake-quantizes): its op computes the qparams with a formula of its own, so the same moving average gives
other qparams than here, where they are those of torch.ao's observers (``calculate_qparams``, bit for bit):
symmetric int8 divides ``amax`` by 127 there and by 127.5 here (torch.ao's observers), and affine scales
and zero points can differ in the last bit on some batches. Its observer and fake-quant switches are
tensors read in the op; here they are Python flags (and buffers, for ``state_dict``), so ``forward`` never
reads the device.
"""

from __future__ import annotations

import torch
from torch import nn

from mono_quant.core.base import ObserverBase, _check_input, check_mask
from mono_quant.core.observers import (
    AmaxHistoryObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
)
from mono_quant.core.qparams import calculate_qparams
from mono_quant.core.registry import create_observer, observer_name
from mono_quant.history import AmaxHistoryState
from mono_quant.ops import amax_history_fake_quantize_, fake_quantize_, observe_fake_quantize_
from mono_quant.state import RangeState, Seen

__all__ = ["FakeQuantize"]

_SUPPORTED = (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PerChannelMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    AmaxHistoryObserver,
)
# a per-tensor name with ch_axis -> its per-channel counterpart
_PER_CHANNEL = {"minmax": "per_channel", "moving_average": "moving_average_per_channel"}


def _straight_through(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``grad * mask``, torch's fake-quantize backward (through the uint8 view of the bool mask: the same
    values, and faster on the CPU)."""
    return grad * mask.view(torch.uint8)


class _FakeQuantizeFn(torch.autograd.Function):
    """``ops.fake_quantize_`` with the straight-through gradient."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max, fp8_dtype, ch_axis, backend):
        out, mask = fake_quantize_(
            x, scale, zero_point, quant_min, quant_max, fp8_dtype, ch_axis, backend=backend
        )
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        return (_straight_through(grad, ctx.saved_tensors[0]),) + (None,) * 7


class _ObserveFakeQuantizeFn(torch.autograd.Function):
    """``ops.observe_fake_quantize_`` (delayed, fused) with the straight-through gradient."""

    @staticmethod
    def forward(ctx, x, rmin, rmax, seen, c, scale, zero_point, quant_min, quant_max, fp8_dtype, backend):
        state = RangeState(rmin, rmax, seen)
        out, mask = observe_fake_quantize_(
            x.detach(), state, c, scale, zero_point, quant_min, quant_max, fp8_dtype, backend=backend
        )
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        return (_straight_through(grad, ctx.saved_tensors[0]),) + (None,) * 10


class _HistoryFakeQuantizeFn(torch.autograd.Function):
    """``ops.amax_history_fake_quantize_`` (delayed scaling, one launch), straight-through gradient."""

    @staticmethod
    def forward(ctx, x, rmin, rmax, seen, hist, scale, dscale, ticket, consts, zero_point, target, backend):
        state = AmaxHistoryState(rmin, rmax, seen, hist, scale, dscale, ticket)
        out, mask = amax_history_fake_quantize_(
            x.detach(), state, *consts, zero_point, *target, backend=backend
        )
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        return (_straight_through(grad, ctx.saved_tensors[0]),) + (None,) * 11


def _after_load(module: FakeQuantize, incompatible_keys) -> None:
    """After the whole state (the observer's too) is loaded: the host mirrors follow the loaded buffers
    (loading may read the device)."""
    module._fake_quant_on = bool(module.fake_quant_enabled[0])
    module._observer_on = bool(module.observer_enabled[0])
    module._has_qparams = bool(module.observer.seen[Seen.BATCHES] > 0)


class FakeQuantize(nn.Module):
    """Observe and fake-quantize in one module (see the module docstring).

    Args:
        observer: a registry name (``"moving_average"`` default, ``"minmax"``, ``"per_channel"``,
            ``"moving_average_per_channel"``, ``"amax_history"``) or an observer instance of those kinds
            (then ``dtype``, ``qscheme``, ``ch_axis`` and the keywords come from it and must not be given).
        dtype: the target, ``torch.qint8`` by default; any dtype of ``QuantSpec``, FP8 included.
        qscheme: ``"affine"`` / ``"symmetric"``; default affine for integers, symmetric for FP8.
        ch_axis: per-channel qparams along this dimension (a per-tensor name becomes its per-channel kind).
        delayed: quantize with the qparams from before each batch (delayed scaling).
        fused: with ``delayed=True`` and a per-tensor observer (MinMax, moving average, or an amax history
            with ``"max"`` / ``"most_recent"``), observe and fake-quantize in one pass over ``x`` (on CUDA one
            Triton kernel reads ``x`` once; for the amax history one launch does the whole step). Opt-in;
            the same results as unfused. An amax history then quantizes with the observer's own ``scale``.
        **observer_kwargs: passed to the observer (``averaging_constant``, ``history_len``, ``margin``, ...).

    Buffers: ``scale`` (float32, ``()`` or ``(C,)``, 1.0 until data), ``zero_point`` (int32, 0),
    ``fake_quant_enabled`` and ``observer_enabled`` (uint8 ``(1,)``, as torch.ao), and the observer's.

    Raises:
        ValueError: an unknown or unsupported observer (the histogram's search reads the host), or settings
            given beside an observer instance.
    """

    _version = 1

    def __init__(
        self,
        observer="moving_average",
        dtype: torch.dtype | None = None,
        qscheme=None,
        ch_axis: int | None = None,
        delayed: bool = False,
        fused: bool = False,
        **observer_kwargs,
    ):
        super().__init__()
        if isinstance(observer, ObserverBase):
            given = {"dtype": dtype, "qscheme": qscheme, "ch_axis": ch_axis, **observer_kwargs}
            extra = sorted(k for k, v in given.items() if v is not None)
            if extra:
                raise ValueError(
                    f"FakeQuantize got an observer instance and {', '.join(extra)} too; configure the "
                    "observer itself, or pass its name"
                )
        else:
            name = observer_name(observer)
            if ch_axis is not None:
                name = _PER_CHANNEL.get(name, name)
                observer_kwargs["ch_axis"] = ch_axis
            kwargs = {"dtype": dtype, "qscheme": qscheme, **observer_kwargs}
            observer = create_observer(name, **{k: v for k, v in kwargs.items() if v is not None})
        if not isinstance(observer, _SUPPORTED):
            names = "minmax, moving_average, per_channel, moving_average_per_channel, amax_history"
            raise ValueError(
                f"FakeQuantize cannot use a {type(observer).__name__}: its qparams need a host-side search "
                f"every step; use one of: {names}"
            )
        self.observer = observer
        self.delayed = bool(delayed)
        self.fused = bool(fused)
        if self.fused and not (
            self.delayed
            and observer.ch_axis is None
            and not callable(getattr(observer, "amax_compute_algo", None))
        ):
            raise ValueError(
                "fused=True fuses the delayed step of a per-tensor observer: pass delayed=True and a MinMax, "
                "moving-average or amax-history observer (with amax_compute_algo 'max' or 'most_recent')"
            )
        channels = () if observer.ch_axis is None else (observer.running_min.numel(),)
        self.register_buffer("scale", torch.ones(channels, device=observer.seen.device))
        self.register_buffer(
            "zero_point", torch.zeros(channels, dtype=torch.int32, device=observer.seen.device)
        )
        self.register_buffer("fake_quant_enabled", torch.ones(1, dtype=torch.uint8))
        self.register_buffer("observer_enabled", torch.ones(1, dtype=torch.uint8))
        # host mirrors of the switches (forward reads these, never the buffers) and of "qparams exist"
        self._fake_quant_on = True
        self._observer_on = True
        self._has_qparams = False
        self.register_load_state_dict_post_hook(_after_load)

    # --- configuration -----------------------------------------------------------------------------------
    spec = property(lambda self: self.observer.spec)
    dtype = property(lambda self: self.observer.dtype)
    qscheme = property(lambda self: self.observer.qscheme)
    ch_axis = property(lambda self: self.observer.ch_axis)

    @property
    def quant_min(self) -> int:
        return self.spec.qmin

    @property
    def quant_max(self) -> int:
        return self.spec.qmax

    # --- the switches, as torch.ao has them ----------------------------------------------------------------
    def enable_fake_quant(self, enabled: bool = True) -> FakeQuantize:
        self._fake_quant_on = bool(enabled)
        self.fake_quant_enabled.fill_(int(enabled))
        return self

    def disable_fake_quant(self) -> FakeQuantize:
        return self.enable_fake_quant(False)

    def enable_observer(self, enabled: bool = True) -> FakeQuantize:
        self._observer_on = bool(enabled)
        self.observer_enabled.fill_(int(enabled))
        return self

    def disable_observer(self) -> FakeQuantize:
        return self.enable_observer(False)

    # --- the interface ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Observe ``x`` and return it fake-quantized (module docstring); shape and dtype of ``x``.

        Args:
            x: the tensor.
            mask: ``None``, or a token mask (a bool tensor of the leading dims of ``x``, as for observers):
                only the values under ``True`` are observed; the output is all of ``x`` fake-quantized.
                With a mask, ``fused=True`` takes the unfused steps (the same results).

        Raises:
            TypeError: ``x`` is not a float tensor (as for observers), ``mask`` not a bool tensor.
            ValueError: another device than the module's buffers, a per-channel shape that does not match,
                or a mask of the wrong shape (nothing changes then).
        """
        _check_input(x)
        if mask is not None:
            check_mask(x, mask)
        if x.numel() == 0:
            return x
        observe = self._observer_on
        if self.fused and observe and self._fake_quant_on and self._has_qparams and mask is None:
            return self._fused_step(x)
        if observe and (not self.delayed or not self._has_qparams):
            self._observe(x, mask)
            observe = False
        out = self._fake_quantize(x) if self._fake_quant_on else x
        if observe:
            self._observe(x, mask)
        return out

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The observer's ``calculate_qparams()`` (with its checks; may read the device)."""
        return self.observer.calculate_qparams()

    def reset(self) -> None:
        """Forget the observer's statistics and the qparams (the switches stay)."""
        self.observer.reset()
        self.scale.fill_(1.0)
        self.zero_point.zero_()
        self._has_qparams = False

    # --- helpers -----------------------------------------------------------------------------------------
    def _observe(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        self.observer(x, mask)
        self._update_qparams()

    def _update_qparams(self) -> None:
        """The qparams of the observer's state, on the device (no host read)."""
        obs = self.observer
        if isinstance(obs, AmaxHistoryObserver):
            scale, zero_point = obs.device_qparams()
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
        else:
            lo, hi = obs.running_min, obs.running_max
            if self.scale.shape != lo.shape:  # a per-channel observer sized by its first batch
                self.scale.resize_(lo.shape).fill_(1.0)
                self.zero_point.resize_(lo.shape).zero_()
            scale, zero_point = calculate_qparams(lo, hi, obs.spec)
            seen = lo <= hi  # per channel: where a finite value was seen; elsewhere the qparams stay
            self.scale.copy_(torch.where(seen, scale, self.scale))
            self.zero_point.copy_(torch.where(seen, zero_point, self.zero_point))
        self._has_qparams = True

    def _target(self) -> tuple[int, int, torch.dtype | None]:
        spec = self.spec
        if spec.is_fp8:
            return 0, 0, spec.dtype
        return spec.qmin, spec.qmax, None

    def _fused_step(self, x: torch.Tensor) -> torch.Tensor:
        obs = self.observer
        if x.device != obs.seen.device:
            obs(x)  # raises the observers' error naming both devices
        grad = x.requires_grad and torch.is_grad_enabled()
        target = self._target()
        if isinstance(obs, AmaxHistoryObserver):
            consts = (obs.amax_compute_algo, obs._multiplier, obs._divisor, obs.eps)
            zp = obs._zero_point()
            state = obs.history_state()
            if grad:
                out = _HistoryFakeQuantizeFn.apply(x, *state, consts, zp, target, obs.backend)
            else:
                out = amax_history_fake_quantize_(x, state, *consts, zp, *target, backend=obs.backend)[0]
            self.scale.copy_(obs.scale)
            self.zero_point.copy_(zp)
            return out
        args = (obs.averaging_constant, self.scale, self.zero_point, *target)
        if grad:
            out = _ObserveFakeQuantizeFn.apply(x, *obs.range_state(), *args, obs.backend)
        else:
            out = observe_fake_quantize_(x, obs.range_state(), *args, backend=obs.backend)[0]
        self._update_qparams()
        return out

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax, fp8 = self._target()
        axis = None if self.ch_axis is None else self.ch_axis % x.dim()
        args = (x, self.scale, self.zero_point, qmin, qmax, fp8, axis, self.observer.backend)
        if x.requires_grad and torch.is_grad_enabled():
            return _FakeQuantizeFn.apply(*args)
        return fake_quantize_(*args[:-1], backend=args[-1])[0]

    def _apply(self, fn, recurse=True):
        # .half() / .double() must not change the buffers' dtypes (as for observers)
        super()._apply(lambda t: fn(t) if not t.is_floating_point() else fn(t).to(t.dtype), recurse)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        for name in ("scale", "zero_point"):
            saved = state_dict.get(prefix + name)
            buf = self._buffers[name]
            if isinstance(saved, torch.Tensor) and saved.shape != buf.shape and self.ch_axis is not None:
                buf.resize_(saved.shape)  # per-channel qparams take their size from the state
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def extra_repr(self) -> str:
        return (
            f"fake_quant_enabled={self._fake_quant_on}, observer_enabled={self._observer_on}, "
            f"delayed={self.delayed}" + (", fused=True" if self.fused else "")
        )
