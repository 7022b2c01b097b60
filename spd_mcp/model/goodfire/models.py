"""Goodfire's target architectures, written here from their published definitions, with the same
module paths (so their checkpoints' ``target_model.*`` keys load as they are):

- ``LlamaSimple`` / ``LlamaSimpleMLP``: pre-norm RMSNorm blocks, RoPE on the full head dimension
  (rotate-half, or adjacent pairs), grouped-query attention, SwiGLU (``gate/up/down_proj``) or a
  GELU-tanh MLP (``c_fc``, ``down_proj``), tied ``wte`` / ``lm_head``;
- ``GPT2Simple``: learned positions, LayerNorm, ``q/k/v/o_proj`` with biases, GELU-tanh MLP;
- ``TMS`` and ``ResidMLP`` toys.

Every LM returns logits (B, T, V) for ids (B, T).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class LlamaSimpleConfig(_Cfg):
    model_type: str = "LlamaSimple"
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_intermediate: int = 768 * 4 * 2 // 3
    mlp_bias: bool = False
    attn_bias: bool = False
    rotary_adjacent_pairs: bool = False
    rotary_base: float = 10000.0
    n_ctx: int = 1024
    n_key_value_heads: int = 3
    use_grouped_query_attention: bool = True
    rms_norm_eps: float = 1e-6


class LlamaSimpleMLPConfig(LlamaSimpleConfig):
    model_type: str = "LlamaSimpleMLP"
    n_intermediate: int = 768 * 4


class GPT2SimpleConfig(_Cfg):
    model_type: str = "GPT2Simple"
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


def gelu_tanh(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LayerNorm(nn.Module):
    """(x − mean) / sqrt(biased var + 1e-5) · w + b (Goodfire's own LayerNorm)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, 1e-5)


def _rope(x: Tensor, positions: Tensor, base: float, adjacent: bool) -> Tensor:
    """Rotary embedding over the full head dimension of x (B, H, T, hd)."""
    hd = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, hd // 2, device=x.device, dtype=torch.float32)
                          / (hd // 2)))
    ang = positions.float()[:, None] * inv[None]  # (T, hd/2)
    if adjacent:
        ang = ang.repeat_interleave(2, -1)
        rot = torch.stack([-x[..., 1::2], x[..., 0::2]], -1).flatten(-2)
    else:
        ang = torch.cat([ang, ang], -1)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        rot = torch.cat([-x2, x1], -1)
    return (x * ang.cos().to(x.dtype) + rot * ang.sin().to(x.dtype))


class LlamaAttention(nn.Module):
    def __init__(self, c: LlamaSimpleConfig) -> None:
        super().__init__()
        self.c = c
        hd = c.n_embd // c.n_head
        n_kv = c.n_key_value_heads if c.use_grouped_query_attention else c.n_head
        self.n_kv = n_kv
        if c.use_grouped_query_attention:
            self.q_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.attn_bias)
            self.k_proj = nn.Linear(c.n_embd, n_kv * hd, bias=c.attn_bias)
            self.v_proj = nn.Linear(c.n_embd, n_kv * hd, bias=c.attn_bias)
        else:
            self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.attn_bias)
        self.o_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.attn_bias)

    def forward(self, x: Tensor) -> Tensor:
        c, (B, T, d) = self.c, x.shape
        H, hd = c.n_head, d // c.n_head
        if c.use_grouped_query_attention:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.c_attn(x).split(d, -1)
        q = q.view(B, T, H, hd).transpose(1, 2)
        k = k.view(B, T, self.n_kv, hd).transpose(1, 2)
        v = v.view(B, T, self.n_kv, hd).transpose(1, 2)
        pos = torch.arange(T, device=x.device).clamp(max=c.n_ctx - 1)
        q = _rope(q, pos, c.rotary_base, c.rotary_adjacent_pairs)
        k = _rope(k, pos, c.rotary_base, c.rotary_adjacent_pairs)
        if self.n_kv != H:
            k = k.repeat_interleave(H // self.n_kv, dim=1)
            v = v.repeat_interleave(H // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, d))


class SwiGLU(nn.Module):
    def __init__(self, c: LlamaSimpleConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.n_embd, c.n_intermediate, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.n_embd, c.n_intermediate, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.n_intermediate, c.n_embd, bias=c.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    def __init__(self, d: int, d_mlp: int, bias: bool) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d, d_mlp, bias=bias)
        self.down_proj = nn.Linear(d_mlp, d, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(gelu_tanh(self.c_fc(x)))


class LlamaBlock(nn.Module):
    def __init__(self, c: LlamaSimpleConfig, gated: bool) -> None:
        super().__init__()
        self.rms_1 = RMSNorm(c.n_embd, c.rms_norm_eps)
        self.attn = LlamaAttention(c)
        self.rms_2 = RMSNorm(c.n_embd, c.rms_norm_eps)
        self.mlp = SwiGLU(c) if gated else GeluMLP(c.n_embd, c.n_intermediate, c.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.rms_1(x))
        return x + self.mlp(self.rms_2(x))


class LlamaSimple(nn.Module):
    """Goodfire's LlamaSimple (``gated``: SwiGLU) or LlamaSimpleMLP (GELU-tanh MLP)."""

    def __init__(self, c: LlamaSimpleConfig, *, gated: bool = True) -> None:
        super().__init__()
        self.config = c
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.h = nn.ModuleList([LlamaBlock(c, gated) for _ in range(c.n_layer)])
        self.ln_f = RMSNorm(c.n_embd, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: Tensor) -> Tensor:
        x = self.wte(ids)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class LlamaSimpleMLP(LlamaSimple):
    """Goodfire's LlamaSimpleMLP: LlamaSimple with a GELU-tanh MLP (``c_fc``, ``down_proj``)."""

    def __init__(self, c: LlamaSimpleConfig) -> None:
        super().__init__(c, gated=False)


class GPT2Attention(nn.Module):
    def __init__(self, c: GPT2SimpleConfig) -> None:
        super().__init__()
        self.n_head = c.n_head
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, m, nn.Linear(c.n_embd, c.n_embd))

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        H = self.n_head
        q, k, v = (p(x).view(B, T, H, d // H).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, d))


class GPT2Block(nn.Module):
    def __init__(self, c: GPT2SimpleConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(c.n_embd)
        self.attn = GPT2Attention(c)
        self.ln_2 = LayerNorm(c.n_embd)
        self.mlp = GeluMLP(c.n_embd, 4 * c.n_embd, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Simple(nn.Module):
    def __init__(self, c: GPT2SimpleConfig) -> None:
        super().__init__()
        self.config = c
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.h = nn.ModuleList([GPT2Block(c) for _ in range(c.n_layer)])
        self.ln_f = LayerNorm(c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: Tensor) -> Tensor:
        T = ids.shape[-1]
        x = self.wte(ids) + self.wpe(torch.arange(T, device=ids.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class TMS(nn.Module):
    """Goodfire's TMS: relu(linear2(hidden_layers(linear1(x)))), no nonlinearity between."""

    def __init__(self, n_features: int, n_hidden: int, n_hidden_layers: int = 0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(n_features, n_hidden, bias=False)
        self.hidden_layers = nn.ModuleList(
            [nn.Linear(n_hidden, n_hidden, bias=False) for _ in range(n_hidden_layers)])
        self.linear2 = nn.Linear(n_hidden, n_features, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear1(x)
        for layer in self.hidden_layers:
            h = layer(h)
        return F.relu(self.linear2(h))


class ResidMLP(nn.Module):
    """Goodfire's residual MLP: r = x W_E; r += mlp_out(act(mlp_in(r))) per layer; out = r W_U."""

    def __init__(self, n_features: int, d_embed: int, d_mlp: int, n_layers: int,
                 act_fn_name: str = "relu", in_bias: bool = True, out_bias: bool = True) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.zeros(n_features, d_embed))
        self.W_U = nn.Parameter(torch.zeros(d_embed, n_features))
        self.act = F.relu if act_fn_name == "relu" else F.gelu
        self.layers = nn.ModuleList()
        for _ in range(n_layers):
            block = nn.Module()
            block.mlp_in = nn.Linear(d_embed, d_mlp, bias=in_bias)
            block.mlp_out = nn.Linear(d_mlp, d_embed, bias=out_bias)
            self.layers.append(block)

    def forward(self, x: Tensor) -> Tensor:
        r = x @ self.W_E
        for block in self.layers:
            r = r + block.mlp_out(self.act(block.mlp_in(r)))
        return r @ self.W_U


def build_lm(model_type: str, config: dict[str, Any]) -> nn.Module:
    """One of Goodfire's pretrain LMs from its ``model_config.yaml`` contents."""
    if model_type == "LlamaSimple":
        return LlamaSimple(LlamaSimpleConfig.model_validate(config), gated=True)
    if model_type == "LlamaSimpleMLP":
        return LlamaSimpleMLP(LlamaSimpleMLPConfig.model_validate(config))
    if model_type == "GPT2Simple":
        return GPT2Simple(GPT2SimpleConfig.model_validate(config))
    raise ValueError(f"unknown Goodfire model type {model_type!r}")
