"""Text data for a Hugging Face target: documents from a file, a held-out split, and token
windows for training.

Sources: a plain-text file (one document per line; blank lines skipped), JSONL (one object per
line with a text field), or a directory written by ``datasets``' ``save_to_disk``. The last
``heldout_frac`` of the documents are held out: never trained on, used for measurements.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor

from spd_mcp.errors import InputError
from spd_mcp.model.config import TextData


class TextDataError(InputError):
    """A text source that cannot be read, or that has too little text."""


def read_documents(path: Path, field: str = "text") -> list[str]:
    """Every non-empty document of a text source, in file order."""
    if path.is_dir():
        return _read_dataset(path, field)
    if not path.is_file():
        raise TextDataError(f"data.text: {path} does not exist")
    docs: list[str] = []
    jsonl = path.suffix in {".jsonl", ".ndjson"}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if jsonl:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TextDataError(f"{path}:{n}: not JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                    raise TextDataError(f"{path}:{n}: no string field {field!r}")
                line = obj[field]
            docs.append(line)
    return docs


def _read_dataset(path: Path, field: str) -> list[str]:
    try:
        from datasets import load_from_disk
    except ImportError:
        raise TextDataError(
            f"data.text: {path} is a directory (a saved `datasets` dataset?) but the `datasets` "
            "package is not installed; pip install datasets, or give a .txt / .jsonl file"
        ) from None
    try:
        ds = load_from_disk(str(path))
    except Exception as e:
        raise TextDataError(f"data.text: cannot load a saved dataset from {path}: {e}") from None
    if hasattr(ds, "keys"):  # a DatasetDict: take the train split, else the first
        split = "train" if "train" in ds else next(iter(ds.keys()))
        ds = ds[split]
    if field not in ds.column_names:
        raise TextDataError(f"data.text: dataset {path} has no column {field!r} "
                            f"(columns: {ds.column_names}); set data.text_field")
    return [t for t in ds[field] if isinstance(t, str) and t.strip()]


class TextDocuments:
    """Documents split into a training part and a held-out tail, and the training token stream.

    ``encode(text) -> ids`` is the model's tokenizer (with its special tokens)."""

    def __init__(self, spec: TextData, encode, *, base: Path | None = None) -> None:
        path = Path(spec.text)
        if not path.is_absolute() and base is not None:
            path = base / path
        self.path = path
        self.spec = spec
        self.encode = encode

    @cached_property
    def _docs(self) -> tuple[list[str], list[str]]:
        docs = read_documents(self.path, self.spec.text_field)
        n_held = max(1, round(len(docs) * self.spec.heldout_frac))
        if len(docs) - n_held < 1:
            raise TextDataError(
                f"data.text: {self.path} has {len(docs)} document(s); need at least two (one "
                f"to train on, the last {self.spec.heldout_frac:.0%} held out)"
            )
        return docs[: len(docs) - n_held], docs[len(docs) - n_held :]

    @property
    def train(self) -> list[str]:
        return self._docs[0]

    @property
    def heldout(self) -> list[str]:
        return self._docs[1]

    @cached_property
    def stream(self) -> Tensor:
        """Every training document's ids, concatenated (1-D int64)."""
        ids: list[int] = []
        for d in self.train:
            ids += self.encode(d)
        if len(ids) < self.spec.context:
            raise TextDataError(
                f"data.text: the training documents hold {len(ids)} tokens, fewer than one "
                f"window (data.context = {self.spec.context})"
            )
        return torch.tensor(ids, dtype=torch.long)

    def windows(self, batch_size: int, device: str) -> Tensor:
        """``batch_size`` random windows (B, context) of the training stream (global RNG)."""
        T = self.spec.context
        starts = torch.randint(0, len(self.stream) - T + 1, (batch_size,))
        idx = starts[:, None] + torch.arange(T)[None]
        return self.stream[idx].to(device)
