"""Canonical layer names <-> module paths of a target model.

For the zoo transformer the canonical names are ``embed``, ``{b}.attn.{q,k,v,o}``,
``{b}.mlp.{up,down}`` and ``output``; they map to ``embed``, ``blocks.{b}.attn.q``, ...,
``unembed``. Toy models can use :meth:`Topology.identity` (canonical name == module path).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spd_mcp.model.zoo.transformer import TransformerConfig

ATTN_MATRICES: tuple[str, ...] = ("q", "k", "v", "o")
MLP_MATRICES: tuple[str, ...] = ("up", "down")


@dataclass(frozen=True)
class Topology:
    """Ordered (canonical name, module path) pairs plus the decomposable subset."""

    layers: tuple[tuple[str, str], ...]
    decomposable_names: tuple[str, ...]

    def __post_init__(self) -> None:
        canonical = [c for c, _ in self.layers]
        modules = [m for _, m in self.layers]
        if len(set(canonical)) != len(canonical) or len(set(modules)) != len(modules):
            raise ValueError("canonical names and module paths must each be unique")
        unknown = [n for n in self.decomposable_names if n not in canonical]
        if unknown:
            raise ValueError(f"decomposable names {unknown} are not canonical names {canonical}")

    @classmethod
    def for_transformer(cls, config: TransformerConfig) -> Topology:
        """Topology of :class:`spd_mcp.model.zoo.transformer.Transformer` with ``config``."""
        layers: list[tuple[str, str]] = [("embed", "embed")]
        decomposable: list[str] = []
        for b in range(config.n_layers):
            parts = [("attn", m) for m in ATTN_MATRICES]
            if config.mlp:
                parts += [("mlp", m) for m in MLP_MATRICES]
            for sub, matrix in parts:
                name = f"{b}.{sub}.{matrix}"
                layers.append((name, f"blocks.{b}.{sub}.{matrix}"))
                decomposable.append(name)
        layers.append(("output", "unembed"))
        return cls(tuple(layers), tuple(decomposable))

    @classmethod
    def identity(
        cls, module_paths: Iterable[str], decomposable: Iterable[str] | None = None
    ) -> Topology:
        """Canonical name == module path; all layers decomposable unless given."""
        paths = tuple(module_paths)
        wanted = set(paths if decomposable is None else decomposable)
        if unknown := sorted(wanted - set(paths)):
            raise ValueError(f"decomposable names {unknown} are not module paths {list(paths)}")
        return cls(tuple((p, p) for p in paths), tuple(p for p in paths if p in wanted))

    @property
    def canonical_names(self) -> tuple[str, ...]:
        """All canonical names in forward order."""
        return tuple(c for c, _ in self.layers)

    @property
    def module_paths(self) -> tuple[str, ...]:
        """All module paths in forward order."""
        return tuple(m for _, m in self.layers)

    def decomposable(self) -> tuple[str, ...]:
        """Canonical names of the matrices SPD decomposes, in forward order."""
        return self.decomposable_names

    def to_module(self, canonical: str) -> str:
        """Module path of a canonical layer name."""
        for c, m in self.layers:
            if c == canonical:
                return m
        raise ValueError(
            f"unknown canonical layer name {canonical!r}; valid: {', '.join(self.canonical_names)}"
        )

    def to_canonical(self, module_path: str) -> str:
        """Canonical layer name of a module path."""
        for c, m in self.layers:
            if m == module_path:
                return c
        raise ValueError(
            f"unknown module path {module_path!r}; valid: {', '.join(self.module_paths)}"
        )

    def __contains__(self, canonical: object) -> bool:
        return canonical in self.canonical_names
