"""Canonical layer, component and node keys: one grammar, parsed and validated here only.

- layer: a canonical layer name (``0.attn.q``, ``1.mlp.down``, ``embed``, ``output``; toys use
  their module paths, e.g. ``linear1``);
- component: ``"{layer}:{c}"`` (``0.mlp.up:17``);
- node (a component at a position): ``"{layer}:{pos}:{c}"``; ``embed:{pos}:0``;
  ``output:{pos}:{token_id}``.
- node-set patterns, where a tool takes a list: ``*`` for any part (``1.attn.v:17:*``,
  ``*:17:*``, ``1.mlp.up:*:5``; ``LAYER:*`` is every node of a layer), an ``@alive`` suffix keeping
  only nodes with natural CI > 0 on the prompt, and ``alive`` alone for every alive node;
  component patterns ``LAYER:*``, ``*:*`` and ``alive`` (alive at some position). Expansions are
  capped; the error says by how much a pattern overflows.

Errors name the key, say what is wrong and list what is valid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from spd_mcp.errors import InputError

WILD = "*"
ALIVE = "alive"
ALIVE_SUFFIX = "@alive"
EMBED = "embed"
OUTPUT = "output"
SPECIAL_LAYERS = (EMBED, OUTPUT)


class BadKeyError(InputError):
    """A malformed or out-of-range key (an InputError: callers treat it as bad input)."""


BLOCK_KINDS = ("attn", "mlp", "glu")


@dataclass(frozen=True, order=True)
class BlockLayer:
    """A canonical transformer layer name ``{block}.{kind}.{matrix}`` (``1.attn.o``)."""

    block: int
    kind: str
    """``attn``, ``mlp`` or ``glu`` (gated MLP)."""
    matrix: str
    """``q`` / ``k`` / ``v`` / ``o`` for attention, ``up`` / ``down`` / ``gate`` for MLPs."""

    def __str__(self) -> str:
        return f"{self.block}.{self.kind}.{self.matrix}"

    @classmethod
    def parse(cls, name: str) -> BlockLayer | None:
        """The parts of a canonical block-layer name; None for other names (``embed``, toys)."""
        parts = name.split(".")
        if len(parts) != 3 or not parts[0].isdigit() or parts[1] not in BLOCK_KINDS:
            return None
        return cls(int(parts[0]), parts[1], parts[2])


@dataclass(frozen=True, order=True)
class ComponentKey:
    layer: str
    c: int

    def __str__(self) -> str:
        return f"{self.layer}:{self.c}"

    @classmethod
    def parse(cls, key: str) -> ComponentKey:
        """Split ``"{layer}:{c}"`` without checking it against a run (stored, trusted keys)."""
        layer, sep, c = str(key).rpartition(":")
        if not sep or not layer:
            raise BadKeyError(f"component key {key!r} must look like 'LAYER:C'")
        return cls(layer, _int(c, "component index", key))


@dataclass(frozen=True, order=True)
class NodeKey:
    layer: str
    pos: int
    index: int
    """Component index, 0 for ``embed``, the token id for ``output``."""

    def __str__(self) -> str:
        return f"{self.layer}:{self.pos}:{self.index}"

    @property
    def component(self) -> ComponentKey:
        return ComponentKey(self.layer, self.index)

    @classmethod
    def parse(cls, key: str) -> NodeKey:
        """Split ``"{layer}:{pos}:{index}"`` without checking it against a run (trusted keys)."""
        parts = str(key).rsplit(":", 2)
        if len(parts) != 3 or not parts[0]:
            raise BadKeyError(f"node key {key!r} must look like 'LAYER:POS:C'")
        return cls(parts[0], _int(parts[1], "position", key), _int(parts[2], "index", key))


def is_special_layer(layer: str) -> bool:
    """``embed`` and ``output``: graph nodes that are not components."""
    return layer in SPECIAL_LAYERS


def layer_of(key: str) -> str:
    """The layer of a component key ``"{layer}:{c}"``."""
    return ComponentKey.parse(key).layer


def token_key(side: str, token: int | str) -> str:
    """``embed:{token}`` (an input token) or ``output:{token}`` (a predicted token)."""
    return f"{side}:{token}"


def split_last(key: str) -> tuple[str, str] | None:
    """``(layer, rest)`` of ``"LAYER:REST"`` split at the last colon; None without a colon."""
    layer, sep, rest = key.rpartition(":")
    return (layer, rest) if sep else None


def split_first(key: str) -> tuple[str, str] | None:
    """``(prefix, rest)`` of ``"PREFIX:REST"`` split at the first colon; None without a colon."""
    prefix, sep, rest = key.partition(":")
    return (prefix, rest) if sep else None


def component_key(layer: str, c: int) -> str:
    return f"{layer}:{c}"


def node_key(layer: str, pos: int, index: int) -> str:
    return f"{layer}:{pos}:{index}"


def _int(part: str, what: str, key: str) -> int:
    try:
        value = int(part)
    except ValueError:
        raise BadKeyError(f"{key!r}: {what} {part!r} is not an integer") from None
    if value < 0:
        raise BadKeyError(f"{key!r}: {what} {value} is negative")
    return value


def _alive_split(key: str) -> tuple[str, bool]:
    """(pattern without ``@alive``, whether alive-only); ``alive`` alone is every alive key."""
    if key == ALIVE:
        return WILD, True
    if key.endswith(ALIVE_SUFFIX):
        return key[: -len(ALIVE_SUFFIX)], True
    return key, False


def is_pattern(key: str) -> bool:
    """Whether a node or component key is a pattern (wildcard or alive filter)."""
    return isinstance(key, str) and (WILD in key or _alive_split(key)[1])


def needs_alive(keys: Sequence[str]) -> bool:
    """Whether expanding ``keys`` needs the prompt's alive set."""
    return any(isinstance(k, str) and _alive_split(k)[1] for k in keys)


