"""The Python API: the tools' capabilities on a loaded run, for notebooks and scripts.

    import spd_mcp
    run = spd_mcp.load_run("tales")
    circuit, graph = run.optimize("... stella played all day , and then", label="she")
    run.intervene("...", circuit.nodes(), loss="label", label="she")

Same analysis code as the MCP tools; keys are the canonical strings of ``spd_mcp.keys``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spd_mcp.analysis import components as comp
from spd_mcp.analysis.dataset import DatasetIndex, DatasetSearchResult
from spd_mcp.analysis.graph import AttributionGraph, compute_graph
from spd_mcp.analysis.intervene import REGIMES, InterventionResult, Regime, run_intervention
from spd_mcp.analysis.optimize import OptimizedCI, OptimizeSettings, optimize_ci
from spd_mcp.editing.bake import export_baked
from spd_mcp.editing.edit import ComponentScale, Edit, applied, edited_forward, scale_edit
from spd_mcp.editing.measure import EditMeasurement, MeasureSettings, Probe, measure_edit
from spd_mcp.editing.train import EditTarget, TrainReport, TrainSettings, train_edit
from spd_mcp.keys import NodeKey, node_key
from spd_mcp.model.session import RunSession
from spd_mcp.model.text import Generation, generate
from spd_mcp.service.state import DATASET_DOCS


@dataclass
class Circuit:
    """Optimised CI for one prediction, with its metrics."""

    result: OptimizedCI

    def nodes(self) -> list[str]:
        """Node keys with optimised CI > 0."""
        return [node_key(layer, p, c) for layer, g in self.result.ci.items()
                for p, c in (g > 0).nonzero().tolist()]


class Run:
    """A loaded run with the analyses the MCP server exposes."""

    def __init__(self, session: RunSession) -> None:
        self.session = session
        self._index: DatasetIndex | None = None

    @classmethod
    def load(cls, ref: str, *, device: str = "cpu") -> Run:
        return cls(RunSession.load(ref, device=device))

    @property
    def layers(self) -> list[str]:
        return self.session.layers

    def tokens(self, text: str) -> list[str]:
        return self.session.tokens(self.session.encode(text))

    def ci(self, text: str, **kw: Any) -> comp.CIResult:
        return comp.active_components(self.session, self.session.encode(text), **kw)

    def probe(self, component: str, text: str) -> comp.ProbeResult:
        s = self.session
        return comp.probe_component(s, s.encode(text), s.keys.component(component))

    def vectors(self, component: str, **kw: Any) -> comp.ComponentVectors:
        return comp.component_vectors(self.session, self.session.keys.component(component), **kw)

    def generate(self, text: str, *, edit: Edit | None = None, **kw: Any) -> Generation:
        return generate(self.session, self.session.encode(text),
                        forward=edited_forward(self.session, edit), **kw)

    # ------------------------------------------------------------------------------- editing
    def edit(self, scales: Mapping[str, float], *, ci_threshold: float | None = None) -> Edit:
        """A runtime edit: component key → scale (0 ablates), optionally CI-gated."""
        return scale_edit(self.session, [
            ComponentScale(component=k, scale=v, ci_threshold=ci_threshold)
            for k, v in scales.items()])

    def train_edit(self, components: Sequence[str], targets: Sequence[tuple[str, str] | EditTarget],
                   *, preserve: Sequence[str] = (), **settings: Any) -> tuple[Edit, TrainReport]:
        """Rank-1 adapters on ``components``; targets are (prompt, token) pairs to raise, or
        EditTarget objects (direction raise / lower)."""
        ts = [t if isinstance(t, EditTarget) else EditTarget(prompt=t[0], token=t[1])
              for t in targets]
        return train_edit(self.session, components, ts, TrainSettings(**settings),
                          preserve=preserve)

    def measure(self, edit: Edit, *, probes: Sequence[tuple[str, str]] = (),
                **settings: Any) -> EditMeasurement:
        """measure_edit: KL / perplexity on held-out text, probes, behaviours, random control."""
        ps = [Probe(prompt=p, expected=e) for p, e in probes]
        return measure_edit(self.session, edit, MeasureSettings(probes=ps, **settings))

    @contextmanager
    def applied(self, edit: Edit) -> Iterator[None]:
        """Inside the block, ``run.session.cm.target`` computes the edited model (ungated)."""
        with applied(self.session, edit):
            yield

    def export(self, edit: Edit, out: str | Path) -> Path:
        """Bake ``edit`` into the target weights and write a standalone checkpoint."""
        return export_baked(self.session, edit, Path(out))

    def search(self, query: str, **kw: Any) -> DatasetSearchResult:
        if self._index is None:
            self._index = DatasetIndex.build(self.session, DATASET_DOCS)
        return self._index.search(self.session, query, **kw)

    def graph(self, text: str, *, ci_threshold: float = 0.0, label: str | None = None,
              **kw: Any) -> AttributionGraph:
        s = self.session
        ids = s.encode(text)
        nat = s.natural_ci(ids)
        return compute_graph(s.cm, s.topology, ids, s.to_module_dict(nat.ci),
                             ci_threshold=ci_threshold,
                             label_token=s.token_id(label) if label else None, **kw)

    def optimize(self, text: str, *, label: str | None = None, position: int | None = None,
                 **settings: Any) -> tuple[Circuit, AttributionGraph]:
        s = self.session
        ids = s.encode(text)
        tok = s.token_id(label) if label else None
        opt = optimize_ci(s, ids, position=position, label_token=tok,
                          settings=OptimizeSettings(**settings))
        pos = opt.metrics.position
        g = compute_graph(s.cm, s.topology, ids, s.to_module_dict(opt.ci),
                          output_positions=[pos], label_token=tok)
        return Circuit(opt), g

    def intervene(self, text: str, nodes: Sequence[str], *, label: str | None = None,
                  regimes: Sequence[Regime] = REGIMES, **kw: Any) -> InterventionResult:
        s = self.session
        ids = s.encode(text)
        keys = s.keys.nodes(nodes, len(ids), allow_special=False)
        return run_intervention(s, ids, keys, regimes=regimes,
                                label_token=s.token_id(label) if label else None, **kw)

    def ablate(self, text: str, components: Sequence[str], *, label: str | None = None,
               **kw: Any) -> InterventionResult:
        s = self.session
        ids = s.encode(text)
        comps = s.keys.components(components)
        nodes = [NodeKey(c.layer, p, c.c) for c in comps for p in range(len(ids))]
        return run_intervention(s, ids, nodes, regimes=["ablated"],
                                label_token=s.token_id(label) if label else None, **kw)
