"""Merging observer state across ranks (torch.distributed) and across saved runs: mono_quant.distributed.

One world of 2 and one of 3 ranks are spawned (gloo, CPU), once each: every rank runs every scenario and
saves its observers' state before and after the sync; the tests then compare them, in this process, with a
single process that saw all the data. Ranks get different shares: ranges that do not overlap, a share with
only non-finite values, and (in the world of 3) a rank with no data at all.
"""

import datetime
import multiprocessing
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from spawn_ranks import count_all_reduce
from torch import nn

import mono_quant as mq
from mono_quant.distributed import merge_observers, merge_state_dicts, sync_observers

SPAWN_TIMEOUT_S = 90  # a hang fails the test instead of blocking the run
CHANNELS = 5
AVERAGING = 0.3

# --- the scenario: data, shares, observers (the same on every rank and in this process) -------------


def _batches() -> list[torch.Tensor]:
    """Six (8, CHANNELS) float32 batches of very different ranges, one with NaN/Inf, one all NaN."""
    g = torch.Generator().manual_seed(1234)
    randn = lambda scale, shift: torch.randn(8, CHANNELS, generator=g) * scale + shift
    b2 = randn(1.0, 0.0)
    b2[0, 1], b2[3, 4] = float("nan"), float("inf")
    return [
        randn(0.01, -3.0),
        randn(0.1, -1.0),
        b2,
        randn(10.0, 60.0),
        randn(100.0, 600.0),
        torch.full((8, CHANNELS), float("nan")),
    ]


# Batch indices per rank: ranks 0 and 1 of the world of 2 see ranges that do not overlap; rank 2 of the
# world of 3 sees nothing; the all-NaN batch goes to a rank that also has finite data or to one alone.
SHARES = {2: [[0, 1, 2], [3, 4, 5]], 3: [[3, 4], [0, 1, 2, 5], []]}

EXACT = {
    "minmax": lambda: mq.MinMaxObserver(),
    "minmax_sym_u8": lambda: mq.MinMaxObserver(dtype=torch.quint8, qscheme="symmetric"),
    "per_channel": lambda: mq.PerChannelMinMaxObserver(ch_axis=-1),
    "hist_kl": lambda: mq.HistogramObserver(bins=128, method="kl"),
    "hist_kl_sym": lambda: mq.HistogramObserver(bins=128, method="kl", qscheme="symmetric"),
    "hist_mse": lambda: mq.HistogramObserver(bins=128, method="mse"),
    "hist_pct": lambda: mq.HistogramObserver(bins=128, method="percentile", percentile=99.0),
}
EMA = {
    "ema": lambda: mq.MovingAverageMinMaxObserver(averaging_constant=AVERAGING),
    "ema_pc": lambda: mq.MovingAveragePerChannelMinMaxObserver(averaging_constant=AVERAGING, ch_axis=-1),
}


# segmented (MoE experts): rows routed top-2 over SEGMENTS experts; expert 3 gets rows of batch 4 only (so
# it is empty on every rank but one), expert 4 none
SEGMENTS = 5
SEGMENTED = ("minmax", "hist_kl", "per_channel")


def _routing(batch: int) -> torch.Tensor:
    rows = torch.arange(8)
    idx = torch.stack([(rows + batch) % 3, (rows * 2 + batch + 1) % 3], 1)
    if batch == 4:
        idx[:3, 1] = 3
    return idx


def _segmented_reference() -> dict[str, dict]:
    observers = {k: EXACT[k]() for k in SEGMENTED}
    for i, b in enumerate(_batches()):
        for obs in observers.values():
            obs(b, segments=_routing(i), num_segments=SEGMENTS)
    return {k: _snapshot(v) for k, v in observers.items()}


def _observers() -> dict[str, mq.ObserverBase]:
    return {name: make() for name, make in {**EXACT, **EMA}.items()}


def _model() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(CHANNELS, 6), nn.ReLU(), nn.Linear(6, 3))


