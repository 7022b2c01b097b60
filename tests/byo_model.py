"""A bring-your-own target used by the tests: imported by path as ``tests.byo_model:make``."""

import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, vocab: int = 11, d: int = 6, hidden: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)  # (B, T, d)
        return self.down(torch.relu(self.up(h)))  # (B, T, vocab)


def make(**kwargs) -> Tiny:
    return Tiny(**kwargs)


def data(batch_size: int, device: str, vocab: int = 11, seq: int = 4) -> torch.Tensor:
    return torch.randint(0, vocab, (batch_size, seq), device=device)
