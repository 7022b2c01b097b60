"""``ComponentModel``: a target ``nn.Module`` with selected Linear/Embedding layers decomposed.

The target is never modified: forward hooks on the decomposed modules swap in the component path
for the layers a caller routes through components, and record layer inputs when asked. One forward
therefore runs the real target code (attention, norms, ...) with some matrices replaced by
((x V) ⊙ m) U [+ m_δ x Δᵀ] + b.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from spd_mcp.errors import InputError
from spd_mcp.model.ci_functions import CIFunctions, PerComponentMLP
from spd_mcp.model.components import Components, components_for, is_decomposable
from spd_mcp.model.config import CIFnConfig, ModulePattern
from spd_mcp.model.sigmoids import lower_leaky_hard_sigmoid, upper_leaky_hard_sigmoid


class PatternError(InputError):
    """A module pattern matched nothing, or a module matched two patterns."""


def match_modules(
    target: nn.Module, patterns: list[ModulePattern], aliases: Mapping[str, str] | None = None
) -> dict[str, int]:
    """Module path → C for every decomposable module (Linear, Embedding, Conv1D) matched by a
    pattern, in module order. A pattern matches a module's path or its alias (its canonical
    name, e.g. ``0.attn.q`` for ``model.layers.0.self_attn.q_proj``)."""
    aliases = aliases or {}
    decomposable = [
        name for name, mod in target.named_modules() if name and is_decomposable(mod)
    ]
    found: dict[str, int] = {}
    owner: dict[str, str] = {}
    for p in patterns:
        hits = [
            n for n in decomposable
            if fnmatch.fnmatchcase(n, p.pattern)
            or (n in aliases and fnmatch.fnmatchcase(aliases[n], p.pattern))
        ]
        if not hits:
            named = [f"{aliases[n]} ({n})" if n in aliases else n for n in decomposable]
            raise PatternError(
                f"module pattern {p.pattern!r} matches no decomposable module (nn.Linear, "
                f"nn.Embedding, Conv1D); they are: {', '.join(named) or '(none)'}"
            )
        for n in hits:
            if n in owner:
                raise PatternError(
                    f"module {n!r} is matched by two patterns, {owner[n]!r} and {p.pattern!r}; "
                    "each module may have only one C"
                )
            owner[n] = p.pattern
            found[n] = p.C
    return {n: found[n] for n in decomposable if n in found}


@dataclass
class CI:
    """Causal importances per layer, (..., C) each: ``lower`` for masks, ``upper`` for penalties."""

    lower: dict[str, Tensor]
    upper: dict[str, Tensor]
    pre: dict[str, Tensor]


@dataclass
class _ForwardState:
    masks: dict[str, Tensor] | None = None
    delta_masks: dict[str, Tensor | float] = field(default_factory=dict)
    routes: dict[str, Tensor] = field(default_factory=dict)
    acts_override: dict[str, Tensor] = field(default_factory=dict)
    inputs: dict[str, Tensor] | None = None
    acts: dict[str, Tensor] | None = None


def _safe(name: str) -> str:
    return name.replace(".", "__")


class ComponentModel(nn.Module):
    def __init__(
        self,
        target: nn.Module,
        patterns: list[ModulePattern],
        ci_fn: CIFnConfig | None = None,
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        """``aliases``: module path → canonical name, so patterns may name either."""
        super().__init__()
        ci_fn = ci_fn or CIFnConfig()
        self.target = target
        self._delta_cache: dict[str, tuple[tuple[tuple[int, int, int], ...], Tensor]] = {}
        self.target.requires_grad_(False)
        self.Cs = match_modules(target, patterns, aliases)
        self.layer_names: list[str] = list(self.Cs)
        self.leak_alpha = ci_fn.leak_alpha
        mods = dict(target.named_modules())
        self.components = nn.ModuleDict(
            {_safe(n): components_for(mods[n], C) for n, C in self.Cs.items()}
        )
        self.ci_fns = CIFunctions(
            ci_fn.type,
            list(ci_fn.hidden),
            {
                n: (self.component(n).d_in, C, self.component(n).kind == "embedding")
                for n, C in self.Cs.items()
            },
        )
        self._state: _ForwardState | None = None
        self._ties: list[tuple[str, str]] = []
        self._handles = [
            mods[n].register_forward_hook(self._make_hook(n)) for n in self.layer_names
        ]

    # ------------------------------------------------------------------------------- accessors
    def component(self, name: str) -> Components:
        return self.components[_safe(name)]  # type: ignore[return-value]

    def target_weight(self, name: str) -> Tensor:
        return self.target.get_submodule(name).weight

    def weight_delta(self, name: str) -> Tensor:
        """Δ = W − (V U)ᵀ in the target's weight layout (differentiable in V, U).

        When no gradient can flow into W, V or U (inference, or an optimisation over masks
        with the parameters frozen) it is computed once and reused until one of them changes
        (another tensor or storage, or an in-place update: ``Tensor._version``)."""
        w, comp = self.target_weight(name), self.component(name)
        if torch.is_grad_enabled() and (w.requires_grad or comp.V.requires_grad
                                        or comp.U.requires_grad):
            return w - comp.weight()
        key = tuple((id(t), t.data_ptr(), t._version) for t in (w, comp.V, comp.U))
        hit = self._delta_cache.get(name)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = (key, w - comp.weight())
            self._delta_cache[name] = hit
        return hit[1]

    def weight_deltas(self) -> dict[str, Tensor]:
        return {n: self.weight_delta(n) for n in self.layer_names}

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.components.parameters()
        yield from self.ci_fns.parameters()

    def per_component_ci_fn(self, name: str) -> PerComponentMLP | None:
        """Layer ``name``'s CI function when it is one small MLP per component (slice c along
        dim 0 of every parameter belongs to component c: types ``mlp`` and ``vector_mlp``, and
        embeddings under any per-layer type), else None (shared MLPs mix components)."""
        if self.ci_fns.fn_type == "global_shared_mlp":
            return None
        fn = self.ci_fns.fns[_safe(name)]
        return fn if isinstance(fn, PerComponentMLP) else None

    # ------------------------------------------------------------------------------------ ties
    def tie(self, source: str, follower: str) -> None:
        """Share parameters between two linear layers whose target weights are transposes of each
        other (TMS's W and Wᵀ): the follower's V becomes the source's Uᵀ and its U the source's Vᵀ,
        so component c of the follower is the transpose of component c of the source. Each layer
        keeps its own CI function. ``untie`` turns the follower back into independent parameters.
        """
        unknown = [n for n in (source, follower) if n not in self.Cs]
        if unknown or source == follower:
            raise ValueError(
                f"cannot tie {source!r} and {follower!r}: name two different decomposed layers "
                f"({', '.join(self.layer_names)})"
            )
        s, f = self.component(source), self.component(follower)
        if s.kind != "linear" or f.kind != "linear" or s.C != f.C:
            raise ValueError(f"cannot tie {source!r} and {follower!r}: need linear layers, equal C")
        if (f.d_in, f.d_out) != (s.d_out, s.d_in):
            raise ValueError(f"cannot tie {source!r} and {follower!r}: shapes are not transposes")
        if any(follower in pair or source == pair[1] for pair in self._ties):
            raise ValueError(f"{follower!r} or {source!r} is already tied")
        del f._parameters["V"], f._parameters["U"]
        self._ties.append((source, follower))
        self.refresh_ties()

    def refresh_ties(self) -> None:
        """Point each follower's V, U at (transposed views of) its source's current parameters."""
        for source, follower in self._ties:
            s, f = self.component(source), self.component(follower)
            object.__setattr__(f, "V", s.U.T)
            object.__setattr__(f, "U", s.V.T)

    def untie(self) -> None:
        """Give every follower independent parameters holding its current (tied) values."""
        for _, follower in self._ties:
            f = self.component(follower)
            V, U = f.V.detach().clone(), f.U.detach().clone()
            del f.V, f.U
            f.V, f.U = nn.Parameter(V), nn.Parameter(U)
        self._ties = []

    # ----------------------------------------------------------------------------------- hooks
    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            st = self._state
            if st is None:
                return None
            x = args[0]
            if st.inputs is not None:
                st.inputs[name] = x
            comp = self.component(name)
            if st.acts is not None:
                st.acts[name] = comp.component_acts(x)
            if st.masks is None or name not in st.masks:
                return None
            dm = st.delta_masks.get(name)
            delta = self.weight_delta(name) if dm is not None else None
            acts = st.acts_override.get(name)
            out = comp(x, st.masks[name], delta=delta, delta_mask=dm, acts=acts)
            route = st.routes.get(name)
            if route is not None:  # per-datapoint routing: component path only where route is True
                out = torch.where(route.unsqueeze(-1), out, output)
            return out

        return hook

    @contextmanager
    def _forward_state(self, st: _ForwardState) -> Iterator[_ForwardState]:
        assert self._state is None, "ComponentModel forwards must not be nested"
        self._state = st
        try:
            yield st
        finally:
            self._state = None

    # --------------------------------------------------------------------------------- forwards
    def forward(
        self,
        x: Tensor,
        *,
        masks: dict[str, Tensor] | None = None,
        delta_masks: dict[str, Tensor | float] | None = None,
        routes: dict[str, Tensor] | None = None,
        acts_override: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """Run the target with the layers in ``masks`` routed through their components.

        masks: layer → (..., C) component mask; layers absent use the target weight.
        delta_masks: layer → per-position scalar (...) (or a float) scaling the weight delta;
            absent means no delta for that layer.
        routes: layer → bool (...) choosing, per datapoint, component path (True) or target.
        acts_override: layer → (..., C) component activations to use instead of x V (e.g. leaves
            for attribution).
        """
        st = _ForwardState(
            masks=masks,
            delta_masks=delta_masks or {},
            routes=routes or {},
            acts_override=acts_override or {},
        )
        with self._forward_state(st):
            return self.target(x)

    def forward_with_inputs(
        self,
        x: Tensor,
        *,
        acts: bool = False,
        masks: dict[str, Tensor] | None = None,
        delta_masks: dict[str, Tensor | float] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor] | None]:
        """Forward (target unless masks given) recording each decomposed layer's input and acts."""
        st = _ForwardState(
            masks=masks, delta_masks=delta_masks or {}, inputs={}, acts={} if acts else None
        )
        with self._forward_state(st):
            out = self.target(x)
        assert st.inputs is not None
        return out, st.inputs, st.acts

    def compute_ci(self, inputs: dict[str, Tensor]) -> CI:
        acts = {n: self.component(n).component_acts(inputs[n]) for n in self.layer_names}
        pre = self.ci_fns(inputs, acts)
        return CI(
            lower={n: lower_leaky_hard_sigmoid(z, self.leak_alpha) for n, z in pre.items()},
            upper={n: upper_leaky_hard_sigmoid(z, self.leak_alpha) for n, z in pre.items()},
            pre=pre,
        )

    def ci_for(self, x: Tensor) -> tuple[Tensor, CI]:
        """Target output and natural CI for input x."""
        out, inputs, _ = self.forward_with_inputs(x)
        return out, self.compute_ci(inputs)
