"""A residual MLP doing "compressed computation" (SPD paper §4.2), shrunk to decompose on a CPU.

n sparse features x ∈ [-1, 1]^n are written into a residual stream by a fixed random embedding
W_E (n × d, unit rows); one MLP block (``layers.0.mlp_in`` d→h, ReLU, ``layers.0.mlp_out`` h→d)
adds to the stream; the fixed unembedding W_Eᵀ reads it out. Only the MLP is trained, to make the
output x + ReLU(x) — n ReLUs computed with h < n neurons. The known SPD solution uses one
``mlp_in`` component per feature (and one ``mlp_out`` component per feature).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from spd_mcp.model.zoo.base import Progress, TargetKwargs, ZooEntry


class ResidMLPKwargs(TargetKwargs):
    n_features: int = Field(25, gt=0)
    d_embed: int = Field(200, gt=0)
    d_mlp: int = Field(12, gt=0)
    feature_probability: float = Field(0.04, gt=0, le=1)
    embed_seed: int = 0


class MLPBlock(nn.Module):
    def __init__(self, d_embed: int, d_mlp: int) -> None:
        super().__init__()
        self.mlp_in = nn.Linear(d_embed, d_mlp)
        self.mlp_out = nn.Linear(d_mlp, d_embed)

    def forward(self, r: Tensor) -> Tensor:
        return self.mlp_out(F.relu(self.mlp_in(r)))


class ResidMLP(nn.Module):
    def __init__(self, n_features: int, d_embed: int, d_mlp: int, embed_seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(embed_seed)
        W_E = torch.randn(n_features, d_embed, generator=g)
        self.register_buffer("W_E", W_E / W_E.norm(dim=1, keepdim=True))  # (n, d) fixed
        self.layers = nn.ModuleList([MLPBlock(d_embed, d_mlp)])

    def forward(self, x: Tensor) -> Tensor:
        r = x @ self.W_E  # (B, d)
        for layer in self.layers:
            r = r + layer(r)
        return r @ self.W_E.T  # (B, n)


class ResidMLPEntry(ZooEntry[ResidMLPKwargs]):
    name = "resid-mlp"
    description = "residual MLP computing 25 ReLUs with 12 neurons (compressed computation)"
    kwargs_model = ResidMLPKwargs
    target_steps = 4000
    cpu_threads = 1

    def build_model(self) -> nn.Module:
        k = self.kwargs
        return ResidMLP(k.n_features, k.d_embed, k.d_mlp, k.embed_seed)

    def sample_batch(self, batch_size: int, device: str) -> Tensor:
        n, p = self.kwargs.n_features, self.kwargs.feature_probability
        active = torch.rand(batch_size, n, device=device) < p
        return (torch.rand(batch_size, n, device=device) * 2 - 1) * active

    def train_target(
        self, model: nn.Module, *, steps: int, device: str, seed: int, progress: Progress | None
    ) -> dict[str, float]:
        torch.manual_seed(seed)
        model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        t0, loss = time.time(), torch.zeros(())
        for step in range(steps):
            x = self.sample_batch(2048, device)
            loss = (model(x) - (x + F.relu(x))).pow(2).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if progress is not None and (step % 50 == 0 or step == steps - 1):
                progress(step + 1, steps, loss.item())
        model.eval()
        return {"loss": loss.item(), "seconds": time.time() - t0}

    def default_config(self) -> dict[str, Any]:
        n = self.kwargs.n_features
        return {
            "name": self.name,
            "seed": 0,
            "target": {"zoo": self.name},
            "modules": [{"pattern": "layers.*.mlp_*", "C": 2 * n}],
            "ci_fn": {"type": "mlp", "hidden": [16]},
            "sampling": "continuous",
            "losses": [
                {"type": "faithfulness", "coeff": 1.0},
                {"type": "importance_minimality", "coeff": 1e-2, "p": 1.0},
                {"type": "stochastic_recon", "coeff": 1.0},
                {"type": "stochastic_recon", "coeff": 1.0, "routing": "layerwise"},
            ],
            "steps": 4000,
            "batch_size": 1024,
            "lr": 3e-3,
            "schedule": {"type": "cosine", "warmup_frac": 0.0, "final_frac": 0.0},
            "eval_every": 1000,
            "eval_batch_size": 8192,
        }

    def expected_alive(self) -> dict[str, int]:
        n = self.kwargs.n_features
        return {"layers.0.mlp_in": n, "layers.0.mlp_out": n}
