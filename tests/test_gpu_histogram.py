"""The one-read histogram binnings on a real CUDA device (marked ``gpu``; run by benchmarks/gpu_check.sh).

Under the interpreter the same kernels run with scratch counters; here they run with the counters a GPU
gets (inline-PTX shared memory on Triton 3.6 to 3.9), which only a GPU can prove: every count exact
against the torch path after every batch, on randn, LLM-like and concentrated data, bf16 and fp16, NaN
and Inf, growing ranges, side-buffer overflow, both flushes, and a sync-free forward captured in a CUDA
graph. A failure here means the binning must not be used: no timing matters before these pass.
"""

import pytest
import torch

import mono_quant
from mono_quant import reference
from mono_quant.grid import internal_bins
from mono_quant.state import HistogramState

pytestmark = pytest.mark.gpu

kernels = pytest.importorskip("mono_quant.kernels", reason="triton is not installed")
from mono_quant.kernels import _smem  # noqa: E402
from mono_quant.kernels import histogram as khist  # noqa: E402

DEV = "cuda"
ONE_READ = ("smem_rows", "smem_atomic")


def _check(seq, bins, strategy):
    got = HistogramState.empty(internal_bins(bins), device=DEV)
    want = HistogramState.empty(internal_bins(bins), device=DEV)
    for i, x in enumerate(seq):
        khist.histogram_update_(x, got, strategy=strategy)
        reference.histogram_update_(x, want)
        for name, g, w in zip(HistogramState._fields, got, want, strict=True):
            if not torch.equal(g, w):
                diff = (g != w).nonzero().flatten()[:8].tolist() if g.dim() else []
                pytest.fail(
                    f"{strategy} batch {i} {name}: first differing bins {diff}; {g.sum()} vs {w.sum()}"
                )
    assert int(got.counts.sum()) == int(got.seen[0])


def _llm_like(n, dtype):
    """Most values in a few bins near zero, a few outlier channels far out (as LLM activations)."""
    x = torch.randn(n // 4096, 4096, device=DEV) * 0.05
    x[:, [7, 1000, 2049]] *= 400
    return x.reshape(-1).to(dtype)


@pytest.mark.parametrize("strategy", ONE_READ)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_exact_on_randn_and_growing_ranges(strategy, dtype):
    n = (1 << 22) + 4097  # many tiles per program, a ragged tail
    xs = [torch.randn(n, device=DEV) * s + o for s, o in ((1, 0), (0.5, 0.25), (3, -2), (1, 5), (0.1, 0))]
    xs[2][::997] = float("nan")
    xs[3][-1] = float("inf")
    _check([x.to(dtype) for x in xs], 2048, strategy)


@pytest.mark.parametrize("strategy", ONE_READ)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_on_concentrated_and_llm_like(strategy, dtype):
    n = 1 << 23
    concentrated = (torch.randn(n, device=DEV)).round().to(dtype)  # 7 bins hold almost all
    constant = torch.full((n,), 0.5, device=DEV, dtype=dtype)  # one bin: every lane of a warp on one word
    llm = _llm_like(n, dtype)
    _check([llm, concentrated, constant, llm * 1.5, llm], 2048, strategy)


@pytest.mark.parametrize("strategy", ONE_READ)
def test_side_buffer_paths(strategy, monkeypatch):
    """Growth in a few tiles (noted, re-read alone), in many (past SIDE: whole programs re-read)."""
    monkeypatch.setattr(khist, "SIDE", 2)
    n = 1 << 22
    base = torch.rand(n, device=DEV)
    few = torch.rand(n, device=DEV)
    few[[5, 70_000, n - 1]] = torch.tensor([3.0, -2.0, 9.0], device=DEV)
    many = torch.rand(n, device=DEV)
    many[:: 4096 * 3] = 40.0
    _check([base, few, many, -many, base], 512, strategy)


def test_bins_at_the_shared_memory_cap():
    fits = (_smem.PTX_MAX_SLOTS - 3) // 2 - 1
    x = torch.randn(1 << 21, device=DEV) * 10
    _check([x, x * 4, x.to(torch.bfloat16)], fits, "smem_rows")


@pytest.mark.parametrize("strategy", ONE_READ)
def test_sync_free_and_graph_replay(strategy, monkeypatch):
    monkeypatch.setattr(khist, "HIST_STRATEGY", strategy)
    eager = mono_quant.HistogramObserver(bins=2048, backend="triton").to(DEV)
    graphed = mono_quant.HistogramObserver(bins=2048, backend="triton").to(DEV)
    xs = [torch.randn(1 << 20, device=DEV) * s for s in (1.0, 2.0, 0.5, 3.0)]
    eager(xs[0])
    graphed(xs[0])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager(xs[1])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    static = xs[1].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graphed(static)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        graphed(static)
    for x in xs[2:]:
        static.copy_(x)
        g.replay()
        eager(x)
    torch.cuda.synchronize()
    for (name, a), (_, b) in zip(graphed.state_dict().items(), eager.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
