"""Token masks: ``forward(x, mask)`` keeps only the values under ``True``, on both backends.

The oracle of every test: the same observer fed the kept tokens alone (``x[mask]``) holds exactly the
same state, but for ``seen[Seen.MASKED]``, which counts the values left out.
"""

import pytest
import torch

import mono_quant as mq
from mono_quant.core.fake_quant import FakeQuantize
from mono_quant.core.registry import OBSERVERS, create_observer
from mono_quant.distributed import merge_observers, merge_state_dicts
from mono_quant.state import Seen

KINDS = sorted(OBSERVERS)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _kwargs(kind: str) -> dict:
    if kind in ("per_channel", "moving_average_per_channel"):
        return {"ch_axis": -1}
    if kind in ("histogram", "kl", "mse", "percentile"):
        return {"bins": 64}
    if kind == "moving_average":
        return {"averaging_constant": 0.25}
    return {}


def _padded_batches(g, dtype=torch.float32, hidden=32, specials=True):
    """Three ``[batch, seq, hidden]`` batches with a ``[batch, seq]`` mask (right padding of varied length;
    the padding holds huge values and NaN that must not count), and NaN / Inf among the kept tokens."""
    out = []
    for b, s, scale in ((3, 7, 1.0), (2, 9, 10.0), (4, 5, 0.1)):
        x = (torch.randn(b, s, hidden, generator=g) * scale).to(dtype)
        lengths = torch.randint(1, s + 1, (b,), generator=g)
        lengths[0] = s
        mask = torch.arange(s)[None, :] < lengths[:, None]
        x[~mask] = 1e4
        x[~mask][..., 0] = float("nan")
        if specials:
            x[0, 0, 3], x[0, 1, 5] = float("nan"), float("inf")
        out.append((x, mask))
    return out


def _assert_same_state(got, want, masked: int) -> None:
    g, w = got.state_dict(), want.state_dict()
    assert g.keys() == w.keys()
    for key in g:
        a, b = g[key], w[key]
        if key.endswith("seen"):
            assert int(a[Seen.MASKED]) == masked
            a, b = a[: Seen.MASKED], b[: Seen.MASKED]
        assert a.shape == b.shape and torch.equal(a, b), key


@pytest.mark.parametrize("kind", KINDS)
def test_padded_batch_gives_the_state_of_the_tokens_alone(kind):
    g = torch.Generator().manual_seed(3)
    batches = _padded_batches(g)
    if kind == "per_block":
        # a block grid is positional: one batch, blocks along the hidden dim; the masked rows stay -inf
        obs, ref = create_observer(kind, block_size=(1, 32)), create_observer(kind, block_size=(1, 32))
        x, mask = batches[0]
        obs(x, mask)
        ref(x[mask])
        assert torch.equal(obs.block_amax[mask.reshape(-1)], ref.block_amax)
        assert bool((obs.block_amax[~mask.reshape(-1)] == float("-inf")).all())
        for name in ("running_min", "running_max"):
            assert torch.equal(getattr(obs, name), getattr(ref, name))
        assert torch.equal(obs.seen[: Seen.MASKED], ref.seen[: Seen.MASKED])
        assert obs.masked_count == int((~mask).sum()) * x.shape[-1]
        return
    obs, ref = create_observer(kind, **_kwargs(kind)), create_observer(kind, **_kwargs(kind))
    masked = 0
    for x, mask in batches:
        assert obs(x, mask) is x
        ref(x[mask])
        masked += int((~mask).sum()) * x.shape[-1]
    _assert_same_state(obs, ref, masked)
    assert obs.masked_count == masked
    assert obs.nonfinite_count == ref.nonfinite_count == 3 * 2
    s, z = obs.calculate_qparams()
    rs, rz = ref.calculate_qparams()
    assert torch.equal(s, rs) and torch.equal(z, rz)


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "amax_history"])
@pytest.mark.parametrize("fused", [False, True])
def test_fake_quantize_observes_under_the_mask(observer, fused):
    g = torch.Generator().manual_seed(5)
    fq, ref = (FakeQuantize(observer=observer, fused=fused, delayed=fused) for _ in range(2))
    masked = 0
    for x, mask in _padded_batches(g, specials=False):
        out = fq(x, mask)
        assert out.shape == x.shape
        ref(x[mask])
        masked += int((~mask).sum()) * x.shape[-1]
    _assert_same_state(fq.observer, ref.observer, masked)
    assert torch.equal(fq.scale, ref.scale) and torch.equal(fq.zero_point, ref.zero_point)


