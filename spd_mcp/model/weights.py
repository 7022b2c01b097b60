"""Loading target weights strictly, and the error every target loader raises."""

from __future__ import annotations

from torch import Tensor, nn

from spd_mcp.errors import InputError


class TargetError(InputError):
    """The target spec cannot be resolved (bad import path, missing weights, shape mismatch)."""


def load_state_strict(model: nn.Module, state: dict[str, Tensor], *, source: str) -> None:
    """Load with every key and shape checked; the error lists exact keys, sorted."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if bad:
            parts.append(
                "shape mismatch "
                + ", ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                            for k in bad)
            )
        raise TargetError(f"{source}: " + "; ".join(parts))
    model.load_state_dict(state)
