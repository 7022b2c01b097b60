"""Goodfire ``spd`` run format: where a run's files are, its config (with the migrations their
loader applies to old keys), and its checkpoint's state-dict keys (old layouts migrated).

Facts (Goodfire ``spd``, main 3f0bb61e and dev 2ab728c0): a run directory holds
``final_config.yaml`` and ``model_<step>.pth`` files (the highest step is the final one); a
checkpoint is ``torch.save`` of the ComponentModel state dict with ``target_model.*`` (the whole
target), ``_components.<m>.{V,U,bias}`` and ``_ci_fns.<m>.layers.<2i>.{W,b}`` (dev:
``ci_fn._ci_fns.*`` or ``ci_fn._global_ci_fn.*``), module paths mangled ``.`` → ``-``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import Tensor

from spd_mcp.errors import InputError

CONFIG_FILE = "final_config.yaml"
_STEP = re.compile(r"^model_(\d+)\.pth?$")


class GoodfireError(InputError):
    """A Goodfire run that cannot be imported; the message names the file, key or value."""


@dataclass(frozen=True)
class RunFiles:
    directory: Path
    config: Path
    checkpoint: Path
    step: int | None


def locate(path: Path) -> RunFiles:
    """The config and the final checkpoint of a run directory (or of a given ``.pth`` file)."""
    path = Path(path).expanduser()
    if path.is_file():
        directory, ckpt = path.parent, path
    elif path.is_dir():
        directory = path
        found = [(int(m.group(1)), p) for p in path.iterdir()
                 if (m := _STEP.match(p.name)) is not None]
        if not found:
            raise GoodfireError(f"{path}: no model_<step>.pth checkpoint in this directory")
        ckpt = max(found)[1]
    else:
        raise GoodfireError(f"{path} does not exist (give a Goodfire run directory or .pth)")
    config = directory / CONFIG_FILE
    if not config.is_file():
        raise GoodfireError(f"{directory}: no {CONFIG_FILE} beside the checkpoint")
    m = _STEP.match(ckpt.name)
    return RunFiles(directory, config, ckpt, int(m.group(1)) if m else None)


# ----------------------------------------------------------------------------------- config
LayerwiseType = Literal["mlp", "vector_mlp", "shared_mlp"]


@dataclass
class GoodfireConfig:
    """What the importer needs from ``final_config.yaml`` (after Goodfire's own migrations)."""

    raw: dict[str, Any]
    module_info: list[tuple[str, int]]
    identity_module_info: list[tuple[str, int]]
    ci_mode: Literal["layerwise", "global"]
    ci_fn_type: str
    ci_hidden: list[int]
    sigmoid_type: str
    sampling: str
    use_delta_component: bool
    output_loss: str
    pretrained_model_class: str
    pretrained_model_name: str | None
    pretrained_model_path: str | None
    output_attr: str | None
    tokenizer_name: str | None
    task: dict[str, Any] = field(default_factory=dict)

    @property
    def all_module_info(self) -> list[tuple[str, int]]:
        """Module patterns with C, identity patterns as ``<pattern>.pre_identity``."""
        return [*self.module_info, *((p + ".pre_identity", C)
                                     for p, C in self.identity_module_info)]


def _pairs(items: Any, key: str) -> list[tuple[str, int]]:
    if items is None:
        return []
    if not isinstance(items, list):
        raise GoodfireError(f"{key}: expected a list of {{module_pattern, C}}, got {items!r}")
    out = []
    for i, it in enumerate(items):
        if not isinstance(it, dict) or "module_pattern" not in it or "C" not in it:
            raise GoodfireError(f"{key}[{i}]: expected {{module_pattern, C}}, got {it!r}")
        out.append((str(it["module_pattern"]), int(it["C"])))
    return out


def read_config(path: Path) -> GoodfireConfig:
    """Parse ``final_config.yaml``, applying the renames Goodfire's own loader applies."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise GoodfireError(f"{path}: not YAML ({e})") from None
    if not isinstance(raw, dict):
        raise GoodfireError(f"{path}: top level must be a mapping")
    c = dict(raw)
    for old, new in (("gate_type", "ci_fn_type"), ("gate_hidden_dims", "ci_fn_hidden_dims"),
                     ("pretrained_model_name_hf", "pretrained_model_name")):
        if old in c and new not in c:
            c[new] = c.pop(old)
    if "module_info" not in c and "target_module_patterns" in c:  # pre-module_info configs
        C = int(c["C"])
        c["module_info"] = [{"module_pattern": p, "C": C} for p in c["target_module_patterns"]]
        c["identity_module_info"] = [{"module_pattern": p, "C": C}
                                     for p in c.get("identity_module_patterns") or []]
    if "module_info" not in c:
        raise GoodfireError(f"{path}: no module_info (nor C + target_module_patterns)")
    cls = str(c.get("pretrained_model_class", ""))
    if cls.startswith("simple_stories_train.models."):
        cls = "spd.pretrain.models." + cls.removeprefix("simple_stories_train.models.")
    if "ci_config" in c:  # dev branch: ci_config {mode, fn_type, hidden_dims}
        ci = c["ci_config"] or {}
        mode = ci.get("mode", "layerwise")
        fn_type = ci.get("fn_type")
        hidden = list(ci.get("hidden_dims") or [])
    else:
        fn_type = c.get("ci_fn_type", "vector_mlp")
        hidden = list(c.get("ci_fn_hidden_dims") or [8])
        mode = "global" if c.get("use_global_ci") or str(fn_type).startswith("global_") else (
            "layerwise")
    task = c.get("task_config") or {}
    return GoodfireConfig(
        raw=raw,
        module_info=_pairs(c.get("module_info"), "module_info"),
        identity_module_info=_pairs(c.get("identity_module_info"), "identity_module_info"),
        ci_mode=mode, ci_fn_type=str(fn_type), ci_hidden=[int(h) for h in hidden],
        sigmoid_type=str(c.get("sigmoid_type", "leaky_hard")),
        sampling=str(c.get("sampling", "continuous")),
        use_delta_component=bool(c.get("use_delta_component", True)),
        output_loss=str(c.get("output_loss_type", "mse")),
        pretrained_model_class=cls,
        pretrained_model_name=c.get("pretrained_model_name"),
        pretrained_model_path=c.get("pretrained_model_path"),
        output_attr=c.get("pretrained_model_output_attr"),
        tokenizer_name=c.get("tokenizer_name"),
        task=dict(task) if isinstance(task, dict) else {},
    )


# ------------------------------------------------------------------------------- checkpoint
def mangle(module_path: str) -> str:
    return module_path.replace(".", "-")


def migrate_key(key: str) -> str:
    """A state-dict key in today's layout (the renames of Goodfire's loader, generalised to
    biases and identity components as their earlier generic transform did)."""
    key = key.replace("_gates.", "_ci_fns.")
    if key.startswith("patched_model."):
        key = "target_model." + key.removeprefix("patched_model.")
    for part in ("components", "identity_components"):
        m = re.match(rf"^target_model\.(.+)\.{part}\.(U|V|bias)$", key)
        if m:
            path = m.group(1) + (".pre_identity" if part == "identity_components" else "")
            return f"_components.{mangle(path)}.{m.group(2)}"
    m = re.match(r"^_ci_fns\.identity_(.+?)\.(.+)$", key)
    if m:
        return f"_ci_fns.{m.group(1)}-pre_identity.{m.group(2)}"
    if key.startswith("target_model.") and ".original." in key:
        key = key.replace(".original.", ".")
    return key


@dataclass
class Checkpoint:
    target: dict[str, Tensor]
    """Target state dict (``target_model.`` stripped)."""
    components: dict[str, dict[str, Tensor]]
    """Mangled module name → {V, U[, bias]}."""
    ci_layout: Literal["layerwise", "global"]
    ci_fns: dict[str, dict[str, Tensor]]
    """layerwise: mangled module name → {layers.<i>.W/b}; global: {"": {…}}."""


def read_checkpoint(path: Path) -> Checkpoint:
    """Load a checkpoint (tensors only; storage-sharing views are cloned apart)."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise GoodfireError(f"{path}: cannot read the checkpoint ({e})") from None
    if not isinstance(state, dict):
        raise GoodfireError(f"{path}: not a state dict")
    target: dict[str, Tensor] = {}
    comps: dict[str, dict[str, Tensor]] = {}
    ci: dict[str, dict[str, Tensor]] = {}
    layout: Literal["layerwise", "global"] = "layerwise"
    for key, t in state.items():
        if not isinstance(t, Tensor):
            raise GoodfireError(f"{path}: key {key!r} is not a tensor")
        t = t.detach().clone().contiguous()
        k = migrate_key(key)
        k = k.replace("ci_fn._ci_fns.", "_ci_fns.", 1) if k.startswith("ci_fn._ci_fns.") else k
        if k.startswith("target_model."):
            target[k.removeprefix("target_model.")] = t
        elif k.startswith("_components."):
            name, _, leaf = k.removeprefix("_components.").rpartition(".")
            comps.setdefault(name, {})[leaf] = t
        elif k.startswith("_ci_fns."):
            name, _, rest = k.removeprefix("_ci_fns.").partition(".")
            ci.setdefault(name, {})[rest] = t
        elif k.startswith(("ci_fn._global_ci_fn.", "_global_ci_fn.")):
            layout = "global"
            ci.setdefault("", {})[k.split("_global_ci_fn.", 1)[1]] = t
        else:
            raise GoodfireError(f"{path}: unrecognised state-dict key {key!r}")
    return Checkpoint(target, comps, layout, ci)
