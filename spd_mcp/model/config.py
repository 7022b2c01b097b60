"""The decomposition config: one pydantic model, unknown keys are errors that name them.

A config is a YAML or JSON file (``spd-mcp decompose CONFIG``) or a zoo default. Losses are a list
of typed entries, each with its own coefficient, so a config states exactly what is optimised.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from spd_mcp.errors import InputError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------------------- target
class ZooTarget(Strict):
    """A built-in target, trained by its zoo trainer (or loaded from ``weights``)."""

    zoo: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = Field(None, description="safetensors of trained target weights")


class ImportTarget(Strict):
    """Bring your own model: ``package.module:factory`` called with ``kwargs``."""

    factory: str = Field(pattern=r"^[\w.]+:[\w.]+$")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = Field(None, description="safetensors of trained target weights")
    data: str = Field(
        pattern=r"^[\w.]+:[\w.]+$",
        description="`package.module:fn`; fn(batch_size, generator, device) -> input batch",
    )
    data_kwargs: dict[str, Any] = Field(default_factory=dict)
    output_loss: Literal["mse", "kl"] = "mse"


class TopologySpec(Strict):
    """Where a Hugging Face architecture this code does not know keeps its parts. Module paths
    are the model's own (``model.layers.{i}.self_attn.q_proj``); ``{i}`` stands for the block."""

    n_blocks: int = Field(gt=0, description="number of transformer blocks")
    embed: str = Field(description="token embedding module, e.g. 'model.embed_tokens'")
    unembed: str = Field(description="output projection, e.g. 'lm_head'")
    final_norm: str | None = Field(None, description="norm before the unembedding")
    norm: Literal["rms", "layer"] = Field("rms", description="RMSNorm or LayerNorm")
    attn: dict[Literal["q", "k", "v", "o", "qkv"], str] = Field(
        description="attention matrices per block: q/k/v/o, or qkv (fused) and o"
    )
    mlp: dict[Literal["up", "down", "gate"], str] = Field(
        default_factory=dict, description="MLP matrices per block: up/down, or gate/up/down"
    )
    n_heads: int | None = Field(None, gt=0, description="attention heads (query heads)")
    qkv_layout: Literal["blocks", "heads"] = Field(
        "blocks", description="a fused qkv output: [q | k | v] (GPT-2) or per head "
        "[h0: q k v | h1: q k v | …] (GPT-NeoX)")
    attn_norm: str | None = Field(None, description="norm read by attention, per block")
    mlp_norm: str | None = Field(None, description="norm read by the MLP, per block")

    @model_validator(mode="after")
    def _check(self) -> TopologySpec:
        keys = set(self.attn)
        if keys not in ({"q", "k", "v", "o"}, {"qkv", "o"}):
            raise ValueError(f"attn must name q, k, v, o or qkv, o; got {sorted(keys)}")
        if self.mlp and set(self.mlp) not in ({"up", "down"}, {"gate", "up", "down"}):
            raise ValueError(f"mlp must name up, down or gate, up, down; got {sorted(self.mlp)}")
        for name, path in [*self.attn.items(), *self.mlp.items(),
                           ("attn_norm", self.attn_norm), ("mlp_norm", self.mlp_norm)]:
            if path is not None and "{i}" not in path:
                raise ValueError(f"{name}: {path!r} must contain '{{i}}' (the block index)")
        return self


class HFTarget(Strict):
    """A Hugging Face ``transformers`` causal LM saved with ``save_pretrained`` (model and
    tokenizer) in a local directory; nothing is ever downloaded."""

    identity: list[str] = Field(
        default_factory=list, description="module paths with an identity matrix inserted "
        "before them (``<path>.pre_identity``; imported Goodfire runs)")
    huggingface: str = Field(description="directory written by save_pretrained")
    topology: TopologySpec | None = Field(
        None, description="required for architectures spd-mcp does not know (GPT-2, Llama "
        "family, GPT-NeoX are inferred from the model's config)"
    )
    weights: str | None = Field(None, description="safetensors of the target weights (a run's)")


