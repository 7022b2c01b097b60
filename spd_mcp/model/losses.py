"""SPD losses (DESIGN §3). Each returns a scalar; coefficients are applied by the trainer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from spd_mcp.model.component_model import ComponentModel
from spd_mcp.model.masks import (
    RoutingKind,
    SourceKind,
    delta_masks,
    masks_from_sources,
    route_sets,
    stochastic_masks,
    subset_routes,
)

OutputLoss = Literal["mse", "kl"]


def output_divergence(
    kind: OutputLoss, target: Tensor, pred: Tensor, mask: Tensor | None = None
) -> Tensor:
    """mse: squared error summed over the output dim, mean over datapoints.
    kl: KL(target ‖ pred) per token in nats (logits over the last dim), mean over tokens.
    ``mask`` (target.shape[:-1], bool) keeps only some positions (e.g. not padding)."""
    if kind == "mse":
        per = (pred - target).pow(2).sum(-1)  # (...)
    elif kind == "kl":
        logp_t = F.log_softmax(target, -1)
        logp_p = F.log_softmax(pred, -1)
        per = (logp_t.exp() * (logp_t - logp_p)).sum(-1)  # (...)
    else:
        raise ValueError(f"unknown output loss {kind!r}")
    if mask is None:
        return per.mean()
    return (per * mask).sum() / mask.sum().clamp_min(1)


def faithfulness_loss(cm: ComponentModel) -> Tensor:
    """Mean squared weight delta over every decomposed parameter."""
    total = sum(d.pow(2).sum() for d in cm.weight_deltas().values())
    n = sum(cm.target_weight(name).numel() for name in cm.layer_names)
    return total / n  # type: ignore[operator]


def importance_minimality_loss(
    ci_upper: dict[str, Tensor], *, p: float, eps: float = 1e-12, beta: float = 0.0
) -> Tensor:
    """Σ_layers Σ_c mean_tokens (g + ε)^p  [+ β Σ_layers Σ_c log2(1 + Σ_tokens (g + ε)^p) / N]."""
    loss = torch.zeros(())
    for g in ci_upper.values():
        gp = (g + eps).pow(p).flatten(0, -2)  # (N, C)
        loss = loss.to(g.device) + gp.mean(0).sum()
        if beta:
            loss = loss + beta * torch.log2(1 + gp.sum(0)).sum() / gp.shape[0]
    return loss


def masked_recon_loss(
    cm: ComponentModel,
    x: Tensor,
    target_out: Tensor,
    masks: dict[str, Tensor],
    *,
    kind: OutputLoss,
    routing: RoutingKind,
    dmasks: dict[str, Tensor] | None = None,
    mask: Tensor | None = None,
    layers_per_step: int | None = None,
) -> Tensor:
    """Divergence between target output and the output with ``masks``, under a routing."""
    losses = []
    for layers in route_sets(routing, cm.layer_names, layers_per_step):
        routes = None
        if routing == "subset":
            lead = next(iter(masks.values())).shape[:-1]
            routes = subset_routes(layers, tuple(lead), x.device)
        out = cm(
            x,
            masks={n: masks[n] for n in layers},
            delta_masks={n: dmasks[n] for n in layers} if dmasks is not None else None,
            routes=routes,
        )
        losses.append(output_divergence(kind, target_out, out, mask))
    return torch.stack(losses).mean()


def stochastic_recon_loss(
    cm: ComponentModel,
    x: Tensor,
    target_out: Tensor,
    ci_lower: dict[str, Tensor],
    *,
    kind: OutputLoss,
    routing: RoutingKind,
    sampling: SourceKind,
    n_samples: int = 1,
    use_delta: bool = True,
    mask: Tensor | None = None,
    layers_per_step: int | None = None,
) -> Tensor:
    total = torch.zeros((), device=x.device)
    for _ in range(n_samples):
        masks = stochastic_masks(ci_lower, sampling)
        dm = delta_masks(ci_lower, sampling) if use_delta else None
        total = total + masked_recon_loss(
            cm, x, target_out, masks, kind=kind, routing=routing, dmasks=dm, mask=mask,
            layers_per_step=layers_per_step,
        )
    return total / n_samples


def ci_masked_recon_loss(
    cm: ComponentModel,
    x: Tensor,
    target_out: Tensor,
    ci_lower: dict[str, Tensor],
    *,
    kind: OutputLoss,
    routing: RoutingKind = "all",
    mask: Tensor | None = None,
) -> Tensor:
    """Masks = g exactly (source 0), no weight delta."""
    return masked_recon_loss(cm, x, target_out, ci_lower, kind=kind, routing=routing, mask=mask)


LossFn = Callable[[dict[str, Tensor], dict[str, Tensor] | None], Tensor]


def pgd_sources(
    loss_fn: LossFn,
    ci_lower: dict[str, Tensor],
    *,
    steps: int,
    step_size: float,
    init: Literal["random", "ones", "zeros"],
    shared: bool,
    include_delta: bool,
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """Sign-gradient ascent on sources in [0, 1] that maximise ``loss_fn(sources, delta_sources)``.

    ``shared`` sources have shape (C,) per layer (one adversary for the whole batch); otherwise one
    per datapoint, like the CI. The delta's scalar mask is an extra adversarial entry per layer.
    Returned sources are detached.
    """

    def start(shape: tuple[int, ...], like: Tensor) -> Tensor:
        if init == "random":
            s = torch.rand(shape, device=like.device)
        else:
            s = torch.full(shape, 1.0 if init == "ones" else 0.0, device=like.device)
        return s.requires_grad_(True)

    src = {n: start(g.shape[-1:] if shared else g.shape, g) for n, g in ci_lower.items()}
    dsrc = (
        {n: start((1,) if shared else g.shape[:-1], g) for n, g in ci_lower.items()}
        if include_delta
        else None
    )
    for _ in range(steps):
        leaves = list(src.values()) + (list(dsrc.values()) if dsrc else [])
        with torch.enable_grad():
            loss = loss_fn(src, dsrc)
            grads = torch.autograd.grad(loss, leaves)
        with torch.no_grad():
            for leaf, gr in zip(leaves, grads, strict=True):
                leaf.add_(step_size * gr.sign()).clamp_(0.0, 1.0)
    src = {n: s.detach() for n, s in src.items()}
    dsrc = {n: s.detach() for n, s in dsrc.items()} if dsrc else None
    return src, dsrc


def pgd_recon_loss(
    cm: ComponentModel,
    x: Tensor,
    target_out: Tensor,
    ci_lower: dict[str, Tensor],
    *,
    kind: OutputLoss,
    routing: RoutingKind,
    steps: int,
    step_size: float,
    init: Literal["random", "ones", "zeros"],
    shared: bool,
    include_delta: bool,
    mask: Tensor | None = None,
) -> Tensor:
    """Reconstruction loss under adversarially chosen sources (found with CI detached)."""
    ci_det = {n: g.detach() for n, g in ci_lower.items()}

    def loss_with(ci: dict[str, Tensor]) -> LossFn:
        def fn(src: dict[str, Tensor], dsrc: dict[str, Tensor] | None) -> Tensor:
            masks = masks_from_sources(ci, src)
            dm = None
            if dsrc is not None:
                dm = {n: dsrc[n].expand(ci[n].shape[:-1]) for n in ci}
            return masked_recon_loss(
                cm, x, target_out, masks, kind=kind, routing=routing, dmasks=dm, mask=mask
            )

        return fn

    src, dsrc = pgd_sources(
        loss_with(ci_det),
        ci_det,
        steps=steps,
        step_size=step_size,
        init=init,
        shared=shared,
        include_delta=include_delta,
    )
    return loss_with(ci_lower)(src, dsrc)
