"""Is a decomposition trustworthy? The checks a careful reviewer asks for, for any run.

On fresh data (toys: the target's sampler; language models: held-out text), measured against the
target's own output with the run's output divergence (MSE for toys, KL per token for LMs):

- ``unmasked``: every component on (masks 1), no weight delta — do the components sum to W?
- ``ci_masked``: masks = CI, no delta; ``ci_rounded``: masks = [CI > ½], no delta — does the
  decomposition work with exactly the components CI says are needed?
- ``stochastic``: masks g + (1 − g)·s with the run's sources, delta masked alike;
- ``adversarial``: a fresh PGD search for the sources that hurt most (what SPD's training
  adversary does, with its own seed and more steps) — a decomposition that only looks good under
  random masks fails here;
- ``zero``: every component off — the scale the others are divided by (a ratio of 0 is the target,
  1 is as bad as no components at all).

Per matrix: L0 (components with CI > 0 per token) and its fraction of C, the alive/dead spectrum
(how often each component fires), ‖Δ‖/‖W‖, and duplicated components (two alive components whose
rank-1 weights are parallel: one mechanism split in two).

:func:`verdict_line` lists every threshold a run fails, so a reader (or an agent through
``get_model_info``) knows how far to trust the decomposition.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from torch import Tensor

from spd_mcp.files import write_json_atomic
from spd_mcp.model.component_model import ComponentModel
from spd_mcp.model.losses import OutputLoss, output_divergence, pgd_recon_loss
from spd_mcp.model.masks import SourceKind, delta_masks, ones_masks, stochastic_masks
from spd_mcp.model.run_io import LoadedRun
from spd_mcp.paths import run_data_dir

VALIDITY_VERSION = 1
"""Bumped when what is measured changes (cached verdicts are keyed by it)."""
VALIDITY_FILE = "validity.json"
"""A run's verdict: in the run directory (shipped runs) or under ``$SPD_MCP_HOME/runs/<id>/``."""
RECON_KINDS = ("unmasked", "ci_masked", "ci_rounded", "stochastic", "adversarial")
SPECTRUM_EDGES = (1e-4, 1e-3, 1e-2, 1e-1)
"""Firing-frequency bin edges of the alive/dead spectrum."""


class Thresholds(BaseModel):
    """What a trustworthy decomposition meets (reconstructions as a fraction of ``zero``)."""

    unmasked: float = Field(0.01, description="max unmasked / zero divergence")
    ci_masked: float = Field(0.05, description="max CI-masked / zero divergence")
    ci_rounded: float = Field(0.05, description="max rounded-CI / zero divergence")
    stochastic: float = Field(0.10, description="max stochastic / zero divergence")
    adversarial: float = Field(0.25, description="max adversarial (PGD) / zero divergence")
    l0_frac: float = Field(0.05, description="max components per token as a fraction of C")
    delta_ratio: float = Field(0.05, description="max ‖W − VU‖ / ‖W‖ per matrix")
    duplicate_cos: float = Field(0.99, description="alive components more parallel are "
                                                   "duplicates")
    round_at: float = Field(0.5, description="CI above this counts as 1 when rounding")


class Recon(BaseModel):
    divergence: float = Field(description="output divergence from the target (MSE or KL/token)")
    ratio: float = Field(description="divergence / the all-components-off divergence")


class MatrixValidity(BaseModel):
    layer: str
    C: int
    alive: int
    dead: int
    l0: float = Field(description="mean components with CI > 0 per token")
    l0_frac: float = Field(description="l0 / C")
    delta_ratio: float
    spectrum: dict[str, int] = Field(
        description="components by firing frequency (CI > alive threshold): dead, then bins")
    duplicates: list[list[int]] = Field(
        default_factory=list, description="pairs of alive components with parallel weights")


class Validity(BaseModel):
    version: int = VALIDITY_VERSION
    run: str
    output_loss: OutputLoss
    data: str = Field(description="what the checks ran on")
    n_positions: int
    zero_divergence: float
    recon: dict[str, Recon]
    matrices: list[MatrixValidity]
    thresholds: Thresholds
    failures: list[str] = Field(description="every threshold the run fails, one line each")
    verdict: str

    @property
    def ok(self) -> bool:
        return not self.failures

    def flagged_layers(self) -> dict[str, str]:
        """Matrix → why it is flagged (too dense, delta-carried, duplicated, all dead)."""
        th, out = self.thresholds, {}
        for m in self.matrices:
            why = [w for w, bad in (
                (f"L0 {100 * m.l0_frac:.1f}% of C", m.l0_frac > th.l0_frac),
                (f"‖Δ‖/‖W‖ {m.delta_ratio:.3f}", m.delta_ratio > th.delta_ratio),
                ("duplicated components", bool(m.duplicates)),
                ("no alive component", m.alive == 0)) if bad]
            if why:
                out[m.layer] = ", ".join(why)
        return out

    def failed_regimes(self) -> list[str]:
        """Mask regimes whose reconstruction fails its threshold."""
        return [k for k in RECON_KINDS if self.recon[k].ratio > getattr(self.thresholds, k)]


