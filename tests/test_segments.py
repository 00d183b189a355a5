"""Segmented observation (MoE experts): ``obs(x, segments=idx, num_segments=E)``.

The oracle: per segment ``e``, a plain observer of the same kind fed the rows routed to ``e``
(``x[rows]`` under ``mask[rows]``) in the same batches; the segmented observer's segment ``e`` must hold
exactly its state.
"""

import pytest
import torch

from mono_quant.core.registry import create_observer
from mono_quant.distributed import merge_observers, merge_state_dicts
from mono_quant.state import Seen

E = 5
KINDS = {
    "minmax": {},
    "moving_average": {"averaging_constant": 0.3},
    "histogram": {"bins": 32},
    "kl": {"bins": 32},
    "mse": {"bins": 32},
    "percentile": {"bins": 32},
    "per_channel": {"ch_axis": -1},
    "moving_average_per_channel": {"ch_axis": -1, "averaging_constant": 0.3},
    "channel_stats": {},
}
REFUSED = {"amax_history": {}, "per_block": {}}


def _routed_batches(g, dtype=torch.float32, topk=2, hidden=12, with_mask=True):
    """Three batches of ``[N, hidden]`` rows, top-k routing (a repeated expert in a row counts once), a
    token mask, NaN / Inf among the rows; expert 3 never gets a row, expert 4 only in the last batch."""
    out = []
    for n, scale in ((17, 1.0), (9, 20.0), (23, 0.05)):
        x = (torch.randn(n, hidden, generator=g) * scale).to(dtype)
        x[1, 2], x[2, 0] = float("nan"), float("-inf")
        idx = torch.randint(0, 3, (n, topk), generator=g)
        idx[0, :] = 1  # listed twice
        if n == 23:
            idx[5:9, 0] = 4
        mask = (torch.rand(n, generator=g) > 0.25) if with_mask else None
        out.append((x, idx if topk > 1 else idx[:, 0], mask))
    return out


def _oracle(kind, batches):
    plain = [create_observer(kind, **KINDS[kind]) for _ in range(E)]
    tokens = [0] * E
    for x, idx, mask in batches:
        routed = idx.reshape(len(x), -1)
        for e in range(E):
            rows = torch.nonzero((routed == e).any(1)).flatten()
            if rows.numel() == 0:
                continue
            plain[e](x[rows], None if mask is None else mask[rows])
            tokens[e] += int(rows.numel() if mask is None else mask[rows].sum())
    return plain, tokens


def _assert_segment_equals(obs, e: int, want) -> None:
    got = obs.segment(e)
    for name in obs.SEGMENT_FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        if b.numel() == 0:  # a per-channel observer that never saw a row has not sized its channels
            fill = {"running_min": float("inf"), "running_max": float("-inf")}.get(name, 0)
            assert bool((a == fill).all()), name
        else:
            assert a.shape == b.shape and torch.equal(a, b), (e, name, a, b)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("topk, with_mask", [(1, False), (2, True), (3, True)])
def test_every_segment_equals_a_plain_observer_of_its_rows(kind, topk, with_mask):
    g = torch.Generator().manual_seed(1)
    batches = _routed_batches(g, topk=topk, with_mask=with_mask)
    obs = create_observer(kind, **KINDS[kind])
    for x, idx, mask in batches:
        assert obs(x, mask, segments=idx, num_segments=E) is x
    plain, tokens = _oracle(kind, batches)
    assert obs.num_segments == E and obs.tokens_seen.tolist() == tokens
    assert obs.tokens_seen[3] == 0 and obs.invalid_segment_count == 0
    for e in range(E):
        _assert_segment_equals(obs, e, plain[e])
    assert obs.nonfinite_count == sum(p.nonfinite_count for p in plain)
    assert obs.masked_count == sum(p.masked_count for p in plain)
    with pytest.raises(RuntimeError, match=r"segments 3\b"):  # expert 3 saw nothing
        obs.calculate_qparams()


