"""Observers on the torch path: interface, torch.ao parity, bad input, dtypes, module state."""

import copy
import warnings

import pytest
import torch

import mono_quant
from mono_quant import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
)

ALL = [
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    HistogramObserver,
    PerChannelMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
]
PER_CHANNEL = (PerChannelMinMaxObserver, MovingAveragePerChannelMinMaxObserver)
# (dtype, atol) of the statistics against the float32 values of the same tensor: exact
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _make(cls, **kw):
    return cls(backend="torch", **kw)


def _ao():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from torch.ao.quantization import observer
        except ImportError:
            pytest.skip("torch.ao.quantization is not importable in this torch build")
    return observer


# --- the interface ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL)
def test_forward_returns_its_input_and_state_appears(cls):
    obs = _make(cls)
    assert obs.min_val is None and obs.max_val is None
    x = torch.randn(4, 8)
    assert obs(x) is x
    assert obs.min_val is not None and obs.max_val is not None
    want_shape = (4,) if cls in PER_CHANNEL else ()
    assert tuple(obs.min_val.shape) == want_shape
    scale, zp = obs.calculate_qparams()
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32
    assert tuple(scale.shape) == want_shape and tuple(zp.shape) == want_shape
    obs.reset()
    assert obs.min_val is None and obs.max_val is None
    with pytest.raises(RuntimeError, match="no data"):
        obs.calculate_qparams()


@pytest.mark.parametrize("cls", ALL)
def test_forward_inside_autograd_records_nothing(cls):
    # observers sit in training graphs: the activation's gradient passes unchanged, no buffer joins a graph
    obs = _make(cls)
    w = torch.randn(4, 8, requires_grad=True)
    for _ in range(2):
        y = obs(w * 3)
        assert y.requires_grad
    y.sum().backward()
    assert torch.equal(w.grad, torch.full((4, 8), 3.0))
    assert all(not b.requires_grad and b.grad_fn is None for b in obs.buffers())


