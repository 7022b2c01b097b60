"""Canonical layer names <-> module paths of a target model.

For the zoo transformer the canonical names are ``embed``, ``{b}.attn.{q,k,v,o}``,
``{b}.mlp.{up,down}`` and ``output``; they map to ``embed``, ``blocks.{b}.attn.q``, ...,
``unembed``. Toy models can use :meth:`Topology.identity` (canonical name == module path).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from spd_mcp.keys import EMBED, OUTPUT, BlockLayer

if TYPE_CHECKING:
    from spd_mcp.model.config import TopologySpec
    from spd_mcp.model.zoo.transformer import TransformerConfig

ATTN_MATRICES: tuple[str, ...] = ("q", "k", "v", "o")
MLP_MATRICES: tuple[str, ...] = ("up", "down")


@dataclass(frozen=True)
class Topology:
    """Ordered (canonical name, module path) pairs plus the decomposable subset and, for
    transformers, the structure analyses need (blocks, width, context, norms).

    Analyses reach a model's structure only through this object, never through its class.
    """

    layers: tuple[tuple[str, str], ...]
    decomposable_names: tuple[str, ...]
    n_blocks: int = 0
    """Transformer blocks (0: not a transformer; positions never mix)."""
    d_model: int | None = None
    """Residual-stream width (transformers)."""
    max_len: int | None = None
    """Context length in tokens (language models)."""
    final_norm: str | None = None
    """Module path of the RMSNorm before the unembedding (its ``weight`` is the gain)."""
    input_norms: tuple[tuple[str, str], ...] = ()
    """(canonical layer, module path of the norm whose output the layer reads)."""
    norm: Literal["rms", "layer"] = "rms"
    """Kind of every norm: RMSNorm (gain) or LayerNorm (centre, scale, gain, bias)."""
    n_heads: int | None = None
    """Attention (query) heads, where known."""
    qkv_layout: Literal["blocks", "heads"] = "blocks"
    """How a fused qkv matrix's output is laid out: [q | k | v], or per head [q k v] × heads."""

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
        layers: list[tuple[str, str]] = [(EMBED, "embed")]
        decomposable: list[str] = []
        norms: list[tuple[str, str]] = []
        for b in range(config.n_layers):
            parts = [("attn", m) for m in ATTN_MATRICES]
            if config.mlp:
                parts += [("mlp", m) for m in MLP_MATRICES]
            for sub, matrix in parts:
                name = str(BlockLayer(b, sub, matrix))
                layers.append((name, f"blocks.{b}.{sub}.{matrix}"))
                decomposable.append(name)
                if matrix in ("q", "k", "v", "up"):
                    norms.append((name, f"blocks.{b}.{sub}_norm"))
        layers.append((OUTPUT, "unembed"))
        return cls(tuple(layers), tuple(decomposable), n_blocks=config.n_layers,
                   d_model=config.d_model, max_len=config.max_len, final_norm="final_norm",
                   input_norms=tuple(norms), n_heads=config.n_heads)

    @classmethod
    def from_spec(cls, spec: TopologySpec, *, d_model: int, max_len: int | None) -> Topology:
        """Topology of a transformer described by a config's ``topology:`` section (or by the
        section a known Hugging Face family implies): canonical ``{i}.attn.{q,k,v,o}`` (fused:
        ``{i}.attn.qkv``), ``{i}.mlp.{up,down}`` (gated: ``{i}.glu.{gate,up,down}``)."""
        layers: list[tuple[str, str]] = [(EMBED, spec.embed)]
        decomposable: list[str] = []
        norms: list[tuple[str, str]] = []
        mlp_kind = "glu" if "gate" in spec.mlp else "mlp"
        attn_order = [m for m in ("qkv", "q", "k", "v", "o") if m in spec.attn]
        mlp_order = [m for m in ("gate", "up", "down") if m in spec.mlp]
        for b in range(spec.n_blocks):
            parts = [("attn", m, spec.attn[m]) for m in attn_order]
            parts += [(mlp_kind, m, spec.mlp[m]) for m in mlp_order]
            for sub, matrix, path in parts:
                name = str(BlockLayer(b, sub, matrix))
                layers.append((name, path.replace("{i}", str(b))))
                decomposable.append(name)
                norm = spec.attn_norm if sub == "attn" else spec.mlp_norm
                if norm is not None and matrix not in ("o", "down"):
                    norms.append((name, norm.replace("{i}", str(b))))
        layers.append((OUTPUT, spec.unembed))
        return cls(tuple(layers), tuple(decomposable), n_blocks=spec.n_blocks, d_model=d_model,
                   max_len=max_len, final_norm=spec.final_norm, input_norms=tuple(norms),
                   norm=spec.norm, n_heads=spec.n_heads, qkv_layout=spec.qkv_layout)

    def qkv_parts(self, d_out: int) -> dict[str, list[slice]] | None:
        """Where a fused qkv matrix's output keeps q, k and v: one slice per head each (None
        when the head count is unknown or does not fit ``d_out``)."""
        H = self.n_heads
        if H is None or d_out % (3 * H):
            return None
        hd = d_out // (3 * H)
        if self.qkv_layout == "blocks":
            return {p: [slice(i * H * hd + h * hd, i * H * hd + (h + 1) * hd) for h in range(H)]
                    for i, p in enumerate("qkv")}
        return {p: [slice(h * 3 * hd + i * hd, h * 3 * hd + (i + 1) * hd) for h in range(H)]
                for i, p in enumerate("qkv")}

    def qkv_layers(self, block: int) -> tuple[str, str, str] | None:
        """Canonical names feeding attention's query, key and value in ``block`` (the same name
        three times for a fused qkv matrix); None when the block has neither form."""
        fused = str(BlockLayer(block, "attn", "qkv"))
        if fused in self:
            return (fused, fused, fused)
        names = tuple(str(BlockLayer(block, "attn", m)) for m in "qkv")
        return names if all(n in self for n in names) else None  # type: ignore[return-value]

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

    def module_of(self, canonical: str) -> str | None:
        """Module path of a canonical name, or None when the model has no such layer."""
        for c, m in self.layers:
            if c == canonical:
                return m
        return None

    def input_norm(self, canonical: str) -> str | None:
        """Module path of the norm a layer reads from (None: it does not read the residual)."""
        return dict(self.input_norms).get(canonical)
