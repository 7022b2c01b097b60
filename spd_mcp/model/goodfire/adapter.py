"""A target rebuilt from a Goodfire ``spd`` run: its architecture (``models``), identity
insertions, topology and, for language models, the tokenizer and text the run was given at
import (``hf/`` in the run directory, ``data:`` in its config)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from spd_mcp.model.adapter import TargetAdapter
from spd_mcp.model.config import GoodfireTarget, TextData, TopologySpec
from spd_mcp.model.goodfire import models as M
from spd_mcp.model.hf.adapter import RUN_SUBDIR, HFText
from spd_mcp.model.hf.data import TextDocuments
from spd_mcp.model.hf.tokenizer import HFTokenizer
from spd_mcp.model.identity import insert_identities, with_identities
from spd_mcp.model.topology import Topology
from spd_mcp.model.weights import TargetError

LMS = ("LlamaSimple", "LlamaSimpleMLP", "GPT2Simple")


def build_model(spec: GoodfireTarget) -> nn.Module:
    c = spec.config
    try:
        if spec.goodfire in LMS:
            model = M.build_lm(spec.goodfire, c)
        elif spec.goodfire == "TMS":
            model = M.TMS(int(c["n_features"]), int(c["n_hidden"]),
                          int(c.get("n_hidden_layers", 0)))
        else:
            model = M.ResidMLP(int(c["n_features"]), int(c["d_embed"]), int(c["d_mlp"]),
                               int(c["n_layers"]), str(c.get("act_fn_name", "relu")),
                               bool(c.get("in_bias", True)), bool(c.get("out_bias", True)))
    except (KeyError, ValueError, TypeError) as e:
        raise TargetError(f"target.config for {spec.goodfire}: {e}") from None
    insert_identities(model, list(spec.identity))
    return model.eval()


def lm_topology_spec(kind: str, config: Mapping[str, Any]) -> TopologySpec:
    """Canonical names of a Goodfire LM: ``{i}.attn.{q,k,v,o}`` (``qkv`` without GQA), MLPs as
    ``{i}.mlp.{up,down}`` (``c_fc``, ``down_proj``) or ``{i}.glu.{gate,up,down}``."""
    h = "h.{i}"
    fused = kind != "GPT2Simple" and not config.get("use_grouped_query_attention", True)
    attn = ({"qkv": f"{h}.attn.c_attn"} if fused else
            {m: f"{h}.attn.{m}_proj" for m in ("q", "k", "v")}) | {"o": f"{h}.attn.o_proj"}
    if kind == "LlamaSimple":
        mlp = {m: f"{h}.mlp.{m}_proj" for m in ("gate", "up", "down")}
    else:
        mlp = {"up": f"{h}.mlp.c_fc", "down": f"{h}.mlp.down_proj"}
    rms = kind != "GPT2Simple"
    return TopologySpec(
        n_blocks=int(config.get("n_layer", 12)), embed="wte", unembed="lm_head",
        final_norm="ln_f", norm="rms" if rms else "layer", attn=attn, mlp=mlp,
        n_heads=int(config.get("n_head", 12)),
        attn_norm=f"{h}.rms_1" if rms else f"{h}.ln_1",
        mlp_norm=f"{h}.rms_2" if rms else f"{h}.ln_2")


class GoodfireAdapter(TargetAdapter):
    """Target adapter of a ``target: {goodfire: …}`` config (an imported run)."""

    def __init__(self, spec: GoodfireTarget, data: TextData | None, *,
                 tokenizer: Path | None = None) -> None:
        self.spec = spec
        self.data = data
        self.is_lm = spec.goodfire in LMS
        self._text: HFText | None = None
        self.tokenizer: HFTokenizer | None = (
            HFTokenizer.load(tokenizer) if tokenizer is not None else None)

    def load_extras(self, run_dir: Path) -> None:
        tok_dir = run_dir / RUN_SUBDIR
        if self.is_lm and tok_dir.is_dir():
            self.tokenizer = HFTokenizer.load(tok_dir)

    def save_extras(self, run_dir: Path) -> None:
        if self.tokenizer is not None:
            out = run_dir / RUN_SUBDIR
            out.mkdir(exist_ok=True)
            self.tokenizer.save(out)

    def build(self) -> tuple[nn.Module, Topology]:
        model = build_model(self.spec)
        if self.is_lm:
            c = dict(self.spec.config)
            topo = Topology.from_spec(lm_topology_spec(self.spec.goodfire, c),
                                      d_model=int(c.get("n_embd", 768)),
                                      max_len=int(c.get("n_ctx", c.get("block_size", 1024))))
        else:
            names = [n for n, m in model.named_modules()
                     if n and isinstance(m, nn.Linear) and not n.endswith(".pre_identity")]
            topo = Topology.identity(names)
        topo = with_identities(topo, list(self.spec.identity))
        if self.is_lm and self.tokenizer is not None:
            n_emb = int(model.wte.weight.shape[0])  # type: ignore[union-attr]
            if self.tokenizer.vocab_size > n_emb:
                raise TargetError(f"tokenizer has {self.tokenizer.vocab_size} tokens, the "
                                  f"model's embedding {n_emb}: not this model's tokenizer")
            docs = (TextDocuments(self.data, self.tokenizer.encode) if self.data is not None
                    else None)
            self._text = HFText(self.tokenizer, docs)
        return model, topo

    @property
    def output_loss(self) -> Literal["mse", "kl"]:  # type: ignore[override]
        return "kl" if self.is_lm else "mse"

    def text_target(self) -> HFText | None:
        return self._text

    def sample_batch(self, batch_size: int, device: str) -> Tensor:
        """LMs: windows of the run's text; toys: sparse features as in Goodfire's tasks
        (each feature active with the task's probability, TMS magnitudes U(0,1), ResidMLP
        U(−1,1))."""
        if self.is_lm:
            if self._text is None or self._text.docs is None:
                raise TargetError("this imported run has no text data (import with --data)")
            return self._text.docs.windows(batch_size, device)
        c = self.spec.config
        n = int(c["n_features"])
        p = float(c.get("feature_probability", 0.05))
        active = torch.rand(batch_size, n, device=device) < p
        vals = torch.rand(batch_size, n, device=device)
        if self.spec.goodfire == "ResidMLP":
            vals = vals * 2 - 1
        return vals * active