class PatternKeys:
    """Expansion of node and component patterns over a :class:`KeySpace` (mixed in)."""

    Cs: dict[str, int]

    def _layers_of(self, part: str, key: str) -> list[str]:
        if part == WILD:
            return list(self.Cs)
        self.layer_checked(part, key)  # type: ignore[attr-defined]
        return [part]

    def _range(self, part: str, n: int, what: str, key: str) -> list[int]:
        if part == WILD:
            return list(range(n))
        v = _int(part, what, key)
        if v >= n:
            raise BadKeyError(f"{key!r}: {what} {v} out of range (0..{n - 1})")
        return [v]

    def expand_nodes(
        self, keys: Sequence[str], n_pos: int, *,
        alive: Mapping[str, Sequence[tuple[int, int]]] | None = None, cap: int = 4096,
        allow_special: bool = False,
    ) -> tuple[list[NodeKey], dict[str, int]]:
        """Nodes of ``keys`` (patterns expanded, order kept, duplicates dropped) and the count
        each pattern expanded to. ``alive``: layer → (pos, c) pairs alive on the prompt."""
        out: dict[NodeKey, None] = {}
        counts: dict[str, int] = {}
        for key in keys:
            if not is_pattern(key):
                out[self.node(key, n_pos, allow_special=allow_special)] = None  # type: ignore[attr-defined]
                continue
            pat, alive_only = _alive_split(key)
            parts = pat.split(":")
            if pat == WILD:
                parts = [WILD, WILD, WILD]
            elif len(parts) == 2 and parts[1] == WILD:
                parts = [parts[0], WILD, WILD]
            if len(parts) != 3:
                raise BadKeyError(
                    f"node pattern {key!r} must look like 'LAYER:POS:C' with '*' for any part "
                    f"(e.g. '{next(iter(self.Cs), 'layer')}:3:*', '*:3:*'), 'LAYER:*', "
                    "optionally ending '@alive', or 'alive'")
            layers = self._layers_of(parts[0], key)
            positions = self._range(parts[1], n_pos, "position", key)
            found: list[NodeKey] = []
            if alive_only:
                assert alive is not None, "the caller supplies the alive set for '@alive'"
                pos_ok = set(positions)
                for layer in layers:
                    cs = None if parts[2] == WILD else set(self._range(parts[2], self.Cs[layer],
                                                                       "index", key))
                    found += [NodeKey(layer, p, c) for p, c in alive.get(layer, ())
                              if p in pos_ok and (cs is None or c in cs)]
            else:
                total = sum(len(positions) * (self.Cs[la] if parts[2] == WILD else 1)
                            for la in layers)
                if total > cap:
                    raise BadKeyError(
                        f"{key!r} expands to {total} nodes; at most {cap} per call: narrow it or "
                        "add '@alive' to keep only nodes alive on the prompt")
                for layer in layers:
                    cs = self._range(parts[2], self.Cs[layer], "index", key)
                    found += [NodeKey(layer, p, c) for p in positions for c in cs]
            counts[key] = len(found)
            out.update(dict.fromkeys(found))
            if len(out) > cap:
                raise BadKeyError(f"the node list expands to more than {cap} nodes (at "
                                  f"{key!r}); narrow the patterns or add '@alive'")
        return list(out), counts

    def expand_components(
        self, keys: Sequence[str], *, alive: Mapping[str, Sequence[int]] | None = None,
        cap: int = 4096,
    ) -> tuple[list[ComponentKey], dict[str, int]]:
        """Components of ``keys`` (``LAYER:*``, ``*:*``, ``@alive`` / ``alive`` expanded) and
        the count each pattern expanded to. ``alive``: layer → components alive on the prompt."""
        out: dict[ComponentKey, None] = {}
        counts: dict[str, int] = {}
        for key in keys:
            if not is_pattern(key):
                out[self.component(key)] = None  # type: ignore[attr-defined]
                continue
            pat, alive_only = _alive_split(key)
            parts = [WILD, WILD] if pat == WILD else pat.split(":")
            if len(parts) != 2:
                raise BadKeyError(
                    f"component pattern {key!r} must look like 'LAYER:*', '*:*' or 'LAYER:C', "
                    "optionally ending '@alive', or 'alive'")
            found: list[ComponentKey] = []
            for layer in self._layers_of(parts[0], key):
                cs = self._range(parts[1], self.Cs[layer], "component index", key)
                if alive_only:
                    assert alive is not None, "the caller supplies the alive set for '@alive'"
                    ok = set(alive.get(layer, ()))
                    cs = [c for c in cs if c in ok]
                found += [ComponentKey(layer, c) for c in cs]
            counts[key] = len(found)
            out.update(dict.fromkeys(found))
            if len(out) > cap:
                raise BadKeyError(f"the component list expands to {len(out)} components (at "
                                  f"{key!r}); at most {cap}: narrow the patterns or add "
                                  "'@alive'")
        return list(out), counts