def _snapshot(obs: mq.ObserverBase) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in obs.state_dict().items()}


def _qparams(obs: mq.ObserverBase):
    if int(obs.seen[0]) == 0:
        return None
    return tuple(t.cpu() for t in obs.calculate_qparams())


def _reference() -> dict[str, mq.ObserverBase]:
    """One process over all the data, in batch order."""
    observers = _observers()
    for b in _batches():
        for obs in observers.values():
            obs(b)
    return observers


def _reference_states() -> tuple[dict, dict]:
    observers = _reference()
    return {k: _snapshot(v) for k, v in observers.items()}, {k: _qparams(v) for k, v in observers.items()}


# --- one rank ----------------------------------------------------------------------------------------


def _rank_scenarios(rank: int, world: int, device: torch.device) -> dict:
    out = {}
    batches = [b.to(device) for b in _batches()]
    mine = [batches[i] for i in SHARES[world][rank]]

    # every observer kind, this rank's share
    observers = {k: v.to(device) for k, v in _observers().items()}
    for b in mine:
        for obs in observers.values():
            obs(b)
    out["pre"] = {k: _snapshot(v) for k, v in observers.items()}
    assert sync_observers(observers) is observers
    out["post"] = {k: _snapshot(v) for k, v in observers.items()}
    out["qparams"] = {k: _qparams(v) for k, v in observers.items()}

    # replicated inputs: every rank's EMA is the same, so the merge must be exactly that EMA
    rep = mq.MovingAverageMinMaxObserver(averaging_constant=AVERAGING).to(device)
    for b in batches[:5]:
        rep(b)
    out["replicated_pre"] = _snapshot(rep)
    sync_observers([rep])
    out["replicated_post"] = _snapshot(rep)

    # run_calibration(sync=True), each rank on its share of the data
    model = _model().to(device)
    result = mq.run_calibration(model, mine, "histogram", observer_kwargs={"bins": 64}, sync=True)
    out["calibration"] = {k: _snapshot(v) for k, v in result.items()}

    # segmented observers: experts empty on some ranks (and the rank of the world of 3 that sees nothing)
    segmented = {k: EXACT[k]().to(device) for k in SEGMENTED}
    for i in SHARES[world][rank]:
        for obs in segmented.values():
            obs(batches[i], segments=_routing(i).to(device), num_segments=SEGMENTS)
    sync_observers(segmented)
    out["segmented"] = {k: _snapshot(v) for k, v in segmented.items()}

    # a fixed number of collectives: 2 observers or 24 cost the same
    def synced(n):
        obs = [
            mq.HistogramObserver(bins=32).to(device) if i % 2 else mq.MinMaxObserver().to(device)
            for i in range(n)
        ]
        for o in obs:
            if mine:
                o(mine[0])
        return lambda: sync_observers(obs)

    out["collectives"] = {n: count_all_reduce(synced(n)) for n in (2, 24)}
    every_kind = {k: v.to(device) for k, v in _observers().items()}
    out["collectives"]["every_kind"] = count_all_reduce(lambda: sync_observers(every_kind))

    # a Mapping in another order on each rank merges by name, not by position
    named = {"a": mq.MinMaxObserver().to(device), "b": mq.MinMaxObserver().to(device)}
    named["a"](torch.full((3,), float(rank + 1), device=device))
    named["b"](torch.full((3,), -10.0 * (rank + 1), device=device))
    shuffled = {k: named[k] for k in (["a", "b"] if rank % 2 == 0 else ["b", "a"])}
    sync_observers(shuffled)
    out["by_name"] = {k: (float(v.min_val), float(v.max_val)) for k, v in shuffled.items()}

    # mismatches raise the same error on every rank (and nothing hangs afterwards)
    errors = {}
    first = rank == 0
    layouts = {
        "types": [mq.MinMaxObserver(), mq.MinMaxObserver() if first else mq.HistogramObserver(bins=8)],
        "number": [mq.MinMaxObserver() for _ in range(1 + first)],
        "names": {"fc1" if first else "fc2": mq.MinMaxObserver()},
        "dtype": [mq.MinMaxObserver(dtype=torch.qint8 if first else torch.int4)],
        "qscheme": [mq.MinMaxObserver(qscheme="affine" if first else "symmetric")],
        "reduce_range": [mq.MinMaxObserver(reduce_range=first)],
        "eps": [mq.MinMaxObserver(eps=1e-3 if first else 1e-4)],
        "averaging_constant": [mq.MovingAverageMinMaxObserver(averaging_constant=0.1 if first else 0.2)],
        "method": [mq.HistogramObserver(bins=8, method="kl" if first else "mse")],
        "percentile": [mq.HistogramObserver(bins=8, method="percentile", percentile=99.0 if first else 99.9)],
    }
    pc = mq.PerChannelMinMaxObserver(ch_axis=-1).to(device)
    pc(torch.randn(2, CHANNELS + rank, device=device))
    layouts["channels"] = [pc]
    for name, obs in layouts.items():
        try:
            sync_observers({k: o.to(device) for k, o in obs.items()} if isinstance(obs, dict) else obs)
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    out["errors"] = errors
    return out


