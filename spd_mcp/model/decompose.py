"""The SPD training loop: ``decompose(config)`` trains components + CI functions and saves a run."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from spd_mcp.model import losses as L
from spd_mcp.model.component_model import ComponentModel
from spd_mcp.model.config import (
    CIMaskedRecon,
    DecomposeConfig,
    Faithfulness,
    ImportanceMinimality,
    PGDRecon,
    Schedule,
    StochasticRecon,
    ZooTarget,
)
from spd_mcp.model.diagnostics import diagnose_batch
from spd_mcp.model.run_io import save_run
from spd_mcp.model.targets import ResolvedTarget, resolve_target

Reporter = Callable[[int, int, dict[str, float]], None]
"""reporter(step, total, latest losses) — for progress bars."""


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available (use cpu or auto)")
    if device not in {"cpu", "cuda"} and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; expected cpu, cuda or auto")
    return device


def set_cpu_threads(device: str, threads: int | None, entry_default: int | None) -> None:
    """CPU thread count: explicit > $SPD_MCP_THREADS > the zoo entry's > torch's default."""
    if device != "cpu":
        return
    env = os.environ.get("SPD_MCP_THREADS")
    n = threads or (int(env) if env else None) or entry_default
    if n:
        torch.set_num_threads(n)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(schedule: Schedule, step: int, total: int) -> float:
    """Multiplier on the base lr: linear warm-up, then constant / linear / cosine decay."""
    warm = int(schedule.warmup_frac * total)
    if warm and step < warm:
        return (step + 1) / warm
    if schedule.type == "constant" or total <= warm:
        return 1.0
    t = (step - warm) / max(1, total - warm)
    lo = schedule.final_frac
    if schedule.type == "linear":
        return lo + (1 - lo) * (1 - t)
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))


def annealed_p(loss: ImportanceMinimality, step: int, total: int) -> float:
    if loss.p_final is None:
        return loss.p
    t0, t1 = loss.anneal_start_frac * total, loss.anneal_end_frac * total
    t = 0.0 if step <= t0 else 1.0 if step >= t1 else (step - t0) / max(1e-9, t1 - t0)
    return loss.p + (loss.p_final - loss.p) * t


def compute_losses(
    cm: ComponentModel,
    config: DecomposeConfig,
    x: Tensor,
    *,
    output_loss: L.OutputLoss,
    step: int,
    mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Every configured loss term (uncoefficiented) for one batch, keyed by a readable name."""
    with torch.no_grad():
        target_out, inputs, _ = cm.forward_with_inputs(x)
    ci = cm.compute_ci(inputs)
    out: dict[str, Tensor] = {}
    for i, loss in enumerate(config.losses):
        key = loss.type + (f"_{loss.routing}" if hasattr(loss, "routing") else "")
        key = key if key not in out else f"{key}_{i}"
        if isinstance(loss, Faithfulness):
            out[key] = L.faithfulness_loss(cm)
        elif isinstance(loss, ImportanceMinimality):
            p = annealed_p(loss, step, config.steps)
            out[key] = L.importance_minimality_loss(ci.upper, p=p, eps=loss.eps, beta=loss.beta)
        elif isinstance(loss, StochasticRecon):
            out[key] = L.stochastic_recon_loss(
                cm, x, target_out, ci.lower, kind=output_loss, routing=loss.routing,
                sampling=config.sampling, n_samples=loss.n_mask_samples,
                use_delta=config.use_delta_component, mask=mask,
                layers_per_step=loss.layers_per_step,
            )
        elif isinstance(loss, CIMaskedRecon):
            out[key] = L.ci_masked_recon_loss(
                cm, x, target_out, ci.lower, kind=output_loss, routing=loss.routing, mask=mask
            )
        elif isinstance(loss, PGDRecon):
            out[key] = L.pgd_recon_loss(
                cm, x, target_out, ci.lower, kind=output_loss, routing=loss.routing,
                steps=loss.steps, step_size=loss.step_size, init=loss.init,
                shared=loss.sources == "shared",
                include_delta=loss.include_delta and config.use_delta_component, mask=mask,
            )
        else:  # pragma: no cover - the discriminated union is exhaustive
            raise TypeError(f"unhandled loss {loss!r}")
    return out


