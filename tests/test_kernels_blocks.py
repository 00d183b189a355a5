"""Block kernels (``mono_quant.kernels.blocks``) against ``mono_quant.reference`` and a float64 oracle,
under the interpreter.

Block amaxes, ``seen`` and the range are compared exactly; fake-quantized values bit for bit (NaN for
NaN). Shapes are small (the interpreter runs every program in Python) but straddle the kernels' tiles:
ragged last blocks, ragged tiles, a tile count that is not a multiple of the programs.
"""

import pytest
import torch

from mono_quant import reference
from mono_quant.blockwise import BlockRule
from mono_quant.minifloat import E2M1, E4M3, E5M2
from mono_quant.state import RangeState

kernels = pytest.importorskip("mono_quant.kernels", reason="triton is not installed")
from mono_quant.kernels import blocks as kb  # noqa: E402

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (shape, block): ragged rows of blocks, a ragged last block, small and 128-wide tiles
AMAX_CASES = [
    ((37, 100), (1, 32)),
    ((8, 64), (1, 16)),
    ((3, 5, 300), (1, 128)),
    ((1, 7), (1, 32)),
    ((9, 13), (4, 4)),
    ((130, 140), (128, 128)),
]
RULES = [
    BlockRule(E4M3, "e8m0_floor"),
    BlockRule(E5M2, "e8m0_rceil"),
    BlockRule(E2M1, "e8m0_floor"),
    BlockRule(E2M1, "e8m0_rceil"),
    BlockRule(E2M1, "nvfp4"),
    BlockRule(E4M3, "fp32"),
]


