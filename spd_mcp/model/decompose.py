"""The SPD training loop: ``decompose(config)`` trains components + CI functions and saves a run."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from spd_mcp.model import losses as L
from spd_mcp.model.checkpoint import Checkpoints
from spd_mcp.model.ci_functions import PerComponentMLP
from spd_mcp.model.component_model import ComponentModel
from spd_mcp.model.config import (
    CIMaskedRecon,
    ConfigError,
    DecomposeConfig,
    Faithfulness,
    GoodfireTarget,
    HFTarget,
    ImportanceMinimality,
    PGDRecon,
    Schedule,
    StochasticRecon,
    ZooTarget,
)
from spd_mcp.model.diagnostics import diagnose_batch
from spd_mcp.model.distributed import (
    Dist,
    GlobalDraws,
    average_grads,
    check_config,
    from_env,
    join,
    leave,
    mean_over_ranks,
)
from spd_mcp.model.run_io import DONE_FILE, save_run
from spd_mcp.model.targets import ResolvedTarget, resolve_target
from spd_mcp.model.zoo.base import ZooEntry

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
    dist: Dist | None = None,
    checkpoints: Checkpoints | None = None,
) -> list[dict[str, Any]]:
    """Optimise U, V and CI functions in place; return the metrics rows (also eval rows).

    Layers in ``config.tied`` share parameters during training and are untied at the end.
    ``dist``: this process's share of a data-parallel job; ``checkpoints``: write checkpoints,
    and continue from the one being resumed."""
    resuming = checkpoints is not None and checkpoints.state is not None
    trainer = _Trainer(cm, target, config, device=device, reporter=reporter, dist=dist,
                       warmup=not resuming)
    trainer.checkpoints = checkpoints
    try:
        start = 0 if checkpoints is None else checkpoints.attach(trainer)
        trainer.run(start, config.steps)
    finally:
        cm.untie()
    return trainer.metrics


class _Trainer:
    """One decomposition being optimised: its ComponentModel, optimiser and metrics rows.

    Training can stop and resume (``run(start, stop)``), which restarts use to screen candidates
    for a few steps and then carry the chosen one on with its optimiser state, and which
    checkpoints use to continue after the process stopped (``state_dict``/``load_state_dict``).
    With ``dist`` each process trains on its rows of every batch (``spd_mcp.model.distributed``).
    """

    def __init__(
        self,
        cm: ComponentModel,
        target: ResolvedTarget,
        config: DecomposeConfig,
        *,
        device: str,
        reporter: Reporter | None,
        dist: Dist | None = None,
        warmup: bool = True,
    ) -> None:
        self.cm, self.target, self.config, self.device = cm, target, config, device
        self.reporter, self.dist = reporter, dist
        self.checkpoints: Checkpoints | None = None
        self.output_loss = config.output_loss or target.output_loss
        self.metrics: list[dict[str, Any]] = []
        # revive.retire: each layer's component weights and who was under the bar, last check
        self.last_weight: dict[str, Tensor] = {}
        self.below: dict[str, Tensor] = {}
        for source, follower in config.tied:
            cm.tie(source, follower)
        if config.faithfulness_warmup_steps and warmup:
            self._faithfulness_warmup()
        self.params = list(cm.trainable_parameters())
        self.opt = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.t0 = time.time()

    def state_dict(self) -> dict[str, Any]:
        """Model (tied), optimiser, metrics rows and elapsed time, for a checkpoint."""
        return {"model": self.cm.state_dict(), "optimizer": self.opt.state_dict(),
                "metrics": json.dumps(self.metrics), "seconds": time.time() - self.t0,
                "below": dict(self.below), "last_weight": dict(self.last_weight)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cm.load_state_dict(state["model"])
        self.cm.refresh_ties()
        self.opt.load_state_dict(state["optimizer"])
        self.metrics = json.loads(state["metrics"])
        self.t0 = time.time() - state["seconds"]
        self.below = dict(state.get("below", {}))
        self.last_weight = dict(state.get("last_weight", {}))

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

    def _rank_objective(self, x_all: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """This rank's share of the objective on global batch ``x_all``: its rows, the masks the
        single process draws for them, and each term scaled so that its mean over ranks is the
        single-process term on ``x_all`` (a padding-masked average is rescaled by the rank's
        share of the kept positions; other terms are means over equal row counts)."""
        assert self.dist is not None
        x = self.dist.rows(x_all)
        mask = self.target.position_mask(x)
        self.cm.refresh_ties()
        with GlobalDraws(self.dist, x.shape[0]):
            terms = compute_losses(
                self.cm, self.config, x, output_loss=self.output_loss, step=step, mask=mask
            )
        if mask is not None:
            kept = self.target.position_mask(x_all)
            assert kept is not None
            share = mask.sum() * self.dist.world / kept.sum().clamp_min(1)
            for key, loss in zip(list(terms), self.config.losses, strict=True):
                if isinstance(loss, StochasticRecon | CIMaskedRecon | PGDRecon):
                    terms[key] = terms[key] * share
        coeffs = _coeffs(self.config, list(terms))
        total = sum(coeffs[k] * v for k, v in terms.items())
        return total, terms  # type: ignore[return-value]

    def _train_step(self, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """One optimiser step on a fresh batch; the loss and its terms (this rank's, with dist)."""
        cfg = self.config
        x = self.target.sampler(cfg.batch_size, self.device)
        if self.dist is None:
            total, terms = self.objective(x, step)
        else:
            total, terms = self._rank_objective(x, step)
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        if self.dist is not None:
            average_grads(self.params, self.dist.world)
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        return total, terms

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
            if self.checkpoints is not None and self.checkpoints.due(step, start):
                self.checkpoints.save(step, self)
            if self._revive_due(step):
                self.revive(step)
            for group in self.opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg.schedule, step, steps)
            total, terms = self._train_step(step)
            report = step % 10 == 0 or step == steps - 1
            if self.dist is not None and report:  # every rank takes part in the all-reduce
                terms = mean_over_ranks({**terms, "total": total})
                total = terms.pop("total")
            if self.reporter is not None and report:
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

    # ---------------------------------------------------------------------------------- revival
    def _revive_due(self, step: int) -> bool:
        rv = self.config.revive
        return (rv is not None and step > 0 and step % rv.every == 0
                and step < rv.until_frac * self.config.steps)

    @torch.no_grad()
    def revive(self, step: int) -> dict[str, Tensor]:
        """Re-initialise the dead components (``config.revive``); return layer → revived indices.

        Dead: the component's lower CI never exceeds ``revive.threshold`` (default
        ``alive_threshold``) on ``revive.batches`` fixed batches of ``eval_batch_size`` (the same
        draws at every check). Padding positions count neither as firing nor as residual. A
        component shared by a tied pair is dead only if it is dead in both layers.

        New V column and U row are *aimed* rather than drawn blindly: on the same batches each
        layer's residual under its own CI masks, R = x Wᵀ − ((x V) ⊙ g) U, gives G = Σ xᵀ R, whose
        top singular pair is the rank-1 piece that adding would reduce that residual fastest.
        Revived component k reads v_k ∝ G ω_k (ω_k ~ N(0, I)) and writes u_k ∝ Gᵀ v_k: a random
        direction inside the span of the inputs the decomposition reconstructs worst, weighted
        by how badly, so the revived components are distinct yet all start where a component is
        missing (a blind draw would mostly land in directions the alive components already
        explain; in tms-40-10 the residual sits on the five features the baseline shares out).
        When G is zero the directions fall back to the ComponentModel's normal draws. Norms are
        small: V_k and U_k keep the ratio of the layer's median alive V and U norms, and the
        revived pieces V_k U_k together weigh 10% of a median alive component, so revival barely
        moves the layer's weight or output and a revived component starts nearly silent (its CI
        function sees small activations); it grows where that lowers the loss (Adam's steps do not
        depend on the parameter's scale) and otherwise fades like any dead component. (A first
        version gave V the full alive norm and only U a small one; on tms-40-10 six revived
        components then kept a CI just over the threshold on rare inputs with no weight behind
        it, counting as alive.) A per-component CI function (``mlp``, ``vector_mlp``) has its
        slices re-drawn by the CI function's own initialiser in every layer that uses the
        component; shared CI MLPs are left as they are. AdamW's ``exp_avg`` and ``exp_avg_sq``
        are zeroed for exactly the revived slices (the per-tensor step count is shared and kept,
        so Adam's bias correction is ~1 and those slices take steps of up to a few lr for the
        next few hundred steps, larger than a fresh optimiser's, until their moments fill).

        All randomness (the fixed batches, then the draws, seeded by ``seed`` and ``step``) is
        taken from forked generators, so the training stream is the same as without the check.
        A metrics row ``{"step": step, "revived": {layer: n}}`` records every check."""
        rv, cfg, cm = self.config.revive, self.config, self.cm
        assert rv is not None
        threshold = cfg.alive_threshold if rv.threshold is None else rv.threshold
        source_of = {f: s for s, f in cfg.tied}
        cm.refresh_ties()
        with _fork_rng(self.device):
            torch.manual_seed(cfg.seed + _REVIVE_BATCH_SEED)
            max_ci, resid, seen = self._revive_stats(
                rv.batches, skip=set(source_of),
                keep_firing=threshold if rv.split is not None else None,
            )
            dead = {n: max_ci[n] <= threshold for n in cm.layer_names}
            for s, f in cfg.tied:
                dead[s] = dead[f] = dead[s] & dead[f]
            retired = self._retire(dead, source_of) if rv.retire is not None else None
            merged = self._merge(dead, source_of) if rv.merge is not None else None
            torch.manual_seed(_revive_seed(cfg.seed, step))
            revived = {n: dead[n].nonzero().flatten() for n in cm.layer_names}
            split: dict[str, int] = {}
            taken: dict[str, Tensor] = {}
            for n in cm.layer_names:
                if n in seen and revived[n].numel():
                    taken[n] = self._split_components(n, *seen[n], spare=revived[n],
                                                      alive=~dead[n])
                    split[n] = int(taken[n].numel())
            for s, f in cfg.tied:
                if s in taken:
                    taken[f] = taken[s]
            if not rv.reaim:  # only the spares that took a split half are touched
                revived = {n: taken.get(n, revived[n][:0]) for n in cm.layer_names}
            for n, idx in revived.items():
                if idx.numel() == 0:
                    continue
                if n not in source_of:
                    rest = idx[~torch.isin(idx, taken[n])] if n in taken else idx
                    if rest.numel():
                        self._reinit_components(n, rest, resid[n], alive=~dead[n])
                self._reinit_ci_fn(n, idx)
        cm.refresh_ties()
        row: dict[str, Any] = {
            "step": step, "revived": {n: int(i.numel()) for n, i in revived.items()}}
        if rv.split is not None:
            row["split"] = split
        if retired is not None:
            row["retired"] = retired
        if merged is not None:
            row["merged"] = merged
        self.metrics.append(row)
        return revived

    def _retire(self, dead: dict[str, Tensor], source_of: dict[str, str]) -> dict[str, int]:
        """Zero and silence the components whose weight has collapsed (``revive.retire``) and
        mark them dead in ``dead`` (in place); return layer → how many. Collapsed: under the bar
        now, and either under it at the previous check too or lighter than then (a component
        growing into a feature is under it once and heavier each time; the first check only
        records). Dead components count too: a CI function can hover at the threshold, dead at
        this check and alive at the end."""
        rv, cm = self.config.revive, self.cm
        assert rv is not None and rv.retire is not None
        out: dict[str, int] = {}
        for n in cm.layer_names:
            if n in source_of:  # a follower shares its source's weights and verdict
                continue
            comp, alive = cm.component(n), ~dead[n]
            if not bool(alive.any()):
                out[n] = 0
                continue
            weight = comp.V.norm(dim=0) * comp.U.norm(dim=1)
            below = (weight > 0) & (weight < rv.retire * _mass_median(weight[alive]))
            gone = torch.zeros_like(below)
            if n in self.below:
                gone = below & (self.below[n] | (weight < self.last_weight[n]))
            self.below[n], self.last_weight[n] = below & ~gone, weight.detach().clone()
            idx = gone.nonzero().flatten()
            out[n] = int(idx.numel())
            if not idx.numel():
                continue
            self._zero_out(n, gone, dead, source_of)
        for f, s in source_of.items():
            out[f] = out.get(s, 0)
        return out

    def _zero_out(self, n: str, gone: Tensor, dead: dict[str, Tensor],
                  source_of: dict[str, str]) -> None:
        """Zero components ``gone`` (bool, C) of layer n, silence their CI functions in every
        layer that uses them, and mark them dead (in place)."""
        comp, idx = self.cm.component(n), gone.nonzero().flatten()
        comp.V[:, idx] = 0.0
        comp.U[idx, :] = 0.0
        self._zero_adam(comp.V, 1, idx)
        self._zero_adam(comp.U, 0, idx)
        for layer in [n, *(f for f, s in source_of.items() if s == n)]:
            dead[layer] |= gone
            self._silence_ci_fn(layer, idx)

    def _merge(self, dead: dict[str, Tensor], source_of: dict[str, str]) -> dict[str, int]:
        """Join live duplicates (``revive.merge``): for pairs of alive components whose rank-1
        weights have cosine above the bar, most parallel first and each component in one pair
        at most, the heavier's U row is scaled by 1 + ⟨W_b, W_a⟩ / ‖W_a‖² (so it carries the
        lighter's piece projected on its own) and the lighter is zeroed, silenced and marked
        dead. Returns layer → pairs merged."""
        rv, cm = self.config.revive, self.cm
        assert rv is not None and rv.merge is not None
        out: dict[str, int] = {}
        for n in cm.layer_names:
            if n in source_of:
                continue
            comp = cm.component(n)
            alive = (~dead[n]).nonzero().flatten()
            V, U = comp.V[:, alive], comp.U[alive]
            vn, un = V.norm(dim=0).clamp_min(1e-12), U.norm(dim=1).clamp_min(1e-12)
            gram = (V.T @ V) * (U @ U.T)  # ⟨W_a, W_b⟩ for rank-1 W = v uᵀ
            cos = gram / torch.outer(vn * un, vn * un)
            cos.fill_diagonal_(-1.0)
            pairs = (cos > rv.merge).nonzero()
            pairs = pairs[pairs[:, 0] < pairs[:, 1]]
            order = cos[pairs[:, 0], pairs[:, 1]].argsort(descending=True)
            used: set[int] = set()
            gone = torch.zeros_like(dead[n])
            weight = vn * un
            for i, j in pairs[order].tolist():
                if i in used or j in used:
                    continue
                used |= {i, j}
                a, b = (i, j) if weight[i] >= weight[j] else (j, i)
                scale = 1.0 + float(gram[a, b] / gram[a, a].clamp_min(1e-24))
                comp.U[alive[a]] *= scale
                self._zero_adam(comp.U, 0, alive[a:a + 1])
                gone[alive[b]] = True
            out[n] = int(gone.sum())
            if out[n]:
                self._zero_out(n, gone, dead, source_of)
        for f, s in source_of.items():
            out[f] = out.get(s, 0)
        return out

    def _revive_stats(
        self, batches: int, *, skip: set[str], keep_firing: float | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
        """Per layer: (C,) max lower CI, and G = Σ xᵀ R (d_in, d_out) for layers not in skip;
        with ``keep_firing``, also each such linear layer's inputs (m, d_in) and which
        components fire on them (m, C) (lower CI above ``keep_firing``; padding left out)."""
        cm, cfg = self.cm, self.config
        max_ci: dict[str, Tensor] = {}
        resid: dict[str, Tensor] = {}
        inputs_seen: dict[str, list[Tensor]] = {}
        fired: dict[str, list[Tensor]] = {}
        for _ in range(batches):
            x = self.target.sampler(cfg.eval_batch_size, self.device)
            pos = self.target.position_mask(x)
            _, inputs, _ = cm.forward_with_inputs(x)
            ci = cm.compute_ci(inputs)
            for n in cm.layer_names:
                g = ci.lower[n] if pos is None else ci.lower[n] * pos.unsqueeze(-1)
                top = g.flatten(0, -2).amax(0)
                max_ci[n] = torch.maximum(max_ci[n], top) if n in max_ci else top
                if n in skip:
                    continue
                comp, xin = cm.component(n), inputs[n]
                out = comp.delta_out(xin, cm.target_weight(n))  # x Wᵀ (W[ids] for embeddings)
                R = out - (comp.component_acts(xin) * g) @ comp.U
                if pos is not None:
                    R = R * pos.unsqueeze(-1)
                R = R.flatten(0, -2)
                G = resid.get(n)
                if G is None:
                    G = resid[n] = torch.zeros(comp.d_in, comp.d_out, device=R.device,
                                               dtype=R.dtype)
                if comp.kind == "embedding":
                    G.index_add_(0, xin.flatten(), R)
                else:
                    G.addmm_(xin.flatten(0, -2).T, R)
                    if keep_firing is not None:
                        valid = slice(None) if pos is None else pos.flatten().bool()
                        inputs_seen.setdefault(n, []).append(xin.flatten(0, -2)[valid])
                        fired.setdefault(n, []).append(
                            (g.flatten(0, -2) > keep_firing)[valid])
        seen = {n: (torch.cat(xs), torch.cat(fired[n])) for n, xs in inputs_seen.items()}
        return max_ci, resid, seen

    @torch.no_grad()
    def _split_components(
        self, name: str, x: Tensor, on: Tensor, *, spare: Tensor, alive: Tensor
    ) -> Tensor:
        """Split live components of a layer that do two things (``revive.split``); return the
        spare (dead) components that took a half.

        For an alive component c firing on inputs X_c, of which those it reads substantially
        (|x·v_c| at least a quarter of its 90th percentile; a CI that also fires on inputs it
        barely reads is not a second job): two lines through the origin fitted to
        X_c (k-lines: start at its largest input and the input least parallel to it, assign each
        input to the line it projects on more, refit each line as its group's top eigenvector;
        eight rounds). It is split when the smaller group's energy (Σ projection²) is at least
        ``split`` × the larger's and fewer than ``split_overlap`` of its inputs project on both
        lines (the smaller |projection| ≥ 30% of the larger): its inputs are two groups that
        rarely come together, not one group or a dense cloud. c keeps the line nearer its V
        column, a spare takes the other; each reads its line at c's V norm and writes the target
        weight's image of it (so the two pieces are the layer's own map on each group). The most
        even splits go first, while spares last."""
        rv, cm = self.config.revive, self.cm
        assert rv is not None and rv.split is not None
        comp = cm.component(name)
        counts = on.sum(0)
        plans: list[tuple[float, int, Tensor]] = []
        for c in ((counts >= rv.split_min_fires) & alive).nonzero().flatten().tolist():
            xc = x[on[:, c]]
            act = (xc @ comp.V[:, c]).abs()  # what the component reads on each of them
            found = _two_lines(xc[act >= 0.25 * torch.quantile(act, 0.9)])
            if found is None:
                continue
            pair, evenness, both = found
            if evenness >= rv.split and both < rv.split_overlap:
                plans.append((evenness, c, pair))
        plans.sort(key=lambda p: -p[0])
        weight = cm.target_weight(name)
        taken = []
        for (_, c, pair), d in zip(plans, spare.tolist(), strict=False):
            v = comp.V[:, c]
            scale = v.norm().clamp_min(1e-12)
            reads = v @ pair  # (2,)
            keep = 0 if reads[0].abs() >= reads[1].abs() else 1
            a_keep = pair[:, keep] if reads[keep] >= 0 else -pair[:, keep]
            for k, a in ((c, a_keep), (d, pair[:, 1 - keep])):
                comp.V[:, k] = a * scale
                comp.U[k] = comp.delta_out(a, weight) / scale
            taken.append(d)
        idx = torch.tensor(sorted({c for _, c, _ in plans[:len(taken)]} | set(taken)),
                           dtype=torch.long, device=comp.V.device)
        if idx.numel():
            self._zero_adam(comp.V, 1, idx)
            self._zero_adam(comp.U, 0, idx)
        return torch.tensor(taken, dtype=torch.long, device=spare.device)

    def _reinit_components(self, name: str, idx: Tensor, G: Tensor, *, alive: Tensor) -> None:
        """New V columns and U rows for components ``idx`` of a layer (see ``revive``)."""
        comp = self.cm.component(name)
        V, U = comp.V, comp.U
        k = idx.numel()
        v_norm, u_norm = V.norm(dim=0), U.norm(dim=1)
        ref = alive if bool(alive.any()) else torch.ones_like(alive)
        nu, mu = float(v_norm[ref].median()), float(u_norm[ref].median())
        if not (nu > 0 and mu > 0):  # the expected norms of a fresh V column and U row
            nu, mu = math.sqrt(comp.d_in / comp.d_out), math.sqrt(comp.d_out / comp.C)
        piece = float((v_norm * u_norm)[ref].median())
        if not piece > 0:  # (a zero piece would leave V_k = U_k = 0, a point with no gradient)
            piece = nu * mu
        shrink = math.sqrt(_REVIVE_TOTAL_NORM * piece / (k * nu * mu))
        scale = float(G.norm()) if G.numel() else 0.0
        if scale > 0 and math.isfinite(scale):
            G = G / scale
            v = G @ torch.randn(comp.d_out, k, device=G.device, dtype=G.dtype)  # (d_in, k)
            u = G.T @ v  # (d_out, k)
        else:
            v = torch.randn(comp.d_in, k, device=V.device, dtype=V.dtype)
            u = torch.randn(comp.d_out, k, device=V.device, dtype=V.dtype)
        v = v / v.norm(dim=0).clamp_min(1e-12)
        u = u / u.norm(dim=0).clamp_min(1e-12)
        V[:, idx] = (v * (nu * shrink)).to(V.dtype)
        U[idx, :] = (u.T * (mu * shrink)).to(U.dtype)
        self._zero_adam(V, 1, idx)
        self._zero_adam(U, 0, idx)

    def _reinit_ci_fn(self, name: str, idx: Tensor) -> None:
        fn = self.cm.per_component_ci_fn(name)
        if fn is None:
            return
        hidden = [w.shape[2] for w in fn.weights]
        d_in = fn.weights[0].shape[1] if hidden else fn.w_out.shape[1]
        fresh = PerComponentMLP(idx.numel(), d_in, hidden)
        for old, new in zip(fn.parameters(), fresh.parameters(), strict=True):
            old[idx] = new.to(old)
            self._zero_adam(old, 0, idx)

    def _silence_ci_fn(self, name: str, idx: Tensor) -> None:
        """Per-component CI functions of ``idx``: every weight 0 and the output bias −1, so the
        CI is 0 on every input (a shared CI MLP is left as it is)."""
        fn = self.cm.per_component_ci_fn(name)
        if fn is None:
            return
        for param in fn.parameters():
            param[idx] = 0.0
            self._zero_adam(param, 0, idx)
        fn.b_out[idx] = -1.0

    def _zero_adam(self, param: Tensor, dim: int, idx: Tensor) -> None:
        state = self.opt.state.get(param)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if state and key in state:
                state[key].index_fill_(dim, idx.to(state[key].device), 0.0)


def _mass_median(w: Tensor) -> float:
    """The weight-weighted median of non-negative ``w``: the value at which the larger entries
    hold half of the total. Unlike the plain median, many tiny entries do not drag it down (an
    identity layer with 10 real components and 90 near-zero ones has it at the real ones)."""
    top = w.detach().sort(descending=True).values
    cum = top.cumsum(0)
    return float(top[int((cum < 0.5 * cum[-1]).sum())])


def _two_lines(x: Tensor, rounds: int = 8) -> tuple[Tensor, float, float] | None:
    """Fit two lines through the origin to the rows of ``x`` (k-lines). Returns the unit
    directions (d, 2), the smaller group's energy over the larger's, and the fraction of rows
    whose smaller |projection| is at least 30% of the larger; None when a group comes out empty
    or ``x`` is zero."""
    norms = x.norm(dim=1)
    if x.shape[0] < 2 or not float(norms.max()) > 0:
        return None
    a1 = x[norms.argmax()] / norms.max()
    unit = x / norms.clamp_min(1e-12).unsqueeze(1)
    a2 = unit[(unit @ a1).abs().argmin()]
    pair = torch.stack([a1, a2], dim=1)  # (d, 2)
    for _ in range(rounds):
        group = (x @ pair).abs().argmax(1)
        lines = []
        for k in (0, 1):
            xk = x[group == k]
            if xk.shape[0] == 0:
                return None
            lines.append(torch.linalg.eigh(xk.T @ xk)[1][:, -1])
        pair = torch.stack(lines, dim=1)
    proj = (x @ pair).abs()
    group = proj.argmax(1)
    energy = torch.stack([(proj[group == k, k] ** 2).sum() for k in (0, 1)])
    if not float(energy.max()) > 0:
        return None
    both = (proj.min(1).values > 0.3 * proj.max(1).values).float().mean()
    return pair, float(energy.min() / energy.max()), float(both)


_REVIVE_BATCH_SEED = 7_919
"""Offset from ``config.seed`` of the seed that draws revival's fixed batches."""
_REVIVE_TOTAL_NORM = 0.1
"""Revived pieces of one layer together weigh this fraction of a median alive component."""


def _revive_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % 2**63


def _fork_rng(device: str) -> AbstractContextManager:
    """Fork the CPU generator and, on a GPU, that device's, so draws inside leave both as found."""
    dev = torch.device(device)
    devices = [dev.index or 0] if dev.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


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
    checkpoint_every: int | None = None,
    resume: bool = False,
    init: Callable[[ComponentModel, ResolvedTarget], None] | None = None,
) -> Path:
    """Resolve (and if needed train) the target, decompose it, and save the run at ``out``.

    ``init``: called on each fresh ComponentModel (every restart candidate) before training,
    to start it somewhere chosen (``benchmarks/zoo_recipes.py --ground-truth-init`` starts a
    toy at its known solution, to ask whether that solution is a stable point of a recipe).

    ``checkpoint_every``: write a checkpoint every that many steps; ``resume``: continue from
    the checkpoint when there is one (``spd_mcp.model.checkpoint``), and leave a finished run as
    it is. Started by ``torchrun`` (WORLD_SIZE > 1), the processes train one run data-parallel
    (``spd_mcp.model.distributed``) and rank 0 saves it."""
    device = resolve_device(device)
    if isinstance(config.target, HFTarget | GoodfireTarget) and config.data is None:
        kind = "huggingface" if isinstance(config.target, HFTarget) else "goodfire"
        raise ConfigError(f"a {kind} target needs `data: {{text: FILE}}` to train on")
    dist = from_env()
    if dist is not None:
        check_config(config, dist.world)
        device = join(dist, device)
        if not dist.main:
            reporter = target_reporter = None
    try:
        return _decompose(config, out=out, device=device, target_steps=target_steps,
                          reporter=reporter, target_reporter=target_reporter, overwrite=overwrite,
                          threads=threads, checkpoint_every=checkpoint_every, resume=resume,
                          dist=dist, init=init)
    finally:
        if dist is not None:
            leave()