def _coeffs(config: DecomposeConfig, keys: list[str]) -> dict[str, float]:
    return {k: loss.coeff for k, loss in zip(keys, config.losses, strict=True)}


def train_components(
    cm: ComponentModel,
    target: ResolvedTarget,
    config: DecomposeConfig,
    *,
    device: str,
    reporter: Reporter | None = None,
) -> list[dict[str, Any]]:
    """Optimise U, V and CI functions in place; return the metrics rows (also eval rows).

    Layers in ``config.tied`` share parameters during training and are untied at the end."""
    trainer = _Trainer(cm, target, config, device=device, reporter=reporter)
    try:
        trainer.run(0, config.steps)
    finally:
        cm.untie()
    return trainer.metrics


class _Trainer:
    """One decomposition being optimised: its ComponentModel, optimiser and metrics rows.

    Training can stop and resume (``run(start, stop)``), which restarts use to screen candidates
    for a few steps and then carry the chosen one on with its optimiser state."""

    def __init__(
        self,
        cm: ComponentModel,
        target: ResolvedTarget,
        config: DecomposeConfig,
        *,
        device: str,
        reporter: Reporter | None,
    ) -> None:
        self.cm, self.target, self.config, self.device = cm, target, config, device
        self.reporter = reporter
        self.output_loss = config.output_loss or target.output_loss
        self.metrics: list[dict[str, Any]] = []
        for source, follower in config.tied:
            cm.tie(source, follower)
        if config.faithfulness_warmup_steps:
            self._faithfulness_warmup()
        self.params = list(cm.trainable_parameters())
        self.opt = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.t0 = time.time()

    def _faithfulness_warmup(self) -> None:
        cfg = self.config
        warm_opt = torch.optim.AdamW(
            self.cm.components.parameters(), lr=cfg.faithfulness_warmup_lr,
            weight_decay=cfg.faithfulness_warmup_weight_decay,
        )
        for _ in range(cfg.faithfulness_warmup_steps):
            self.cm.refresh_ties()
            loss = L.faithfulness_loss(self.cm)
            warm_opt.zero_grad(set_to_none=True)
            loss.backward()
            warm_opt.step()
        self.cm.refresh_ties()
        self.metrics.append({"step": 0, "faithfulness_warmup": loss.item()})

    def objective(self, x: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The training loss (Σ coeff · term) on batch ``x`` and its terms."""
        self.cm.refresh_ties()
        terms = compute_losses(
            self.cm, self.config, x, output_loss=self.output_loss, step=step,
            mask=self.target.position_mask(x),
        )
        coeffs = _coeffs(self.config, list(terms))
        total = sum(coeffs[k] * v for k, v in terms.items())
        return total, terms  # type: ignore[return-value]

    def run(self, start: int, stop: int) -> None:
        """Train steps [start, stop) of the schedule; evaluate on the eval grid and at the end."""
        cfg, steps = self.config, self.config.steps
        for step in range(start, stop + 1):
            resumed = step == start > 0  # the first leg already evaluated this step
            if (step % cfg.eval_every == 0 or step == steps) and not resumed:
                row = {"step": step, "seconds": round(time.time() - self.t0, 3),
                       **evaluate(self.cm, self.target, cfg, device=self.device)}
                self.metrics.append(row)
            if step == stop:
                break
            for group in self.opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg.schedule, step, steps)
            x = self.target.sampler(cfg.batch_size, self.device)
            total, terms = self.objective(x, step)
            self.opt.zero_grad(set_to_none=True)
            total.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            self.opt.step()
            if self.reporter is not None and (step % 10 == 0 or step == steps - 1):
                latest = {k: v.item() for k, v in terms.items()}
                latest["total"] = float(total.detach())
                self.reporter(step + 1, steps, latest)
                if step % max(1, cfg.eval_every // 5) == 0:
                    self.metrics.append({"step": step, "train": latest})

    @torch.no_grad()
    def selection_loss(self, step: int, *, batches: int, seed: int) -> float:
        """The training objective averaged over ``batches`` fixed batches (data and mask noise
        drawn from ``seed``, so every candidate is scored on the same draws; the global RNG
        stream is left untouched). Uses no ground truth."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            losses = [
                float(self.objective(
                    self.target.sampler(self.config.eval_batch_size, self.device), step
                )[0])
                for _ in range(batches)
            ]
        return sum(losses) / len(losses)


