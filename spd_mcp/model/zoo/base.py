"""The zoo contract: what a built-in target gives the decomposer, the evaluator and loaders."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

if TYPE_CHECKING:
    from spd_mcp.model.text_target import TextTarget

Progress = Callable[[int, int, float], None]
"""progress(step, total, loss) — called during target training."""


class TargetKwargs(BaseModel):
    """Constructor kwargs of a zoo target; subclasses add fields. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


K = TypeVar("K", bound=TargetKwargs)


class ZooEntry(ABC, Generic[K]):
    """One built-in target: architecture, data, trainer, default decomposition, ground truth.

    ``self.kwargs`` is the validated ``kwargs_model`` instance (typed ``K`` in subclasses).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    output_loss: ClassVar[Literal["mse", "kl"]] = "mse"
    kwargs_model: ClassVar[type[TargetKwargs]] = TargetKwargs
    default_kwargs: ClassVar[dict[str, Any]] = {}
    target_steps: ClassVar[int] = 1000
    cpu_threads: ClassVar[int | None] = None
    """Torch CPU threads for this target (tiny models run fastest on one thread)."""

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

    def ground_truth(self, model: nn.Module) -> dict[str, Tensor]:
        """Module path → (n, *weight shape) true rank-1 pieces, for layers where they are known."""
        return {}

    def expected_alive(self) -> dict[str, int]:
        """Module path → the number of alive components the known solution has."""
        return {}

    def position_mask(self, x: Tensor) -> Tensor | None:
        """Positions of a batch that count in losses and diagnostics (None: all)."""
        return None

    def save_extras(self, run_dir: Path) -> None:
        """Write extra files (e.g. a tokenizer) into a run directory being created."""

    def load_extras(self, run_dir: Path) -> None:
        """Read extra files from a run directory."""

    def text_target(self) -> TextTarget | None:
        """What this target offers text tools (tokenizer, text, behaviours); None for toys."""
        return None

    def evaluate_run(self, run: Any) -> dict[str, Any] | None:
        """A target-specific evaluation of a decomposed run (None: the generic one applies)."""
        return None