def test_masks_of_every_depth_and_the_all_masked_batch():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 4, generator=g)
    for mask in (torch.tensor(True), torch.tensor([True, False]), torch.rand(2, 3, generator=g) > 0.5,
                 torch.rand(2, 3, 4, generator=g) > 0.5):  # fmt: skip
        obs, ref = mq.MinMaxObserver(), mq.MinMaxObserver()
        obs(x, mask)
        kept = x[mask] if mask.dim() else x
        if kept.numel():
            ref(kept)
        assert torch.equal(obs.running_min, ref.running_min) and torch.equal(obs.running_max, ref.running_max)
        assert obs.masked_count == x.numel() - kept.numel()
    obs = mq.HistogramObserver(bins=16)
    obs(x, torch.zeros(2, 3, dtype=torch.bool))  # nothing kept: only the masked values count
    assert obs.seen.tolist() == [0, 0, 0, x.numel()] and not bool(obs.counts.any())
    amax = mq.AmaxHistoryObserver(history_len=4)
    amax(x, torch.zeros(2, dtype=torch.bool))  # no step of the history
    assert int(amax.seen[Seen.BATCHES]) == 0 and not bool(amax.amax_history.any())


# --- bad masks: clear errors, nothing changed -----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "mask, error, words",
    [
        (torch.ones(3, 6, dtype=torch.bool), ValueError, "(3, 6)"),
        (torch.ones(7, dtype=torch.bool), ValueError, "leading dims"),
        (torch.ones(3, 7, 32, 1, dtype=torch.bool), ValueError, "(3, 7, 32, 1)"),
        (torch.ones(3, 7), TypeError, "torch.float32"),
        (torch.ones(3, 7, dtype=torch.int64), TypeError, "torch.int64"),
        ([[True] * 7] * 3, TypeError, "list"),
        (torch.ones(3, 7, dtype=torch.bool, device="meta"), ValueError, "meta"),
    ],
)
def test_bad_masks_are_refused_before_any_change(kind, mask, error, words):
    obs = create_observer(kind, **_kwargs(kind))
    x = torch.randn(3, 7, 32)
    obs(x)
    before = {k: v.clone() for k, v in obs.state_dict().items()}
    with pytest.raises(error, match="mask") as info:
        obs(x * 100, mask)
    assert words in str(info.value)
    after = obs.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fake_quantize_refuses_a_bad_mask():
    fq = FakeQuantize()
    with pytest.raises(ValueError, match="mask of shape"):
        fq(torch.randn(3, 4), torch.ones(4, dtype=torch.bool))
    assert int(fq.observer.seen.sum()) == 0


# --- saved states -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["minmax", "histogram", "per_channel", "amax_history"])
def test_a_state_saved_before_the_masked_slot_still_loads(kind):
    obs = create_observer(kind, **_kwargs(kind))
    obs(torch.randn(5, 8))
    old = obs.state_dict()
    old["seen"] = old["seen"][: Seen.MASKED].clone()  # what _version 2 saved
    fresh = create_observer(kind, **_kwargs(kind))
    fresh.load_state_dict(old)
    assert fresh.seen.shape == (Seen.SIZE,) and fresh.masked_count == 0
    assert torch.equal(fresh.seen[: Seen.MASKED], obs.seen[: Seen.MASKED])
    assert torch.equal(fresh.running_max, obs.running_max)


