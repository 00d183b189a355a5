"""run_calibration(mask_key=...): padding tokens are left out of every observer's statistics.

The oracle is the unpadded sequences run one by one without a mask: for observers whose state does not
depend on how the data is split into batches, their state after all of them; for every observer, one
observation of the real tokens' activations gathered into one tensor (what one batch without padding
would give).
"""

import pytest
import torch
from torch import nn

from mono_quant import MinMaxObserver, run_calibration
from mono_quant.calibration import capture_inputs
from mono_quant.core.registry import OBSERVERS, create_observer
from mono_quant.state import Seen

V, H = 50, 16
LENGTHS = [5, 2, 7, 4]


class TokenNet(nn.Module):
    """Token-wise layers: ``fc1`` reads ``[B, S, H]``, ``fc2`` the flattened tokens ``[B * S, H]``, and a
    pooled ``head`` reads ``[B, H]`` (not token-shaped: observed whole)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(V, H)
        with torch.no_grad():
            self.emb.weight[0] = 25.0  # the padding token: far outside every real token's range
        self.fc1 = nn.Linear(H, H)
        self.fc2 = nn.Linear(H, H)
        self.head = nn.Linear(H, 3)
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, **unused):
        self.calls += 1
        x = self.emb(input_ids)  # (B, S, H)
        x = torch.relu(self.fc1(x)) * 3.0
        y = self.fc2(x.reshape(-1, H)).reshape(x.shape)  # (B * S, H)
        return self.head(y.mean(1))  # (B, H)


def _sequences() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(1, V, (n,), generator=g) for n in LENGTHS]


def _padded(seqs, side: str, mask_dtype=torch.int64) -> dict:
    """One batch of ``seqs`` padded with token 0 (whose activations lie outside every real token's) on
    ``side``, with a 1 / 0 ``attention_mask``."""
    longest = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), longest, dtype=torch.long)
    mask = torch.zeros(len(seqs), longest, dtype=mask_dtype)
    for i, s in enumerate(seqs):
        where = slice(0, len(s)) if side == "right" else slice(longest - len(s), longest)
        ids[i, where] = s
        mask[i, where] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _observer_kwargs(kind: str) -> dict:
    return {"bins": 64} if OBSERVERS[kind][0].__name__ == "HistogramObserver" else {}


# observers whose state after several batches is that of their data in one batch (per_block keeps one amax
# per block position of the batch's [R, C] grid: batches of other shapes cannot be compared with it)
ORDERED = ("moving_average", "moving_average_per_channel", "amax_history", "per_block")
SPLIT_FREE = [k for k in OBSERVERS if k not in ORDERED]


def _state(obs) -> dict[str, torch.Tensor]:
    return {k: v for k, v in obs.state_dict().items() if k not in ("seen", "_extra_state")}


def _assert_same_statistics(got, want, what: str) -> None:
    g, w = _state(got), _state(want)
    assert g.keys() == w.keys(), what
    for key in w:
        if w[key].dtype == torch.float64:  # channel statistics' sums: float64, their order may differ
            torch.testing.assert_close(g[key], w[key], rtol=1e-13, atol=0, msg=f"{what}: {key}")
        else:
            assert torch.equal(g[key], w[key]), f"{what}: {key} {g[key]} != {w[key]}"
    assert torch.equal(got.seen[: Seen.NONFINITE + 1], want.seen[: Seen.NONFINITE + 1]), what


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", list(OBSERVERS))
def test_a_padded_batch_gives_the_state_of_its_real_tokens(kind, side):
    model, seqs = TokenNet(), _sequences()
    kwargs = _observer_kwargs(kind)
    result = run_calibration(model, [_padded(seqs, side)], kind, observer_kwargs=kwargs, progress=False)
    assert result.masked == {"fc1": True, "fc2": True, "head": False}
    assert result.masked_layers() == ["fc1", "fc2"] and result.unmasked_layers() == ["head"]
    pads = sum(max(LENGTHS) - n for n in LENGTHS)
    for name in ("fc1", "fc2"):
        assert result[name].masked_count == pads * H, name
    # one observation of the real tokens' activations, gathered from the sequences run alone
    alone = [capture_inputs(model, {"input_ids": s[None]}) for s in seqs]
    real = _padded(seqs, side)["attention_mask"].reshape(-1).nonzero().flatten()  # real rows, in order
    for name in ("fc1", "fc2"):
        rows = torch.cat([a[name].reshape(-1, H) for a in alone])
        if kind == "per_block":  # one amax per row (H < the block size): -inf where masked
            got = result[name]
            want = torch.full_like(got.block_amax, float("-inf"))
            want[real, 0] = rows.abs().amax(-1)
            assert torch.equal(got.block_amax, want), f"{side} {name}"
            assert (float(got.min_val), float(got.max_val)) == (float(rows.min()), float(rows.max()))
            continue
        oracle = create_observer(kind, **kwargs)
        if oracle.ch_axis is not None:
            oracle = type(oracle)(**{**oracle.settings(), "ch_axis": -1})
        oracle(rows)
        _assert_same_statistics(result[name], oracle, f"{kind} {side} {name}")
    if kind in SPLIT_FREE:  # and the unpadded sequences run one by one through run_calibration
        one_by_one = run_calibration(
            model, [{"input_ids": s[None]} for s in seqs], kind, observer_kwargs=kwargs, progress=False
        )
        assert one_by_one.masked == {"fc1": None, "fc2": None, "head": None}
        for name in ("fc1", "fc2"):
            _assert_same_statistics(result[name], one_by_one[name], f"{kind} {side} {name} one by one")


def test_padding_changes_the_unmasked_statistics():
    # guards the test above: the padding token's activations do lie outside the real tokens' range
    model, seqs = TokenNet(), _sequences()
    masked = run_calibration(model, [_padded(seqs, "right")], progress=False)
    whole = run_calibration(model, [_padded(seqs, "right")], mask_key=None, progress=False)
    assert whole.masked == {"fc1": None, "fc2": None, "head": None}  # mask_key=None: no mask
    differs = [
        n
        for n in ("fc1", "fc2")
        if (float(masked[n].min_val), float(masked[n].max_val))
        != (float(whole[n].min_val), float(whole[n].max_val))
    ]
    assert differs == ["fc1", "fc2"]


def test_bool_masks_other_keys_and_batches_without_the_key():
    model, seqs = TokenNet(), _sequences()
    batch = _padded(seqs, "left", torch.bool)
    as_int = run_calibration(model, [_padded(seqs, "left")], progress=False)
    as_bool = run_calibration(model, [batch], progress=False)
    for name in ("fc1", "fc2"):
        _assert_same_statistics(as_bool[name], as_int[name], name)
    # another key: the model gets the batch as it is, the mask comes from that key
    renamed = {"input_ids": batch["input_ids"], "attention_mask": None, "tokens": batch["attention_mask"]}
    by_key = run_calibration(model, [renamed], mask_key="tokens", progress=False)
    assert by_key.masked_layers() == ["fc1", "fc2"]
    _assert_same_statistics(by_key["fc1"], as_int["fc1"], "mask_key='tokens'")
    # a batch without the key, a tuple batch: observed whole, no batch had a mask
    plain = run_calibration(model, [{"input_ids": batch["input_ids"]}, (batch["input_ids"],)], progress=False)
    assert plain.masked == {"fc1": None, "fc2": None, "head": None} and plain.unmasked_layers() == []
    # a batch without a mask leaves what the batches with one reported as it is
    mixed = run_calibration(TokenNet(), [batch, {"input_ids": batch["input_ids"][:, :3]}], progress=False)
    assert mixed.masked == {"fc1": True, "fc2": True, "head": False}


@pytest.mark.parametrize("bad", [3, "", b"attention_mask", ("attention_mask",)])
def test_a_bad_mask_key_is_refused_before_the_model_runs(bad):
    model = TokenNet()
    with pytest.raises(ValueError, match=r"mask_key=.* must be the key of the token mask"):
        run_calibration(model, [_padded(_sequences(), "right")], mask_key=bad, progress=False)
    assert model.calls == 0


@pytest.mark.parametrize(
    "mask, error, match",
    [
        (
            torch.ones(4, 7),
            TypeError,
            r"batch\['attention_mask'\] is a torch.float32 tensor; a token mask is bool",
        ),
        (torch.full((4, 7), 2), ValueError, r"values other than 0 and 1 \(min 2, max 2\)"),
        ([[1] * 7] * 4, TypeError, r"batch\['attention_mask'\] is a list"),
    ],
)
def test_a_mask_of_a_wrong_dtype_is_a_clear_error_before_any_state_changes(mask, error, match):
    model = TokenNet()
    batch = {"input_ids": _padded(_sequences(), "right")["input_ids"], "attention_mask": mask}
    with pytest.raises(error, match=match):
        run_calibration(model, [batch], progress=False)
    assert model.calls == 0


def test_an_observer_without_masks_is_an_error_only_when_a_batch_has_one():
    class Unmasked(MinMaxObserver):
        def forward(self, x):
            return super().forward(x)

    batch = _padded(_sequences(), "right")
    with pytest.raises(TypeError, match=r"Unmasked.forward takes no mask.*mask_key=None"):
        run_calibration(TokenNet(), [batch], Unmasked, progress=False)
    result = run_calibration(TokenNet(), [batch], Unmasked, mask_key=None, progress=False)
    assert int(result["fc1"].seen[Seen.BATCHES]) == 1


@pytest.mark.parametrize("side", ["right", "left"])
def test_the_cli_comparison_leaves_the_padding_out_too(side):
    from mono_quant.compare import COMPARED, calibrate_observers

    model, seqs = TokenNet(), _sequences()
    padded = _padded(seqs, side)
    got, _ = calibrate_observers(model, [padded], COMPARED, torch.int8, "affine")
    alone = [{"input_ids": torch.cat(seqs)[None]}]  # the real tokens, in one unpadded sequence
    want, _ = calibrate_observers(model, alone, COMPARED, torch.int8, "affine")
    every, _ = calibrate_observers(model, [padded], COMPARED, torch.int8, "affine", mask_key=None)
    for kind in COMPARED:
        for name in ("fc1", "fc2"):
            _assert_same_statistics(got[name][kind], want[name][kind], f"{kind} {side} {name}")
            assert got[name][kind].masked_count > 0 and every[name][kind].masked_count == 0
        assert not torch.equal(every["fc1"][kind].running_max, got["fc1"][kind].running_max), kind
