"""What a text model offers the analyses: the seam zoo language models (and, later, Hugging Face
models and imported runs) plug into. Nothing here asks which model it is.

A target adapter returns a :class:`TextTarget` (``ZooEntry.text_target()``); the run session
exposes it as ``session.text``. Toy targets have none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable


class TextTokenizer(Protocol):
    """A tokenizer loadable offline. ``encode`` prepends BOS; ids below ``vocab_size``."""

    pad_id: int
    unk_id: int
    eos_id: int

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_to_id(self, token: str) -> int: ...

    def id_to_token(self, token_id: int) -> str: ...


class BehaviourProbe(Protocol):
    """A prompt whose next token is known exactly."""

    prompt: str
    expected: str


class PlantedBehaviour(Protocol):
    """A behaviour planted in the training text, with an exact expected next token."""

    name: str
    rule: str
    example_prompt: str
    example_expected: str

    def probes(self, seed: int, n: int) -> Sequence[BehaviourProbe]: ...


@runtime_checkable
class TextTarget(Protocol):
    """A language-model target: tokenizer, training and held-out text, planted behaviours."""

    @property
    def tokenizer(self) -> TextTokenizer: ...

    def dataset_text(self, index: int) -> str:
        """Document ``index`` of the stream the decomposition was trained on (random access)."""
        ...

    def heldout_text(self, index: int) -> str:
        """Document ``index`` of a stream neither the target nor the decomposition saw."""
        ...

    def behaviours(self) -> Mapping[str, PlantedBehaviour]:
        """Planted behaviours by name (empty when the target has none)."""
        ...
