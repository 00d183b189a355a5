"""The built-in demo of ``mono-quant calibrate``: a small transformer and its calibration batches.

The model is a two-block, GPT-style decoder (token and position embeddings, causal self-attention, a GELU
MLP, pre-LayerNorms, a tied-free LM head), small enough to calibrate in a second or two on a laptop CPU.
Its activations are built to look like a real LLM's, because that is where observers differ:

- heavy tails: embeddings are drawn from a Student-t distribution (3 degrees of freedom), not a Gaussian;
- outlier channels: a few hidden channels (``OUTLIER_CHANNELS``) have LayerNorm gains 20-50x the others,
  the "emergent features" of LLM.int8() and SmoothQuant, so every LayerNorm output (the inputs of
  ``attn.qkv``, ``mlp.fc`` and ``lm_head``) carries a handful of channels far larger than the rest;
- asymmetry: the ``mlp.proj`` input is a GELU output, bounded below by -0.17 and heavy above.

Everything is seeded: the same call gives the same weights and the same batches on every machine.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["OUTLIER_CHANNELS", "DemoTransformer", "demo_batches", "demo_model"]

VOCAB = 512
HIDDEN = 128
HEADS = 4
LAYERS = 2
SEQ_LEN = 64
BATCH_SIZE = 8
OUTLIER_CHANNELS = (3, 41, 97)
OUTLIER_GAINS = (20.0, 35.0, 50.0)


def _student_t(shape, df: float, generator: torch.Generator) -> torch.Tensor:
    """Student-t samples ``z / sqrt(chi2_df / df)``, drawn with ``generator`` (integer ``df``)."""
    z = torch.randn(shape, generator=generator)
    chi2 = torch.randn((int(df), *shape), generator=generator).square().sum(0)
    return z / torch.sqrt(chi2 / df)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``qkv`` projection, scaled dot product, output ``proj``."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape  # (B, T, C)
        q, k, v = self.qkv(x).split(c, dim=2)
        # (B, T, C) -> (B, H, T, D)
        q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2) for y in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    """``fc`` (C -> 4C), GELU, ``proj`` (4C -> C)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.fc = nn.Linear(hidden, 4 * hidden)
        self.proj = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden)
        self.attn = CausalSelfAttention(hidden, heads)
        self.ln_2 = nn.LayerNorm(hidden)
        self.mlp = MLP(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class DemoTransformer(nn.Module):
    """A small GPT-style decoder: ``idx`` ``(B, T)`` token ids -> logits ``(B, T, VOCAB)``.

    Calibrated layers (the ``nn.Linear`` inputs): ``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``,
    ``blocks.{i}.mlp.fc``, ``blocks.{i}.mlp.proj`` for each block, and ``lm_head``.
    """

    def __init__(self, vocab: int = VOCAB, hidden: int = HIDDEN, heads: int = HEADS, layers: int = LAYERS):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, hidden)
        self.pos_emb = nn.Embedding(SEQ_LEN, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, VOCAB)

    def example_inputs(self, num_batches: int) -> list[torch.Tensor]:
        """``num_batches`` seeded token batches (``demo_batches``), used by the command without ``--data``."""
        return demo_batches(num_batches)


def demo_model(seed: int = 0) -> DemoTransformer:
    """The demo model with seeded weights, heavy-tailed embeddings and outlier LayerNorm channels."""
    g = torch.Generator().manual_seed(seed)
    model = DemoTransformer()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_emb.weight"):
                p.copy_(_student_t(p.shape, df=3, generator=g))
            elif p.dim() == 2:  # Linear weights: variance-preserving Gaussian
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=g))
                for ch, gain in zip(OUTLIER_CHANNELS, OUTLIER_GAINS, strict=True):
                    m.weight[ch] = gain
    return model.eval()


def demo_batches(num_batches: int, seed: int = 1234) -> list[torch.Tensor]:
    """``num_batches`` int64 token batches ``(BATCH_SIZE, SEQ_LEN)``, Zipf-distributed like text.

    Batch ``i`` depends only on ``seed`` and ``i``, so asking for more batches keeps the first ones.
    """
    ranks = torch.arange(1, VOCAB + 1, dtype=torch.float64)
    zipf = 1.0 / ranks  # token frequency ~ 1 / rank
    batches = []
    for i in range(num_batches):
        g = torch.Generator().manual_seed(seed + i)
        batches.append(torch.multinomial(zipf, BATCH_SIZE * SEQ_LEN, replacement=True, generator=g))
    return [b.view(BATCH_SIZE, SEQ_LEN) for b in batches]
