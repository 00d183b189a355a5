"""Segmented ``ChannelStatsObserver`` (MoE experts): the sync-free update against the CPU's loop.

On the CPU ``channel_ops.channel_stats_segments_update_`` runs the plain update per segment on its gathered
rows; elsewhere (CUDA) it is sync-free: the min/max and counts of ``ops.minmax_segments_update_`` and
per-row float64 sums folded into the segments with ``index_add_``. The sync-free path runs here on CPU
tensors with ``_may_branch`` saying False where ``channel_ops`` and ``reference_segments`` look it up.
Counts, min/max, ``seen`` and ``tokens_seen`` must be equal exactly, the float64 sums (added in another
order) to within float64 rounding (``rtol=1e-12``); the oracle of the sums is ``math.fsum`` per segment and
channel.
"""

import math

import pytest
import torch

import mono_quant as mq
from mono_quant import channel_ops, reference_segments
from mono_quant.rows import keep_view
from mono_quant.state import RangeState, Seen

E = 6  # the routing picks experts 0-3, expert 4 only in the second batch: expert 5 never gets a row
SUMS = ("abs_sum", "sq_sum")
SHAPES = [((15, 3, 5), -1), ((15, 3, 5), 1), ((37, 24), -1)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _sync_free(m: pytest.MonkeyPatch) -> None:
    """The CUDA path on CPU tensors; gathering a segment's rows (the CPU loop) is then an error."""

    def gather(*args):
        raise AssertionError("the sync-free path gathered the rows of a segment")

    for module in (channel_ops, reference_segments):
        m.setattr(module, "_may_branch", lambda t: False)
        m.setattr(module, "each_segment_rows", gather)


def _batches(shape, dtype=torch.float32, topk=2, with_mask=True, seed=0):
    """Two batches of ``shape`` with NaN / +-Inf, top-k routing (under top-2 row 0 lists expert 1 twice) and
    a token mask of all dims but the last (``[N]`` for ``[N, C]``) with rows 2 and 5 wholly masked (or
    ``None``)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(2):
        x = torch.randn(*shape, generator=g, dtype=torch.float64) * (1 + 20 * step)  # float64 bits too
        x.view(-1)[::13] = float("nan")
        x.view(-1)[5::17] = float("inf")
        x.view(-1)[9::19] = float("-inf")
        idx = torch.randint(0, 4, (shape[0], topk), generator=g)
        idx[0] = 1
        if step:
            idx[6:10, -1] = 4
        mask = None
        if with_mask:
            mask = torch.rand(shape[:-1], generator=g) > 0.3
            mask[2], mask[5] = False, False
        out.append((x.to(dtype), idx if topk > 1 else idx[:, 0], mask))
    return out


def _observe(batches, ch_axis, **kwargs) -> mq.ChannelStatsObserver:
    obs = mq.ChannelStatsObserver(ch_axis=ch_axis, **kwargs)
    for x, idx, mask in batches:
        assert obs(x, mask, segments=idx, num_segments=E) is x
    return obs


def _assert_same_state(got, want) -> None:
    """Every buffer equal; the float64 sums to within float64 rounding."""
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys()
    for key, value in b.items():
        if key in SUMS:
            torch.testing.assert_close(a[key], value, rtol=1e-12, atol=0, msg=key)
        elif isinstance(value, torch.Tensor):
            assert a[key].dtype == value.dtype and torch.equal(a[key], value), key


def _assert_covered(obs) -> None:
    """The batches reach what the comparison is about: non-finite values, an expert that gets rows late
    and one that gets none."""
    assert int(obs.tokens_seen[5]) == 0 and int(obs.tokens_seen[4]) > 0
    assert int(obs.seen[:, Seen.NONFINITE].sum()) > 0 and int(obs.count[5].sum()) == 0
    assert bool((obs.abs_sum[:5] > 0).any(1).all())


@pytest.mark.parametrize("shape, ch_axis", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("topk", [1, 2])
@pytest.mark.parametrize("with_mask", [False, True])
def test_the_sync_free_path_equals_the_cpu_loop(shape, ch_axis, dtype, topk, with_mask, monkeypatch):
    batches = _batches(shape, dtype, topk, with_mask)
    loop = _observe(batches, ch_axis)
    _assert_covered(loop)
    if with_mask:
        assert int(loop.seen[:, Seen.MASKED].sum()) > 0
    _sync_free(monkeypatch)
    _assert_same_state(_observe(batches, ch_axis), loop)


@pytest.mark.parametrize("chunk", [1, 16, 40])
def test_pieces_of_rows_sum_as_one(chunk, monkeypatch):
    """Pieces of one row (a row larger than the piece), of one and of a few rows give the same state."""
    batches = _batches((15, 3, 5))
    loop = _observe(batches, 1)
    _sync_free(monkeypatch)
    monkeypatch.setattr(channel_ops, "FILTER_CHUNK", chunk)
    _assert_same_state(_observe(batches, 1), loop)


@pytest.mark.parametrize("mask", ["true", "false", "every value"])
def test_masks_of_no_dims_and_of_every_dim(mask, monkeypatch):
    (x, idx, _), batch = _batches((15, 3, 5))
    m = {"true": torch.tensor(True), "false": torch.tensor(False)}.get(mask, torch.rand(15, 3, 5) > 0.5)
    loop = _observe([(x, idx, m)], 1)
    masked, kept = int(loop.seen[:, Seen.MASKED].sum()), int(loop.count.sum())
    assert (masked == 0) == (mask == "true") and (kept == 0) == (mask == "false")
    assert loop(batch[0], batch[2], segments=batch[1], num_segments=E) is batch[0]
    _sync_free(monkeypatch)
    _assert_same_state(_observe([(x, idx, m), batch], 1), loop)


def test_one_row_listing_its_expert_twice_counts_once(monkeypatch):
    x = torch.tensor([[1.5, -2.0, float("nan")]])
    _sync_free(monkeypatch)
    obs = _observe([(x, torch.tensor([[2, 2]]), None)], -1)
    assert obs.count[2].tolist() == [1, 1, 0] and obs.tokens_seen.tolist() == [0, 0, 1, 0, 0, 0]
    assert obs.abs_sum[2].tolist() == [1.5, 2.0, 0.0] and obs.sq_sum[2].tolist() == [2.25, 4.0, 0.0]
    assert obs.seen[2].tolist() == [2, 1, 1, 0] and int(obs.seen.sum()) == 4


def _fsum_oracle(batches, ch_axis, channels):
    """Per expert and channel, ``math.fsum`` of ``|x|`` and ``x**2`` (float32 values, in float64) over the
    finite kept values of the rows routed to it (a row listing it twice counts once), and their count."""
    abs_sum = torch.zeros(E, channels, dtype=torch.float64)
    sq_sum, count = torch.zeros_like(abs_sum), torch.zeros(E, channels, dtype=torch.int64)
    terms = [[([], []) for _ in range(channels)] for _ in range(E)]
    for x, idx, mask in batches:
        v = x.float().double()
        keep = torch.ones(x.shape, dtype=torch.bool) if mask is None else keep_view(x, mask)
        for i, listed in enumerate(idx.reshape(len(x), -1).tolist()):
            row, kept = v[i].movedim(ch_axis - 1, -1), keep[i].movedim(ch_axis - 1, -1)
            for e in set(listed):
                for c in range(channels):
                    vals = row[..., c][kept[..., c] & torch.isfinite(row[..., c])].tolist()
                    terms[e][c][0].extend(abs(t) for t in vals)
                    terms[e][c][1].extend(t * t for t in vals)
    for e in range(E):
        for c in range(channels):
            a, s = terms[e][c]
            abs_sum[e, c], sq_sum[e, c], count[e, c] = math.fsum(a), math.fsum(s), len(a)
    return abs_sum, sq_sum, count


@pytest.mark.parametrize("shape, ch_axis", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sync_free", [False, True])
def test_sums_equal_a_float64_oracle(shape, ch_axis, dtype, sync_free, monkeypatch):
    batches = _batches(shape, dtype, seed=3)
    if sync_free:
        _sync_free(monkeypatch)
    obs = _observe(batches, ch_axis)
    abs_sum, sq_sum, count = _fsum_oracle(batches, ch_axis % len(shape), shape[ch_axis])
    assert torch.equal(obs.count, count) and int(count[:5].sum()) > 0
    torch.testing.assert_close(obs.abs_sum, abs_sum, rtol=1e-12, atol=0)
    torch.testing.assert_close(obs.sq_sum, sq_sum, rtol=1e-12, atol=0)
    assert torch.equal(obs.count.sum(1), obs.seen[:, Seen.FINITE])


def _buffers(channels):
    """Blank segmented buffers: the ``RangeState`` and ``abs_sum, sq_sum, count, tokens_seen, invalid``."""
    state = RangeState.empty((channels,), segments=(E,))
    sums = torch.zeros(E, channels, dtype=torch.float64)
    return state, (sums, sums.clone(), torch.zeros(E, channels, dtype=torch.int64),
                   torch.zeros(E, dtype=torch.int64), torch.zeros((), dtype=torch.int64))  # fmt: skip


def test_outside_entries_are_dropped_and_counted_on_the_sync_free_path(monkeypatch):
    """An entry outside ``[0, E)`` is dropped like a repeat of the row's other entry, and counted."""
    (x, _, mask), _ = _batches((37, 24))
    idx = torch.randint(0, 4, (37, 2))
    idx[3, 1], idx[8, 0], idx[20, 1] = -1, E, 100
    same = idx.clone()
    same[3, 1], same[8, 0], same[20, 1] = idx[3, 0], idx[8, 1], idx[20, 0]
    want_state, want = _buffers(24)
    channel_ops.channel_stats_segments_update_(x, -1, same, want_state, *want, mask=mask)
    _sync_free(monkeypatch)
    got_state, got = _buffers(24)
    channel_ops.channel_stats_segments_update_(x, -1, idx, got_state, *got, mask=mask)
    for a, b in zip((*got_state, *got[2:4]), (*want_state, *want[2:4]), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(got[:2], want[:2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert int(got[4]) == 3 and int(want[4]) == 0 and int(got[3].sum()) > 0


def test_outside_entries_are_refused_on_the_cpu_before_any_change():
    batches = _batches((37, 24))
    obs = _observe(batches[:1], -1)
    x, idx, mask = batches[1]
    idx = idx.clone()
    idx[7, 1] = E
    before = {k: v.clone() for k, v in obs.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=r"segments\[7, 1\]"):
        obs(x, mask, segments=idx, num_segments=E)
    state, bufs = obs.range_state(), (obs.abs_sum, obs.sq_sum, obs.count, obs.tokens_seen,
                                       obs.invalid_segments)  # fmt: skip
    with pytest.raises(ValueError, match=r"segments\[7, 1\]"):  # the update's own check, under the observer's
        channel_ops.channel_stats_segments_update_(x, -1, idx, state, *bufs, mask=mask)
    after = obs.state_dict()
    assert before.keys() <= after.keys() and int(before["seen"].sum()) > 0
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.mark.interpreter
@pytest.mark.parametrize("shape, ch_axis", SHAPES)
def test_the_sync_free_path_with_the_kernel_equals_the_cpu_loop(shape, ch_axis, monkeypatch):
    """The min/max of the sync-free path from the segments kernel (Triton's interpreter)."""
    pytest.importorskip("triton")
    batches = _batches(shape, torch.bfloat16, seed=5)
    loop = _observe(batches, ch_axis, backend="torch")
    monkeypatch.setattr(channel_ops, "_may_branch", lambda t: False)
    _assert_same_state(_observe(batches, ch_axis, backend="triton"), loop)
    _assert_covered(loop)


@pytest.mark.gpu
def test_a_segmented_call_is_sync_free_and_matches_the_twin_on_cuda():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(4096, 256, generator=g).to(torch.bfloat16)
    x[::97, 3] = float("nan")
    idx = torch.randint(0, 8, (4096, 2), generator=g)
    idx[::5, 1] = idx[::5, 0]  # a row listing its expert twice
    mask = torch.rand(4096, generator=g) > 0.1
    obs = mq.ChannelStatsObserver().cuda()
    ref = mq.ChannelStatsObserver(backend="torch").cuda()
    cpu = mq.ChannelStatsObserver()
    args = {"x": x.cuda(), "mask": mask.cuda(), "segments": idx.cuda(), "num_segments": 8}  # before the mode
    obs(**args)  # the first call sizes the buffers and the kernel's scratch
    torch.cuda.set_sync_debug_mode("error")
    try:
        obs(**args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for _ in range(2):
        ref(**args)
        cpu(x, mask, segments=idx, num_segments=8)
    _assert_same_state(obs.cpu(), ref.cpu())
    _assert_same_state(obs, cpu)
    assert int(obs.seen[:, Seen.NONFINITE].sum()) > 0
