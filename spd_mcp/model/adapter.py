"""The target-adapter contract: what a target tells the decomposer, the evaluator and loaders
beyond its weights. Zoo entries (``spd_mcp.model.zoo``) and Hugging Face models
(``spd_mcp.model.hf``) implement it; every method has a neutral default."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from torch import Tensor, nn

if TYPE_CHECKING:
    from spd_mcp.model.text_target import TextTarget


class TargetAdapter:
    """Base of every target adapter (no abstract methods: a plain model needs none)."""

    output_loss: ClassVar[Literal["mse", "kl"]] = "mse"
    cpu_threads: ClassVar[int | None] = None
    """Torch CPU threads for this target (tiny models run fastest on one thread)."""

    def position_mask(self, x: Tensor) -> Tensor | None:
        """Positions of a batch that count in losses and diagnostics (None: all)."""
        return None

    def save_extras(self, run_dir: Path) -> None:
        """Write extra files (e.g. a tokenizer) into a run directory being created."""

    def load_extras(self, run_dir: Path) -> None:
        """Read extra files from a run directory."""

    def save_native(self, state: dict[str, Tensor], out: Path) -> bool:
        """Write the target with weights ``state`` in its ecosystem's own format into ``out``
        (a Hugging Face model: ``save_pretrained`` files and its tokenizer); False: none."""
        return False

    def text_target(self) -> TextTarget | None:
        """What this target offers text tools (tokenizer, text, behaviours); None for toys."""
        return None

    def ground_truth(self, model: nn.Module) -> dict[str, Tensor]:
        """Module path → (n, *weight shape) true rank-1 pieces, for layers where they are known."""
        return {}

    def expected_alive(self) -> dict[str, int]:
        """Module path → the number of alive components the known solution has."""
        return {}

    def evaluate_run(self, run: Any) -> dict[str, Any] | None:
        """A target-specific evaluation of a decomposed run (None: the generic one applies)."""
        return None
