"""Saved files (``mono_quant.io``): strict JSON qparams, observer state, and the checks on loading them.

Every bad file gets ``StateFileError`` (a ``ValueError``) naming the file, where (kind, layer, key) and
what is wrong; writes go through ``write_file``, which never leaves a destroyed file behind.
"""

import copy
import json
import math
import os
import stat
from collections import OrderedDict

import pytest
import torch

from mono_quant import compare, files, io
from mono_quant.core.registry import create_observer
from mono_quant.io import StateFileError

# --- observer state ----------------------------------------------------------------------------------


def _observers() -> dict:
    """``{layer: {kind: observer}}`` as the comparison builds them, fed a little data."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for layer in ("fc", "proj"):
        row = {
            k: compare.make_observer(k, torch.int8, "affine", torch.nn.Linear(1, 1)) for k in compare.COMPARED
        }
        for _ in range(2):
            x = torch.randn(4, 8, generator=g)
            for obs in row.values():
                obs(x)
        out[layer] = row
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``(path of a save_state file, the dict in it)``."""
    path = tmp_path_factory.mktemp("state") / "s.pt"
    io.save_state(_observers(), str(path))
    return path, torch.load(path, weights_only=True)


def test_state_round_trip_gives_the_same_buffers(saved):
    path, _ = saved
    original = _observers()
    loaded = io.load_state(str(path))
    assert set(loaded) == set(compare.COMPARED)
    for kind, layers in loaded.items():
        for layer, obs in layers.items():
            want = original[layer][kind]
            assert type(obs) is type(want) and obs.settings() == want.settings()
            for name, buf in want.named_buffers():
                assert torch.equal(getattr(obs, name), buf), (kind, layer, name)


def _write(tmp_path, state) -> str:
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    return str(path)


def _sd(state, kind="kl", layer="fc"):
    return state["observers"][kind]["layers"][layer]["state_dict"]


def _set(kind, key, value, layer="fc"):
    def edit(state):
        _sd(state, kind, layer)[key] = value

    return edit


def _edit_buffer(kind, key, fn, layer="fc"):
    def edit(state):
        sd = _sd(state, kind, layer)
        sd[key] = fn(sd[key].clone())

    return edit


def _bump_count(t):
    t[int(torch.nonzero(t)[0])] += 1
    return t


def _kwargs(kind, **changes):
    def edit(state):
        state["observers"][kind]["layers"]["fc"]["kwargs"].update(changes)

    return edit


def _drop(kind, key):
    def edit(state):
        del _sd(state, kind)[key]

    return edit


def _top(**changes):
    def edit(state):
        state.update(changes)

    return edit


def _move_counts(t):  # same total, but a count outside the bins of the min and max
    j = int(torch.nonzero(t)[-1])
    t[j] -= 1
    t[-1] += 1
    return t


def _swap_range(state):
    sd = _sd(state, "minmax")
    sd["running_min"], sd["running_max"] = sd["running_max"].clone(), sd["running_min"].clone()


def _forget_finite(state):
    seen = _sd(state, "minmax")["seen"].clone()
    seen[1] += seen[0]  # the same number of values, none finite: but the range is there
    seen[0] = 0
    _sd(state, "minmax")["seen"] = seen


def _nan_channel(t):
    return t.index_fill_(0, torch.tensor([3]), float("nan"))


def _negative_count(t):
    return t.index_fill_(0, torch.tensor([0]), -1)


def _many_batches(t):
    return t.index_fill_(0, torch.tensor([2]), 10**9)


def _unknown_class(state):
    state["observers"]["minmax"]["class"] = "NoSuchObserver"


def _bad(case_id, edit, message, kind=None, layer=None, key=None):
    """One bad state file: the edit of the saved dict, what the message says, where the error points."""
    return pytest.param(edit, message, (kind, layer, key), id=case_id)