GoodfireModel = Literal["LlamaSimple", "LlamaSimpleMLP", "GPT2Simple", "TMS", "ResidMLP"]


class GoodfireTarget(Strict):
    """A target architecture of Goodfire's ``spd`` repository, rebuilt by spd-mcp
    (``spd_mcp.model.goodfire.models``) from its architecture config (imported runs)."""

    goodfire: GoodfireModel
    config: dict[str, Any] = Field(description="the architecture's config (model_config.yaml)")
    identity: list[str] = Field(
        default_factory=list, description="module paths with ``<path>.pre_identity`` inserted")
    weights: str | None = Field(None, description="safetensors of the target weights (a run's)")


class TextData(Strict):
    """Text a language model is decomposed, harvested and measured on."""

    text: str = Field(
        description="plain text (one document per line), JSONL with a 'text' field, or a "
        "directory written by datasets' save_to_disk"
    )
    context: int = Field(128, gt=1, description="tokens per training window")
    heldout_frac: float = Field(
        0.1, gt=0, lt=1, description="the last documents, never trained on (measurements)"
    )
    text_field: str = Field("text", description="field holding the text (JSONL, datasets)")


# ------------------------------------------------------------------------------------------ model
class ModulePattern(Strict):
    pattern: str = Field(description="fnmatch pattern over the target's module paths")
    C: int = Field(gt=0, description="number of rank-1 components for each matched module")


class CIFnConfig(Strict):
    type: Literal["mlp", "vector_mlp", "shared_mlp", "global_shared_mlp"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [16])
    leak_alpha: float = Field(0.01, ge=0, description="slope of the leaky hard sigmoids")


# ----------------------------------------------------------------------------------------- losses
Routing = Literal["all", "layerwise", "subset"]


class Faithfulness(Strict):
    type: Literal["faithfulness"]
    coeff: float = Field(ge=0)


class ImportanceMinimality(Strict):
    type: Literal["importance_minimality"]
    coeff: float = Field(ge=0)
    p: float = Field(1.0, gt=0)
    p_final: float | None = Field(None, gt=0, description="anneal p linearly to this value")
    anneal_start_frac: float = Field(0.0, ge=0, le=1)
    anneal_end_frac: float = Field(1.0, ge=0, le=1)
    beta: float = Field(0.0, ge=0, description="weight of the Σ_c log2(1 + Σ_tokens g^p) term")
    eps: float = Field(1e-12, ge=0)


class StochasticRecon(Strict):
    type: Literal["stochastic_recon"]
    coeff: float = Field(ge=0)
    routing: Routing = "all"
    n_mask_samples: int = Field(1, ge=1)
    layers_per_step: int | None = Field(
        None, ge=1,
        description="layerwise only: average over this many randomly chosen layers per step "
        "(an unbiased estimate of the all-layer mean at a fraction of the cost)",
    )


class CIMaskedRecon(Strict):
    type: Literal["ci_masked_recon"]
    coeff: float = Field(ge=0)
    routing: Routing = "all"


class PGDRecon(Strict):
    type: Literal["pgd_recon"]
    coeff: float = Field(ge=0)
    routing: Routing = "all"
    steps: int = Field(2, ge=1)
    step_size: float = Field(0.1, gt=0)
    init: Literal["random", "ones", "zeros"] = "random"
    sources: Literal["shared", "per_datapoint"] = "per_datapoint"
    include_delta: bool = True


LossEntry = Annotated[
    Faithfulness | ImportanceMinimality | StochasticRecon | CIMaskedRecon | PGDRecon,
    Field(discriminator="type"),
]


class Schedule(Strict):
    type: Literal["constant", "linear", "cosine"] = "constant"
    warmup_frac: float = Field(0.0, ge=0, le=1)
    final_frac: float = Field(0.0, ge=0, le=1, description="final lr as a fraction of lr")


