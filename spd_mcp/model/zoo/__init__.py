"""Built-in targets. Entries are imported lazily so ``zoo list`` stays cheap."""

from __future__ import annotations

import importlib
from typing import Any

from spd_mcp.errors import InputError
from spd_mcp.model.zoo.base import ZooEntry

# name -> ("module:Class", kwargs overriding the class defaults)
_REGISTRY: dict[str, tuple[str, dict[str, Any]]] = {
    "tms-5-2": ("spd_mcp.model.zoo.tms:TMSEntry", {}),
    "tms-5-2-id": ("spd_mcp.model.zoo.tms:TMSIdentityEntry", {}),
    "tms-40-10": ("spd_mcp.model.zoo.tms:TMS40Entry", {}),
    "tms-40-10-id": ("spd_mcp.model.zoo.tms:TMS40IdentityEntry", {}),
    "resid-mlp": ("spd_mcp.model.zoo.resid_mlp:ResidMLPEntry", {}),
    "resid-mlp-2": ("spd_mcp.model.zoo.resid_mlp:ResidMLP2Entry", {}),
    "resid-mlp-3": ("spd_mcp.model.zoo.resid_mlp:ResidMLP3Entry", {}),
    "induction": ("spd_mcp.model.zoo.induction:InductionEntry", {}),
    "tales": ("spd_mcp.model.zoo.tales.entry:TalesEntry", {}),
    "tales-llama": ("spd_mcp.model.zoo.tales.hf:TalesLlamaEntry", {}),
    "tales-gpt2": ("spd_mcp.model.zoo.tales.hf:TalesGPT2Entry", {}),
}


class UnknownZooTarget(InputError, KeyError):
    def __str__(self) -> str:
        return f"unknown zoo target {self.args[0]!r}; available: {', '.join(zoo_names())}"


def zoo_names() -> list[str]:
    return list(_REGISTRY)


def zoo_class(name: str) -> type[ZooEntry]:
    if name not in _REGISTRY:
        raise UnknownZooTarget(name)
    path, _ = _REGISTRY[name]
    module, cls = path.split(":")
    return getattr(importlib.import_module(module), cls)


def get_entry(name: str, **kwargs: Any) -> ZooEntry:
    """Instantiate zoo target ``name`` with constructor ``kwargs``."""
    cls = zoo_class(name)
    return cls(**{**_REGISTRY[name][1], **kwargs})
