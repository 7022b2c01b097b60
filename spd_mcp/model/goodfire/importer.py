"""``spd-mcp import goodfire``: a finished Goodfire ``spd`` run written as an spd-mcp run.

Everything that maps is mapped exactly (module patterns and C, identity insertions, V/U
orientation, Conv1D, embeddings, biases, the CI-function families and their parameters, the
sigmoid); anything that does not is an error naming the config key and value. Nothing is
approximated silently: after loading, the importer checks that all-ones masks with the delta
reproduce the target's output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from spd_mcp.model.ci_functions import PerComponentMLP, SharedMLP
from spd_mcp.model.component_model import ComponentModel
from spd_mcp.model.config import (
    CIFnConfig,
    DecomposeConfig,
    GoodfireTarget,
    HFTarget,
    ModulePattern,
    TextData,
)
from spd_mcp.model.goodfire.fmt import (
    Checkpoint,
    GoodfireConfig,
    GoodfireError,
    locate,
    mangle,
    read_checkpoint,
    read_config,
)

PROVENANCE_FILE = "goodfire.json"
CLASS_KINDS = {
    "spd.experiments.tms.models.TMSModel": "TMS",
    "spd.experiments.resid_mlp.models.ResidMLP": "ResidMLP",
    "spd.pretrain.models.llama_simple.LlamaSimple": "LlamaSimple",
    "spd.pretrain.models.llama_simple_mlp.LlamaSimpleMLP": "LlamaSimpleMLP",
    "spd.pretrain.models.gpt2_simple.GPT2Simple": "GPT2Simple",
}
SIGMOIDS = ("leaky_hard", "hard")
"""Sigmoids whose CI (the lower function, clamp(z, 0, 1)) is ours exactly."""


@dataclass
class ImportReport:
    run: Path
    source: str
    step: int | None
    target: str
    layers: dict[str, int]
    identity: list[str]
    ci_fn: str
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------- targets
def _target_spec(cfg: GoodfireConfig, ckpt: Checkpoint, files_dir: Path,
                 target_config: Path | None) -> tuple[GoodfireTarget | HFTarget, str]:
    cls = cfg.pretrained_model_class
    if cls.startswith("transformers."):
        return _hf_spec(cfg, target_config), cls
    kind = CLASS_KINDS.get(cls)
    if kind is None:
        known = ", ".join([*CLASS_KINDS, "transformers.*"])
        raise GoodfireError(f"pretrained_model_class: {cls!r} is not supported (known: {known})")
    t = ckpt.target
    if kind == "TMS":
        n_hidden, n_features = t["linear1.weight"].shape
        n_hl = sum(1 for k in t if k.startswith("hidden_layers.") and k.endswith(".weight"))
        arch: dict[str, Any] = {"n_features": n_features, "n_hidden": n_hidden,
                                "n_hidden_layers": n_hl}
    elif kind == "ResidMLP":
        n_features, d_embed = t["W_E"].shape
        n_layers = sum(1 for k in t if k.endswith(".mlp_in.weight"))
        d_mlp = t["layers.0.mlp_in.weight"].shape[0]
        train = _resid_train_config(files_dir)
        act = (train.get("resid_mlp_model_config") or train).get("act_fn_name")
        if act not in ("relu", "gelu"):
            raise GoodfireError(
                f"{files_dir}: the ResidMLP activation is not in resid_mlp_train_config.yaml "
                "(resid_mlp_model_config.act_fn_name); it cannot be read from the weights")
        arch = {"n_features": n_features, "d_embed": d_embed, "d_mlp": d_mlp,
                "n_layers": n_layers, "act_fn_name": act,
                "in_bias": "layers.0.mlp_in.bias" in t, "out_bias": "layers.0.mlp_out.bias" in t}
    else:
        arch = _lm_config(kind, files_dir, target_config)
    if "feature_probability" in cfg.task:
        arch["feature_probability"] = float(cfg.task["feature_probability"])
    return GoodfireTarget(goodfire=kind, config=arch), cls  # type: ignore[arg-type]


def _resid_train_config(directory: Path) -> dict[str, Any]:
    p = directory / "resid_mlp_train_config.yaml"
    return dict(yaml.safe_load(p.read_text()) or {}) if p.is_file() else {}


def _lm_config(kind: str, directory: Path, given: Path | None) -> dict[str, Any]:
    """The pretrain model config: ``--target-config`` (model_config.yaml), else a
    ``model_config.yaml`` beside the run. An SPD run does not store it."""
    candidates = [given] if given is not None else [directory / "model_config.yaml"]
    for p in candidates:
        if p is not None and p.is_file():
            data = yaml.safe_load(p.read_text()) or {}
            if not isinstance(data, dict):
                raise GoodfireError(f"{p}: not a mapping")
            mt = data.get("model_type", kind)
            if mt != kind:
                raise GoodfireError(f"{p}: model_type {mt!r}, but the run's target is {kind}")
            return {k: v for k, v in data.items()}
        if p is not None and given is not None:
            raise GoodfireError(f"--target-config {p} does not exist")
    raise GoodfireError(
        f"the target is a {kind}, whose architecture (heads, key/value heads, RoPE base, "
        "context) a Goodfire SPD run does not store; pass --target-config with the pretrain "
        "run's model_config.yaml (it names pretrained_model_name)")


def _hf_spec(cfg: GoodfireConfig, given: Path | None) -> HFTarget:
    if given is None or not (given / "config.json").is_file():
        raise GoodfireError(
            f"the target is {cfg.pretrained_model_class} ({cfg.pretrained_model_name!r}); pass "
            "--target-config DIR with its config.json (AutoConfig.from_pretrained(NAME)"
            ".save_pretrained(DIR)); the weights come from the checkpoint")
    if cfg.output_attr not in (None, "logits"):
        raise GoodfireError(f"pretrained_model_output_attr: {cfg.output_attr!r} is not supported "
                            "for a transformers target (expected 'logits')")
    return HFTarget(huggingface=str(given))


# ---------------------------------------------------------------------------- CI functions
def _take(d: dict[str, Tensor], key: str, where: str) -> Tensor:
    if key not in d:
        raise GoodfireError(f"{where}: missing CI-function parameter {key!r} "
                            f"(has {sorted(d)})")
    return d.pop(key)


def _fill_per_component(fn: PerComponentMLP, params: dict[str, Tensor], where: str) -> None:
    """Theirs: layers.<2i>.W (C, in, out), .b (C, out); the last maps to 1 output."""
    n_hidden = len(fn.weights)
    with torch.no_grad():
        for i in range(n_hidden):
            fn.weights[i].copy_(_take(params, f"layers.{2 * i}.W", where))
            fn.biases[i].copy_(_take(params, f"layers.{2 * i}.b", where))
        W = _take(params, f"layers.{2 * n_hidden}.W", where)
        fn.w_out.copy_(W[..., 0])
        fn.b_out.copy_(_take(params, f"layers.{2 * n_hidden}.b", where)[..., 0])


def _fill_shared(fn: SharedMLP, params: dict[str, Tensor], where: str,
                 rows: Tensor | None = None, cols: Tensor | None = None) -> None:
    """Theirs: layers.<2i>.W (in, out), .b (out,). ``rows`` / ``cols`` reorder the first
    layer's inputs and the last layer's outputs (global functions: their sorted layer order)."""
    last = len(fn.layers) - 1
    with torch.no_grad():
        for i, lin in enumerate(fn.layers):
            W = _take(params, f"layers.{2 * i}.W", where)
            b = _take(params, f"layers.{2 * i}.b", where)
            if i == 0 and rows is not None:
                W = W[rows]
            if i == last and cols is not None:
                W, b = W[:, cols], b[cols]
            lin.weight.copy_(W.T)
            lin.bias.copy_(b)


def _fill_ci(cm: ComponentModel, cfg: GoodfireConfig, ckpt: Checkpoint) -> None:
    fns = cm.ci_fns
    if cfg.ci_mode == "global":
        if cfg.ci_fn_type != "global_shared_mlp":
            raise GoodfireError(f"ci_config.fn_type: {cfg.ci_fn_type!r} is not supported (only "
                                "global_shared_mlp among the global CI functions)")
        params = ckpt.ci_fns.pop("", {})
        ours = list(cm.layer_names)
        theirs = sorted(ours)  # their global function reads layers in sorted path order
        width = {n: (cm.Cs[n] if cm.component(n).kind == "embedding" else cm.component(n).d_in)
                 for n in ours}
        start, s = {}, 0
        for n in theirs:
            start[n] = s
            s += width[n]
        rows = torch.cat([torch.arange(start[n], start[n] + width[n]) for n in ours])
        cstart, s = {}, 0
        for n in theirs:
            cstart[n] = s
            s += cm.Cs[n]
        cols = torch.cat([torch.arange(cstart[n], cstart[n] + cm.Cs[n]) for n in ours])
        _fill_shared(fns.global_mlp, params, "global CI function", rows, cols)
        if params:
            raise GoodfireError(f"global CI function: unused parameters {sorted(params)}")
        return
    for n in cm.layer_names:
        key = mangle(n)
        params = ckpt.ci_fns.pop(key, None)
        if params is None:
            raise GoodfireError(f"checkpoint has no CI function for {n!r} (key _ci_fns.{key})")
        fn = fns.fns[n.replace(".", "__")]
        if isinstance(fn, PerComponentMLP):
            _fill_per_component(fn, params, f"CI function of {n}")
        else:
            assert isinstance(fn, SharedMLP)
            _fill_shared(fn, params, f"CI function of {n}")
        if params:
            raise GoodfireError(f"CI function of {n}: unused parameters {sorted(params)}")
    if ckpt.ci_fns:
        raise GoodfireError(f"CI functions for modules no pattern names: {sorted(ckpt.ci_fns)}")


def _fill_components(cm: ComponentModel, ckpt: Checkpoint) -> None:
    for n in cm.layer_names:
        key = mangle(n)
        got = ckpt.components.pop(key, None)
        if got is None:
            raise GoodfireError(f"checkpoint has no components for {n!r} (_components.{key})")
        comp = cm.component(n)
        for leaf in ("V", "U"):
            t = got.pop(leaf, None)
            if t is None:
                raise GoodfireError(f"_components.{key}.{leaf} is missing")
            want = tuple(getattr(comp, leaf).shape)
            if tuple(t.shape) != want:
                raise GoodfireError(f"_components.{key}.{leaf}: shape {tuple(t.shape)}, the "
                                    f"target's layer needs {want}")
            with torch.no_grad():
                getattr(comp, leaf).copy_(t)
        bias = got.pop("bias", None)
        if bias is not None and (comp.bias is None or not torch.allclose(bias, comp.bias)):
            raise GoodfireError(f"_components.{key}.bias differs from the target's bias")
        if got:
            raise GoodfireError(f"_components.{key}: unexpected entries {sorted(got)}")
    if ckpt.components:
        raise GoodfireError(f"components for modules no pattern names: {sorted(ckpt.components)}")


# ---------------------------------------------------------------------------------- config
def _ci_fn_config(cfg: GoodfireConfig) -> CIFnConfig:
    if cfg.sigmoid_type not in SIGMOIDS:
        raise GoodfireError(
            f"sigmoid_type: {cfg.sigmoid_type!r} is not supported (its CI differs from "
            f"clamp(z, 0, 1); supported: {', '.join(SIGMOIDS)})")
    if cfg.ci_mode == "global":
        return CIFnConfig(type="global_shared_mlp", hidden=cfg.ci_hidden)
    if cfg.ci_fn_type not in ("mlp", "vector_mlp", "shared_mlp"):
        raise GoodfireError(f"ci_fn_type: {cfg.ci_fn_type!r} is not supported")
    return CIFnConfig(type=cfg.ci_fn_type, hidden=cfg.ci_hidden)  # type: ignore[arg-type]


_LOSSES = {"ImportanceMinimalityLoss": "importance_minimality", "FaithfulnessLoss": "faithfulness",
           "StochasticReconLoss": "stochastic_recon", "CIMaskedReconLoss": "ci_masked_recon",
           "StochasticReconLayerwiseLoss": "stochastic_recon"}


def _losses(raw: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """Their loss terms in our config's terms (a record of how the run was trained; an
    imported run is never trained here). Terms without an equivalent are listed."""
    out, skipped = [], []
    for item in raw.get("loss_metric_configs") or []:
        name = item.get("classname")
        kind = _LOSSES.get(name)
        if kind is None:
            skipped.append(str(name))
            continue
        entry: dict[str, Any] = {"type": kind, "coeff": float(item.get("coeff") or 0.0)}
        if kind == "importance_minimality":
            entry["p"] = float(item.get("pnorm", 1.0))
        if name == "StochasticReconLayerwiseLoss":
            entry["routing"] = "layerwise"
        out.append(entry)
    if not out:
        out = [{"type": "stochastic_recon", "coeff": 1.0}]
    return out, skipped


# ---------------------------------------------------------------------------------- import
def import_goodfire(
    path: Path, out: Path, *, name: str, tokenizer: Path | None = None,
    data: TextData | None = None, target_config: Path | None = None, overwrite: bool = False,
) -> ImportReport:
    """Import the run at ``path`` (directory or ``.pth``) as an spd-mcp run at ``out``."""
    from spd_mcp.model.run_io import save_run

    files = locate(path)
    cfg = read_config(files.config)
    ckpt = read_checkpoint(files.checkpoint)
    spec, cls = _target_spec(cfg, ckpt, files.directory, target_config)
    identity = _identity_paths(cfg, spec, ckpt)
    spec = spec.model_copy(update={"identity": identity})
    is_lm = cfg.output_loss == "kl"
    ci_fn = _ci_fn_config(cfg)
    losses, skipped = _losses(cfg.raw)
    raw = cfg.raw
    sched = raw.get("lr_schedule") or {}
    config = DecomposeConfig.model_validate({
        "name": name, "seed": int(raw.get("seed", 0)), "target": spec.model_dump(mode="json"),
        "data": data.model_dump(mode="json") if data is not None else None,
        "modules": [{"pattern": p, "C": C} for p, C in cfg.all_module_info],
        "ci_fn": ci_fn.model_dump(mode="json"),
        "sampling": cfg.sampling if cfg.sampling in ("continuous", "binomial") else "continuous",
        "use_delta_component": cfg.use_delta_component,
        "output_loss": cfg.output_loss if cfg.output_loss in ("mse", "kl") else None,
        "losses": losses, "steps": int(raw.get("steps", 0)),
        "batch_size": int(raw.get("batch_size", 1)),
        "lr": float(sched.get("start_val") or raw.get("lr") or 1e-3),
        "alive_threshold": float(raw.get("ci_alive_threshold", 0.1)),
    })
    if is_lm and tokenizer is None:
        raise GoodfireError(
            f"a language-model run needs its tokenizer ({cfg.tokenizer_name!r}): pass "
            "--tokenizer DIR (AutoTokenizer.from_pretrained(NAME).save_pretrained(DIR)) or a "
            "tokenizer.json")
    target = _resolve(config, tokenizer, ckpt)
    cm = ComponentModel(target.model, [ModulePattern(pattern=p, C=C)
                                       for p, C in cfg.all_module_info], ci_fn,
                        target.aliases())
    _fill_components(cm, ckpt)
    _fill_ci(cm, cfg, ckpt)
    _check_exact(cm, target)
    notes = []
    if cfg.sigmoid_type == "hard":
        notes.append("sigmoid_type hard: the CI (clamp) is exact; training-only leaks differ")
    if skipped:
        notes.append(f"loss terms without an spd-mcp equivalent (recorded only): {skipped}")
    provenance = {"source": str(files.directory), "checkpoint": files.checkpoint.name,
                  "step": files.step, "pretrained_model_class": cls,
                  "pretrained_model_name": cfg.pretrained_model_name,
                  "tokenizer_name": cfg.tokenizer_name, "notes": notes,
                  "final_config": cfg.raw}

    def extras(run_dir: Path) -> None:
        if target.entry is not None:
            target.entry.save_extras(run_dir)
        (run_dir / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1, default=str))

    save_run(out, config=config, cm=cm, metrics=[],
             summary={"imported_from": {k: provenance[k] for k in (
                 "source", "checkpoint", "step", "pretrained_model_class")}, "notes": notes},
             extras=extras, overwrite=overwrite)
    return ImportReport(out, str(files.checkpoint), files.step, cls, dict(cm.Cs), identity,
                        f"{ci_fn.type} {ci_fn.hidden}", notes)


def _identity_paths(cfg: GoodfireConfig, spec: Any, ckpt: Checkpoint) -> list[str]:
    """Module paths their identity patterns name, in module order (from the checkpoint's
    component keys ending in ``-pre_identity``, matched back through the patterns)."""
    import fnmatch

    if not cfg.identity_module_info:
        return []
    paths = sorted({k.removesuffix("-pre_identity") for k in ckpt.components
                    if k.endswith("-pre_identity")})
    # mangled → dotted: every '-' of a mangled name was a '.', underscores are kept
    dotted = [p.replace("-", ".") for p in paths]
    pats = [p for p, _ in cfg.identity_module_info]
    out = [d for d in dotted if any(fnmatch.fnmatchcase(d, p) for p in pats)]
    if not out:
        raise GoodfireError(f"identity_module_info {pats} but the checkpoint has no "
                            "pre_identity components")
    return out


def _resolve(config: DecomposeConfig, tokenizer: Path | None, ckpt: Checkpoint) -> Any:
    """The target with the checkpoint's weights (identities inserted first)."""
    from spd_mcp.model.targets import resolve_goodfire, resolve_hf

    spec = config.target
    if isinstance(spec, HFTarget):
        # buffers older transformers versions saved (causal masks) are not parameters today
        state = {k: v for k, v in ckpt.target.items()
                 if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        return resolve_hf(spec, config.data, state=state, tokenizer=tokenizer,
                          source="checkpoint target_model.*")
    assert isinstance(spec, GoodfireTarget)
    return resolve_goodfire(spec, config.data, state=ckpt.target, tokenizer=tokenizer,
                            source="checkpoint target_model.*")


@torch.no_grad()
def _check_exact(cm: ComponentModel, target: Any) -> None:
    """All-ones masks with the delta must reproduce the target (the mapping is exact)."""
    x = _probe_input(target)
    want = cm.target(x)
    T = x.shape[:-1] if x.is_floating_point() else x.shape
    ones = {n: torch.ones(*T, C) for n, C in cm.Cs.items()}
    got = cm(x, masks=ones, delta_masks=dict.fromkeys(cm.Cs, 1.0))
    err = (got - want).abs().max().item()
    scale = want.abs().max().item() + 1e-6
    if err > 1e-4 * scale:
        raise GoodfireError(f"import check failed: all-ones masks with the delta differ from "
                            f"the target by {err:.3g} (scale {scale:.3g})")


def _probe_input(target: Any) -> Tensor:
    model: nn.Module = target.model
    if target.text is not None or hasattr(model, "wte") or hasattr(model, "transformer"):
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else (
            model.wte)  # type: ignore[union-attr]
        vocab = int(emb.weight.shape[0])  # type: ignore[union-attr]
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab, (2, 8), generator=g)
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    n_in = int(model.W_E.shape[0]) if hasattr(model, "W_E") else first.in_features
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, n_in, generator=g)
