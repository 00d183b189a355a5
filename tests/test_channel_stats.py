"""``ChannelStatsObserver`` (per-channel absmax, mean |x|, mean x^2) and ``smoothing_factors``, against a
float64 reference written out below."""

import pytest
import torch
from spawn_ranks import run_ranks
from torch import nn

import mono_quant as mq
from mono_quant.core.base import StateError
from mono_quant.rows import FILTER_CHUNK


def reference_stats(batches, ch_axis):
    """float64 oracle: per channel ``(absmax, sum |x|, sum x^2, finite count)`` over the float32 values."""
    cols = [b.float().double().movedim(ch_axis % b.dim(), -1).reshape(-1, b.shape[ch_axis]) for b in batches]
    v = torch.cat(cols)
    finite = torch.isfinite(v)
    z = torch.where(finite, v, 0.0)
    absmax = torch.where(finite, v.abs(), -float("inf")).amax(dim=0)
    return absmax, z.abs().sum(0), (z * z).sum(0), finite.sum(0)


def _data(shape, dtype, nonfinite=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    if nonfinite and x.numel() > 3:
        flat = x.view(-1)
        flat[0], flat[x.numel() // 2], flat[-1] = float("nan"), float("inf"), -float("inf")
    return x.to(dtype)


@pytest.mark.parametrize(
    "shape, ch_axis",
    [((1, 1), -1), ((3, 7, 5), -1), ((2, 3, 4, 5), 1), ((9, 6), 0), ((1025,), 0)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_against_float64_reference(shape, ch_axis, dtype):
    batches = [_data(shape, dtype, seed=s) for s in range(3)]
    obs = mq.ChannelStatsObserver(ch_axis=ch_axis)
    for b in batches:
        assert obs(b) is b
    absmax, abs_sum, sq_sum, count = reference_stats(batches, ch_axis)
    assert torch.equal(obs.count, count)
    assert torch.equal(obs.absmax.double(), absmax)
    torch.testing.assert_close(obs.abs_sum, abs_sum, rtol=1e-12, atol=0)
    torch.testing.assert_close(obs.sq_sum, sq_sum, rtol=1e-12, atol=0)
    torch.testing.assert_close(obs.mean_abs, abs_sum / count, rtol=1e-12, atol=0, equal_nan=True)
    torch.testing.assert_close(obs.mean_square, sq_sum / count, rtol=1e-12, atol=0, equal_nan=True)
    assert int(obs.seen[0]) == int(count.sum()) and obs.nonfinite_count == sum(
        int((~torch.isfinite(b.float())).sum()) for b in batches
    )


@pytest.mark.parametrize("ch_axis", [0, -1])
def test_tensors_larger_than_a_piece(ch_axis):
    x = _data((FILTER_CHUNK // 1000 + 7, 1000), torch.float32)
    obs = mq.ChannelStatsObserver(ch_axis=ch_axis)
    obs(x)
    absmax, abs_sum, sq_sum, count = reference_stats([x], ch_axis)
    assert torch.equal(obs.count, count) and torch.equal(obs.absmax.double(), absmax)
    torch.testing.assert_close(obs.sq_sum, sq_sum, rtol=1e-12, atol=0)


@pytest.mark.interpreter
def test_triton_backend_gives_the_same_state():
    pytest.importorskip("triton")
    batches = [_data((4, 33), torch.float32, seed=s) for s in range(2)]
    a, b = mq.ChannelStatsObserver(backend="torch"), mq.ChannelStatsObserver(backend="triton")
    for x in batches:
        a(x)
        b(x)
    for name, buf in a.named_buffers():
        assert torch.equal(buf, getattr(b, name)), name


def test_merge_of_halves_is_the_whole():
    x = _data((8, 5, 12), torch.float32)
    whole, first, second = (mq.ChannelStatsObserver() for _ in range(3))
    for part, obs in ((x[:3], first), (x[3:], second)):
        whole(part)
        obs(part)
    merged = mq.merge_observers([first, second])
    for name in ("running_min", "running_max", "seen", "count"):
        assert torch.equal(getattr(merged, name), getattr(whole, name)), name
    torch.testing.assert_close(merged.abs_sum, whole.abs_sum, rtol=1e-13, atol=0)
    torch.testing.assert_close(merged.sq_sum, whole.sq_sum, rtol=1e-13, atol=0)


def test_state_round_trip_and_checks():
    obs = mq.ChannelStatsObserver()
    obs(_data((6, 10), torch.float32))
    fresh = mq.ChannelStatsObserver()
    fresh.load_state_dict(obs.state_dict())
    for name, buf in obs.named_buffers():
        assert torch.equal(getattr(fresh, name), buf), name
    bad = obs.state_dict()
    bad["count"] = bad["count"].clone()
    bad["count"][0] += 1
    with pytest.raises(StateError, match="count: sums to"):
        mq.ChannelStatsObserver().load_state_dict(bad)
    bad = obs.state_dict()
    bad["sq_sum"] = -bad["sq_sum"]
    with pytest.raises(StateError, match="sq_sum: must be finite and >= 0"):
        mq.ChannelStatsObserver().load_state_dict(bad)


def test_channels_reset_and_empty_input():
    obs = mq.ChannelStatsObserver()
    obs(torch.empty(0, 4))
    assert obs.absmax is None and obs.count.numel() == 0
    obs(torch.ones(2, 4))
    with pytest.raises(ValueError, match="has 4 channels along ch_axis=-1, got a tensor of shape \\(2, 5\\)"):
        obs(torch.ones(2, 5))
    assert torch.equal(obs.count, torch.full((4,), 2))  # the refused batch changed nothing
    obs.reset()
    assert obs.count.numel() == 0 and obs.absmax is None
    sized = mq.ChannelStatsObserver(num_channels=3)
    assert sized.abs_sum.shape == (3,)
    sized.reset()
    assert sized.abs_sum.shape == (3,)
    assert mq.create_observer("channel_stats", ch_axis=1).ch_axis == 1


def test_run_calibration_on_a_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    batches = [torch.randn(3, 8) for _ in range(4)]
    result = mq.run_calibration(model, batches, "channel_stats")
    assert result["0"].count.shape == (8,) and result["2"].count.shape == (16,)
    absmax, *_ = reference_stats(batches, -1)
    assert torch.equal(result["0"].absmax.double(), absmax)
    assert bool((result["2"].absmax >= 0).all())  # ReLU outputs
    # its qparams are those of the per-channel range, as PerChannelMinMaxObserver's
    same = mq.PerChannelMinMaxObserver(ch_axis=-1)
    for b in batches:
        same(b)
    for got, want in zip(result["0"].calculate_qparams(), same.calculate_qparams(), strict=True):
        assert torch.equal(got, want)


# --- SmoothQuant -------------------------------------------------------------------------------------------


def reference_smoothquant(act_absmax, weights, alpha, floor=1e-5):
    w = torch.stack([w.double().abs().amax(dim=0) for w in weights]).amax(dim=0).clamp(min=floor)
    return (act_absmax.double().pow(alpha) / w.pow(1 - alpha)).clamp(min=floor)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.85, 1.0])
def test_smoothing_factors(alpha):
    torch.manual_seed(0)
    q, k, v = (nn.Linear(12, 12) for _ in range(3))
    obs = mq.ChannelStatsObserver()
    x = torch.randn(10, 12) * torch.linspace(0.1, 30, 12)
    obs(x)
    s = mq.smoothing_factors(obs, [q, k, v], alpha=alpha)
    want = reference_smoothquant(obs.absmax, [q.weight, k.weight, v.weight], alpha)
    assert s.dtype == torch.float32 and s.shape == (12,)
    torch.testing.assert_close(s.double(), want, rtol=1e-7, atol=0)
    from_absmax = mq.smoothing_factors(obs.absmax, q.weight, alpha)
    assert torch.equal(from_absmax, mq.smoothing_factors(obs, q, alpha))
    # the product is unchanged: (x / s) (W * s)^T == x W^T
    torch.testing.assert_close((x / s) @ (q.weight * s).T, x @ q.weight.T, rtol=1e-4, atol=1e-4)


def test_smoothquant_bad_input():
    obs = mq.ChannelStatsObserver()
    with pytest.raises(RuntimeError, match="observed no data"):
        mq.smoothing_factors(obs, nn.Linear(4, 4))
    obs(torch.ones(2, 4))
    with pytest.raises(ValueError, match="alpha=1.5 must be a number in \\[0, 1\\]"):
        mq.smoothing_factors(obs, nn.Linear(4, 4), alpha=1.5)
    with pytest.raises(ValueError, match="4 channels but the weights read 5"):
        mq.smoothing_factors(obs, nn.Linear(5, 4))
    with pytest.raises(ValueError, match="different sizes"):
        mq.smoothing_factors(obs, [nn.Linear(4, 4), nn.Linear(5, 4)])
    with pytest.raises(ValueError, match="must be 2-D"):
        mq.smoothing_factors(obs, torch.ones(4))
    zero = mq.ChannelStatsObserver()
    zero(torch.zeros(3, 4))
    assert torch.equal(mq.smoothing_factors(zero, nn.Linear(4, 4)), torch.full((4,), 1e-5))


# --- across ranks (gloo, CPU) ------------------------------------------------------------------------------


def _rank_shares(world: int) -> list[list[torch.Tensor]]:
    """Rank ``r``'s batches; the last rank of a world of 3 sees none."""
    batches = [_data((4, 6), torch.float32, seed=s) * (10.0**s) for s in range(4)]
    return {2: [batches[:1], batches[1:]], 3: [batches[1:3], [batches[0], batches[3]], []]}[world]


def _sync_rank(rank: int, world: int, sized: bool = True) -> dict:
    obs = mq.ChannelStatsObserver(num_channels=6 if sized else None)
    for b in _rank_shares(world)[rank]:
        obs(b)
    mq.sync_observers({"x": obs})
    return {k: v.clone() for k, v in obs.state_dict().items() if k != "_extra_state"}


def _sync_rank_unsized(rank: int, world: int) -> dict:
    return _sync_rank(rank, world, sized=False)  # the rank without data holds (0,) buffers


@pytest.mark.parametrize("world, sized", [(2, True), (3, True), (3, False)])
def test_sync_across_ranks_is_the_single_process_state(world, sized, tmp_path):
    ranks = run_ranks(world, _sync_rank if sized else _sync_rank_unsized, tmp_path, __name__)
    whole = mq.ChannelStatsObserver(num_channels=6)
    for share in _rank_shares(world):
        for b in share:
            whole(b)
    for rank, got in enumerate(ranks):
        for name in ("running_min", "running_max", "seen", "count"):
            assert torch.equal(got[name], getattr(whole, name)), (rank, name)
        for name in ("abs_sum", "sq_sum"):
            assert got[name].dtype == torch.float64
            torch.testing.assert_close(got[name], getattr(whole, name), rtol=1e-13, atol=0)


def test_an_empty_unsized_observer_merges_offline():
    a, empty = mq.ChannelStatsObserver(), mq.ChannelStatsObserver()
    a(_data((5, 6), torch.float32))
    want = {k: v.clone() for k, v in a.state_dict().items() if k != "_extra_state"}
    merged = mq.merge_observers([empty, a])
    for name, value in want.items():
        assert torch.equal(merged.state_dict()[name], value), name
    assert merged.abs_sum.dtype == torch.float64 and merged.count.dtype == torch.int64


# --- token masks -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_batch_gives_the_state_of_the_tokens_alone(dtype):
    x = _data((3, 7, 10), dtype)  # [batch, seq, hidden], NaN / Inf among the tokens
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:], mask[2, 1:] = False, False
    padded, alone = mq.ChannelStatsObserver(), mq.ChannelStatsObserver()
    padded(x, mask=mask)
    alone(x[mask])  # [tokens, hidden]
    for name, buf in alone.named_buffers():
        if name != "seen":
            assert torch.equal(getattr(padded, name), buf), name
    assert torch.equal(padded.seen[:3], alone.seen[:3])
    assert padded.masked_count == int((~mask).sum()) * 10
    with pytest.raises(ValueError, match="mask"):
        padded(x, mask=torch.ones(3, 6, dtype=torch.bool))


def test_mask_over_the_channel_axis_of_a_conv_input():
    x = _data((2, 3, 5), torch.float32, nonfinite=False)  # (N, C, L), ch_axis=1
    mask = torch.tensor([True, False])
    obs = mq.ChannelStatsObserver(ch_axis=1)
    obs(x, mask=mask)
    absmax, abs_sum, sq_sum, count = reference_stats([x[:1]], 1)
    assert torch.equal(obs.count, count) and torch.equal(obs.absmax.double(), absmax)
    torch.testing.assert_close(obs.sq_sum, sq_sum, rtol=1e-12, atol=0)


# --- segments (MoE experts) --------------------------------------------------------------------------------

E = 4


def _routed(topk: int, seed: int = 0):
    """Two batches of ``[N, 10]`` rows with NaN / Inf, a token mask and top-k routing over experts 0-2 (a
    row may list one expert twice); expert 3 never gets a row."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, scale in ((13, 1.0), (19, 30.0)):
        x = torch.randn(n, 10, generator=g) * scale
        x[1, 2], x[2, 0], x[4, 9] = float("nan"), float("inf"), -float("inf")
        idx = torch.randint(0, 3, (n, topk), generator=g)
        idx[0, :] = 1
        mask = torch.rand(n, generator=g) > 0.3
        out.append((x, idx if topk > 1 else idx[:, 0], mask))
    return out


def _plain_per_expert(batches):
    plain = [mq.ChannelStatsObserver() for _ in range(E)]
    tokens = [0] * E
    for x, idx, mask in batches:
        routed = idx.reshape(len(x), -1)
        for e in range(E):
            rows = torch.nonzero((routed == e).any(1)).flatten()
            if rows.numel():
                plain[e](x[rows], mask=mask[rows])
                tokens[e] += int(mask[rows].sum())
    return plain, tokens


def _assert_segments_equal(obs, plain, tokens):
    assert obs.num_segments == E and obs.tokens_seen.tolist() == tokens
    for e in range(E):
        got, want = obs.segment(e), plain[e]
        if tokens[e] == 0:
            assert int(got.seen.sum()) == 0 and int(got.count.sum()) == 0
            continue
        for name in ("running_min", "running_max", "count"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (e, name)
        assert torch.equal(got.seen[:3], want.seen[:3]), e
        for name in ("abs_sum", "sq_sum"):
            assert getattr(got, name).dtype == torch.float64
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-13, atol=0)


@pytest.mark.parametrize("topk", [1, 2])
def test_segments_hold_the_state_of_their_rows(topk):
    batches = _routed(topk)
    obs = mq.ChannelStatsObserver()
    for x, idx, mask in batches:
        assert obs(x, mask=mask, segments=idx, num_segments=E) is x
    assert obs.abs_sum.shape == obs.count.shape == obs.running_min.shape == (E, 10)
    assert obs.seen.shape == (E, 4)
    plain, tokens = _plain_per_expert(batches)
    assert tokens[3] == 0 and obs.tokens_seen[3] == 0  # the expert without rows
    _assert_segments_equal(obs, plain, tokens)
    obs.check_state()
    with pytest.raises(RuntimeError, match=r"segments 3\b"):
        obs.calculate_qparams()


def test_merge_of_segmented_observers_is_one_fed_both():
    first_batch, second_batch = _routed(2)
    whole, first, second = (mq.ChannelStatsObserver() for _ in range(3))
    for (x, idx, mask), obs in ((first_batch, first), (second_batch, second)):
        whole(x, mask=mask, segments=idx, num_segments=E)
        obs(x, mask=mask, segments=idx, num_segments=E)
    merged = mq.merge_observers([first, second])
    assert merged.num_segments == E
    for name in ("running_min", "running_max", "seen", "count", "tokens_seen", "invalid_segments"):
        assert torch.equal(getattr(merged, name), getattr(whole, name)), name
    for name in ("abs_sum", "sq_sum"):
        torch.testing.assert_close(getattr(merged, name), getattr(whole, name), rtol=1e-13, atol=0)
    plain, tokens = _plain_per_expert([first_batch, second_batch])
    _assert_segments_equal(merged, plain, tokens)


def test_segmented_state_round_trip_and_checks():
    obs = mq.ChannelStatsObserver()
    for x, idx, mask in _routed(2):
        obs(x, mask=mask, segments=idx, num_segments=E)
    fresh = mq.ChannelStatsObserver()
    fresh.load_state_dict(obs.state_dict())
    assert fresh.num_segments == E
    for name, buf in obs.named_buffers():
        assert torch.equal(getattr(fresh, name), buf), name
    plain = mq.ChannelStatsObserver()  # a segmented observer loads a plain state back
    plain(torch.ones(3, 10))
    fresh.load_state_dict(plain.state_dict())
    assert fresh.num_segments is None and torch.equal(fresh.count, plain.count)
    bad = obs.state_dict()
    bad["count"] = bad["count"].clone()
    bad["count"][1, 0] += 1
    with pytest.raises(StateError, match="count: sums to"):
        mq.ChannelStatsObserver().load_state_dict(bad)
    obs.reset()
    assert obs.num_segments is None and obs.abs_sum.shape == (0,)


def test_segmented_calls_that_are_refused():
    x, idx, mask = _routed(2)[0]
    obs = mq.ChannelStatsObserver()
    obs(x, mask=mask, segments=idx, num_segments=E)
    before = {n: b.clone() for n, b in obs.named_buffers()}
    with pytest.raises(ValueError, match="num_segments=5 but this ChannelStatsObserver observes 4"):
        obs(x, segments=idx, num_segments=5)
    with pytest.raises(ValueError, match="is segmented"):
        obs(x)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        obs(x, segments=torch.full_like(idx, 4), num_segments=E)
    for name, buf in obs.named_buffers():
        assert torch.equal(buf, before[name]), name
    unsegmented = mq.ChannelStatsObserver()
    unsegmented(x)
    with pytest.raises(ValueError, match="observed tensors without segments"):
        unsegmented(x, segments=idx, num_segments=E)