BAD_STATES = [
    _bad("version-99", _top(version=99), "version 99"),
    _bad("observers-list", _top(observers=[]), "'observers' must be a dict"),
    _bad("format", _top(format="something.else"), "is not a mono_quant observer state file"),
    _bad("nan-min", _set("minmax", "running_min", torch.tensor(float("nan"))), "holds NaN",
         "minmax", "fc", "running_min"),
    _bad("nan-channel", _edit_buffer("per_channel", "running_max", _nan_channel), "holds NaN",
         "per_channel", "fc", "running_max"),
    _bad("min-above-max", _swap_range, "min <= max", "minmax", "fc", "running_min/running_max"),
    _bad("counts-vs-seen", _edit_buffer("kl", "counts", _bump_count), "sum to", "kl", "fc", "counts"),
    _bad("counts-outside-range", _edit_buffer("mse", "counts", _move_counts), "outside the bins",
         "mse", "fc", "counts"),
    _bad("negative-counts", _edit_buffer("percentile", "counts", _negative_count), "negative counts",
         "percentile", "fc", "counts"),
    _bad("exponent-minus-500", _set("kl", "exponent", torch.tensor(-500)), "outside [-126, 126]",
         "kl", "fc", "exponent"),
    _bad("origin-2-62", _set("kl", "origin", torch.tensor(2**62)), "outside [-2**24, 2**24)",
         "kl", "fc", "origin"),
    _bad("origin-off-grid", _edit_buffer("kl", "origin", lambda t: t + 1), "not the canonical grid",
         "kl", "fc", "exponent/origin"),
    _bad("seen-negative", _set("minmax", "seen", torch.tensor([-1, 0, 1])), ">= 0", "minmax", "fc", "seen"),
    _bad("seen-batches", _edit_buffer("minmax", "seen", _many_batches), "non-empty batches",
         "minmax", "fc", "seen"),
    _bad("seen-no-finite", _forget_finite, "no finite value", "minmax", "fc", "seen"),
    _bad("method-changed", _kwargs("kl", method="mse"), "the name 'kl' means HistogramObserver(method='kl')",
         "kl", "fc", "kwargs"),
    _bad("settings-vs-extra-state", _kwargs("minmax", eps=1e-3), "saved with other settings",
         "minmax", "fc", "state_dict"),
    _bad("unknown-class", _unknown_class, "cannot rebuild", "minmax", "fc", "kwargs"),
    _bad("bad-kwargs", _kwargs("kl", bins=-1), "cannot rebuild", "kl", "fc", "kwargs"),
    _bad("unknown-kwarg", _kwargs("minmax", colour="red"), "cannot rebuild", "minmax", "fc", "kwargs"),
    _bad("missing-counts", _drop("kl", "counts"), "is missing", "kl", "fc", "state_dict['counts']"),
    _bad("missing-extra-state", _drop("kl", "_extra_state"), "is missing",
         "kl", "fc", "state_dict['_extra_state']"),
    _bad("unexpected-key", _set("minmax", "bonus", torch.zeros(1)), "is not a key",
         "minmax", "fc", "state_dict['bonus']"),
    _bad("wrong-dtype", _edit_buffer("minmax", "running_min", lambda t: t.double()),
         "must be a torch.float32", "minmax", "fc", "state_dict"),
    _bad("per-tensor-into-per-channel", _set("per_channel", "running_min", torch.tensor(0.0)), "shape",
         "per_channel", "fc", "state_dict"),
    _bad("channel-counts-differ", _edit_buffer("per_channel", "running_min", lambda t: t[:-1]), "channels",
         "per_channel", "fc", "running_min/running_max"),
]  # fmt: skip


