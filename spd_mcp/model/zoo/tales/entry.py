"""The `tales` zoo entry: corpus stream, target trainer, decomposition config and evaluation."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from spd_mcp.keys import BlockLayer
from spd_mcp.model.topology import Topology
from spd_mcp.model.zoo.base import Progress, TargetKwargs, ZooEntry
from spd_mcp.model.zoo.tales.corpus import (
    DEFAULT_GRAMMAR,
    Behaviour,
    Grammar,
    TalesCorpus,
)
from spd_mcp.model.zoo.tales.corpus import behaviours as grammar_behaviours
from spd_mcp.model.zoo.tales.tokenizer import Tokenizer
from spd_mcp.model.zoo.tales.train import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_LR,
    DEFAULT_STEPS,
    build_tales_model,
    evaluate_behaviours,
    story_batches,
    train_tales_model,
)
from spd_mcp.model.zoo.transformer import Transformer, TransformerConfig

SPD_DATA_SEED = 1  # the stream SPD is trained on (the target trains on seed 0)
HELD_OUT_TEXT_SEED = 424_242  # held-out text for KL evaluation; used by nothing else


class TalesKwargs(TargetKwargs):
    d_model: int = Field(64, gt=0)
    n_layers: int = Field(2, gt=0)
    n_heads: int = Field(4, gt=0)
    d_mlp: int | None = Field(None, gt=0)
    max_len: int = Field(128, gt=0)
    train_batch_size: int = Field(DEFAULT_BATCH_SIZE, gt=0)
    train_lr: float = Field(DEFAULT_LR, gt=0)
    # v2 (default, the shipped run's): v1's shortcuts broken, with `<behaviour>_shortcut` probe
    # families (docs/tales.md); v1: the first shipped run's grammar (runs made before grammars
    # existed have no `grammar` key in run.json and must say `grammar: v1`).
    grammar: Grammar = DEFAULT_GRAMMAR


class TalesEntry(ZooEntry[TalesKwargs]):
    name = "tales"
    description = "2-layer Llama-style LM on generated children's stories with planted behaviours"
    output_loss = "kl"
    kwargs_model = TalesKwargs
    target_steps = DEFAULT_STEPS
    cpu_threads = 1

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._tokenizer: Tokenizer | None = None
        self._streams: dict[int, Iterator[Tensor]] = {}

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(TalesCorpus.vocabulary(self.kwargs.grammar))
        return self._tokenizer

    def transformer_config(self) -> TransformerConfig:
        k = self.kwargs
        return TransformerConfig(
            vocab_size=self.tokenizer.vocab_size, d_model=k.d_model, n_layers=k.n_layers,
            n_heads=k.n_heads, d_mlp=k.d_mlp, max_len=k.max_len,
        )

    def build_model(self) -> nn.Module:
        return build_tales_model(self.tokenizer, seed=0, config=self.transformer_config())

    def train_target(
        self, model: nn.Module, *, steps: int, device: str, seed: int, progress: Progress | None
    ) -> dict[str, float]:
        assert isinstance(model, Transformer)
        t0 = time.time()
        loss = train_tales_model(
            model, self.tokenizer, seed=seed, steps=steps, batch_size=self.kwargs.train_batch_size,
            device=device, lr=self.kwargs.train_lr, num_threads=None, progress=progress,
            grammar=self.kwargs.grammar,
        )
        scores = evaluate_behaviours(model, self.tokenizer, device=device,
                                     grammar=self.kwargs.grammar)
        return {"loss": loss, "seconds": time.time() - t0,
                **{f"top1/{k}": v for k, v in scores.items()}}

    def sample_batch(self, batch_size: int, device: str) -> Tensor:
        """Right-padded (B, T) story batches from the SPD data stream (deterministic)."""
        if batch_size not in self._streams:
            self._streams[batch_size] = story_batches(
                self.tokenizer, SPD_DATA_SEED + batch_size, batch_size, max_len=self.kwargs.max_len,
                grammar=self.kwargs.grammar,
            )
        return next(self._streams[batch_size]).to(device)

    def position_mask(self, x: Tensor) -> Tensor | None:
        return x != self.tokenizer.pad_id

    def dataset_text(self, index: int) -> str:
        """Story ``index`` of the stream SPD was trained on (deterministic, random access)."""
        return TalesCorpus(SPD_DATA_SEED, self.kwargs.grammar).story(index).text

    def heldout_text(self, index: int) -> str:
        """Story ``index`` of a stream neither the target nor SPD saw (for edit measurements)."""
        return TalesCorpus(HELD_OUT_TEXT_SEED, self.kwargs.grammar).story(index).text

    def n_documents(self, source: str) -> int | None:
        """Unbounded: the corpus generates any story index."""
        return None

    def behaviours(self) -> Mapping[str, Behaviour]:
        """The grammar's planted behaviours (held-out probes; v2 also ``shortcut_probes``)."""
        return grammar_behaviours(self.kwargs.grammar)

    def text_target(self) -> TalesEntry:
        return self

    def default_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seed": 0,
            "target": {"zoo": self.name, "kwargs": {"grammar": self.kwargs.grammar}},
            "modules": [
                {"pattern": "blocks.*.attn.*", "C": 128},
                {"pattern": "blocks.*.mlp.*", "C": 128},
            ],
            # A per-layer shared MLP reads the whole input at a fraction of vector_mlp's cost.
            "ci_fn": {"type": "shared_mlp", "hidden": [64]},
            "sampling": "binomial",
            "losses": [
                # Faithfulness stays on throughout (not only as a warm-up).
                {"type": "faithfulness", "coeff": 1000.0},
                # p annealed below 1 drives small CIs to exactly zero (L0 counts CI > 0).
                {"type": "importance_minimality", "coeff": 6e-3, "p": 1.0, "p_final": 0.5,
                 "anneal_start_frac": 0.1, "anneal_end_frac": 0.7},
                {"type": "stochastic_recon", "coeff": 1.0},
                {"type": "stochastic_recon", "coeff": 1.0, "routing": "layerwise",
                 "layers_per_step": 2},
                # Without a CI-masked term the CI-masked model can break while the stochastic
                # reconstruction looks fine.
                {"type": "ci_masked_recon", "coeff": 2.0},
            ],
            # 3,200 steps at 6e-3: every matrix <= 5% L0 (max 4.0%) with the KL thresholds met
            # (1,600 steps left 1.attn.o above 5% or KL(stochastic) above 0.05; docs/tales.md).
            "steps": 3200,
            "batch_size": 16,
            "lr": 5e-3,
            "schedule": {"type": "cosine", "warmup_frac": 0.05, "final_frac": 0.1},
            "faithfulness_warmup_steps": 300,
            "faithfulness_warmup_lr": 1e-2,
            "eval_every": 800,
            "eval_batch_size": 64,
            "alive_threshold": 0.1,
        }

    def save_extras(self, run_dir: Path) -> None:
        self.tokenizer.save(run_dir)

    def load_extras(self, run_dir: Path) -> None:
        self._tokenizer = Tokenizer.load(run_dir)

    @torch.no_grad()
    def evaluate_run(self, run: Any, *, n_probes: int = 200, n_text: int = 256) -> dict[str, Any]:
        """Behaviour accuracy (target / CI-masked / stochastic), held-out KL, per-layer stats.

        The behaviour table has a row per probe family: each behaviour and, for grammar v2,
        each ``<behaviour>_shortcut`` family (probes that no known shortcut solves).
        """
        from spd_mcp.model.diagnostics import alive_mask, delta_ratios
        from spd_mcp.model.losses import output_divergence
        from spd_mcp.model.masks import delta_masks, stochastic_masks

        cm = run.model
        device = next(cm.parameters()).device
        sampling = run.config.sampling
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(0)

        def ci_logits(ids: Tensor) -> Tensor:
            _, ci = cm.ci_for(ids)
            return cm(ids, masks=ci.lower)

        def stochastic_logits(ids: Tensor) -> Tensor:
            _, ci = cm.ci_for(ids)
            return cm(ids, masks=stochastic_masks(ci.lower, sampling),
                      delta_masks=delta_masks(ci.lower, sampling))

        fns = {"target_top1": cm.target, "ci_top1": ci_logits, "stochastic_top1": stochastic_logits}
        per_fn = {k: evaluate_behaviours(f, self.tokenizer, n=n_probes, device=device,
                                         grammar=self.kwargs.grammar)
                  for k, f in fns.items()}
        behaviours = {b: {k: per_fn[k][b] for k in fns} for b in per_fn["target_top1"]}

        batches = story_batches(self.tokenizer, HELD_OUT_TEXT_SEED, 64, max_len=self.kwargs.max_len,
                                grammar=self.kwargs.grammar)
        kl_ci = kl_st = tokens = 0.0
        l0: dict[str, float] = {n: 0.0 for n in cm.layer_names}
        alive = {n: torch.zeros(cm.Cs[n], dtype=torch.bool, device=device) for n in cm.layer_names}
        for _ in range(max(1, n_text // 64)):
            ids = next(batches).to(device)  # (B, T)
            mask = ids != self.tokenizer.pad_id  # (B, T)
            out, ci = cm.ci_for(ids)
            n_tok = mask.sum().item()
            kl_ci += output_divergence("kl", out, cm(ids, masks=ci.lower), mask).item() * n_tok
            st = cm(ids, masks=stochastic_masks(ci.lower, sampling),
                    delta_masks=delta_masks(ci.lower, sampling))
            kl_st += output_divergence("kl", out, st, mask).item() * n_tok
            tokens += n_tok
            masked = {n: g * mask.unsqueeze(-1) for n, g in ci.lower.items()}
            for n, hit in alive_mask(masked, run.config.alive_threshold).items():
                alive[n] |= hit
            for n, g in masked.items():
                l0[n] += ((g > 0).sum(-1).float() * mask).sum().item()
        torch.random.set_rng_state(gen_state)
        ratios = delta_ratios(cm)
        topo = run.target.topology or Topology.for_transformer(self.transformer_config())
        layers = {
            topo.to_canonical(n): {
                "l0": l0[n] / tokens, "alive": int(alive[n].sum()), "C": cm.Cs[n],
                "delta_ratio": ratios[n],
            }
            for n in cm.layer_names
        }
        blocks: dict[str, dict[str, float]] = {}
        for name, row in layers.items():  # per transformer block: its six matrices together
            role = BlockLayer.parse(name)
            assert role is not None, name
            b = blocks.setdefault(str(role.block), {"l0": 0.0, "C": 0})
            b["l0"] += row["l0"]
            b["C"] += row["C"]
        return {
            "run": run.name,
            "behaviours": behaviours,
            "kl_ci": kl_ci / tokens,
            "kl_stochastic": kl_st / tokens,
            "n_probes": n_probes,
            "held_out_tokens": int(tokens),
            "layers": layers,
            "blocks": blocks,
        }