def oracle_block_amax(xs, block):
    """float64: per block, the max of |x| over the finite values of every batch (-inf where none)."""
    x = torch.stack([t.double().reshape(-1, t.shape[-1]) for t in xs])  # (batches, R, C)
    (r, c), (br, bc) = x.shape[1:], block
    rb, cb = -(-r // br), -(-c // bc)
    pad = torch.full((x.shape[0], rb * br, cb * bc), float("-inf"), dtype=torch.float64)
    a = torch.where(torch.isfinite(x.float()), x.abs(), float("-inf"))  # float32 values decide finiteness
    pad[:, :r, :c] = a
    return pad.reshape(-1, rb, br, cb, bc).amax((0, 2, 4)).float()


def batches(shape, dtype, g, n=3):
    out = []
    for i in range(n):
        x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 2) * (i + 1)
        f = x.view(-1)
        k = max(f.numel() // 30, 1)
        f[torch.randint(0, f.numel(), (k,), generator=g)] = float("nan")
        f[torch.randint(0, f.numel(), (k,), generator=g)] = float("inf") * (-1) ** i
        f[torch.randint(0, f.numel(), (k,), generator=g)] = 0.0
        out.append(x.to(dtype))
    return out


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("shape, block", AMAX_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_block_amax_matches_the_reference_and_the_oracle(shape, block, dtype):
    g = torch.Generator().manual_seed(0)
    xs = batches(shape, dtype, g)
    r, c = xs[0].numel() // shape[-1], shape[-1]
    grid = (-(-r // block[0]), -(-c // block[1]))
    got, want = RangeState.empty(), RangeState.empty()
    got_amax, want_amax = torch.full(grid, float("-inf")), torch.full(grid, float("-inf"))
    for x in xs:
        kernels.block_amax_update_(x, block, got, got_amax)
        reference.block_amax_update_(x, block, want, want_amax)
        assert torch.equal(got_amax, want_amax)
        for g_, w_ in zip(got, want, strict=True):
            assert torch.equal(g_, w_)
    assert torch.equal(got_amax, oracle_block_amax(xs, block))
    f32 = torch.cat([x.float().reshape(-1) for x in xs])
    finite = f32[torch.isfinite(f32)]
    assert got.seen.tolist() == [finite.numel(), f32.numel() - finite.numel(), 3, 0]
    assert float(got.running_min) == float(finite.min()) and float(got.running_max) == float(finite.max())


def test_a_block_with_nothing_finite_stays_minus_inf():
    x = torch.randn(2, 64)
    x[1, 32:] = float("nan")
    state, amax = RangeState.empty(), torch.full((2, 2), float("-inf"))
    kernels.block_amax_update_(x, (1, 32), state, amax)
    assert amax[1, 1] == float("-inf") and bool(torch.isfinite(amax.reshape(-1)[:3]).all())
    assert int(state.seen[1]) == 32


@pytest.mark.parametrize("shape, block", [((37, 100), (1, 32)), ((8, 48), (1, 16)), ((5, 300), (1, 128))])
@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.elem.name}-{r.scale}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_quantize_rows_matches_the_reference(shape, block, rule, dtype):
    x = batches(shape, dtype, torch.Generator().manual_seed(1), n=1)[0]
    t = torch.tensor(0.0123) if rule.scale == "nvfp4" else None
    want = reference.block_fake_quantize(x, block, rule, tensor_scale=t)
    assert same(kernels.block_fake_quantize(x, block, rule, tensor_scale=t), want)


@pytest.mark.parametrize("shape, block", [((9, 13), (4, 4)), ((130, 129), (128, 128))])
@pytest.mark.parametrize("rule", [RULES[0], RULES[1], RULES[5]], ids=lambda r: f"{r.elem.name}-{r.scale}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_tiles_matches_the_reference(shape, block, rule, dtype):
    x = batches(shape, dtype, torch.Generator().manual_seed(2), n=1)[0]
    x[:4, :4] = 0.0  # an all-zero block where the tiles are small
    want = reference.block_fake_quantize(x, block, rule)
    assert same(kernels.block_fake_quantize(x, block, rule), want)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.elem.name}-{r.scale}")
def test_fake_quantize_with_given_scales_matches_the_reference(rule):
    """Scales in the rule's encoding: e8m0 codes (uint8 and float8_e8m0fnu), e4m3, float32."""
    from mono_quant.blockwise import dynamic_amax, scale_codes

    x = batches((16, 96), torch.bfloat16, torch.Generator().manual_seed(3), n=1)[0]
    block = (1, 16) if rule.scale == "nvfp4" else (1, 32)
    t = torch.tensor(0.5) if rule.scale == "nvfp4" else None
    codes = scale_codes(dynamic_amax(x.reshape(16, 96).abs().nan_to_num(0, 0, 0), block) * 0.7, rule, t)
    if rule.scale == "nvfp4":
        codes = codes.to(torch.float8_e4m3fn)
    variants = [codes]
    if rule.scale.startswith("e8m0") and hasattr(torch, "float8_e8m0fnu"):
        variants.append(codes.view(torch.float8_e8m0fnu))
    for scales in variants:
        want = reference.block_fake_quantize(x, block, rule, scales, t)
        assert same(kernels.block_fake_quantize(x, block, rule, scales, t), want)


def test_fake_quantize_of_special_values():
    x = torch.tensor([[0.0, -0.0, 1e-45, -1e-45, 448.0, 1e38, float("inf"), float("-inf")] * 4])
    for rule in RULES:
        t = torch.tensor(1.0) if rule.scale == "nvfp4" else None
        block = (1, 16) if rule.scale == "nvfp4" else (1, 32)
        assert same(kernels.block_fake_quantize(x, block, rule, tensor_scale=t),
                    reference.block_fake_quantize(x, block, rule, tensor_scale=t))  # fmt: skip


def test_launchers_refuse_bad_blocks_and_state():
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match=r"\(1, k\) or \(k, k\)"):
        kernels.block_fake_quantize(x, (2, 32), RULES[0])
    with pytest.raises(ValueError, match="power of two"):
        kernels.block_amax_update_(x, (1, 24), RangeState.empty(), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="block_amax must be a contiguous float32 tensor of shape"):
        kernels.block_amax_update_(x, (1, 32), RangeState.empty(), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="scales must have shape"):
        kernels.block_fake_quantize(x, (1, 32), RULES[0], torch.zeros(4, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="nvfp4 needs its per-tensor scale"):
        kernels.block_fake_quantize(x, (1, 16), RULES[4])
    with pytest.raises(TypeError):
        kernels.block_fake_quantize(x.to(torch.int32), (1, 32), RULES[0])


def test_rows_per_tile_and_the_program_budget():
    """More tiles than programs (each program loops) and fewer (a program per tile) give the same."""
    x = torch.randn(kb.TILE // 32 * 9 + 5, 32)  # 9 full tiles and a partial one, 4 programs
    state, amax = RangeState.empty(), torch.full((x.shape[0], 1), float("-inf"))
    kernels.block_amax_update_(x, (1, 32), state, amax)
    assert torch.equal(amax[:, 0], x.abs().amax(1))