Batches = Callable[[], list[tuple[Tensor, Tensor | None]]]
"""Fresh evaluation batches: (inputs, position mask or None)."""


def _spectrum(freq: Tensor) -> dict[str, int]:
    """Counts of components per firing-frequency bin (``freq`` (C,) in [0, 1])."""
    out = {"dead": int((freq == 0).sum())}
    lo = 0.0
    for hi in SPECTRUM_EDGES:
        out[f"({lo:g}, {hi:g}]"] = int(((freq > lo) & (freq <= hi)).sum())
        lo = hi
    out[f"> {lo:g}"] = int((freq > lo).sum())
    return out


@torch.no_grad()
def _duplicates(cm: ComponentModel, layer: str, alive: Tensor, cos_max: float) -> list[list[int]]:
    """Pairs of alive components whose rank-1 weights V_c U_c are parallel (cos > ``cos_max``)."""
    idx = alive.nonzero().flatten()
    if idx.numel() < 2:
        return []
    w = cm.component(layer).component_weights()[idx].flatten(1)  # (k, d_in d_out)
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = w @ w.T  # (k, k)
    i, j = torch.triu_indices(len(idx), len(idx), 1, device=cos.device)
    hit = cos[i, j] > cos_max
    return [[int(idx[a]), int(idx[b])] for a, b in zip(i[hit].tolist(), j[hit].tolist(),
                                                      strict=True)]


def evaluate_validity(
    cm: ComponentModel,
    batches: Batches,
    *,
    run: str,
    output_loss: OutputLoss,
    sampling: SourceKind,
    alive_threshold: float,
    data: str,
    thresholds: Thresholds | None = None,
    layer_names: dict[str, str] | None = None,
    pgd_steps: int = 20,
    pgd_step_size: float = 0.1,
    seed: int = 0,
) -> Validity:
    """Every check on ``batches()``; ``layer_names`` maps module paths to the names reported."""
    th = thresholds or Thresholds()
    names = layer_names or {n: n for n in cm.layer_names}
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        sums = dict.fromkeys(("zero", *RECON_KINDS), 0.0)
        n_pos = 0
        fires = {n: torch.zeros(C, device=_device(cm)) for n, C in cm.Cs.items()}
        l0 = dict.fromkeys(cm.layer_names, 0.0)
        for x, mask in batches():
            out, ci = cm.ci_for(x)
            g = ci.lower
            w = float(mask.sum()) if mask is not None else float(out[..., 0].numel())
            div = {
                "zero": cm(x, masks={n: torch.zeros_like(v) for n, v in g.items()}),
                "unmasked": cm(x, masks=ones_masks(g)),
                "ci_masked": cm(x, masks=g),
                "ci_rounded": cm(x, masks={n: (v > th.round_at).to(v.dtype)
                                           for n, v in g.items()}),
                "stochastic": cm(x, masks=stochastic_masks(g, sampling),
                                 delta_masks=delta_masks(g, sampling)),  # type: ignore[arg-type]
            }
            for k, pred in div.items():
                sums[k] += output_divergence(output_loss, out, pred, mask).item() * w
            with torch.enable_grad():
                adv = pgd_recon_loss(cm, x, out, g, kind=output_loss, routing="all",
                                     steps=pgd_steps, step_size=pgd_step_size, init="random",
                                     shared=False, include_delta=True, mask=mask)
            sums["adversarial"] += adv.item() * w
            n_pos += int(w)
            for n, v in g.items():
                valid = mask.unsqueeze(-1) if mask is not None else torch.ones_like(v[..., :1])
                fires[n] += ((v > alive_threshold) & valid.bool()).flatten(0, -2).sum(0)
                l0[n] += float(((v > 0) & valid.bool()).sum())
    finally:
        torch.random.set_rng_state(state)
    mean = {k: v / max(n_pos, 1) for k, v in sums.items()}
    zero = mean["zero"]
    recon = {k: Recon(divergence=mean[k], ratio=mean[k] / zero if zero > 0 else 0.0)
             for k in RECON_KINDS}
    matrices = []
    for n in cm.layer_names:
        C = cm.Cs[n]
        freq = fires[n] / max(n_pos, 1)
        alive = fires[n] > 0
        delta = (cm.weight_delta(n).norm() / cm.target_weight(n).norm().clamp_min(1e-12)).item()
        matrices.append(MatrixValidity(
            layer=names[n], C=C, alive=int(alive.sum()), dead=C - int(alive.sum()),
            l0=l0[n] / max(n_pos, 1), l0_frac=l0[n] / max(n_pos, 1) / C, delta_ratio=delta,
            spectrum=_spectrum(freq), duplicates=_duplicates(cm, n, alive, th.duplicate_cos)))
    failures = _failures(recon, matrices, th)
    return Validity(run=run, output_loss=output_loss, data=data, n_positions=n_pos,
                    zero_divergence=zero, recon=recon, matrices=matrices, thresholds=th,
                    failures=failures, verdict=verdict_line(failures))