def _decompose(
    config: DecomposeConfig,
    *,
    out: Path,
    device: str,
    target_steps: int | None,
    reporter: Reporter | None,
    target_reporter: Callable[[int, int, float], None] | None,
    overwrite: bool,
    threads: int | None,
    checkpoint_every: int | None,
    resume: bool,
    dist: Dist | None,
    init: Callable[[ComponentModel, ResolvedTarget], None] | None = None,
) -> Path:
    main = dist is None or dist.main
    ckpts = Checkpoints.open(out, every=checkpoint_every, config=config, resume=resume,
                             overwrite=overwrite, write=main)
    resuming = ckpts is not None and ckpts.state is not None
    if resume and not resuming and not overwrite and (out / DONE_FILE).exists():
        return out  # a finished run (e.g. a requeued job that had ended)
    seed_everything(config.seed)
    t0 = time.time()
    target = resolve_target(config.target, data=config.data)
    set_cpu_threads(device, threads, target.entry.cpu_threads if target.entry else None)
    target_metrics: dict[str, float] = {}
    if isinstance(config.target, ZooTarget) and config.target.weights is None and not resuming:
        assert isinstance(target.entry, ZooEntry)
        steps = target.entry.target_steps if target_steps is None else target_steps
        target_metrics = target.entry.train_target(
            target.model, steps=steps, device=device, seed=config.seed, progress=target_reporter
        )
    target.model.to(device).eval()
    if ckpts is not None:
        if resuming:
            target_metrics = ckpts.target_metrics
        else:
            ckpts.target_metrics = target_metrics
        target.sampler = ckpts.record(target.sampler)

    def make_cm(k: int) -> ComponentModel:
        seed_everything(_candidate_seed(config.seed, k))
        # Restart candidates each hook their own copy of the target (hooks are per module).
        model = target.model if config.restarts is None else copy.deepcopy(target.model)
        cm = ComponentModel(model, config.modules, config.ci_fn, target.aliases()).to(device)
        if init is not None:
            init(cm, target)
        return cm

    restarts: dict[str, Any] | None = None
    if config.restarts is None:
        cm = make_cm(0)
        metrics = train_components(cm, target, config, device=device, reporter=reporter,
                                   dist=dist, checkpoints=ckpts)
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
    if dist is not None:
        summary["processes"] = dist.world
    if not main:
        return out
    entry = target.entry
    path = save_run(
        out, config=config, cm=cm.cpu(), metrics=metrics, summary=summary,
        extras=entry.save_extras if entry is not None else None, overwrite=overwrite or resuming,
    )
    if ckpts is not None:
        ckpts.remove()
    return path


def format_summary(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2)