class KeySpace(PatternKeys):
    """The keys valid for one run: decomposed layers (canonical name → C), vocabulary size."""

    def __init__(self, layers: Mapping[str, int], vocab_size: int | None = None) -> None:
        self.Cs: dict[str, int] = dict(layers)
        self.vocab_size = vocab_size

    @property
    def layers(self) -> list[str]:
        return list(self.Cs)

    def _valid_layers(self) -> str:
        return ", ".join(self.Cs)

    def layer(self, name: str) -> str:
        """Validate a decomposed layer name."""
        if name not in self.Cs:
            raise BadKeyError(
                f"unknown layer {name!r}; valid layers: {self._valid_layers()}"
            )
        return name

    def _index(self, layer: str, c: int, key: str) -> None:
        C = self.Cs[layer]
        if c >= C:
            raise BadKeyError(
                f"{key!r}: component index {c} out of range for {layer} (C={C}: 0..{C - 1})"
            )

    def component(self, key: str) -> ComponentKey:
        """Parse ``"{layer}:{c}"``."""
        if not isinstance(key, str) or key.count(":") != 1:
            raise BadKeyError(
                f"component key {key!r} must look like 'LAYER:C' (e.g. "
                f"'{next(iter(self.Cs), 'layer')}:0'); valid layers: {self._valid_layers()}"
            )
        layer, c_str = key.split(":")
        self.layer_checked(layer, key)
        c = _int(c_str, "component index", key)
        self._index(layer, c, key)
        return ComponentKey(layer, c)

    def layer_checked(self, layer: str, key: str) -> None:
        if layer not in self.Cs:
            raise BadKeyError(
                f"{key!r}: unknown layer {layer!r}; valid layers: {self._valid_layers()}"
            )

    def node(self, key: str, n_pos: int, *, allow_special: bool = True) -> NodeKey:
        """Parse ``"{layer}:{pos}:{c}"`` (and ``embed:{pos}:0`` / ``output:{pos}:{tok}``)."""
        if not isinstance(key, str) or key.count(":") != 2:
            raise BadKeyError(
                f"node key {key!r} must look like 'LAYER:POS:C' (e.g. "
                f"'{next(iter(self.Cs), 'layer')}:0:0'); valid layers: {self._valid_layers()}"
            )
        layer, p_str, i_str = key.split(":")
        pos = _int(p_str, "position", key)
        if pos >= n_pos:
            raise BadKeyError(f"{key!r}: position {pos} out of range (prompt has {n_pos} tokens: "
                            f"0..{n_pos - 1})")
        index = _int(i_str, "index", key)
        if allow_special and layer == EMBED:
            if index != 0:
                raise BadKeyError(f"{key!r}: embed nodes have index 0")
            return NodeKey(layer, pos, 0)
        if allow_special and layer == OUTPUT:
            if self.vocab_size is not None and index >= self.vocab_size:
                raise BadKeyError(
                    f"{key!r}: token id {index} out of range (vocab {self.vocab_size})"
                )
            return NodeKey(layer, pos, index)
        self.layer_checked(layer, key)
        self._index(layer, index, key)
        return NodeKey(layer, pos, index)

    def components(self, keys: Sequence[str]) -> list[ComponentKey]:
        return [self.component(k) for k in keys]

    def nodes(
        self, keys: Sequence[str], n_pos: int, *, allow_special: bool = True
    ) -> list[NodeKey]:
        return [self.node(k, n_pos, allow_special=allow_special) for k in keys]

