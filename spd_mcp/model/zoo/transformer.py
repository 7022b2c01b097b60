"""A small Llama-style decoder-only transformer (RMSNorm, RoPE, optional GELU MLP).

Module paths are stable and referenced by :class:`spd_mcp.model.topology.Topology`:
``embed``, ``blocks.{i}.attn.{q,k,v,o}``, ``blocks.{i}.mlp.{up,down}``, ``unembed``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn


class TransformerConfig(BaseModel):
    """Architecture hyper-parameters (``d_mlp`` defaults to ``4 * d_model``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vocab_size: int = Field(gt=0)
    d_model: int = Field(default=64, gt=0)
    n_layers: int = Field(default=2, gt=0)
    n_heads: int = Field(default=4, gt=0)
    d_mlp: int | None = Field(default=None, gt=0)
    mlp: bool = True
    max_len: int = Field(default=128, gt=0)
    rope_base: float = Field(default=10_000.0, gt=0)
    tie_embeddings: bool = False

    @model_validator(mode="after")
    def _check(self) -> TransformerConfig:
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError("d_model must split into n_heads heads of even size (for RoPE)")
        return self

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_width(self) -> int:
        return self.d_mlp if self.d_mlp is not None else 4 * self.d_model


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half convention) with cached cos/sin tables."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, d_head: int, max_len: int, base: float) -> None:
        super().__init__()
        inv_freq = base ** (-torch.arange(0, d_head, 2, dtype=torch.float32) / d_head)  # (Dh/2,)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (L, Dh/2)
        angles = torch.cat([angles, angles], dim=-1)  # (L, Dh)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` of shape (B, H, T, Dh) by its positions."""
        t = x.shape[-2]
        x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, Dh/2) each
        rotated = torch.cat([-x2, x1], dim=-1)  # (B, H, T, Dh)
        return x * self.cos[:t].to(x.dtype) + rotated * self.sin[:t].to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head self-attention with separate, bias-free q/k/v/o projections."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.rotary = Rotary(config.d_head, config.max_len, config.rope_base)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)  # (B, H, T, Dh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape  # (B, T, D)
        q = self.rotary(self._heads(self.q(x)))  # (B, H, T, Dh)
        k = self.rotary(self._heads(self.k(x)))  # (B, H, T, Dh)
        v = self._heads(self.v(x))  # (B, H, T, Dh)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, Dh)
        return self.o(z.transpose(1, 2).reshape(b, t, d))  # (B, T, D)


class MLP(nn.Module):
    """``down(gelu(up(x)))``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.d_model, config.mlp_width, bias=False)
        self.down = nn.Linear(config.mlp_width, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))  # (B, T, D)


class Block(nn.Module):
    """Pre-norm residual block: attention, then (optionally) the MLP."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.d_model) if config.mlp else None
        self.mlp = MLP(config) if config.mlp else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))  # (B, T, D)
        if self.mlp is not None and self.mlp_norm is not None:
            x = x + self.mlp(self.mlp_norm(x))  # (B, T, D)
        return x


class Transformer(nn.Module):
    """Decoder-only language model: ``forward(ids (B, T)) -> logits (B, T, vocab)``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = nn.RMSNorm(config.d_model)
        self.unembed = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init)
        if config.tie_embeddings:  # shared matrix: use the unembedding's scale
            nn.init.normal_(self.embed.weight, std=config.d_model**-0.5)
            self.unembed.weight = self.embed.weight
        scale = (2 * config.n_layers) ** -0.5  # shrink residual-writing projections
        for block in self.blocks:
            block.attn.o.weight.data.mul_(scale)
            if block.mlp is not None:
                block.mlp.down.weight.data.mul_(scale)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.in_features**-0.5)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[-1] > self.config.max_len:
            raise ValueError(f"sequence length {ids.shape[-1]} > max_len {self.config.max_len}")
        x = self.embed(ids)  # (B, T, D)
        for block in self.blocks:
            x = block(x)  # (B, T, D)
        return self.unembed(self.final_norm(x))  # (B, T, V)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
