"""Identity insertion: an identity matrix placed in front of a linear layer, as a decomposable
module ``<path>.pre_identity`` (Goodfire's ``identity_module_info``). Its input is the layer's
input; its output replaces that input, so with its components decomposed the layer reads
((x V) ⊙ m) U + δ x Δᵀ instead of x."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from spd_mcp.model.components import is_conv1d
from spd_mcp.model.topology import Topology
from spd_mcp.model.weights import TargetError

SUFFIX = "pre_identity"


def _pre_hook(module: nn.Module, args: tuple) -> tuple:
    return (module.pre_identity(args[0]), *args[1:])  # type: ignore[operator]


def insert_identities(model: nn.Module, paths: list[str]) -> None:
    """Insert ``<path>.pre_identity`` (an nn.Linear holding the identity) before each layer."""
    for path in paths:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            raise TargetError(f"identity insertion: the model has no module {path!r}") from None
        if isinstance(mod, nn.Linear):
            d = mod.in_features
        elif is_conv1d(mod):
            d = int(mod.weight.shape[0])
        else:
            raise TargetError(f"identity insertion: {path!r} is a {type(mod).__name__}, "
                              "not a linear layer")
        ident = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            ident.weight.copy_(torch.eye(d))
        ident.requires_grad_(False)
        mod.add_module(SUFFIX, ident)
        mod.register_forward_pre_hook(_pre_hook)


def with_identities(topo: Topology, identity: list[str]) -> Topology:
    """Add each ``<path>.pre_identity`` layer just before its layer; its canonical name is the
    layer's with ``_pre`` appended (``0.mlp.down_pre``), or its module path for toys."""
    if not identity:
        return topo
    layers, decomp, norms = list(topo.layers), list(topo.decomposable_names), list(
        topo.input_norms)
    for path in identity:
        idx = next((i for i, (_, m) in enumerate(layers) if m == path), None)
        name = f"{layers[idx][0]}_pre" if idx is not None and layers[idx][0] != path else (
            f"{path}.pre_identity")
        entry = (name, f"{path}.pre_identity")
        if idx is None:
            layers.append(entry)
            decomp.append(name)
            continue
        layers.insert(idx, entry)
        decomp.insert(decomp.index(layers[idx + 1][0]) if layers[idx + 1][0] in decomp
                      else len(decomp), name)
        norm = topo.input_norm(layers[idx + 1][0])
        if norm is not None:
            norms.append((name, norm))
    return dataclasses.replace(topo, layers=tuple(layers), decomposable_names=tuple(decomp),
                               input_norms=tuple(norms))
