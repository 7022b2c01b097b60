"""A 2-layer attention-only transformer that learns induction (copying a repeated sequence).

Data: a random token sequence of length L/2 followed by the same sequence again; on the second half
the next token is exactly predictable by an induction circuit (previous-token head in layer 0,
induction head in layer 1). Every attention projection (q/k/v/o in both layers) is decomposed.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from spd_mcp.model.zoo.base import Progress, TargetKwargs, ZooEntry
from spd_mcp.model.zoo.transformer import Transformer, TransformerConfig


class InductionKwargs(TargetKwargs):
    vocab_size: int = Field(48, gt=1)
    seq_len: int = Field(24, gt=3, description="total length; the second half repeats the first")
    d_model: int = Field(32, gt=0)
    n_heads: int = Field(2, gt=0)


class InductionEntry(ZooEntry[InductionKwargs]):
    name = "induction"
    description = "2-layer attention-only transformer trained to copy repeated random sequences"
    output_loss = "kl"
    kwargs_model = InductionKwargs
    target_steps = 2500
    cpu_threads = 1

    def build_model(self) -> nn.Module:
        k = self.kwargs
        cfg = TransformerConfig(vocab_size=k.vocab_size, d_model=k.d_model, n_layers=2,
                                n_heads=k.n_heads, mlp=False, max_len=k.seq_len)
        return Transformer(cfg)

    def sample_batch(self, batch_size: int, device: str) -> Tensor:
        half = self.kwargs.seq_len // 2
        first = torch.randint(0, self.kwargs.vocab_size, (batch_size, half), device=device)
        return torch.cat([first, first], dim=1)[:, : self.kwargs.seq_len]  # (B, L)

    def copy_accuracy(self, logits: Tensor, ids: Tensor) -> float:
        """Top-1 accuracy on the predictable positions (second half, excluding its first token)."""
        half = self.kwargs.seq_len // 2
        pred = logits[:, half:-1].argmax(-1)  # predicts ids[:, half+1:]
        return (pred == ids[:, half + 1 :]).float().mean().item()

    def train_target(
        self, model: nn.Module, *, steps: int, device: str, seed: int, progress: Progress | None
    ) -> dict[str, float]:
        torch.manual_seed(seed)
        model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        warm = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps))
        )
        t0, loss = time.time(), torch.zeros(())
        for step in range(steps):
            ids = self.sample_batch(64, device)
            logits = model(ids)  # (B, L, V)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if progress is not None and (step % 50 == 0 or step == steps - 1):
                progress(step + 1, steps, loss.item())
        model.eval()
        with torch.no_grad():
            ids = self.sample_batch(512, device)
            acc = self.copy_accuracy(model(ids), ids)
        return {"loss": loss.item(), "copy_accuracy": acc, "seconds": time.time() - t0}

    def default_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seed": 0,
            "target": {"zoo": self.name},
            "modules": [{"pattern": "blocks.*.attn.*", "C": 48}],
            "ci_fn": {"type": "vector_mlp", "hidden": [16]},
            "sampling": "binomial",
            "losses": [
                {"type": "faithfulness", "coeff": 1.0},
                {"type": "importance_minimality", "coeff": 1e-3, "p": 1.0},
                {"type": "stochastic_recon", "coeff": 1.0},
                {"type": "stochastic_recon", "coeff": 1.0, "routing": "layerwise"},
                {"type": "ci_masked_recon", "coeff": 1.0},
            ],
            "steps": 2000,
            "batch_size": 64,
            "lr": 3e-3,
            "schedule": {"type": "cosine", "warmup_frac": 0.02, "final_frac": 0.0},
            "eval_every": 500,
            "eval_batch_size": 256,
        }