def _device(cm: ComponentModel) -> torch.device:
    return next(cm.parameters()).device


def _failures(recon: dict[str, Recon], matrices: list[MatrixValidity], th: Thresholds
              ) -> list[str]:
    out = []
    what = {"unmasked": "all components on (no delta)", "ci_masked": "CI-masked",
            "ci_rounded": f"CI rounded at {th.round_at:g}", "stochastic": "stochastic masks",
            "adversarial": "adversarial (PGD) masks"}
    for k in RECON_KINDS:
        limit = getattr(th, k)
        if recon[k].ratio > limit:
            out.append(f"reconstruction with {what[k]}: {recon[k].ratio:.3g} of the "
                       f"all-off divergence > {limit:g}")
    for m in matrices:
        if m.alive == 0:
            out.append(f"{m.layer}: no alive component")
        if m.l0_frac > th.l0_frac:
            out.append(f"{m.layer}: L0 {m.l0:.2f} of C={m.C} ({100 * m.l0_frac:.1f}%) > "
                       f"{100 * th.l0_frac:g}%")
        if m.delta_ratio > th.delta_ratio:
            out.append(f"{m.layer}: ‖W − VU‖/‖W‖ {m.delta_ratio:.3f} > {th.delta_ratio:g} "
                       "(the components do not sum to the weight)")
        for a, b in m.duplicates:
            out.append(f"{m.layer}: components {a} and {b} are duplicates (parallel weights, "
                       f"cos > {th.duplicate_cos:g}: one mechanism split in two)")
    return out


def verdict_line(failures: list[str]) -> str:
    if not failures:
        return "valid: every check within its threshold"
    return f"fails {len(failures)} check{'s' * (len(failures) > 1)}: " + "; ".join(failures)



def run_batches(run: LoadedRun, *, n_batches: int, batch_size: int) -> tuple[Batches, str]:
    """Fresh evaluation data of a run: held-out documents for a language model (padded, with
    a mask of real tokens), otherwise draws from the target's sampler."""
    device = _device(run.model)
    text = run.target.text
    if text is not None:
        tok = text.tokenizer
        limit = run.target.topology.max_len if run.target.topology is not None else None
        available = text.n_documents("heldout")
        n_docs = n_batches * batch_size if available is None else min(
            n_batches * batch_size, available)

        def docs() -> list[tuple[Tensor, Tensor | None]]:
            out = []
            for b0 in range(0, n_docs, batch_size):
                rows = [tok.encode(text.heldout_text(i))[: limit or None]
                        for i in range(b0, min(b0 + batch_size, n_docs))]
                T = max(len(r) for r in rows)
                ids = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
                for i, r in enumerate(rows):
                    ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
                lengths = torch.tensor([len(r) for r in rows])
                mask = torch.arange(T)[None] < lengths[:, None]  # (B, T) real tokens
                out.append((ids.to(device), mask.to(device)))
            return out

        return docs, f"{n_docs} held-out documents"

    def draws() -> list[tuple[Tensor, Tensor | None]]:
        out = []
        for _ in range(n_batches):
            x = run.target.sampler(batch_size, device.type)
            out.append((x, run.target.position_mask(x)))
        return out

    return draws, f"{n_batches * batch_size} fresh samples from the target's data distribution"


def validity_of_run(run: LoadedRun, *, n_batches: int | None = None,
                    batch_size: int | None = None, thresholds: Thresholds | None = None,
                    seed: int = 0) -> Validity:
    """:func:`evaluate_validity` on a loaded run (canonical layer names, fresh data)."""
    is_text = run.target.text is not None
    batches, data = run_batches(run, n_batches=n_batches or 4,
                                batch_size=batch_size or (16 if is_text else 4096))
    topo = run.target.topology
    names = {n: topo.to_canonical(n) if topo is not None else n for n in run.model.layer_names}
    output_loss = run.config.output_loss or run.target.output_loss
    return evaluate_validity(
        run.model, batches, run=run.name, output_loss=output_loss,
        sampling=run.config.sampling, alive_threshold=run.config.alive_threshold, data=data,
        thresholds=thresholds, layer_names=names, seed=seed)


def _readable(path: Path) -> Validity | None:
    try:
        v = Validity.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return None
    return v if v.version == VALIDITY_VERSION and v.thresholds == Thresholds() else None


def cached_validity(run: LoadedRun) -> Validity | None:
    """The run's stored verdict (current version and default thresholds), if one exists."""
    for path in (run.path / VALIDITY_FILE, run_data_dir(run.run_id) / VALIDITY_FILE):
        v = _readable(path)
        if v is not None:
            return v
    return None


def save_validity(run: LoadedRun, v: Validity) -> Path:
    """Store a default-threshold verdict where :func:`cached_validity` finds it."""
    path = run_data_dir(run.run_id) / VALIDITY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, v.model_dump(mode="json"))
    return path


def ensure_validity(run: LoadedRun) -> Validity:
    """The stored verdict, or a fresh evaluation (stored for next time)."""
    v = cached_validity(run)
    if v is None:
        v = validity_of_run(run)
        save_validity(run, v)
    return v