def test_merge_keeps_the_masked_counts():
    g = torch.Generator().manual_seed(11)
    batches = _padded_batches(g)
    parts = []
    for share in (batches[:1], batches[1:]):
        obs = mq.HistogramObserver(bins=64)
        for x, mask in share:
            obs(x, mask)
        parts.append(obs)
    whole = mq.HistogramObserver(bins=64)
    for x, mask in batches:
        whole(x, mask)
    merged = merge_observers(parts)
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), whole.state_dict().values()))
    again = merge_state_dicts(mq.HistogramObserver(bins=64), [p.state_dict() for p in parts])
    assert torch.equal(again.seen, whole.seen) and again.masked_count == whole.masked_count > 0


# --- kernels under the interpreter against the torch twin -------------------------------------------------

INTERP = [
    ("minmax", {}),
    ("moving_average", {"averaging_constant": 0.5}),
    ("histogram", {"bins": 64}),
    ("per_channel", {"ch_axis": -1}),
    ("per_channel", {"ch_axis": 1}),
    ("moving_average_per_channel", {"ch_axis": -1, "averaging_constant": 0.5}),
    ("amax_history", {}),
    ("per_block", {"block_size": (1, 32)}),
]


def _odd_batches(g, dtype, shape):
    out = []
    for i in range(2):
        x = (torch.randn(*shape, generator=g) * (1 + 10 * i)).to(dtype)
        x.view(-1)[::29] = float("nan")
        x.view(-1)[5::31] = float("inf")
        x.view(-1)[7::37] = float("-inf")
        mask = torch.rand(shape[:2], generator=g) > 0.4
        out.append((x, mask))
    return out


@pytest.mark.interpreter
@pytest.mark.parametrize("kind, kwargs", INTERP)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 33), (1, 7, 16), (2, 129, 48)])
def test_kernels_equal_the_torch_twin_under_masks(kind, kwargs, dtype, shape):
    pytest.importorskip("triton")
    if kind == "per_block" and shape[-1] % 32:
        shape = (*shape[:-1], 64)
    g = torch.Generator().manual_seed(13)
    tri = create_observer(kind, backend="triton", **kwargs)
    ref = create_observer(kind, backend="torch", **kwargs)
    for x, mask in _odd_batches(g, dtype, shape):
        tri(x, mask)
        ref(x, mask)
    for key, value in ref.state_dict().items():
        assert torch.equal(tri.state_dict()[key], value), key
    assert ref.masked_count > 0


@pytest.mark.interpreter
@pytest.mark.parametrize("strategy", ["histc", "atomic", "tl_histogram", "smem_rows", "smem_atomic"])
def test_histogram_binnings_read_the_mask(strategy):
    pytest.importorskip("triton")
    from mono_quant.kernels import histogram as khist

    from mono_quant import reference
    from mono_quant.state import HistogramState

    g = torch.Generator().manual_seed(17)
    got, want = HistogramState.empty(34), HistogramState.empty(34)
    for x, mask in _odd_batches(g, torch.float32, (4, 37, 9)):
        khist.histogram_update_(x, got, strategy, mask=mask)
        reference.histogram_update_(x, want, mask=mask)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)


@pytest.mark.interpreter
@pytest.mark.parametrize("kind, kwargs", INTERP)
@pytest.mark.parametrize("depth", [0, 1, 3])
def test_kernels_read_masks_of_any_depth(kind, kwargs, depth):
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(19)
    shape = (3, 6, 64)
    x = torch.randn(*shape, generator=g)
    x.view(-1)[::23] = float("nan")
    mask = torch.rand(shape[:depth], generator=g) > 0.5 if depth else torch.tensor(True)
    tri = create_observer(kind, backend="triton", **kwargs)
    ref = create_observer(kind, backend="torch", **kwargs)
    tri(x, mask)
    ref(x, mask)
    for key, value in ref.state_dict().items():
        assert torch.equal(tri.state_dict()[key], value), key
