"""The MLP head: the only trained part of ITEM. Misalignment features -> p(fake)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class MLPHead(nn.Module):
    def __init__(self, input_dim: int, hidden: list[int], dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        width = input_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        # Feature standardization, fitted on the training split and part of the exported graph:
        # the recipe's columns differ in scale by orders of magnitude (diffs vs cosines).
        self.register_buffer("mean", torch.zeros(input_dim))
        self.register_buffer("std", torch.ones(input_dim))
        self.spec = {"input_dim": input_dim, "hidden": list(hidden), "dropout": dropout}

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.std).squeeze(-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F) -> p(fake) (B,)"""
        return torch.sigmoid(self.logits(features))


def random_head(input_dim: int, hidden: list[int], dropout: float, seed: int) -> MLPHead:
    """A seeded, untrained placeholder until a head is trained: its p(fake) means nothing."""
    torch.manual_seed(seed)
    return MLPHead(input_dim, hidden, dropout).eval()


def save_head(head: MLPHead, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path))


def load_head(path: Path, spec: dict) -> MLPHead:
    """The head as the bundle's manifest describes it, with the weights stored beside it."""
    from safetensors.torch import load_file

    head = MLPHead(spec["input_dim"], spec["hidden"], spec["dropout"])
    missing, unexpected = head.load_state_dict(load_file(str(path)), strict=False)
    if unexpected or set(missing) - {"mean", "std"}:  # bundles from before standardization lack only those
        raise ValueError(f"{path} does not hold this head: missing {missing}, unexpected {unexpected}")
    return head.eval()