def train_with_restarts(
    make_cm: Callable[[int], ComponentModel],
    target: ResolvedTarget,
    config: DecomposeConfig,
    *,
    device: str,
    reporter: Reporter | None = None,
) -> tuple[ComponentModel, list[dict[str, Any]], dict[str, Any]]:
    """Train ``config.restarts.n`` candidates (``make_cm(k)`` builds candidate k, seeded) for
    ``config.restarts.steps`` steps, keep the one with the lowest training objective, and train it
    to ``config.steps``. Returns the model, its metrics rows and a record of the choice."""
    rs = config.restarts
    assert rs is not None
    screen = config.steps if rs.steps is None else rs.steps
    best: _Trainer | None = None
    record: dict[str, Any] = {"n": rs.n, "steps": screen, "criterion": "training objective",
                              "candidates": []}
    for k in range(rs.n):
        trainer = _Trainer(make_cm(k), target, config, device=device, reporter=reporter)
        trainer.run(0, screen)
        loss = trainer.selection_loss(screen, batches=rs.select_batches, seed=config.seed)
        record["candidates"].append({"candidate": k, "seed": _candidate_seed(config.seed, k),
                                     "loss": loss})
        trainer.metrics.append({"step": screen, "restart": k, "selection_loss": loss})
        if best is None or loss < record["candidates"][record["chosen"]]["loss"]:
            best, record["chosen"] = trainer, k
        else:
            trainer.cm.untie()
    assert best is not None
    try:
        best.run(screen, config.steps)
    finally:
        best.cm.untie()
    return best.cm, best.metrics, record


def _candidate_seed(seed: int, k: int) -> int:
    """Candidate k's initialisation seed (candidate 0 matches a run without restarts)."""
    return seed + 1 + 1000 * k


def evaluate(
    cm: ComponentModel, target: ResolvedTarget, config: DecomposeConfig, *, device: str
) -> dict[str, Any]:
    output_loss = config.output_loss or target.output_loss
    x = target.sampler(config.eval_batch_size, device)
    return diagnose_batch(
        cm, x, output_loss=output_loss, sampling=config.sampling,
        alive_threshold=config.alive_threshold, mask=target.position_mask(x),
    )[0]


def decompose(
    config: DecomposeConfig,
    *,
    out: Path,
    device: str = "cpu",
    target_steps: int | None = None,
    reporter: Reporter | None = None,
    target_reporter: Callable[[int, int, float], None] | None = None,
    overwrite: bool = False,
    threads: int | None = None,
) -> Path:
    """Resolve (and if needed train) the target, decompose it, and save the run at ``out``."""
    device = resolve_device(device)
    seed_everything(config.seed)
    t0 = time.time()
    target = resolve_target(config.target)
    set_cpu_threads(device, threads, target.entry.cpu_threads if target.entry else None)
    target_metrics: dict[str, float] = {}
    if isinstance(config.target, ZooTarget) and config.target.weights is None:
        assert target.entry is not None
        steps = target.entry.target_steps if target_steps is None else target_steps
        target_metrics = target.entry.train_target(
            target.model, steps=steps, device=device, seed=config.seed, progress=target_reporter
        )
    target.model.to(device).eval()

    def make_cm(k: int) -> ComponentModel:
        seed_everything(_candidate_seed(config.seed, k))
        # Restart candidates each hook their own copy of the target (hooks are per module).
        model = target.model if config.restarts is None else copy.deepcopy(target.model)
        return ComponentModel(model, config.modules, config.ci_fn).to(device)

    restarts: dict[str, Any] | None = None
    if config.restarts is None:
        cm = make_cm(0)
        metrics = train_components(cm, target, config, device=device, reporter=reporter)
    else:
        cm, metrics, restarts = train_with_restarts(
            make_cm, target, config, device=device, reporter=reporter
        )
    final = next(m for m in reversed(metrics) if "layers" in m)
    summary: dict[str, Any] = {
        "device": device,
        "seconds": round(time.time() - t0, 2),
        "target": target_metrics,
        "final_eval": final,
    }
    if restarts is not None:
        summary["restarts"] = restarts
    entry = target.entry
    return save_run(
        out, config=config, cm=cm.cpu(), metrics=metrics, summary=summary,
        extras=entry.save_extras if entry is not None else None, overwrite=overwrite,
    )


def format_summary(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2)
