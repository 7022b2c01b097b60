"""What is being served: the run, its layers, key grammar, planted behaviours and analyses."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, Field

from spd_mcp.analysis.features import feature_toy
from spd_mcp.model.session import RunSession
from spd_mcp.model.validity import Validity, ensure_validity

from .labels import best_labels
from .state import AppState, compute
from .worker import remote

KEY_GRAMMAR = ("component 'LAYER:C' (e.g. '1.attn.o:5'); node 'LAYER:POS:C' (e.g. "
               "'1.attn.o:12:5'); 'embed:POS:0'; 'output:POS:TOKEN_ID'. Positions count "
               "from 0, and position 0 is the <bos> token.")


class LayerInfo(BaseModel):
    name: str = Field(description="canonical layer name used in every key")
    module: str
    C: int
    d_in: int
    d_out: int


class BehaviourInfo(BaseModel):
    name: str
    rule: str
    example_prompt: str
    expected_next_token: str


RECON_MEANING = {
    "unmasked": "every component on with mask 1, weight delta off: do the components sum to "
                "the weights?",
    "ci_masked": "mask = natural CI, delta off: the decomposition as the CI says it is needed",
    "ci_rounded": "mask = 1 where CI > 0.5 else 0, delta off",
    "stochastic": "mask = CI + (1 − CI)·random source at every position, delta masked alike",
    "adversarial": "mask = CI + (1 − CI)·source, the sources (every component, every position, "
                   "and the delta) chosen by a 20-step PGD to maximise the divergence over all "
                   "positions of fresh text — a worst case for the whole decomposition, unlike "
                   "run_intervention's adversarial regime, which attacks only components outside "
                   "a circuit and only its own loss",
}


class ValiditySummary(BaseModel):
    """How far to trust the decomposition (``spd-mcp evaluate RUN`` shows the details)."""

    verdict: str
    ok: bool
    failures: list[str] = Field(description="every validity threshold the run fails")
    recon_ratio: dict[str, float] = Field(
        description="output divergence from the target under each mask regime, as a fraction "
                    "of all components off (0 = exactly the target, 1 = as bad as nothing)")
    recon_meaning: dict[str, str] = Field(default_factory=lambda: dict(RECON_MEANING),
                                          description="what each recon_ratio key measures")
    flagged_layers: dict[str, str] = Field(
        default_factory=dict, description="matrices that fail a check, and why")
    data: str


class FeatureInfo(BaseModel):
    """A toy with known input features: inputs are feature vectors, not text."""

    n_features: int
    how: str = ("input x has one value per feature (sparse; the rest 0) and output i "
                "reconstructs feature i. Text tools do not apply: get_ci(features={'3': 1.0}) "
                "lists the components that fire on an input; get_component_vectors shows the "
                "features a component reads and how each output changes when it alone is "
                "ablated. The other analysis, intervention and edit tools take text and do not "
                "apply; save_explanation and the investigation tools do")


class ModelInfo(BaseModel):
    run: str
    run_id: str
    architecture: dict[str, Any]
    layers: list[LayerInfo]
    vocab_size: int | None
    max_len: int | None
    key_grammar: str
    analyses: dict[str, bool] = Field(description="which offline analyses exist for this run")
    analyses_note: str | None = Field(
        None, description="what happens when a tool needs an analysis that is not built yet")
    planted_behaviours: list[BehaviourInfo] = Field(
        description="ground-truth behaviours of the target (zoo language models)"
    )
    input_features: FeatureInfo | None = Field(
        None, description="toys with known input features (e.g. TMS): how to give inputs")
    device: str
    compute_queue: dict[str, Any]
    validity: ValiditySummary = Field(
        description="validity checks of the decomposition (fresh adversarial / CI-masked / "
                    "rounded / unmasked reconstruction, L0, ‖Δ‖/‖W‖, duplicates); when it "
                    "fails, treat circuits and ablations with matching caution")


def architecture(st: AppState) -> dict[str, Any]:
    """The target's class name and, where the model has one, its config."""
    model = st.session.run.target.model
    arch: dict[str, Any] = {"type": type(model).__name__}
    config = getattr(model, "config", None)
    if isinstance(config, BaseModel):
        arch |= config.model_dump()
    elif hasattr(config, "to_dict"):  # a transformers config: the fields that describe its size
        full = config.to_dict()
        arch |= {k: full[k] for k in _HF_FIELDS if full.get(k) is not None}
    imported = st.session.run.meta.get("summary", {}).get("imported_from")
    if imported:
        arch["imported_from"] = imported
    return arch