class Restarts(Strict):
    """Train ``n`` candidate decompositions (different initialisation seeds) for ``steps`` steps,
    keep the one whose training objective (Σ coeff · loss on ``select_batches`` fixed batches of
    ``eval_batch_size``) is lowest, and train it on to the config's ``steps``. No ground truth is
    used; the run's summary records every candidate's loss and the choice."""

    n: int = Field(ge=1, description="number of candidates")
    steps: int | None = Field(
        None, ge=1, description="screening steps per candidate (None: every candidate runs in full)"
    )
    select_batches: int = Field(4, ge=1, description="fixed batches the objective is averaged over")


class Revive(Strict):
    """Dead-component revival (opt-in). Every ``every`` steps while ``step < until_frac · steps``
    the trainer measures each component's largest lower CI over ``batches`` fixed batches of
    ``eval_batch_size``; a component whose CI never exceeds ``threshold`` is dead and is
    re-initialised: its V column and U row are aimed at what the current decomposition
    reconstructs worst (at a small norm), its CI function is re-drawn where that function is per
    component, and its AdamW moments are zeroed. A tied component is revived only when it is dead
    in both layers. Each check is recorded as a metrics row ``{"step", "revived": {layer: n}}``.
    No check happens at step 0, nor at all when ``every ≥ until_frac · steps``.

    ``split`` (opt-in) also splits a live component that does two things: over the same batches,
    two lines fitted to the inputs on which it fires hold even shares of their energy (the
    smaller at least ``split`` × the larger) and fewer than ``split_overlap`` of those inputs
    load on both (two groups of inputs that rarely come together, not one group or a dense
    cloud). The component keeps the line closer to what it reads, a dead component takes the
    other, and each writes what the target's weight maps its line to. Recorded as
    ``"split"``.

    ``retire`` (opt-in) silences components whose weight has collapsed: at a check, a component
    (alive or dead at this check) of a layer with 0 < ‖V_c‖·‖U_c‖ < ``retire`` × the
    weight-weighted median over the layer's alive components (the weight at which the larger
    ones hold half the total weight), and either under that bar at the previous check too or
    lighter than then (one growing into a feature is under it once and heavier each time; the
    first check only records), has its V column and U row zeroed and its CI function silenced
    (per-component CI functions: constant −1 before the sigmoid, so its CI is 0 on every input)
    in every layer that uses it; it then counts as a spare (for ``split``, or re-aimed with
    ``reaim``). Such a component adds nothing to any output, yet its CI function forgets the
    inputs it fired on slowly (under p = 2 minimality the pull on a CI of 0.15 is small and
    comes only from those rare inputs), so it can hover around the alive threshold and still
    count as alive when the learning rate has decayed. Recorded as ``"retired"``.

    ``merge`` (opt-in) joins duplicates: two live components whose rank-1 weights V_c U_c have a
    cosine above ``merge`` become one: the heavier one's U row is scaled to carry both pieces
    (the lighter's projected on it) and the lighter is retired as above. Recorded as
    ``"merged"``."""

    every: int = Field(gt=0, description="steps between checks")
    until_frac: float = Field(
        0.5, gt=0, le=1, description="check only while step < until_frac · steps"
    )
    threshold: float | None = Field(
        None, ge=0, le=1, description="dead: max lower CI ≤ this (None: alive_threshold)"
    )
    batches: int = Field(4, ge=1, description="fixed batches of eval_batch_size per check")
    split: float | None = Field(
        None, gt=0, le=1,
        description="split a live component when two lines fitted to its firing inputs hold "
        "energies at least this fraction of each other (None: never split)",
    )
    split_overlap: float = Field(
        0.2, gt=0, le=1,
        description="split only when fewer than this fraction of its firing inputs load on "
        "both directions (≥ 30% of the larger projection on the smaller)",
    )
    split_min_fires: int = Field(
        32, ge=2, description="a component must fire on at least this many inputs to be split")
    reaim: bool = Field(
        True, description="re-aim every dead component at each check (false: dead components "
        "are touched only to take a split half; needs `split` or `retire`)")
    merge: float | None = Field(
        None, gt=0, lt=1,
        description="merge two live components whose rank-1 weights have cosine above this "
        "(parallel duplicates of one mechanism): the heavier takes both, the other is "
        "retired (None: never)",
    )
    retire: float | None = Field(
        None, gt=0, lt=1,
        description="a component whose weight ‖V_c‖·‖U_c‖ is below this fraction of the "
        "weight-weighted median over the layer's alive components is zeroed, its CI silenced, "
        "and counted as dead (None: never)",
    )

    @model_validator(mode="after")
    def _reaim_needs_split(self) -> Revive:
        if not self.reaim and self.split is None and self.retire is None and self.merge is None:
            raise ValueError("reaim: false leaves nothing to do without split, retire or merge; "
                             "set one of them")
        return self


class DecomposeConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    target: ZooTarget | ImportTarget | HFTarget | GoodfireTarget
    data: TextData | None = Field(
        None, description="text for a Hugging Face target (required there, unused elsewhere)"
    )
    modules: list[ModulePattern] = Field(min_length=1)
    ci_fn: CIFnConfig = Field(default_factory=CIFnConfig)
    tied: list[tuple[str, str]] = Field(
        default_factory=list,
        description="(source, follower) linear layers trained with shared components: the "
        "follower's V, U are the source's Uᵀ, Vᵀ (targets with tied weights, e.g. TMS's W and "
        "Wᵀ); each keeps its own CI function, and the saved run stores both layers untied",
    )
    sampling: Literal["continuous", "binomial"] = "continuous"
    use_delta_component: bool = Field(
        True, description="stochastic and PGD losses include the weight delta with its own mask"
    )
    output_loss: Literal["mse", "kl"] | None = Field(
        None, description="defaults to the target's own (mse for toys, kl for language models)"
    )
    losses: list[LossEntry] = Field(min_length=1)
    steps: int = Field(ge=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    schedule: Schedule = Field(default_factory=Schedule)
    faithfulness_warmup_steps: int = Field(0, ge=0)
    faithfulness_warmup_lr: float = Field(1e-3, gt=0)
    faithfulness_warmup_weight_decay: float = Field(0.01, ge=0, description="(AdamW's default)")
    restarts: Restarts | None = Field(
        None, description="train several candidates, keep the lowest training loss"
    )
    revive: Revive | None = Field(
        None, description="re-initialise dead components during the first part of training"
    )
    eval_every: int = Field(500, gt=0)
    eval_batch_size: int = Field(1024, gt=0)
    alive_threshold: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> DecomposeConfig:
        kinds = [loss.type for loss in self.losses]
        dup = sorted({k for k in kinds if kinds.count(k) > 1 and k in _SINGLETON})
        if dup:
            raise ValueError(f"loss types {dup} may appear only once")
        screen = self.restarts.steps if self.restarts is not None else None
        if screen is not None and screen > self.steps:
            raise ValueError(
                f"restarts.steps ({screen}) exceeds steps ({self.steps}); "
                "leave it out to compare full runs"
            )
        return self


_SINGLETON = {"faithfulness", "importance_minimality"}


class ConfigError(InputError):
    """A config file that cannot be read or validated; the message names the offending keys."""


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{loc}'")
        else:
            lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], *, source: str = "config") -> DecomposeConfig:
    try:
        return DecomposeConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid {source}:\n{format_validation_error(err)}") from None


def load_config(path: str | Path) -> DecomposeConfig:
    """Read a YAML (.yaml/.yml) or JSON config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix in {".yaml", ".yml"}:
        import yaml

        data = yaml.safe_load(text)
    elif path.suffix == ".json":
        data = json.loads(text)
    else:
        raise ConfigError(f"config must be .yaml, .yml or .json, got {path.name}")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    _anchor_paths(data, path.resolve().parent)
    return parse_config(data, source=str(path))


def _anchor_paths(data: dict[str, Any], base: Path) -> None:
    """Relative file paths in a config file (``target.huggingface``, ``target.weights``,
    ``data.text``) are relative to the file's directory; they are stored absolute."""
    for section, key in (("target", "huggingface"), ("target", "weights"), ("data", "text")):
        sec = data.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), str):
            p = Path(sec[key]).expanduser()
            looks_like_path = p.is_absolute() or (base / p).exists() or sec[key].startswith(".")
            if not p.is_absolute() and looks_like_path:
                sec[key] = str(base / p)
