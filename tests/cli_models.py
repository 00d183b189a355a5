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
