"""Build a target model and its data sampler from a config's target spec (zoo or import path)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from spd_mcp.model.adapter import TargetAdapter
from spd_mcp.model.config import GoodfireTarget, HFTarget, ImportTarget, TextData, ZooTarget
from spd_mcp.model.text_target import TextTarget
from spd_mcp.model.topology import Topology
from spd_mcp.model.weights import TargetError, load_state_strict
from spd_mcp.model.zoo import get_entry

Sampler = Callable[[int, str], Tensor]
"""sampler(batch_size, device) -> a batch of target inputs."""


def import_object(path: str) -> Any:
    module, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise TargetError(f"cannot import module {module!r} (from {path!r}): {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TargetError(f"module {module!r} has no attribute {attr!r} (from {path!r})")
        obj = getattr(obj, part)
    return obj


@dataclass
class ResolvedTarget:
    """A target model with what its adapter tells about it: data, structure, text."""

    model: nn.Module
    sampler: Sampler
    output_loss: Literal["mse", "kl"]
    entry: TargetAdapter | None
    """What the target's adapter offers (a zoo entry, a Hugging Face adapter; None: import)."""
    topology: Topology | None = None
    """Canonical names and structure (None: canonical name == module path, no structure)."""
    text: TextTarget | None = None
    """Tokenizer, text and planted behaviours of a language model (None for toys)."""

    def aliases(self) -> dict[str, str]:
        """Module path → canonical name (config patterns may name either)."""
        if self.topology is None:
            return {}
        return {m: c for c, m in self.topology.layers if c != m}

    def position_mask(self, x: Tensor) -> Tensor | None:
        """Which positions of a batch count in losses (None: all; language models skip pads)."""
        return self.entry.position_mask(x) if self.entry is not None else None


def resolve_target(
    spec: ZooTarget | ImportTarget | HFTarget | GoodfireTarget,
    *,
    weights: Path | None = None,
    run_dir: Path | None = None,
    data: TextData | None = None,
) -> ResolvedTarget:
    """Instantiate the target architecture; load ``weights`` (or the spec's) when given.

    ``run_dir``: a saved run whose extra files (e.g. its tokenizer) the adapter reads first.
    ``data``: the config's text data (Hugging Face targets).
    """
    weights = weights or (Path(spec.weights) if spec.weights else None)
    if isinstance(spec, HFTarget):
        return resolve_hf(spec, data, state=_read_weights(weights), run_dir=run_dir,
                          source=str(weights))
    if isinstance(spec, GoodfireTarget):
        return resolve_goodfire(spec, data, state=_read_weights(weights), run_dir=run_dir,
                                source=str(weights))
    entry: TargetAdapter | None
    if isinstance(spec, ZooTarget):
        entry = get_entry(spec.zoo, **spec.kwargs)
        if run_dir is not None:
            entry.load_extras(run_dir)
        model = entry.build_model()
        sampler: Sampler = entry.sample_batch
        output_loss = entry.output_loss
    else:
        entry = None
        factory = import_object(spec.factory)
        model = factory(**spec.kwargs)
        if not isinstance(model, nn.Module):
            raise TargetError(f"{spec.factory} returned {type(model).__name__}, not an nn.Module")
        data_fn = import_object(spec.data)
        sampler = partial(_call_data, data_fn, spec.data_kwargs)
        output_loss = spec.output_loss
    if weights is not None:
        if not weights.is_file():
            raise TargetError(f"target weights not found: {weights}")
        load_state_strict(model, load_file(str(weights)), source=str(weights))
    model.eval()
    text = entry.text_target() if entry is not None else None
    return ResolvedTarget(model, sampler, output_loss, entry, infer_topology(model), text)


def _read_weights(weights: Path | None) -> dict[str, Tensor] | None:
    if weights is None:
        return None
    if not weights.is_file():
        raise TargetError(f"target weights not found: {weights}")
    return load_file(str(weights))


def _with_identity_weights(model: nn.Module, state: dict[str, Tensor],
                           identity: list[str]) -> dict[str, Tensor]:
    """``state`` plus the identity matrices of inserted ``pre_identity`` layers it lacks (a
    checkpoint that never held them)."""
    out = dict(state)
    for p in identity:
        key = f"{p}.pre_identity.weight"
        if key not in out:
            out[key] = torch.eye(model.get_submodule(p).pre_identity.weight.shape[0])
    return out


def resolve_hf(
    spec: HFTarget, data: TextData | None, *, state: dict[str, Tensor] | None = None,
    run_dir: Path | None = None, tokenizer: Path | None = None, source: str = "weights",
) -> ResolvedTarget:
    """A Hugging Face target: its architecture from the model directory (or a run's ``hf/``),
    weights from ``state`` (else the directory's own), identities inserted first."""
    from spd_mcp.model.hf.adapter import HFAdapter

    adapter = HFAdapter(spec, data, tokenizer=tokenizer)
    if run_dir is not None:
        adapter.load_extras(run_dir)
    base = None if state is None else {
        k: v for k, v in state.items() if ".pre_identity." not in k}
    model, topology = adapter.build(base)
    if spec.identity:
        from spd_mcp.model.identity import insert_identities, with_identities

        insert_identities(model, list(spec.identity))
        topology = with_identities(topology, list(spec.identity))
    if state is not None:
        load_state_strict(model, _with_identity_weights(model, state, list(spec.identity)),
                          source=source)
    model.eval()
    return ResolvedTarget(model, adapter.sample_batch, "kl", adapter, topology,
                          adapter.text_target())


def resolve_goodfire(
    spec: GoodfireTarget, data: TextData | None, *, state: dict[str, Tensor] | None = None,
    run_dir: Path | None = None, tokenizer: Path | None = None, source: str = "weights",
) -> ResolvedTarget:
    """A Goodfire architecture rebuilt here, with weights from ``state``."""
    from spd_mcp.model.goodfire.adapter import GoodfireAdapter

    adapter = GoodfireAdapter(spec, data, tokenizer=tokenizer)
    if run_dir is not None:
        adapter.load_extras(run_dir)
    model, topology = adapter.build()
    if state is not None:
        load_state_strict(model, _with_identity_weights(model, state, list(spec.identity)),
                          source=source)
    model.eval()
    return ResolvedTarget(model, adapter.sample_batch, adapter.output_loss, adapter, topology,
                          adapter.text_target())


def infer_topology(model: nn.Module) -> Topology | None:
    """The structure of a model this code knows (the zoo transformer, a Hugging Face model of a
    known family); None otherwise."""
    from spd_mcp.model.zoo.transformer import Transformer

    if isinstance(model, Transformer):
        return Topology.for_transformer(model.config)
    if type(model).__module__.startswith("transformers."):
        from spd_mcp.model.hf.adapter import hf_topology
        from spd_mcp.model.hf.families import infer_spec

        return hf_topology(model, infer_spec(model, None))
    return None


def _call_data(
    fn: Callable[..., Tensor], kwargs: dict[str, Any], batch: int, device: str
) -> Tensor:
    return fn(batch_size=batch, device=device, **kwargs)
