"""A Llama-shaped decoder in plain torch, for benchmark machines without transformers (the H200 image).

The layers of ``LlamaForCausalLM`` as far as calibration sees them: per decoder layer RMSNorm, ``q_proj`` /
``k_proj`` / ``v_proj`` (grouped keys and values) / ``o_proj`` around causal attention
(``scaled_dot_product_attention``, rotary embeddings), RMSNorm, ``gate_proj`` / ``up_proj`` / ``down_proj``
(SwiGLU); then a final norm and ``lm_head``. ``forward(input_ids, attention_mask=None, use_cache=False)``
takes the dict batches of a tokenizer; it returns the logits.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class _Norm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        v = x.float()
        v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * v.to(x.dtype)


def _rotate(x, cos, sin):  # (B, H, T, D)
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-b, a), dim=-1) * sin


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.dim = heads, kv_heads, hidden // heads
        self.q_proj = nn.Linear(hidden, heads * self.dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.dim, bias=False)
        self.o_proj = nn.Linear(heads * self.dim, hidden, bias=False)

    def forward(self, x, cos, sin, bias):
        B, T, _ = x.shape  # (B, T, C)
        q = self.q_proj(x).view(B, T, self.heads, self.dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class _MLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self, hidden, heads, kv_heads, inner):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = _Norm(hidden), _Norm(hidden)
        self.self_attn, self.mlp = _Attention(hidden, heads, kv_heads), _MLP(hidden, inner)

    def forward(self, x, cos, sin, bias):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaLike(nn.Module):
    """``vocab``, ``hidden``, ``layers``, ``heads``, ``kv_heads``, ``inner``: as ``LlamaConfig``'s
    ``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
    ``num_key_value_heads``, ``intermediate_size``."""

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, inner: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(_Layer(hidden, heads, kv_heads, inner) for _ in range(layers))
        self.norm = _Norm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.head_dim = hidden // heads

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids)  # (B, T, C)
        pos = torch.arange(T, device=x.device, dtype=torch.float32)
        inv = 10000.0 ** (-torch.arange(0, self.head_dim, 2, device=x.device) / self.head_dim)
        angles = torch.outer(pos, inv).repeat(1, 2)  # (T, D)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T)
        for layer in self.layers:
            x = layer(x, cos, sin, allowed)
        return self.lm_head(self.norm(x))