def _worker(rank: int, world: int, port: int, backend: str, outdir: str) -> None:
    try:
        store = dist.TCPStore("127.0.0.1", port, world, False, timeout=datetime.timedelta(seconds=60))
        device = torch.device("cpu")
        if backend == "nccl":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
        )
        try:
            out = _rank_scenarios(rank, world, device)
        finally:
            dist.destroy_process_group()
        torch.save(out, Path(outdir) / f"rank{rank}.pt")
    except BaseException:
        (Path(outdir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def _context():
    """A forkserver that has imported torch once: each rank then starts in milliseconds, not seconds.

    Forking from a process that never ran an op keeps OpenMP and CUDA safe in the children.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "mono_quant", __name__])
    return ctx


def _spawn(world: int, backend: str, outdir: Path) -> list[dict]:
    """Run ``_worker`` on ``world`` processes; their results, or a failure with the ranks' tracebacks."""
    # the store lives here, on a port the OS picks: no race for a free port
    store = dist.TCPStore("127.0.0.1", 0, world, True, wait_for_workers=False)
    ctx = _context()
    procs = [
        ctx.Process(target=_worker, args=(r, world, store.port, backend, str(outdir)), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        for p in procs:
            p.join(max(deadline - time.monotonic(), 0))
    finally:
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    errors = "\n".join(f.read_text() for f in sorted(outdir.glob("*.err")))
    if hung:
        pytest.fail(f"ranks {hung} of {world} did not finish in {SPAWN_TIMEOUT_S} s\n{errors}")
    codes = [p.exitcode for p in procs]
    if any(codes):
        pytest.fail(f"ranks exited with {codes}\n{errors}")
    return [torch.load(outdir / f"rank{r}.pt", map_location="cpu") for r in range(world)]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"world{n}")
def world(request, tmp_path_factory):
    n = request.param
    return n, _spawn(n, "gloo", tmp_path_factory.mktemp(f"world{n}"))


@pytest.fixture(scope="module")
def reference():
    return _reference_states()


def _assert_state_equal(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for key in want:
        assert got[key].dtype == want[key].dtype, f"{what}: {key}"
        assert torch.equal(got[key], want[key]), f"{what}: {key} is {got[key]}, want {want[key]}"


def _weighted_ema(pres: list[dict], key: str) -> torch.Tensor:
    """The documented merge, written out independently: batch-weighted mean over ranks with finite data."""
    c = max(p[key].numel() for p in pres)
    num = torch.zeros(c, dtype=torch.float64)
    den = torch.zeros(c, dtype=torch.float64)
    for p in pres:
        v = p[key].reshape(-1).double()
        if v.numel() == 0:
            continue
        w = torch.where(torch.isfinite(v), float(p["seen"][2]), 0.0)
        num += torch.where(w > 0, w * v, 0.0)
        den += w
    return (num / den).float()


# --- across ranks --------------------------------------------------------------------------------------


def test_sync_is_exact_on_every_rank(world, reference):
    n, ranks = world
    ref_state, ref_q = reference
    for rank, out in enumerate(ranks):
        for name in EXACT:
            _assert_state_equal(out["post"][name], ref_state[name], f"world {n} rank {rank} {name}")


def test_sync_of_segmented_observers_is_exact_with_empty_experts(world):
    n, ranks = world
    want = _segmented_reference()
    assert int(want["minmax"]["tokens_seen"][3]) == 3 and int(want["minmax"]["tokens_seen"][4]) == 0
    for rank, out in enumerate(ranks):
        for name in SEGMENTED:
            _assert_state_equal(out["segmented"][name], want[name], f"world {n} rank {rank} segmented {name}")


def test_sync_gives_single_process_qparams(world, reference):
    n, ranks = world
    _, ref_q = reference
    for rank, out in enumerate(ranks):
        for name in EXACT:
            scale, zp = out["qparams"][name]
            assert torch.equal(scale, ref_q[name][0]), f"world {n} rank {rank} {name}"
            assert torch.equal(zp, ref_q[name][1]), f"world {n} rank {rank} {name}"


def test_shares_really_differ(world):
    # guards the scenario itself: non-overlapping ranges, a rank with only NaN or no data at all
    n, ranks = world
    pres = [out["pre"]["minmax"] for out in ranks]
    if n == 2:
        assert float(pres[0]["running_max"]) < float(pres[1]["running_min"])
    else:
        assert int(pres[2]["seen"].sum()) == 0
        assert ranks[2]["pre"]["per_channel"]["running_min"].shape == (0,)


def test_ema_merge_is_the_batch_weighted_mean(world, reference):
    n, ranks = world
    ref_state, _ = reference
    for name in EMA:
        pres = [out["pre"][name] for out in ranks]
        want = _weighted_ema(pres, "running_min"), _weighted_ema(pres, "running_max")
        for rank, out in enumerate(ranks):
            post = out["post"][name]
            assert torch.equal(post["seen"], ref_state[name]["seen"]), f"{name} rank {rank}"
            for key, expected in zip(("running_min", "running_max"), want, strict=True):
                got = post[key].reshape(-1)
                torch.testing.assert_close(got, expected, rtol=2e-7, atol=0)
                # a convex combination: between the contributing ranks' values
                vals = torch.stack([p[key].reshape(-1) for p in pres if p[key].numel()])
                vals = torch.where(torch.isfinite(vals), vals, torch.nan)
                assert bool((got >= vals.nan_to_num(torch.inf).amin(0)).all()), f"{name} {key}"
                assert bool((got <= vals.nan_to_num(-torch.inf).amax(0)).all()), f"{name} {key}"
            # every rank ends on the same bits
            _assert_state_equal(post, ranks[0]["post"][name], f"{name} rank {rank} vs rank 0")


def test_ema_merge_of_replicated_inputs_is_exact(world):
    _, ranks = world
    for out in ranks:
        pre, post = out["replicated_pre"], out["replicated_post"]
        assert torch.equal(post["running_min"], pre["running_min"])
        assert torch.equal(post["running_max"], pre["running_max"])
        assert torch.equal(post["seen"], pre["seen"] * len(ranks))


def test_mappings_merge_by_name_whatever_their_order_on_each_rank(world):
    n, ranks = world
    for out in ranks:
        assert out["by_name"] == {"a": (1.0, float(n)), "b": (-10.0 * n, -10.0)}


def test_run_calibration_sync(world):
    _, ranks = world
    want = mq.run_calibration(_model(), _batches(), "histogram", observer_kwargs={"bins": 64}, sync=True)
    assert len(want) == 2
    for rank, out in enumerate(ranks):
        for name, obs in want.items():
            _assert_state_equal(out["calibration"][name], _snapshot(obs), f"rank {rank} layer {name}")


def test_fixed_number_of_collectives(world):
    _, ranks = world
    for out in ranks:
        counts = out["collectives"]
        assert counts[2] == counts[24] == 4  # layout, segment counts, MIN, SUM
        assert counts["every_kind"] == 5  # + channel counts (with the segments), + the moving averages' SUM


def test_mismatched_ranks_raise_everywhere(world):
    _, ranks = world
    for out in ranks:
        errors = out["errors"]
        assert "different names, types or settings" in errors["types"]
        assert "HistogramObserver" in errors["types"] and "MinMaxObserver" in errors["types"]
        assert "holds 1 observers and another 2" in errors["number"]
        assert "'fc1'" in errors["names"] or "'fc2'" in errors["names"]
        for setting in (
            "dtype",
            "qscheme",
            "reduce_range",
            "eps",
            "averaging_constant",
            "method",
            "percentile",
        ):
            assert "different names, types or settings" in errors[setting], setting
            assert setting in errors[setting], setting
            assert errors[setting] == ranks[0]["errors"][setting]  # the same error on every rank
        assert f"{CHANNELS} channels" in errors["channels"]
        assert f"and {CHANNELS + len(ranks) - 1} in another" in errors["channels"]


def test_offline_merge_of_state_dicts_matches(world, reference):
    _, ranks = world
    ref_state, _ = reference
    template = _observers()
    merged = merge_state_dicts(template, [out["pre"] for out in ranks])
    for name in EXACT:
        _assert_state_equal(_snapshot(merged[name]), ref_state[name], f"offline {name}")
    for name in EMA:  # the same rule as the sync, on the same inputs
        _assert_state_equal(_snapshot(merged[name]), ranks[0]["post"][name], f"offline {name}")
    assert all(int(obs.seen.sum()) == 0 for obs in template.values())  # the template is untouched


# --- in this process -------------------------------------------------------------------------------------


def test_sync_without_process_group_is_a_noop():
    assert not dist.is_initialized()
    observers = _reference()
    before = {k: _snapshot(v) for k, v in observers.items()}
    assert sync_observers(observers) is observers
    module = nn.Sequential(observers["minmax"])
    assert sync_observers(module) is module
    for k, v in observers.items():
        _assert_state_equal(_snapshot(v), before[k], k)


def test_sync_with_one_rank_is_a_noop():
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        obs = mq.HistogramObserver(bins=16)
        obs(torch.randn(50))
        before = _snapshot(obs)
        sync_observers(obs)
        _assert_state_equal(_snapshot(obs), before, "world of 1")
    finally:
        dist.destroy_process_group()


def test_merge_observers_any_grouping_and_module_inputs():
    batches = _batches()
    parts = [_observers() for _ in range(3)]
    for i, b in enumerate(batches):
        for obs in parts[i % 3].values():
            obs(b)
    ref = {k: _snapshot(v) for k, v in _reference().items()}
    flat = merge_observers(parts)
    nested = merge_observers([merge_observers(parts[:2]), parts[2]])
    as_modules = merge_observers([nn.ModuleDict(p) for p in parts])
    for name in EXACT:
        _assert_state_equal(_snapshot(flat[name]), ref[name], f"flat {name}")
        _assert_state_equal(_snapshot(nested[name]), ref[name], f"nested {name}")
        _assert_state_equal(_snapshot(as_modules[name]), ref[name], f"module {name}")
    for name in EMA:  # merged weights carry the batches: regrouping changes at most the last float32 bit
        for key in ("running_min", "running_max"):
            torch.testing.assert_close(nested[name].state_dict()[key], flat[name].state_dict()[key])


def test_merge_errors():
    with pytest.raises(ValueError, match="at least one"):
        merge_observers([])
    with pytest.raises(ValueError, match="at least one"):
        merge_state_dicts(mq.MinMaxObserver(), [])
    with pytest.raises(ValueError, match="different names, types or settings"):
        merge_observers([mq.HistogramObserver(bins=8), mq.HistogramObserver(bins=16)])
    with pytest.raises(ValueError, match="different names, types or settings"):
        merge_observers([[mq.MinMaxObserver()], [mq.PerChannelMinMaxObserver()]])
    with pytest.raises(TypeError, match="not an observer"):
        merge_observers([[mq.MinMaxObserver(), 3]])
    with pytest.raises(TypeError, match="cannot merge int"):
        sync_observers(3)


def _seen(value: float, **kwargs) -> mq.MinMaxObserver:
    obs = mq.MinMaxObserver(**kwargs)
    obs(torch.tensor([value]))
    return obs


def test_offline_mappings_merge_by_name_not_position():
    a = {"fc1": _seen(1.0), "fc2": _seen(100.0)}
    b = {"fc2": _seen(200.0), "fc1": _seen(2.0)}
    merged = merge_observers([a, b])
    assert list(merged) == ["fc1", "fc2"]
    assert (float(merged["fc1"].min_val), float(merged["fc1"].max_val)) == (1.0, 2.0)
    assert (float(merged["fc2"].min_val), float(merged["fc2"].max_val)) == (100.0, 200.0)


def test_offline_disjoint_names_are_an_error_or_a_union():
    a = {"fc1": _seen(1.0), "shared": _seen(5.0)}
    b = {"fc2": _seen(2.0), "shared": _seen(7.0)}
    with pytest.raises(ValueError, match=r"different names.*lacks \['fc1'\].*adds \['fc2'\].*strict=False"):
        merge_observers([a, b])
    union = merge_observers([a, b], strict=False)
    assert list(union) == ["fc1", "shared", "fc2"]
    assert float(union["fc1"].max_val) == 1.0 and float(union["fc2"].max_val) == 2.0
    assert (float(union["shared"].min_val), float(union["shared"].max_val)) == (5.0, 7.0)
    assert float(a["fc1"].max_val) == 1.0 and int(a["shared"].seen[2]) == 1  # the sources are untouched


@pytest.mark.parametrize(
    "make",
    [
        lambda v: mq.MinMaxObserver(dtype=torch.qint8 if v else torch.int4),
        lambda v: mq.MinMaxObserver(qscheme="affine" if v else "symmetric"),
        lambda v: mq.MinMaxObserver(reduce_range=v),
        lambda v: mq.MinMaxObserver(eps=1e-3 if v else 1e-4),
        lambda v: mq.MovingAverageMinMaxObserver(averaging_constant=0.1 if v else 0.2),
        lambda v: mq.HistogramObserver(bins=8, method="kl" if v else "mse"),
        lambda v: mq.HistogramObserver(bins=8, method="percentile", percentile=99.0 if v else 99.9),
        lambda v: mq.PerChannelMinMaxObserver(ch_axis=0 if v else 1),
    ],
)
def test_offline_merge_of_other_settings_is_an_error(make):
    a, b = make(True), make(False)
    for obs in (a, b):
        obs(torch.randn(4, 4))
    with pytest.raises(ValueError, match="different names, types or settings"):
        merge_observers([a, b])
    template = make(True)
    with pytest.raises(ValueError, match="saved with other settings"):
        merge_state_dicts(template, [a.state_dict(), b.state_dict()])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl needs more than one GPU")
def test_nccl_sync_on_cuda(tmp_path):
    ranks = _spawn(2, "nccl", tmp_path)
    ref_state, _ = _reference_states()
    for rank, out in enumerate(ranks):
        for name in EXACT:
            # the CUDA statistics are bit-exact with the CPU ones, so the CPU run is the reference
            _assert_state_equal(out["post"][name], ref_state[name], f"nccl rank {rank} {name}")
            for got, first in zip(out["qparams"][name], ranks[0]["qparams"][name], strict=True):
                assert torch.equal(got, first), f"nccl rank {rank} {name}"
        for name in EMA:
            _assert_state_equal(out["post"][name], ranks[0]["post"][name], f"nccl rank {rank} {name}")
        assert out["collectives"][2] == out["collectives"][24] == 4
