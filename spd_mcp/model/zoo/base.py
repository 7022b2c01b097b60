"""The zoo contract: what a built-in target gives the decomposer, the evaluator and loaders."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from spd_mcp.model.adapter import TargetAdapter

Progress = Callable[[int, int, float], None]
"""progress(step, total, loss) — called during target training."""


class TargetKwargs(BaseModel):
    """Constructor kwargs of a zoo target; subclasses add fields. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


K = TypeVar("K", bound=TargetKwargs)


class ZooEntry(TargetAdapter, ABC, Generic[K]):
    """One built-in target: architecture, data, trainer, default decomposition, ground truth.

    ``self.kwargs`` is the validated ``kwargs_model`` instance (typed ``K`` in subclasses).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    kwargs_model: ClassVar[type[TargetKwargs]] = TargetKwargs
    default_kwargs: ClassVar[dict[str, Any]] = {}
    target_steps: ClassVar[int] = 1000

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs: K = self.kwargs_model.model_validate(  # type: ignore[assignment]
            {**self.default_kwargs, **kwargs}
        )

    @abstractmethod
    def build_model(self) -> nn.Module:
        """An untrained target with this entry's architecture."""

    @abstractmethod
    def train_target(
        self, model: nn.Module, *, steps: int, device: str, seed: int, progress: Progress | None
    ) -> dict[str, float]:
        """Train ``model`` in place; return final metrics."""

    @abstractmethod
    def sample_batch(self, batch_size: int, device: str) -> Tensor:
        """A batch of target inputs from the data distribution (global torch RNG)."""

    @abstractmethod
    def default_config(self) -> dict[str, Any]:
        """The decomposition config (as a dict, validated by ``DecomposeConfig``)."""
