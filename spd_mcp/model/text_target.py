"""What a text model offers the analyses: the seam zoo language models (and, later, Hugging Face
models and imported runs) plug into. Nothing here asks which model it is.

A target adapter returns a :class:`TextTarget` (``ZooEntry.text_target()``); the run session
exposes it as ``session.text``. Toy targets have none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Protocol, runtime_checkable


class TextTokenizer(Protocol):
    """A tokenizer loadable offline. ``encode`` adds the tokenizer's own special tokens (a BOS
    for `tales` and Llama-style tokenizers); ids below ``vocab_size``. ``word_level``: words
    outside the vocabulary map to ``unk_id`` (byte-level BPE tokenizers have no unknown text,
    and their ``unk_id`` is -1)."""

    pad_id: int
    unk_id: int
    eos_id: int
    word_level: bool

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

    def n_documents(self, source: Literal["train", "heldout"]) -> int | None:
        """How many documents ``source`` holds (None: unbounded, e.g. a generated corpus)."""
        ...

    def behaviours(self) -> Mapping[str, PlantedBehaviour]:
        """Planted behaviours by name (empty when the target has none)."""
        ...
