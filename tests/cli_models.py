"""Tiny model factories for tests/test_cli.py, imported by path (``--model cli_models:linear``)."""

import torch
from torch import nn


def linear() -> nn.Module:
    """One ``nn.Linear(4, 2)``: its input is the batch itself."""
    return nn.Linear(4, 2)


def mlp() -> nn.Module:
    """``Linear(8, 16)``, ReLU, ``Linear(16, 4)``: layers named ``0`` and ``2``."""
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


class KeywordModel(nn.Module):
    """Takes its input by keyword, as dict batches deliver it: ``model(features=x)``."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 3)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


class WithExamples(nn.Module):
    """A model that brings its own calibration data through ``example_inputs``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    def example_inputs(self, num_batches: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return [torch.randn(4, 8, generator=g) for _ in range(num_batches)]


def not_a_module():
    return "hello"


def broken():
    raise OSError("weights not found")


NOT_CALLABLE = 3


# --- a BERT-style encoder: real layer names, dict batches, forward(features) --------------------------------


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape  # (B, T, C) -> (B, H, T, D)
        q, k, v = (
            p(x).view(b, t, self.heads, c // self.heads).transpose(1, 2)
            for p in (self.query, self.key, self.value)
        )
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :].bool())
        return y.transpose(1, 2).reshape(b, t, c)


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.self = _SelfAttention(hidden, heads)
        self.output = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x, mask):
        return self.norm(x + self.output(self.self(x, mask)))


class _Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.attention = _Attention(hidden, heads)
        self.intermediate = nn.Linear(hidden, ffn)
        self.output = nn.Linear(ffn, hidden)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x, mask):
        x = self.attention(x, mask)
        return self.norm(x + self.output(nn.functional.gelu(self.intermediate(x))))


class _Encoder(nn.Module):
    def __init__(self, vocab, hidden, heads, ffn, layers):
        super().__init__()
        self.embeddings = nn.Embedding(vocab, hidden)
        self.layer = nn.ModuleList(_Layer(hidden, heads, ffn) for _ in range(layers))


class SentenceEncoder(nn.Module):
    """A sentence-transformers-like model: ``forward(features)`` takes ONE dict (``input_ids``,
    ``attention_mask``) and returns a dict; layers named as in BERT (``0.model.encoder.layer.0.attention.
    self.query``, wider than the table's usual first column). The defaults are all-MiniLM-L6-v2's shape."""

    def __init__(self, vocab=1000, hidden=384, heads=12, ffn=1536, layers=6, seq=128, batch=16):
        super().__init__()
        self.seq, self.batch, self.vocab = seq, batch, vocab
        body = nn.Module()
        body.model = nn.Module()
        body.model.encoder = _Encoder(vocab, hidden, heads, ffn, layers)
        self.add_module("0", body)  # names start "0.model.encoder..." as in a SentenceTransformer
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.dim() > 1 else 0.1))

    def forward(self, features: dict) -> dict:
        encoder = self._modules["0"].model.encoder
        mask = features["attention_mask"]
        x = encoder.embeddings(features["input_ids"])
        for layer in encoder.layer:
            x = layer(x, mask)
        emb = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return {"sentence_embedding": emb}

    def example_inputs(self, num_batches: int):
        g = torch.Generator().manual_seed(1)
        for _ in range(num_batches):
            ids = torch.randint(0, self.vocab, (self.batch, self.seq), generator=g)
            mask = torch.ones(self.batch, self.seq, dtype=torch.int64)
            mask[:, self.seq // 2 :] = torch.rand(self.batch, 1, generator=g) > 0.5
            yield {"input_ids": ids, "attention_mask": mask}


def tiny_sentence_encoder() -> nn.Module:
    """``SentenceEncoder`` small enough for a test: one layer, hidden 16 (6 Linear layers)."""
    return SentenceEncoder(vocab=50, hidden=16, heads=2, ffn=32, layers=1, seq=8, batch=2)


class EndlessExamples(nn.Module):
    """``example_inputs`` is an endless generator: only ``--batches`` + 1 may be read from it. (It raises
    after 1000 batches, so that a command that reads on fails instead of running until it is killed.)"""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    def example_inputs(self, num_batches: int):
        for _ in range(1000):
            yield torch.randn(2, 4)
        raise RuntimeError("read 1000 batches from an endless generator")


class BatchEncoding(dict):
    """A stand-in for transformers' ``BatchEncoding``: a dict subclass, which
    ``torch.load(weights_only=True)`` refuses to unpickle just as it refuses the real one."""


class DictLike(dict):
    """Another dict subclass of no known library."""
