"""Topology of the Hugging Face architecture families spd-mcp knows, inferred from the model's
config; any other architecture needs an explicit ``topology:`` section.

- GPT-2: fused ``c_attn`` (``{i}.attn.qkv``), ``Conv1D`` weights, LayerNorm.
- The Llama family (Llama, Mistral, Qwen2, Qwen3): ``q/k/v/o_proj`` and a gated MLP
  (``{i}.glu.{gate,up,down}``), RMSNorm.
- GPT-NeoX / Pythia: fused ``query_key_value`` (``{i}.attn.qkv``), LayerNorm.
"""

from __future__ import annotations

from typing import Any

import yaml
from torch import nn

from spd_mcp.model.config import TopologySpec
from spd_mcp.model.weights import TargetError

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
KNOWN = ("gpt2", *LLAMA_FAMILY, "gpt_neox")


def _gpt2(cfg: Any, model: nn.Module) -> TopologySpec:
    h = "transformer.h.{i}"
    return TopologySpec(
        n_blocks=cfg.n_layer, embed="transformer.wte", unembed="lm_head",
        final_norm="transformer.ln_f", norm="layer",
        attn={"qkv": f"{h}.attn.c_attn", "o": f"{h}.attn.c_proj"},
        mlp={"up": f"{h}.mlp.c_fc", "down": f"{h}.mlp.c_proj"}, n_heads=cfg.n_head,
        attn_norm=f"{h}.ln_1", mlp_norm=f"{h}.ln_2",
    )


def _llama(cfg: Any, model: nn.Module) -> TopologySpec:
    h = "model.layers.{i}"
    return TopologySpec(
        n_blocks=cfg.num_hidden_layers, embed="model.embed_tokens", unembed="lm_head",
        final_norm="model.norm", norm="rms",
        attn={m: f"{h}.self_attn.{m}_proj" for m in ("q", "k", "v", "o")},
        mlp={m: f"{h}.mlp.{m}_proj" for m in ("gate", "up", "down")},
        n_heads=cfg.num_attention_heads,
        attn_norm=f"{h}.input_layernorm", mlp_norm=f"{h}.post_attention_layernorm",
    )


def _neox(cfg: Any, model: nn.Module) -> TopologySpec:
    h = "gpt_neox.layers.{i}"
    names = dict(model.named_modules())
    unembed = "lm_head" if "lm_head" in names else "embed_out"
    return TopologySpec(
        n_blocks=cfg.num_hidden_layers, embed="gpt_neox.embed_in", unembed=unembed,
        final_norm="gpt_neox.final_layer_norm", norm="layer",
        attn={"qkv": f"{h}.attention.query_key_value", "o": f"{h}.attention.dense"},
        mlp={"up": f"{h}.mlp.dense_h_to_4h", "down": f"{h}.mlp.dense_4h_to_h"},
        n_heads=cfg.num_attention_heads, qkv_layout="heads",
        attn_norm=f"{h}.input_layernorm", mlp_norm=f"{h}.post_attention_layernorm",
    )


_L = "model.layers.{i}"
EXAMPLE_SECTION = {
    "topology": {
        "n_blocks": 4, "embed": "model.embed_tokens", "unembed": "lm_head",
        "final_norm": "model.norm", "norm": "rms",
        "attn": {m: f"{_L}.self_attn.{m}_proj" for m in ("q", "k", "v", "o")},
        "mlp": {m: f"{_L}.mlp.{m}_proj" for m in ("up", "down")},
        "attn_norm": f"{_L}.input_layernorm",
        "mlp_norm": f"{_L}.post_attention_layernorm",
    }
}


def infer_spec(model: nn.Module, given: TopologySpec | None) -> TopologySpec:
    """The topology section for ``model``: the config's own, else the family's."""
    cfg = model.config  # type: ignore[attr-defined]
    mt = str(getattr(cfg, "model_type", "?"))
    if given is not None:
        spec = given
    elif mt == "gpt2":
        spec = _gpt2(cfg, model)
    elif mt in LLAMA_FAMILY:
        spec = _llama(cfg, model)
    elif mt == "gpt_neox":
        spec = _neox(cfg, model)
    else:
        arch = ", ".join(getattr(cfg, "architectures", None) or [type(model).__name__])
        raise TargetError(
            f"spd-mcp does not know the architecture {arch} (model_type {mt!r}; known: "
            f"{', '.join(KNOWN)}). Add a `topology:` section under `target:` naming its module "
            "paths ({i} = block index), e.g.\n"
            + yaml.safe_dump(EXAMPLE_SECTION, sort_keys=False)
        )
    check_spec(model, spec)
    return spec


def check_spec(model: nn.Module, spec: TopologySpec) -> None:
    """Every module a topology names exists (an error lists the missing ones)."""
    names = dict(model.named_modules())
    paths = [spec.embed, spec.unembed, *([spec.final_norm] if spec.final_norm else [])]
    per_block = [*spec.attn.values(), *spec.mlp.values(),
                 *(p for p in (spec.attn_norm, spec.mlp_norm) if p)]
    for b in range(spec.n_blocks):
        paths += [p.replace("{i}", str(b)) for p in per_block]
    missing = [p for p in paths if p not in names]
    if missing:
        blocks = sorted({n.rsplit(".", 1)[0] for n in names if n})[:12]
        raise TargetError(
            f"the topology names modules the model does not have: {missing[:8]}"
            f"{' …' if len(missing) > 8 else ''}; some of its modules: {blocks}"
        )