@pytest.mark.parametrize("kind", ["minmax", "histogram", "per_channel"])
def test_qparams_are_stacked_per_segment(kind):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 6, generator=g)
    idx = torch.arange(40) % 4
    obs = create_observer(kind, **KINDS[kind])
    obs(x, segments=idx, num_segments=4)
    scale, zp = obs.calculate_qparams()
    assert scale.shape == ((4,) if kind != "per_channel" else (4, 6))
    for e in range(4):
        want = create_observer(kind, **KINDS[kind])
        want(x[idx == e])
        ws, wz = want.calculate_qparams()
        assert torch.equal(scale[e], ws) and torch.equal(zp[e], wz)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", ["minmax", "per_channel", "histogram"])
def test_half_precision_and_3d_rows(dtype, kind):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 3, 5, generator=g).to(dtype)  # rows of [3, 5]
    x[0, 1, 1] = float("nan")
    idx = torch.tensor([0, 1, 1, 2, 0, 2, 1])
    mask = torch.rand(7, 3, generator=g) > 0.3  # a mask deeper than the rows
    obs = create_observer(kind, **KINDS[kind])
    obs(x, mask, segments=idx, num_segments=3)
    for e in range(3):
        want = create_observer(kind, **KINDS[kind])
        want(x[idx == e], mask[idx == e])
        _assert_segment_equals(obs, e, want)


# --- state: save, load, reset, merge --------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_state_dict_round_trip_and_reset(kind):
    g = torch.Generator().manual_seed(4)
    obs = create_observer(kind, **KINDS[kind])
    for x, idx, mask in _routed_batches(g):
        obs(x, mask, segments=idx, num_segments=E)
    fresh = create_observer(kind, **KINDS[kind])
    fresh.load_state_dict(obs.state_dict())
    assert fresh.num_segments == E
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), obs.state_dict().values()))
    back = create_observer(kind, **KINDS[kind])
    back(torch.randn(3, 12))
    back.load_state_dict(obs.state_dict())  # a plain observer takes a segmented state
    assert back.num_segments == E
    plain = create_observer(kind, **KINDS[kind])
    plain(torch.randn(3, 12))
    obs.load_state_dict(plain.state_dict())  # and back
    assert obs.num_segments is None and torch.equal(obs.running_max, plain.running_max)
    fresh.reset()
    assert fresh.num_segments is None and "tokens_seen" not in fresh.state_dict()
    fresh(torch.randn(2, 12))  # plain again


def test_a_broken_segmented_state_is_refused():
    obs = create_observer("histogram", bins=16)
    obs(torch.randn(8, 3), segments=torch.arange(8) % 2, num_segments=2)
    sd = obs.state_dict()
    sd["counts"] = sd["counts"].clone()
    sd["counts"][1, 0] += 1
    with pytest.raises(ValueError, match="counts"):
        create_observer("histogram", bins=16).load_state_dict(sd)
    sd = obs.state_dict()
    sd["tokens_seen"] = torch.tensor([-1, 3])
    with pytest.raises(ValueError, match="tokens_seen"):
        create_observer("histogram", bins=16).load_state_dict(sd)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_merge_is_exact_with_experts_empty_on_one_side(kind):
    g = torch.Generator().manual_seed(5)
    batches = _routed_batches(g)
    whole, first, last, blank = (create_observer(kind, **KINDS[kind]) for _ in range(4))
    for i, (x, idx, mask) in enumerate(batches):
        whole(x, mask, segments=idx, num_segments=E)
        (first if i < 2 else last)(x, mask, segments=idx, num_segments=E)
    ema = "moving_average" in kind
    merged = merge_observers([last] if ema else [first, last, blank])
    want = last if ema else whole  # an EMA merges exactly where one source saw the segment
    for key, value in want.state_dict().items():
        assert torch.equal(merged.state_dict()[key], value), key
    assert blank.num_segments is None  # the sources stay as they were
    again = merge_state_dicts(create_observer(kind, **KINDS[kind]), [first.state_dict(), last.state_dict()])
    assert torch.equal(again.tokens_seen, whole.tokens_seen)
    if not ema:
        assert torch.equal(again.seen, whole.seen) and torch.equal(again.running_min, whole.running_min)


def test_merge_refuses_other_segment_counts_and_plain_data():
    a, b, c = (create_observer("minmax") for _ in range(3))
    a(torch.randn(4, 2), segments=torch.zeros(4, dtype=torch.int64), num_segments=2)
    b(torch.randn(4, 2), segments=torch.zeros(4, dtype=torch.int64), num_segments=3)
    c(torch.randn(4, 2))
    with pytest.raises(ValueError, match="2 segments in one rank or source and 3"):
        merge_observers([a, b])
    with pytest.raises(ValueError, match="without segments"):
        merge_observers([a, c])


