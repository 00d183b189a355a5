"""``PerBlockObserver``: running per-block amaxes, the formats' scales, state, merges and bad input."""

import itertools
import math

import pytest
import torch

import mono_quant
from mono_quant.core import formats as F
from mono_quant.core.block_observer import PerBlockObserver

CASES = [(name, bs) for name, fmt in F.FORMATS.items() for bs in fmt.block_sizes]
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


def oracle_amax(xs, block):
    """float64 per-block max of |x| over the finite values of all the batches (same 2-D shape)."""
    x = torch.stack([t.double().reshape(-1, t.shape[-1]) for t in xs])
    (r, c), (br, bc) = x.shape[1:], block
    rb, cb = -(-r // br), -(-c // bc)
    pad = torch.full((len(xs), rb * br, cb * bc), float("-inf"), dtype=torch.float64)
    pad[:, :r, :c] = torch.where(torch.isfinite(x), x.abs(), float("-inf"))
    return pad.reshape(-1, rb, br, cb, bc).amax((0, 2, 4)).float()


def batches(shape, dtype=torch.float32, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(shape, generator=g) * (i + 1) ** 2
        x.view(-1)[i::17] = float("nan") if i % 2 else float("inf")
        out.append(x.to(dtype))
    return out


def make(name, block, **kwargs):
    return PerBlockObserver(block, name, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, block", CASES)
def test_running_amax_is_the_amax_of_all_batches_in_any_order(name, block, backend):
    xs = batches((2, 70, 150), torch.bfloat16)  # [140, 150]: ragged rows of 128-tiles and last blocks
    want = oracle_amax(xs, block)
    for order in itertools.islice(itertools.permutations(xs), 3):
        obs = make(name, block, backend=backend)
        for x in order:
            assert obs(x) is x
        assert torch.equal(obs.block_amax, want)
        assert obs.nonfinite_count == sum(int((~torch.isfinite(x)).sum()) for x in xs)
        assert int(obs.seen[2]) == 4


@pytest.mark.parametrize("name, block", CASES)
def test_scales_are_the_formats_scales_of_the_data(name, block):
    """One finite batch: the observer's scales are what quantizing the tensor gives."""
    x = torch.randn(3, 64, 256, dtype=torch.bfloat16)
    obs = make(name, block)
    obs(x)
    scales, tensor_scale = obs.calculate_qparams()
    q = F.quantize(x, name, block_size=block)
    assert scales.dtype == F.FORMATS[name].scale_dtype
    bits = lambda s: s.view(torch.uint8) if s.element_size() == 1 else s  # noqa: E731
    assert torch.equal(bits(scales), bits(q.scales).reshape(scales.shape))
    if name == "nvfp4":
        assert torch.equal(tensor_scale, q.tensor_scale)
        assert torch.equal(tensor_scale, F.tensor_scale_from_range(obs.min_val, obs.max_val))
    else:
        assert tensor_scale is None
    fq = F.fake_quantize(x, name, block_size=block, scales=scales, tensor_scale=tensor_scale)
    assert torch.equal(fq, F.fake_quantize(x, name, block_size=block))


def test_rceil_scales():
    x = torch.randn(8, 64)
    obs = make("mxfp8_e4m3", None, rounding="rceil")
    obs(x)
    want = F.quantize(x, "mxfp8_e4m3", rounding="rceil").scales
    assert torch.equal(obs.calculate_qparams().scales.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_hold_the_same_state(backend):
    xs = batches((33, 100))
    a, b = make("mxfp4_e2m1", None, backend="torch"), make("mxfp4_e2m1", None, backend=backend)
    for x in xs:
        a(x), b(x)
    for (n, u), (_, v) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(u, v), n


def test_any_split_across_observers_merges_by_max():
    """Batches split over observers (ranks, jobs): the elementwise max of their states is the state of
    one observer that saw everything."""
    xs = batches((16, 96), n=6)
    whole = make("nvfp4", None)
    for x in xs:
        whole(x)
    for split in (2, 3, 5):
        parts = [make("nvfp4", None), make("nvfp4", None)]
        for i, x in enumerate(xs):
            parts[i >= split](x)
        merged = torch.maximum(parts[0].block_amax, parts[1].block_amax)
        assert torch.equal(merged, whole.block_amax)


def test_merge_observers_is_exact():
    xs = batches((16, 96), n=4)
    a, b, whole = make("mxfp8_e4m3", None), make("mxfp8_e4m3", None), make("mxfp8_e4m3", None)
    for i, x in enumerate(xs):
        (a if i % 2 else b)(x)
        whole(x)
    merged = mono_quant.merge_observers([a, b])
    for (n, u), (_, v) in zip(merged.state_dict().items(), whole.state_dict().items(), strict=True):
        assert torch.equal(u, v), n


@pytest.mark.parametrize("sized", [False, True])
def test_state_round_trips(sized, tmp_path):
    x = batches((4, 8, 64), n=1)[0]
    kwargs = {"shape": (4, 8, 64)} if sized else {}
    obs = make("mxfp8_e5m2", None, rounding="rceil", **kwargs)
    obs(x)
    path = tmp_path / "obs.pt"
    torch.save(obs.state_dict(), path)
    again = make("mxfp8_e5m2", None, rounding="rceil", **kwargs)
    again.load_state_dict(torch.load(path, weights_only=True))
    for (n, u), (_, v) in zip(obs.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(u, v), n
    assert torch.equal(
        again.calculate_qparams().scales.view(torch.uint8), obs.calculate_qparams().scales.view(torch.uint8)
    )
    with pytest.raises(ValueError, match="rounding: saved 'rceil', here 'floor'"):
        make("mxfp8_e5m2", None, **kwargs).load_state_dict(obs.state_dict())
    assert type(obs)(**obs.settings()).settings() == obs.settings()


def test_shape_sizes_the_buffers_and_reset_keeps_them():
    obs = make("fp8_block", (128, 128), shape=(300, 257))
    assert obs.block_amax.shape == (3, 3) and bool((obs.block_amax == -math.inf).all())
    obs(torch.randn(300, 257))
    obs.reset()
    assert obs.block_amax.shape == (3, 3) and obs.amax is None
    unsized = make("fp8_block", (128, 128))
    unsized(torch.randn(10, 10))
    unsized.reset()
    assert unsized.block_amax.shape == (0, 0)
    unsized(torch.randn(300, 257))  # another grid after reset, as the error advises
    assert unsized.block_amax.shape == (3, 3)


def test_a_tensor_of_another_grid_is_refused_before_any_state_changes():
    obs = make("mxfp8_e4m3", None)
    obs(torch.randn(4, 64))
    before = {k: v.clone() for k, v in obs.state_dict().items()}
    with pytest.raises(ValueError, match=r"4 x 2 grid of \(1, 32\) blocks.*reset\(\) forgets the grid"):
        obs(torch.randn(4, 96))
    for k, v in obs.state_dict().items():
        assert torch.equal(v, before[k]), k
    obs(torch.randn(4, 60))  # the same grid, a ragged last block: fine
    assert obs.block_amax.shape == (4, 2)


def test_a_failed_first_observation_does_not_fix_the_grid(monkeypatch):
    import mono_quant.core.block_observer as mod

    obs = make("mxfp8_e4m3", None)
    monkeypatch.setattr(
        mod, "block_amax_update_", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    )
    with pytest.raises(RuntimeError, match="boom"):
        obs(torch.randn(4, 64))
    assert obs.block_amax.shape == (0, 0)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.complex64])
def test_integer_and_complex_tensors_are_refused(dtype):
    obs = make("mxfp8_e4m3", None)
    with pytest.raises(TypeError, match="cannot observe a tensor of dtype"):
        obs(torch.zeros(4, 32, dtype=dtype))
    assert obs.block_amax.shape == (0, 0) and int(obs.seen.sum()) == 0


def test_bad_settings_and_inputs():
    with pytest.raises(ValueError, match="use one of: mxfp8_e4m3, mxfp8_e5m2, mxfp4_e2m1, nvfp4, fp8_block"):
        PerBlockObserver(format="int4_block")
    with pytest.raises(ValueError, match=r"nvfp4 blocks are \(1, 16\)"):
        PerBlockObserver((1, 32), "nvfp4")
    with pytest.raises(ValueError, match="leave rounding at 'floor'"):
        PerBlockObserver(format="fp8_block", rounding="rceil")
    with pytest.raises(ValueError, match="shape="):
        PerBlockObserver(shape=(4, 0))
    obs = PerBlockObserver()
    with pytest.raises(ValueError, match="0-d tensor"):
        obs(torch.tensor(3.0))
    assert int(obs.seen.sum()) == 0


def test_nothing_observed_and_blocks_without_finite_values_raise():
    obs = PerBlockObserver()
    with pytest.raises(RuntimeError, match="observed no data"):
        obs.calculate_qparams()
    x = torch.randn(2, 64)
    x[1, 32:] = float("nan")
    obs(x)
    with pytest.raises(RuntimeError, match=r"1 of 4 blocks saw no finite value \(blocks \(1, 1\)\)"):
        obs.calculate_qparams()
    x[1, 32:] = 1.0
    obs(x)
    obs.calculate_qparams()


def test_compile_fullgraph_of_a_sized_observer():
    torch._dynamo.reset()
    eager, fresh = make("nvfp4", None, shape=(4, 64)), make("nvfp4", None, shape=(4, 64))
    run = torch.compile(fresh, fullgraph=True, backend="aot_eager")
    for scale in (1.0, 3.0):
        x = torch.randn(4, 64) * scale
        run(x), eager(x)
    for (n, u), (_, v) in zip(fresh.state_dict().items(), eager.state_dict().items(), strict=True):
        assert torch.equal(u, v), n


def test_half_and_double_keep_the_statistics_float32():
    obs = make("mxfp8_e4m3", None)
    obs(torch.randn(2, 32))
    obs.half()
    obs.double()
    assert obs.block_amax.dtype == torch.float32 and obs.seen.dtype == torch.int64
    assert "format='mxfp8_e4m3'" in repr(obs)


# --- real CUDA (marked gpu: skipped without one; benchmarks/gpu_check.sh runs them) -------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name, block", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_equals_torch_on_cuda(name, block, dtype):
    pytest.importorskip("mono_quant.kernels", reason="triton is not installed")
    xs = [x.cuda() for x in batches((3, 700, 1000), dtype)]  # ragged (1000 % 128 != 0), 2.1e6 values
    tri, ref = make(name, block, backend="triton").cuda(), make(name, block, backend="torch").cuda()
    for x in xs:
        tri(x), ref(x)
    for (n, u), (_, v) in zip(tri.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(u, v), n
    for scales in (None, ref.calculate_qparams()):
        kw = {} if scales is None else {"scales": scales.scales, "tensor_scale": scales.tensor_scale}
        if name == "nvfp4" and scales is None:
            kw["tensor_scale"] = torch.tensor(0.01, device="cuda")
        a = F.fake_quantize(xs[0].reshape(-1, 1000), name, block_size=block, backend="triton", **kw)
        b = F.fake_quantize(xs[0].reshape(-1, 1000), name, block_size=block, backend="torch", **kw)
        assert bool(((a == b) | (a.isnan() & b.isnan())).all())


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mxfp8_e4m3", "nvfp4"])
def test_sync_free_and_cuda_graph_capturable(name):
    pytest.importorskip("mono_quant.kernels", reason="triton is not installed")
    x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
    obs, eager = make(name, None, shape=(512, 1024)).cuda(), make(name, None, shape=(512, 1024)).cuda()
    obs(x), eager(x)  # compile the kernels
    t = torch.tensor(0.01, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        obs(x)
        F.fake_quantize(x, name, tensor_scale=t if name == "nvfp4" else None)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    eager(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        obs(x)
        y = F.fake_quantize(x, name, tensor_scale=t if name == "nvfp4" else None)
    for _ in range(2):
        graph.replay()
        eager(x)
    torch.cuda.synchronize()
    for (n, u), (_, v) in zip(obs.state_dict().items(), eager.state_dict().items(), strict=True):
        assert torch.equal(u, v), n
    assert torch.equal(y, F.fake_quantize(x, name, tensor_scale=t if name == "nvfp4" else None))


@pytest.mark.gpu
def test_offsets_past_2_31_elements():
    pytest.importorskip("mono_quant.kernels", reason="triton is not installed")
    x = torch.zeros((1 << 31) // 4096 + 1, 4096, device="cuda", dtype=torch.bfloat16)
    x[-1, -1] = 3.0
    obs = make("mxfp8_e4m3", None, backend="triton").cuda()
    obs(x)
    assert float(obs.block_amax[-1, -1]) == 3.0 and float(obs.block_amax[:, :-1].max()) == 0.0
    assert float(F.fake_quantize(x, "mxfp8_e4m3", backend="triton")[-1, -1]) == 3.0