@pytest.mark.parametrize("cls", ALL)
def test_inference_mode_observes_the_same(cls):
    xs = [torch.randn(6, 4), torch.randn(6, 4) * 3]
    plain, inference = _make(cls), _make(cls)
    for x in xs:
        plain(x)
        with torch.inference_mode():
            inference(x)
    for (name, a), (_, b) in zip(plain.state_dict().items(), inference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_exported_names():
    for name in [c.__name__ for c in ALL] + ["create_observer", "run_calibration", "merge_histograms"]:
        assert name in mono_quant.__all__ and hasattr(mono_quant, name)
        home = mono_quant.state if name == "merge_histograms" else mono_quant.core
        assert hasattr(home, name) or name in ("create_observer", "run_calibration")
    assert mono_quant.merge_histograms is mono_quant.state.merge_histograms


@pytest.mark.parametrize("cls", ALL)
def test_nothing_observed_raises(cls):
    with pytest.raises(RuntimeError, match="no data"):
        _make(cls).calculate_qparams()


# --- parity with torch.ao on the same data --------------------------------------------------------------


@pytest.mark.parametrize("qscheme", ["affine", "symmetric"])
@pytest.mark.parametrize("dtype", [torch.qint8, torch.quint8])
def test_minmax_and_moving_average_match_torch_ao(qscheme, dtype):
    ao = _ao()
    ao_q = torch.per_tensor_affine if qscheme == "affine" else torch.per_tensor_symmetric
    pairs = [
        (
            MinMaxObserver(dtype=dtype, qscheme=qscheme, backend="torch"),
            ao.MinMaxObserver(dtype=dtype, qscheme=ao_q),
        ),
        (
            MovingAverageMinMaxObserver(0.1, dtype=dtype, qscheme=qscheme, backend="torch"),
            ao.MovingAverageMinMaxObserver(0.1, dtype=dtype, qscheme=ao_q),
        ),
    ]
    batches = [torch.randn(17, 33) * (1 + i) + i for i in range(5)]
    for ours, theirs in pairs:
        for b in batches:
            ours(b)
            theirs(b)
        assert torch.equal(ours.min_val, theirs.min_val) and torch.equal(ours.max_val, theirs.max_val)
        s, z = ours.calculate_qparams()
        ts, tz = theirs.calculate_qparams()
        assert torch.equal(s, ts.reshape(())) and int(z) == int(tz)


@pytest.mark.parametrize("ch_axis", [0, 1, -1])
def test_per_channel_matches_torch_ao(ch_axis):
    ao = _ao()
    pairs = [
        (
            PerChannelMinMaxObserver(ch_axis=ch_axis, backend="torch"),
            ao.PerChannelMinMaxObserver(ch_axis=ch_axis, dtype=torch.qint8),
        ),
        (
            MovingAveragePerChannelMinMaxObserver(0.2, ch_axis=ch_axis, backend="torch"),
            ao.MovingAveragePerChannelMinMaxObserver(0.2, ch_axis=ch_axis, dtype=torch.qint8),
        ),
    ]
    batches = [torch.randn(6, 5, 7) * (i + 1) for i in range(4)]
    for ours, theirs in pairs:
        for b in batches:
            ours(b)
            theirs(b)
        assert torch.equal(ours.min_val, theirs.min_val) and torch.equal(ours.max_val, theirs.max_val)
        s, z = ours.calculate_qparams()
        ts, tz = theirs.calculate_qparams()
        assert torch.equal(s, ts) and torch.equal(z, tz.to(torch.int32))


def test_moving_average_update_rule():
    obs = _make(MovingAverageMinMaxObserver, averaging_constant=0.25)
    obs(torch.tensor([-1.0, 2.0]))
    assert float(obs.min_val) == -1.0 and float(obs.max_val) == 2.0  # the first batch sets the range
    obs(torch.tensor([-5.0, 10.0]))
    assert float(obs.min_val) == pytest.approx(0.75 * -1 + 0.25 * -5)
    assert float(obs.max_val) == pytest.approx(0.75 * 2 + 0.25 * 10)


@pytest.mark.parametrize("c", [0, -0.1, 1.5, float("nan"), "0.1", True])
def test_bad_averaging_constant(c):
    with pytest.raises(ValueError, match="averaging_constant"):
        MovingAverageMinMaxObserver(averaging_constant=c)
    with pytest.raises(ValueError, match="averaging_constant"):
        MovingAveragePerChannelMinMaxObserver(averaging_constant=c)


# --- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool, torch.complex64, torch.uint8])
def test_non_float_inputs_raise_type_error(cls, dtype):
    x = torch.zeros(4, dtype=dtype)
    with pytest.raises(TypeError, match=str(dtype)):
        _make(cls)(x)


@pytest.mark.parametrize("cls", ALL)
def test_input_on_another_device_names_both_devices(cls):
    # an activation on another device than the observer's buffers must not reach the kernels (their error
    # says "cpu tensor?"); an observer on the meta device stands in for one on CUDA on machines without one
    obs = _make(cls).to("meta")
    with pytest.raises(ValueError, match=r"x is on cpu but .* on meta.*observer\.to\('cpu'\)"):
        obs(torch.randn(4, 3))


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize(
    "make, what",
    [
        (lambda: torch.randn(4, 3).to_sparse(), "sparse"),
        (lambda: torch.nested.nested_tensor([torch.randn(2), torch.randn(3)]), "nested"),
        (lambda: torch.empty(4, 3, device="meta"), "meta"),
    ],
)
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_sparse_nested_and_meta_inputs_are_type_errors_before_any_state_changes(cls, make, what):
    obs = _make(cls)
    before = {k: v.clone() for k, v in obs.state_dict().items()}
    with pytest.raises(TypeError, match=what):
        obs(make())
    for k, v in obs.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("cls", ALL)
def test_empty_tensor_is_a_no_op(cls):
    obs = _make(cls)
    x = torch.empty(0, 3)
    assert obs(x) is x
    assert obs.min_val is None and int(obs.seen.sum()) == 0


@pytest.mark.parametrize("cls", ALL)
def test_nan_and_inf_are_excluded_and_counted(cls):
    obs = _make(cls)
    x = torch.randn(4, 50)
    clean = obs_clean = _make(cls)
    obs_clean(x.clone())
    x[0, 3], x[1, 7], x[2, 9] = float("nan"), float("inf"), float("-inf")
    clean_vals = x.clone()
    clean_vals[0, 3], clean_vals[1, 7], clean_vals[2, 9] = x[0, 4], x[1, 8], x[2, 10]
    obs(x)
    ref = _make(cls)
    ref(clean_vals)
    assert obs.nonfinite_count == 3
    assert int(obs.seen[0]) == x.numel() - 3
    assert torch.equal(obs.min_val, ref.min_val) and torch.equal(obs.max_val, ref.max_val)
    assert all(torch.isfinite(t).all() for t in obs.calculate_qparams())
    del clean


@pytest.mark.parametrize("cls", ALL)
def test_nothing_finite_raises_with_the_reason(cls):
    obs = _make(cls)
    obs(torch.full((3, 4), float("nan")))
    obs(torch.full((3, 4), float("inf")))
    assert obs.nonfinite_count == 24
    with pytest.raises(RuntimeError, match="none was finite"):
        obs.calculate_qparams()


def test_all_nan_batch_does_not_disturb_the_moving_average():
    obs = _make(MovingAverageMinMaxObserver, averaging_constant=0.5)
    obs(torch.tensor([float("nan")]))  # nothing finite yet: the next batch still starts the average
    obs(torch.tensor([-2.0, 4.0]))
    obs(torch.tensor([float("nan"), float("inf")]))
    assert float(obs.min_val) == -2.0 and float(obs.max_val) == 4.0


@pytest.mark.parametrize("cls", ALL)
def test_float32_limit_gives_finite_scale(cls):
    obs = _make(cls)
    big = torch.finfo(torch.float32).max
    obs(torch.tensor([[-big, big], [1.0, -1.0]]))
    scale, zp = obs.calculate_qparams()
    assert torch.isfinite(scale).all() and (scale > 0).all()


def test_per_channel_errors():
    obs = _make(PerChannelMinMaxObserver, ch_axis=2)
    with pytest.raises(ValueError, match="ch_axis=2"):
        obs(torch.randn(3, 4))
    obs = _make(PerChannelMinMaxObserver, ch_axis=0)
    obs(torch.randn(3, 4))
    with pytest.raises(ValueError, match="3 channels"):
        obs(torch.randn(5, 4))
    with pytest.raises(ValueError, match="ch_axis"):
        PerChannelMinMaxObserver(ch_axis=1.5)


@pytest.mark.parametrize("bins", [0, -3, 2.5, True, "64"])
def test_bad_histogram_settings(bins):
    with pytest.raises(ValueError, match="bins"):
        HistogramObserver(bins=bins)
    with pytest.raises(ValueError, match="method"):
        HistogramObserver(method="entropy")
    with pytest.raises(ValueError, match="percentile"):
        HistogramObserver(method="percentile", percentile=0)


@pytest.mark.parametrize("cls", ALL)
def test_bad_backend_and_triton_on_cpu(cls, monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        cls(backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    obs = cls(backend="triton")
    with pytest.raises((RuntimeError, NotImplementedError), match="triton"):
        obs(torch.randn(4, 4))


# --- dtypes, shapes, layouts ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1,), (1, 1), (7, 13), (3, 5, 1023), (2, 3, 4, 5)])
def test_half_precision_inputs_give_the_float32_statistics(cls, dtype, shape):
    x = (torch.randn(shape) * 3).to(dtype)
    a, b = _make(cls), _make(cls)
    a(x)
    b(x.float())
    assert a.min_val.dtype == torch.float32
    assert torch.equal(a.min_val, b.min_val) and torch.equal(a.max_val, b.max_val)
    if isinstance(a, HistogramObserver):
        assert torch.equal(a.counts, b.counts) and int(a.exponent) == int(b.exponent)
    for u, v in zip(a.calculate_qparams(), b.calculate_qparams()):
        assert torch.equal(u, v)


@pytest.mark.parametrize("cls", ALL)
def test_non_contiguous_input(cls):
    base = torch.randn(8, 10, 6)
    x = base.transpose(0, 2)[:, ::2]
    assert not x.is_contiguous()
    a, b = _make(cls), _make(cls)
    a(x)
    b(x.contiguous())
    assert torch.equal(a.min_val, b.min_val) and torch.equal(a.max_val, b.max_val)
    if isinstance(a, HistogramObserver):
        assert torch.equal(a.counts, b.counts)


def test_float64_input_uses_its_float32_values():
    x = torch.randn(1000, dtype=torch.float64)
    a, b = _make(HistogramObserver), _make(HistogramObserver)
    a(x)
    b(x.float())
    assert torch.equal(a.counts, b.counts) and torch.equal(a.min_val, b.min_val)


@pytest.mark.parametrize("cls", ALL)
def test_large_input(cls):
    x = torch.randn(3_000_003)  # not a multiple of anything; crosses the reference's chunk size
    x[12345] = float("nan")
    obs = _make(cls)
    obs(x.reshape(-1, 3) if cls in PER_CHANNEL else x)
    assert obs.nonfinite_count == 1
    if isinstance(obs, HistogramObserver):
        assert int(obs.counts.sum()) == x.numel() - 1


# --- module state -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("observed", [False, True])
def test_state_dict_round_trip(cls, observed):
    obs = _make(cls)
    if observed:
        obs(torch.randn(6, 9))
        obs(torch.randn(6, 9) * 2)
    fresh = _make(cls)
    fresh.load_state_dict(copy.deepcopy(obs.state_dict()))
    for name, buf in obs.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], buf), name
    if observed:
        for u, v in zip(obs.calculate_qparams(), fresh.calculate_qparams()):
            assert torch.equal(u, v)
        # and calibration continues from the loaded state
        more = torch.randn(6, 9) * 5
        obs(more)
        fresh(more)
        assert torch.equal(obs.min_val, fresh.min_val)
    else:
        assert fresh.min_val is None


@pytest.mark.parametrize("cls", ALL)
def test_half_and_double_keep_statistics_float32(cls):
    obs = _make(cls)
    obs(torch.randn(4, 4) * 1e-3 + 1.0001)
    before = {k: v.clone() for k, v in obs.state_dict().items()}
    obs.half()
    obs.double()
    for k, v in obs.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    obs.to("cpu")
    assert obs.running_min.dtype == torch.float32


def test_extra_repr_shows_the_configuration():
    r = repr(HistogramObserver(bins=512, method="percentile", percentile=99.9, dtype=torch.quint8))
    assert "bins=512" in r and "percentile=99.9" in r and "torch.quint8" in r
    r = repr(MovingAveragePerChannelMinMaxObserver(0.05, ch_axis=1, qscheme="symmetric"))
    assert "averaging_constant=0.05" in r and "ch_axis=1" in r and "'symmetric'" in r


def test_histogram_exposes_counts_and_edges():
    obs = HistogramObserver(bins=100, backend="torch")
    assert obs.bins == 100 and obs.histogram_counts is None and obs.bin_edges is None
    x = torch.rand(1000) * 4 - 1
    obs(x)
    assert len(obs.bin_edges) == len(obs.histogram_counts) + 1
    assert int(obs.histogram_counts.sum()) == 1000
    assert float(obs.min_val) == float(x.min()) and float(obs.max_val) == float(x.max())


@pytest.mark.parametrize("cls", ALL)
def test_float64_beyond_the_float32_range_counts_as_non_finite(cls):
    x = torch.tensor([[1e300, 1.0], [-2.0, -1e300]], dtype=torch.float64)
    obs = _make(cls)
    obs(x)
    assert obs.nonfinite_count == 2
    assert int(obs.seen[0]) == 2
    scale, _ = obs.calculate_qparams()
    assert torch.isfinite(scale).all()
    if isinstance(obs, HistogramObserver):
        assert int(obs.counts.sum()) == 2


def test_float64_tiny_negatives_on_a_coarse_grid():
    obs = _make(HistogramObserver, bins=8)
    obs(torch.tensor([-1e-50, 1000.0, 5.0], dtype=torch.float64))  # -1e-50 is -0.0 in float32
    assert int(obs.counts.sum()) == 3 and int(obs.exponent) > 0


@pytest.mark.parametrize("cls", ALL)
def test_the_sync_free_path_gives_the_cpu_results(cls, monkeypatch):
    """The torch path on CUDA never branches on values; run that code on CPU and compare."""
    from mono_quant import reference_blocks, reference_histogram, reference_range, reference_training

    batches = [torch.randn(6, 40) * 3, torch.randn(6, 40) * 10 + 4, torch.randn(6, 40)]
    batches[1][2, 5], batches[2][0, 0] = float("nan"), float("-inf")
    fast = _make(cls)
    for b in batches:
        fast(b)
    # every home of the twins' CPU branch test (``reference`` re-exports the twins, not their helpers)
    for home in (reference_range, reference_histogram, reference_training, reference_blocks):
        monkeypatch.setattr(home, "_may_branch", lambda x: False)
    slow = _make(cls)
    for b in batches:
        slow(b)
    for (name, a), (_, b) in zip(fast.state_dict().items(), slow.state_dict().items()):
        assert torch.equal(a, b), name


# --- loading checks what it loads ------------------------------------------------------------------------


def _v1(state_dict):
    """A state dict as the first release saved it: no _extra_state, version 1 in the metadata."""
    sd = {k: v for k, v in state_dict.items() if not k.endswith("_extra_state")}
    sd = type(state_dict)(sd)
    sd._metadata = {"": {"version": 1}}
    return sd


@pytest.mark.parametrize("old", [False, True], ids=["v2", "v1"])
def test_a_per_tensor_state_does_not_load_into_a_per_channel_observer(old):
    src = MinMaxObserver()
    src(torch.randn(4, 3))
    sd = _v1(src.state_dict()) if old else src.state_dict()
    dst = PerChannelMinMaxObserver(ch_axis=1)
    with pytest.raises(ValueError, match="MinMaxObserver|shape"):
        dst.load_state_dict(sd)
    with pytest.raises(ValueError, match="MinMaxObserver|shape"):
        mono_quant.merge_state_dicts(PerChannelMinMaxObserver(ch_axis=1), [sd, sd])


def test_a_version_1_state_dict_still_loads():
    src = HistogramObserver(bins=16)
    src(torch.randn(100))
    dst = HistogramObserver(bins=16)
    dst.load_state_dict(_v1(src.state_dict()))
    assert torch.equal(dst.counts, src.counts) and torch.equal(dst.seen, src.seen)


@pytest.mark.parametrize(
    "saved, here, what",
    [
        (
            lambda: HistogramObserver(bins=16, method="kl"),
            lambda: HistogramObserver(bins=16, method="mse"),
            "method",
        ),
        (lambda: MinMaxObserver(dtype=torch.qint8), lambda: MinMaxObserver(dtype=torch.int4), "dtype"),
        (
            lambda: MovingAverageMinMaxObserver(0.1),
            lambda: MovingAverageMinMaxObserver(0.2),
            "averaging_constant",
        ),
        (lambda: MinMaxObserver(), lambda: MovingAverageMinMaxObserver(), "MinMaxObserver"),
    ],
)
def test_loading_the_state_of_other_settings_names_them(saved, here, what):
    src = saved()
    src(torch.randn(10))
    with pytest.raises(ValueError, match=what):
        here().load_state_dict(src.state_dict())


def test_loading_a_buffer_of_another_dtype_is_refused():
    src = MinMaxObserver()
    src(torch.randn(10))
    sd = src.state_dict()
    sd["seen"] = sd["seen"].float()
    with pytest.raises(ValueError, match="seen: it must be a torch.int64"):
        MinMaxObserver().load_state_dict(sd)


# --- settings are validated where they are given ------------------------------------------------------


@pytest.mark.parametrize("c", [1e-46, 1e-40, 0.0, -0.1, 1.5, True, float("nan"), "0.1"])
def test_averaging_constants_that_never_move_the_range_are_refused(c):
    for cls in (MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver):
        with pytest.raises(ValueError, match="averaging_constant"):
            cls(averaging_constant=c)


@pytest.mark.parametrize("p", [50, 49.9, 10, 0, 100.1])
def test_percentiles_whose_ends_cross_are_refused(p):
    with pytest.raises(ValueError, match=r"percentile=.* must be a number in \(50, 100\]"):
        HistogramObserver(method="percentile", percentile=p)


# --- per-channel observers: the channel count ---------------------------------------------------------


@pytest.mark.parametrize("cls", PER_CHANNEL)
def test_reset_forgets_the_channel_count_as_the_error_advises(cls):
    obs = _make(cls, ch_axis=0)
    obs(torch.randn(3, 4))
    with pytest.raises(ValueError, match="reset\\(\\) forgets the channel count"):
        obs(torch.randn(5, 4))
    obs.reset()
    obs(torch.randn(5, 4))
    assert obs.running_min.shape == (5,) and int(obs.seen[2]) == 1


@pytest.mark.parametrize("cls", PER_CHANNEL)
def test_num_channels_sizes_the_buffers_and_is_kept_by_reset(cls):
    obs = _make(cls, ch_axis=-1, num_channels=6)
    assert obs.running_min.shape == (6,) and obs.min_val is None
    obs(torch.randn(2, 6))
    obs.reset()
    assert obs.running_min.shape == (6,)
    with pytest.raises(ValueError, match="num_channels=6 was given"):
        obs(torch.randn(2, 7))
    with pytest.raises(ValueError, match="num_channels"):
        cls(num_channels=0)


@pytest.mark.parametrize("cls", PER_CHANNEL)
def test_a_failed_first_observation_does_not_fix_the_channel_count(cls, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    obs = cls(ch_axis=0, backend="triton")
    with pytest.raises((RuntimeError, NotImplementedError)):
        obs(torch.randn(3, 4))  # the kernels cannot run on CPU tensors without the interpreter
    assert obs.running_min.shape == (0,) and int(obs.seen.sum()) == 0
    obs.backend = "torch"
    obs(torch.randn(5, 4))
    assert obs.running_min.shape == (5,)


@pytest.mark.parametrize("cls", PER_CHANNEL)
def test_a_channel_with_nothing_finite_is_an_error_as_per_tensor(cls):
    x = torch.randn(6, 4)
    x[:, 2] = float("nan")
    x[0, 3] = float("inf")  # one non-finite value in a channel that has finite ones too: fine
    obs = _make(cls, ch_axis=1)
    obs(x)
    with pytest.raises(RuntimeError, match=r"1 of 4 channels saw no finite value \(channels 2\)"):
        obs.calculate_qparams()
    per_tensor = _make(MinMaxObserver)
    per_tensor(torch.full((3,), float("nan")))
    with pytest.raises(RuntimeError, match="none was finite"):
        per_tensor.calculate_qparams()


@pytest.mark.parametrize("cls", PER_CHANNEL)
def test_compile_fullgraph_of_a_fresh_per_channel_observer_with_num_channels(cls):
    torch._dynamo.reset()
    eager = _make(cls, ch_axis=-1, num_channels=8)
    fresh = _make(cls, ch_axis=-1, num_channels=8)
    run = torch.compile(fresh, fullgraph=True, backend="aot_eager")
    for scale in (1.0, 3.0):
        x = torch.randn(4, 8) * scale
        run(x)
        eager(x)
    assert torch.equal(fresh.running_min, eager.running_min) and torch.equal(fresh.seen, eager.seen)


# --- names: one registry ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, cls, method",
    [
        ("kl", HistogramObserver, "kl"),
        ("mse", HistogramObserver, "mse"),
        ("percentile", HistogramObserver, "percentile"),
        ("histogram", HistogramObserver, "kl"),
        ("per_channel", PerChannelMinMaxObserver, None),
        ("per-channel-minmax", PerChannelMinMaxObserver, None),
        ("moving_average_per_channel", MovingAveragePerChannelMinMaxObserver, None),
        ("ema", MovingAverageMinMaxObserver, None),
    ],
)
def test_every_registry_name_creates_its_observer(name, cls, method):
    obs = mono_quant.create_observer(name)
    assert type(obs) is cls and getattr(obs, "method", None) == method


def test_a_keyword_that_contradicts_the_name_is_an_error():
    with pytest.raises(ValueError, match="observer 'kl' means method='kl', got method='mse'"):
        mono_quant.create_observer("kl", method="mse")
    assert mono_quant.create_observer("kl", method="kl", bins=64).bins == 64


def test_every_registry_entry_round_trips_through_its_settings():
    from mono_quant.core.registry import OBSERVERS

    for name in OBSERVERS:
        obs = mono_quant.create_observer(name)
        again = type(obs)(**obs.settings())
        assert again.settings() == obs.settings(), name