# --- bad input: clear errors, nothing changed -----------------------------------------------------------


def _state(obs):
    return {k: v.clone() for k, v in obs.state_dict().items()}


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"segments": torch.tensor([0, 1, 5, 2]), "num_segments": 3}, ValueError, r"\[0, 3\).*got 5"),
        ({"segments": torch.tensor([0, -1, 1, 2]), "num_segments": 3}, ValueError, "got -1"),
        ({"segments": torch.tensor([0, 1, 1, 2]), "num_segments": 4}, ValueError, "3 segments"),
        ({"segments": torch.tensor([0, 1, 1]), "num_segments": 3}, ValueError, r"\[N\] or \[N, k\]"),
        ({"segments": torch.zeros(4, 1, 1, dtype=torch.int64), "num_segments": 3}, ValueError, "N = x"),
        ({"segments": torch.tensor([0.0, 1, 1, 2]), "num_segments": 3}, TypeError, "integer tensor"),
        ({"segments": [0, 1, 1, 2], "num_segments": 3}, TypeError, "list"),
        ({"segments": torch.tensor([0, 1, 1, 2])}, ValueError, "together"),
        ({"segments": torch.tensor([0, 1, 1, 2]), "num_segments": 0}, ValueError, "positive int"),
        ({"segments": torch.tensor([0, 1, 1, 2], device="meta"), "num_segments": 3}, ValueError, "meta"),
        ({}, ValueError, "is segmented"),
    ],
)
@pytest.mark.parametrize("kind", ["minmax", "histogram", "per_channel"])
def test_bad_segments_are_refused_before_any_change(kind, kwargs, error, words):
    obs = create_observer(kind, **KINDS[kind])
    x = torch.randn(4, 6)
    obs(x, segments=torch.tensor([0, 1, 2, 2]), num_segments=3)
    before = _state(obs)
    with pytest.raises(error, match=words):
        obs(x * 10, **kwargs)
    after = obs.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_segments_after_plain_data_and_the_rows_axis_are_refused():
    obs = create_observer("minmax")
    obs(torch.randn(3, 2))
    with pytest.raises(ValueError, match="without segments"):
        obs(torch.randn(3, 2), segments=torch.zeros(3, dtype=torch.int64), num_segments=2)
    pc = create_observer("per_channel", ch_axis=0)
    with pytest.raises(ValueError, match="rows' axis"):
        pc(torch.randn(3, 2), segments=torch.zeros(3, dtype=torch.int64), num_segments=2)
    assert pc.num_segments is None
    pc = create_observer("per_channel", ch_axis=-1)
    pc(torch.randn(3, 2), segments=torch.zeros(3, dtype=torch.int64), num_segments=2)
    with pytest.raises(ValueError, match="2 channels"):
        pc(torch.randn(3, 4), segments=torch.zeros(3, dtype=torch.int64), num_segments=2)


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_kinds_without_segments_say_so(kind):
    obs = create_observer(kind, **REFUSED[kind])
    with pytest.raises(NotImplementedError, match="does not observe segments"):
        obs(torch.randn(4, 32), segments=torch.zeros(4, dtype=torch.int64), num_segments=2)
    assert int(obs.seen.sum()) == 0


def test_empty_rows_fix_the_segments_and_change_nothing_else():
    obs = create_observer("minmax")
    obs(torch.empty(0, 8), segments=torch.empty(0, dtype=torch.int64), num_segments=4)
    assert obs.num_segments == 4 and obs.tokens_seen.tolist() == [0] * 4
    assert int(obs.seen.sum()) == 0


