"""Syncing MoE expert observers over 2 gloo ranks where some experts are empty on some ranks.

ModelOpt's issue 831: a rank whose expert saw no token skips the collective for it and the job hangs. Here
every rank takes part in the same fixed collectives whatever it saw; the merged state must equal that of one
process over all the data, and a hang fails the test after ``spawn_ranks.TIMEOUT_S`` (90 s) instead of
blocking the run.
"""

import pytest
import torch
import torch.nn.functional as F
from spawn_ranks import run_ranks
from torch import nn

import mono_quant as mq
from mono_quant.calibration.experts import empty_segments

E, H, WORLD = 4, 6, 2
KINDS = {
    "minmax": lambda: mq.MinMaxObserver(),
    "histogram": lambda: mq.HistogramObserver(bins=32, method="mse"),
    "per_channel": lambda: mq.PerChannelMinMaxObserver(ch_axis=-1),
}


def _shares() -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per rank, ``(x [T, H], expert ids [T, 2])`` batches: rank 0 routes to experts 0 and 1 only, rank 1
    to 1 and 2 only (other ranges), and expert 3 gets nothing anywhere."""
    g = torch.Generator().manual_seed(21)
    out = []
    for rank, (a, b) in enumerate([(0, 1), (1, 2)]):
        batches = []
        for i in range(2):
            t = 5 + 3 * i + rank
            x = torch.randn(t, H, generator=g) * (1 + 10 * rank) + 5 * rank
            ids = torch.tensor([[a, b], [b, a]] * t)[:t]
            batches.append((x, ids))
        out.append(batches)
    return out


def _observe(kind: str, batches) -> mq.ObserverBase:
    obs = KINDS[kind]()
    for x, ids in batches:
        obs(x, segments=ids, num_segments=E)
    return obs


def _snapshot(obs) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in obs.state_dict().items() if k != "_extra_state"}


class Experts(nn.Module):
    """Fused experts on transformers' template (stacked ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``,
    ``forward(hidden_states, top_k_index, top_k_weights)``), without transformers: the ranks start fast."""

    def __init__(self, inter: int = 8):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * inter, H))
        self.down_proj = nn.Parameter(torch.randn(E, H, inter))
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(E):
            rows, pos = torch.where(top_k_index == e)
            gate, up = F.linear(hidden_states[rows], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, self.down_proj[e]) * top_k_weights[rows, pos, None]
            out.index_add_(0, rows, y)
        return out


class MoE(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(9)
        self.emb = nn.Embedding(64, H)
        self.router = nn.Linear(H, E)
        self.experts = Experts()

    def forward(self, input_ids):
        h = self.emb(input_ids).reshape(-1, H)
        logits = self.router(h)
        logits[:, 3] = float("-inf")  # expert 3 is never picked
        weights, index = torch.topk(torch.softmax(logits, dim=-1), 2, dim=-1)
        return self.experts(h, index, weights)


def _moe_calibration(rank: int):
    """run_calibration(sync=True) of a tiny MoE model: rank 0 sees 4 batches, rank 1 none at all."""
    g = torch.Generator().manual_seed(4)
    batches = [{"input_ids": torch.randint(0, 64, (2, 5), generator=g)} for _ in range(4)]
    return mq.run_calibration(MoE(), batches if rank == 0 else [], "histogram", sync=True, progress=False)


def _rank(rank: int) -> dict:
    out = {}
    share = _shares()[rank]
    observers = {kind: _observe(kind, share) for kind in KINDS}
    out["pre_empty"] = {k: empty_segments(o, E) for k, o in observers.items()}
    mq.sync_observers(observers)
    out["post"] = {k: _snapshot(o) for k, o in observers.items()}
    result = _moe_calibration(rank)
    out["calibration"] = {k: _snapshot(o) for k, o in result.items()}
    out["share"] = result.qparams(empty="share")
    return out


def _rank_of(rank: int, world: int) -> dict:
    return _rank(rank)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(WORLD, _rank_of, tmp_path_factory.mktemp("experts"), __name__)


def test_the_ranks_really_have_different_empty_experts(ranks):
    assert ranks[0]["pre_empty"]["minmax"] == [2, 3] and ranks[1]["pre_empty"]["minmax"] == [0, 3]


@pytest.mark.parametrize("kind", KINDS)
def test_sync_with_empty_experts_is_exact(ranks, kind):
    every = [b for share in _shares() for b in share]
    want = _snapshot(_observe(kind, every))
    for rank, out in enumerate(ranks):
        got = out["post"][kind]
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), f"rank {rank} {kind} {key}"


def test_run_calibration_sync_when_one_rank_saw_nothing(ranks):
    want = _moe_calibration(0)  # one process: the same data, no process group (sync is a no-op)
    layers = ["experts.gate_up_proj", "experts.down_proj"]
    assert set(layers) <= set(want) and want.empty_experts() == dict.fromkeys(layers, [3])
    shared = want.qparams(empty="share")
    for rank, out in enumerate(ranks):
        for name, obs in want.items():
            got, ref = out["calibration"][name], _snapshot(obs)
            for key in ref:
                assert torch.equal(got[key], ref[key]), f"rank {rank} {name} {key}"
        for layer, (scale, zp) in shared.items():
            assert torch.equal(out["share"][layer][0], scale) and torch.equal(out["share"][layer][1], zp)
