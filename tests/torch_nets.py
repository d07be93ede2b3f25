"""Tiny PyTorch modules for the importer tests (imported only where torch is installed)."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """[N, 1, 8, 8] -> conv -> relu -> pool -> linear -> [N, 3]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


def make_tiny_cnn() -> TinyCNN:
    """A factory, as model.module may name one."""
    return TinyCNN()


class FixedBatch(nn.Module):
    """Reshapes with a hard-coded batch of 1, so its ONNX export cannot run other batches."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(1, 64))


class BranchOnBatch(nn.Module):
    """A Python branch on the batch size: tracing freezes it, so the export changes the numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if x.shape[0] == 1:
            y = y * 2
        return y