def test_the_torch_twin_counts_outside_entries_where_it_cannot_raise():
    from mono_quant import reference_segments
    from mono_quant.state import SegmentState

    state = SegmentState.empty(3)
    x = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    idx = torch.tensor([[0, 7], [1, 1], [-2, 2]])
    slots, outside = reference_segments.routing(idx, 3)
    assert slots.tolist() == [[0, 3], [1, 3], [3, 2]] and int(outside) == 2
    with pytest.raises(ValueError, match="got 7"):
        reference_segments.minmax_segments_update_(x, idx, state)
    assert int(state.seen.sum()) == 0
    ok = torch.tensor([[0, 2], [1, 1], [2, 0]])
    reference_segments.minmax_segments_update_(x, ok, state)
    assert state.running_min.tolist() == [0.0, 2.0, 0.0] and state.running_max.tolist() == [5.0, 3.0, 5.0]
    assert state.seen[:, Seen.FINITE].tolist() == [4, 2, 4] and state.tokens_seen.tolist() == [2, 1, 2]


# --- the kernel under the interpreter against the torch twin ----------------------------------------------

INTERP = [
    ("minmax", {}, (13, 7)),
    ("moving_average", {"averaging_constant": 0.3}, (9, 3, 5)),
    ("per_channel", {"ch_axis": -1}, (11, 6)),
    ("per_channel", {"ch_axis": 1}, (7, 3, 4)),
    ("moving_average_per_channel", {"ch_axis": -1, "averaging_constant": 0.3}, (10, 129)),
    ("histogram", {"bins": 16}, (12, 5)),
    ("kl", {"bins": 16}, (9, 3, 5)),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("kind, kwargs, shape", INTERP)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_equals_the_torch_twin(kind, kwargs, shape, dtype):
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(8)
    tri = create_observer(kind, backend="triton", **kwargs)
    ref = create_observer(kind, backend="torch", **kwargs)
    for step in range(2):
        x = (torch.randn(*shape, generator=g) * (1 + 5 * step)).to(dtype)
        x.view(-1)[::13] = float("nan")
        x.view(-1)[4::17] = float("inf")
        idx = torch.randint(0, 4, (shape[0], 2), generator=g)
        idx[0] = 1
        mask = torch.rand(shape[:1], generator=g) > 0.3
        tri(x, mask, segments=idx, num_segments=E)
        ref(x, mask, segments=idx, num_segments=E)
    for key, value in ref.state_dict().items():
        assert torch.equal(tri.state_dict()[key], value), key
    assert int(ref.tokens_seen[4]) == 0 and int(ref.seen[:, Seen.NONFINITE].sum()) > 0


@pytest.mark.interpreter
def test_kernel_drops_and_counts_outside_entries_and_keeps_its_scratch_blank():
    pytest.importorskip("triton")
    from mono_quant.kernels import segments as ks

    from mono_quant import reference_segments
    from mono_quant.state import SegmentState

    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, 4, generator=g)
    idx = torch.tensor([[0, 7], [1, -1], [2, 2], [0, 1], [3, 9], [1, 0]])
    same = torch.tensor([[0, 0], [1, 1], [2, 2], [0, 1], [3, 3], [1, 0]])  # outside -> a repeat (dropped)
    got, want = SegmentState.empty(4, (4,)), SegmentState.empty(4, (4,))
    ks.minmax_segments_update_(x, idx, got, 0.5, ch_axis=-1)
    reference_segments.minmax_segments_update_(x, same, want, 0.5, ch_axis=-1)
    for name in ("running_min", "running_max", "seen", "tokens_seen"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert int(got.invalid) == 3
    smin, smax, scnt, ticket = ks._scratch(x.device, 4, 4)
    assert bool((smin == float("inf")).all() and (smax == float("-inf")).all())
    assert not bool(scnt.any()) and int(ticket) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["minmax", "moving_average", "per_channel", "histogram"])