_HF_FIELDS = ("model_type", "num_hidden_layers", "n_layer", "hidden_size", "n_embd",
              "num_attention_heads", "n_head", "num_key_value_heads", "intermediate_size",
              "n_inner", "vocab_size", "max_position_embeddings", "n_positions")


def _validity_of(session: RunSession) -> Validity:
    return ensure_validity(session.run)


async def validity(st: AppState) -> Validity:
    """The run's validity verdict: stored, or evaluated once on the compute worker."""
    if st._validity is None:
        st._validity = await compute(st, "validity", remote(_validity_of, st.session))
    return st._validity


def summarize_validity(v: Validity) -> ValiditySummary:
    return ValiditySummary(verdict=v.verdict, ok=v.ok, failures=v.failures,
                           recon_ratio={k: round(r.ratio, 5) for k, r in v.recon.items()},
                           flagged_layers=v.flagged_layers(), data=v.data)


async def validity_note(st: AppState, layers: Iterable[str]) -> str | None:
    """A one-line caution for a result whose components lie in ``layers`` (None when the
    decomposition passes every check); after the first, only what is specific to the result."""
    note = note_for(await validity(st), layers, brief=st.validity_noted)
    st.validity_noted = st.validity_noted or note is not None
    return note


def note_for(v: Validity, layers: Iterable[str], brief: bool = False) -> str | None:
    """:func:`validity_note` for a given verdict (``brief``: the caution was given already)."""
    if v.ok:
        return None
    if brief:
        flagged = v.flagged_layers()
        hit = sorted(set(layers) & set(flagged))
        return ("Validity caution as before (get_model_info → validity)"
                + (f"; flagged matrices used here: {', '.join(hit)}" if hit else "") + ".")
    parts = []
    if regimes := v.failed_regimes():
        parts.append(f"its reconstruction fails under {', '.join(regimes)} masks")
    flagged = v.flagged_layers()
    if hit := sorted(set(layers) & set(flagged)):
        parts.append("this result uses flagged matrices: "
                     + "; ".join(f"{n} ({flagged[n]})" for n in hit))
    elif flagged:
        parts.append(f"{len(flagged)} matrices are flagged ({', '.join(sorted(flagged))})")
    return ("The decomposition fails validity checks (get_model_info → validity): "
            + "; ".join(parts) + ". Confirm a circuit on counterfactual prompts before "
            "trusting it.")


def _analyses_note(st: AppState, no_harvest: bool, no_attr: bool) -> str | None:
    missing = [n for n, m in (("harvest", no_harvest), ("dataset attributions", no_attr)) if m]
    if not missing:
        return None
    if st.auto_prepare and st.session.is_language_model:
        return (f"{' and '.join(missing)} not built yet: the first tool call that needs them "
                "builds them on this server (harvest about 15 s, attributions about 40 s for "
                "tales on one core), then they are reused")
    name = st.session.run.name
    return (f"{' and '.join(missing)} not built: tools that need them say so; build with "
            f"`spd-mcp prepare {name}`")


async def model_info(st: AppState) -> ModelInfo:
    s = st.session
    h = await st.harvest()
    attr = await st.attributions()
    labels = await best_labels(st)
    layers = [
        LayerInfo(name=c, module=m, C=s.cm.Cs[m], d_in=s.cm.component(m).d_in,
                  d_out=s.cm.component(m).d_out)
        for m, c in s.to_canonical.items()
    ]
    toy = None if s.is_language_model else await compute(st, "features",
                                                         remote(feature_toy, s))
    behaviours = [BehaviourInfo(name=b.name, rule=b.rule, example_prompt=b.example_prompt,
                                expected_next_token=b.example_expected)
                  for b in s.behaviours().values()]
    return ModelInfo(
        run=s.run.name, run_id=s.run_id, architecture=architecture(st), layers=layers,
        vocab_size=s.keys.vocab_size, max_len=s.max_len, key_grammar=KEY_GRAMMAR,
        analyses={"harvest": h is not None, "dataset_attributions": attr is not None,
                  "labels": bool(labels)},
        analyses_note=_analyses_note(st, h is None, attr is None),
        planted_behaviours=behaviours, device=str(s.device),
        input_features=FeatureInfo(n_features=toy.n_features) if toy is not None else None,
        compute_queue={"running": st.executor.running, "estimated_wait_s":
                       round(st.executor.estimated_wait(), 2)},
        validity=summarize_validity(await validity(st)),
    )