@pytest.mark.parametrize(("edit", "message", "where"), BAD_STATES)
def test_bad_state_files_raise_state_file_error(saved, tmp_path, edit, message, where):
    _, state = saved
    state = copy.deepcopy(state)
    edit(state)
    path = _write(tmp_path, state)
    with pytest.raises(StateFileError) as info:
        io.load_state(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert message in str(err) and str(err).startswith(path)
    assert (err.kind, err.layer, err.key) == where
    assert len(str(err).splitlines()) == 1


def test_files_that_are_not_state_files(saved, tmp_path):
    path, _ = saved
    raw = path.read_bytes()
    cases = {
        "text.pt": b"not a torch file at all\n",
        "empty.pt": b"",
        "truncated.pt": raw[: len(raw) // 2],
        "cut-short.pt": raw[:-30],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(StateFileError, match="torch.load\\(weights_only=True\\) cannot read it") as info:
            io.load_state(str(tmp_path / name))
        assert len(str(info.value).splitlines()) == 1, name
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(StateFileError, match="is not a mono_quant observer state file"):
        io.load_state(str(tmp_path / "list.pt"))
    with pytest.raises(FileNotFoundError):
        io.load_state(str(tmp_path / "missing.pt"))


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path):
    torch.save({"format": io.STATE_FORMAT, "version": 1, "observers": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(StateFileError, match="cannot read it"):
        io.load_state(str(tmp_path / "evil.pt"))


def test_kinds_of_the_users_own_and_empty_observers_load(tmp_path):
    fresh = {
        "fc": {"my label": create_observer("kl"), "per_channel": create_observer("per_channel", ch_axis=1)}
    }
    fed = {"fc": {"everything nan": create_observer("histogram")}}
    fed["fc"]["everything nan"](torch.full((3,), float("nan")))
    for observers in (fresh, fed):
        io.save_state(observers, str(tmp_path / "s.pt"))
        loaded = io.load_state(str(tmp_path / "s.pt"))
        for kind, obs in observers["fc"].items():
            for name, buf in obs.named_buffers():
                assert torch.equal(getattr(loaded[kind]["fc"], name), buf)


def test_a_state_dict_saved_before_extra_state_still_loads(saved, tmp_path):
    _, state = saved
    state = copy.deepcopy(state)
    for entry in state["observers"].values():
        for layer in entry["layers"].values():
            sd = layer["state_dict"]
            layer["state_dict"] = OrderedDict(
                (k, v) for k, v in sd.items() if k != "_extra_state"
            )  # version 1
    loaded = io.load_state(_write(tmp_path, state))
    assert set(loaded) == set(compare.COMPARED)


def test_save_state_refuses_a_kind_name_that_does_not_describe_its_observer(tmp_path):
    with pytest.raises(ValueError, match="the name 'mse' means"):
        io.save_state({"fc": {"mse": create_observer("kl")}}, str(tmp_path / "s.pt"))
    assert not (tmp_path / "s.pt").exists()


# --- qparams JSON --------------------------------------------------------------------------------------


def _comparison() -> compare.Comparison:
    obs = {
        "fc": {"minmax": create_observer("minmax"), "per_channel": create_observer("per_channel", ch_axis=1)}
    }
    for o in obs["fc"].values():
        o(torch.tensor([[0.0, 0.5], [1.0, 2.55]]))
    scores = compare.score_observers(
        obs, {"fc": {"minmax": 0.0, "per_channel": 0.0}}, {"fc": torch.ones(2, 2)}
    )
    return compare.Comparison(scores, torch.int8, "affine", 1)


def _reject_constant(name):
    raise AssertionError(f"non-standard JSON: {name}")


def test_qparams_json_is_strict_and_non_finite_values_read_back(tmp_path):
    cmp = _comparison()
    s = cmp.scores["fc"]["minmax"]
    s.lo, s.hi, s.sqnr_db, s.seconds = -math.inf, math.inf, math.nan, math.inf
    io.save_qparams(cmp, str(tmp_path / "q.json"))
    text = (tmp_path / "q.json").read_text()
    doc = json.loads(text, parse_constant=_reject_constant)  # RFC 8259: no NaN / Infinity tokens
    entry = doc["layers"]["fc"]["observers"]["minmax"]
    assert entry["range"] == ["-inf", "inf"] and entry["sqnr_db"] == "nan" and entry["seconds"] == "inf"
    assert [float(v) for v in entry["range"]] == [-math.inf, math.inf]
    loaded = io.load_qparams(str(tmp_path / "q.json"))
    scale, zp = loaded["fc"]["minmax"]
    assert torch.equal(scale, s.scale.float()) and torch.equal(zp, s.zero_point.int())
    pc_scale, pc_zp = loaded["fc"]["per_channel"]
    assert pc_scale.shape == (2,) and pc_zp.shape == (2,)


def _qparams_doc(tmp_path) -> dict:
    io.save_qparams(_comparison(), str(tmp_path / "q.json"))
    return json.loads((tmp_path / "q.json").read_text())


def _entry(doc, kind="minmax"):
    return doc["layers"]["fc"]["observers"][kind]


BAD_QPARAMS = [
    ("version-99", lambda d: d.update(version=99), "version 99"),
    ("format", lambda d: d.update(format="x"), "is not a mono_quant qparams file"),
    ("layers-list", lambda d: d.update(layers=[]), "'layers' must be a dict"),
    ("qmin", lambda d: d.update(qmin=0), "qmin / qmax"),
    ("dtype", lambda d: d.update(dtype="int16"), "dtype 'int16'"),
    ("scale-zero", lambda d: _entry(d).update(scale=0.0), "finite positive float32"),
    ("scale-nan", lambda d: _entry(d).update(scale="nan"), "finite positive float32"),
    ("scale-text", lambda d: _entry(d).update(scale="big"), "expected a number"),
    ("scale-huge", lambda d: _entry(d).update(scale=1e39), "finite positive float32"),
    ("zero-point-range", lambda d: _entry(d).update(zero_point=300), "from -128 to 127"),
    ("zero-point-bool", lambda d: _entry(d).update(zero_point=True), "an int"),
    ("per-channel-lengths", lambda d: _entry(d, "per_channel")["scale"].append(1.0), "scales but"),
    ("ch-axis-without-lists", lambda d: _entry(d).update(ch_axis=0), "per-channel entries"),
    ("best", lambda d: d["layers"]["fc"].update(best="nope"), "best 'nope'"),
]


@pytest.mark.parametrize(("edit", "message"), [pytest.param(*b[1:], id=b[0]) for b in BAD_QPARAMS])
def test_bad_qparams_files_raise_state_file_error(tmp_path, edit, message):
    doc = _qparams_doc(tmp_path)
    edit(doc)
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(StateFileError, match=None) as info:
        io.load_qparams(str(tmp_path / "bad.json"))
    assert message in str(info.value) and len(str(info.value).splitlines()) == 1


def test_qparams_files_that_are_not_json(tmp_path):
    (tmp_path / "text.json").write_text("scale = 1\n")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    for name in ("text.json", "binary.json"):
        with pytest.raises(StateFileError, match="is not JSON"):
            io.load_qparams(str(tmp_path / name))
    doc = _qparams_doc(tmp_path)
    text = json.dumps(doc).replace('"sqnr_db": ', '"sqnr_db": NaN, "was": ', 1)
    (tmp_path / "nan.json").write_text(text)
    with pytest.raises(StateFileError, match="holds NaN, which is not JSON"):
        io.load_qparams(str(tmp_path / "nan.json"))
    doc["version"] = 1  # version 1 wrote -Infinity in "range": still read
    (tmp_path / "v1.json").write_text(
        json.dumps(doc, allow_nan=True).replace('"range": [', '"range": [-Infinity, ', 1)
    )
    assert set(io.load_qparams(str(tmp_path / "v1.json"))) == {"fc"}


# --- writing files ---------------------------------------------------------------------------------------


def test_write_file_replaces_only_once_complete(tmp_path, monkeypatch):
    target = tmp_path / "q.json"
    target.write_text("old")
    target.chmod(0o640)
    io.write_file(str(target), b"new")
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o640

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        io.write_file(str(target), b"newer")
    assert target.read_text() == "new"  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.json"]  # and no temporary file is left


def test_write_file_follows_symlinks_and_writes_devices_in_place(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    io.write_file(str(link), b"new")
    assert link.is_symlink() and real.read_text() == "new"
    if os.path.exists("/dev/null"):
        io.write_file("/dev/null", b"x")
        assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_check_writable_changes_nothing_and_names_the_problem(tmp_path):
    existing = tmp_path / "keep.json"
    existing.write_text("keep")
    before = existing.stat().st_mtime_ns
    io.check_writable(str(existing))
    io.check_writable(str(tmp_path / "new.json"))
    assert existing.read_text() == "keep" and existing.stat().st_mtime_ns == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]
    with pytest.raises(FileNotFoundError, match="the folder .* does not exist"):
        io.check_writable(str(tmp_path / "no" / "q.json"))
    with pytest.raises(IsADirectoryError, match="is a folder"):
        io.check_writable(str(tmp_path))
    with pytest.raises(OSError, match="cannot create a file there") as info:
        io.check_writable(str(tmp_path / ("a" * 300 + ".json")))
    assert "name too long" in info.value.strerror.lower()