def test_segmented_forward_is_sync_free_and_matches_the_twin_on_cuda(kind):
    g = torch.Generator().manual_seed(10)
    x = torch.randn(4096, 256, generator=g).to("cuda", torch.bfloat16)
    idx = torch.randint(0, 8, (4096, 2), generator=g).cuda()
    mask = (torch.rand(4096, generator=g) > 0.1).cuda()
    obs = create_observer(kind, **KINDS[kind]).cuda()
    ref = create_observer(kind, backend="torch", **KINDS[kind]).cuda()
    obs(x, mask, segments=idx, num_segments=8)  # the first call allocates the scratch
    torch.cuda.set_sync_debug_mode("error")
    try:
        obs(x, mask, segments=idx, num_segments=8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for _ in range(2):
        ref(x, mask, segments=idx, num_segments=8)
    for key, value in ref.state_dict().items():
        assert torch.equal(obs.state_dict()[key].cpu(), value.cpu()), key


@pytest.mark.parametrize("ch_axis, c", [(None, None), (None, 0.3), (-1, None), (1, 0.3)])
def test_the_sync_free_twin_equals_the_per_segment_path(ch_axis, c, monkeypatch):
    from mono_quant import reference_segments
    from mono_quant.state import SegmentState

    g = torch.Generator().manual_seed(12)
    shape = (15, 3, 4)
    cpu, free = (SegmentState.empty(E, () if ch_axis is None else (shape[ch_axis],)) for _ in range(2))
    batches = []
    for step in range(2):
        x = torch.randn(*shape, generator=g) * (1 + step)
        x.view(-1)[::11] = float("nan")
        idx = torch.randint(0, 4, (shape[0], 2), generator=g)
        batches.append((x, idx, torch.rand(shape[:2], generator=g) > 0.3))
    for x, idx, mask in batches:
        reference_segments.minmax_segments_update_(x, idx, cpu, c, ch_axis=ch_axis, mask=mask)
    monkeypatch.setattr(reference_segments, "_may_branch", lambda t: False)  # the CUDA path, on the CPU
    for x, idx, mask in batches:
        reference_segments.minmax_segments_update_(x, idx, free, c, ch_axis=ch_axis, mask=mask)
    for a, b in zip(cpu, free, strict=True):
        assert torch.equal(a, b)
    reference_segments.minmax_segments_update_(batches[0][0], torch.full((15,), 9), free, c, ch_axis=ch_axis)
    assert int(free.invalid) == 15 and torch.equal(free.seen, cpu.seen)


def test_a_segmented_histogram_gives_edges_per_segment():
    obs = create_observer("histogram", bins=8)
    x = torch.tensor([[0.5], [3.0], [-2.0], [1.0]])
    obs(x, segments=torch.tensor([0, 1, 1, 0]), num_segments=2)
    with pytest.raises(ValueError, match="segment"):
        _ = obs.bin_edges
    edges = obs.segment(1).bin_edges
    assert float(edges[0]) <= -2.0 and float(edges[-1]) > 3.0


# --- the segmented histogram: the CPU loop, the sync-free twin and the kernel ----------------------------


def _histogram_state(num_segments: int, num_bins: int):
    from mono_quant.grid import E_MIN
    from mono_quant.state import HistogramState

    return HistogramState(
        torch.full((num_segments,), float("inf")),
        torch.full((num_segments,), float("-inf")),
        torch.zeros(num_segments, 4, dtype=torch.int64),
        torch.full((num_segments,), E_MIN, dtype=torch.int64),
        torch.zeros(num_segments, dtype=torch.int64),
        torch.zeros(num_segments, num_bins, dtype=torch.int64),
    )


def _histogram_paths(batches, num_bins, monkeypatch, names=("loop", "free", "kernel")):
    """The segmented histogram after ``batches`` by the CPU loop, the sync-free twin and the kernels under
    the interpreter (those of ``names``): ``{path: (state, tokens_seen, invalid)}``."""
    from mono_quant import reference_segments

    out = {}
    for name in names:
        if name == "kernel":
            update = pytest.importorskip("mono_quant.kernels").histogram_segments_update_
        else:
            update = reference_segments.histogram_segments_update_
        state = _histogram_state(E, num_bins)
        tokens, invalid = torch.zeros(E, dtype=torch.int64), torch.zeros((), dtype=torch.int64)
        with monkeypatch.context() as m:
            if name == "free":  # the path of every device but the CPU, on the CPU
                m.setattr(reference_segments, "_may_branch", lambda t: False)
            for x, idx, mask in batches:
                update(x, idx, state, tokens, invalid, mask=mask)
        out[name] = (state, tokens, invalid)
    return out


def _assert_same_histograms(paths) -> None:
    want = paths["loop"]
    for name, got in paths.items():
        for field, a, b in zip(want[0]._fields, want[0], got[0], strict=True):
            assert torch.equal(a, b), (name, field)
        assert torch.equal(want[1], got[1]) and torch.equal(want[2], got[2]), name


MASKS = {
    "none": lambda g, shape: None,
    "rows": lambda g, shape: torch.rand(shape[:1], generator=g) > 0.3,
    "tokens": lambda g, shape: torch.rand(shape[:2], generator=g) > 0.3,
    "values": lambda g, shape: torch.rand(shape, generator=g) > 0.3,
    "all_off": lambda g, shape: torch.zeros((), dtype=torch.bool),
}


@pytest.mark.interpreter
@pytest.mark.parametrize("mask_kind", sorted(MASKS))
@pytest.mark.parametrize("dtype, topk", [(torch.float32, 2), (torch.float16, 1), (torch.bfloat16, 3)])
def test_segmented_histogram_paths_agree_exactly(mask_kind, dtype, topk, monkeypatch):
    g = torch.Generator().manual_seed(21)
    shape = (11, 3, 5)
    batches = []
    for step in range(3):  # the range grows: every segment's grid coarsens and its counts move
        x = (torch.randn(*shape, generator=g) * 4.0**step).to(dtype)
        x.view(-1)[::13] = float("nan")
        x.view(-1)[6::29] = float("-inf")
        idx = torch.randint(0, 4, (shape[0], topk), generator=g)
        idx[0] = 2  # a segment listed twice counts once
        batches.append((x, idx if topk > 1 else idx[:, 0], MASKS[mask_kind](g, shape)))
    paths = _histogram_paths(batches, 34, monkeypatch)
    _assert_same_histograms(paths)
    state, tokens, _ = paths["loop"]
    assert int(tokens[4]) == 0 and not bool(state.counts[4].any())  # untouched: no row
    if mask_kind != "all_off":
        assert bool(state.counts[:4].sum(1).gt(0).all()) and int(state.seen[:, Seen.NONFINITE].sum()) > 0
        assert torch.equal(state.counts.sum(1), state.seen[:, Seen.FINITE])


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", [(13,), (7, 1, 3)])
def test_segmented_histogram_of_float64_and_scalar_rows(shape, monkeypatch):
    """float64 values are binned as their float32 roundings: past float32's range they count as
    non-finite on every path."""
    g = torch.Generator().manual_seed(24)
    batches = []
    for step in range(2):
        x = torch.randn(*shape, generator=g, dtype=torch.float64) * 10.0**step
        x.view(-1)[3] = 1e39  # inf in float32
        batches.append((x, torch.randint(0, 3, (shape[0], 2), generator=g), None))
    paths = _histogram_paths(batches, 34, monkeypatch)
    _assert_same_histograms(paths)
    seen = paths["loop"][0].seen
    assert int(seen[:, Seen.NONFINITE].sum()) >= 2 and int(seen[:, Seen.FINITE].sum()) > 0


@pytest.mark.interpreter
def test_segmented_histogram_drops_and_counts_outside_entries(monkeypatch):
    g = torch.Generator().manual_seed(22)
    x = torch.randn(6, 4, generator=g)
    idx = torch.tensor([[0, 7], [1, -1], [2, 2], [0, 1], [3, 9], [1, 0]])
    same = torch.tensor([[0, 0], [1, 1], [2, 2], [0, 1], [3, 3], [1, 0]])  # outside -> a repeat (dropped)
    want = _histogram_paths([(x, same, None)], 18, monkeypatch, ["loop"])["loop"]
    # the CPU loop refuses them (test_bad_segments_are_refused_before_any_change)
    for name, got in _histogram_paths([(x, idx, None)], 18, monkeypatch, ["free", "kernel"]).items():
        for a, b in zip(want[0], got[0], strict=True):
            assert torch.equal(a, b), name
        assert torch.equal(want[1], got[1]) and int(got[2]) == 3, name


@pytest.mark.interpreter
def test_segmented_histogram_with_many_bins(monkeypatch):
    """Past 2**16 bins the grid kernel walks the counts in larger blocks."""
    g = torch.Generator().manual_seed(23)
    batches = [(torch.randn(8, 16, generator=g) * s, torch.randint(0, 3, (8, 2), generator=g), None)
               for s in (1.0, 1e3)]  # fmt: skip
    paths = _histogram_paths(batches, 80002, monkeypatch)
    _assert_same_histograms(paths)
    assert int(paths["loop"][0].counts.sum()) == int(paths["loop"][0].seen[:, Seen.FINITE].sum()) > 0
