"""Resumable decompositions: a checkpoint holds everything the next training step depends on.

A checkpoint is taken before training step s (after that step's evaluation) and written
atomically (temporary sibling, fsync, rename) to ``<run directory>.checkpoint.pt``, beside the
run it will become; it is deleted once the run is saved. It holds

- the ComponentModel's state (target weights included), the AdamW state and the metrics rows;
- every random generator: torch's CPU generator, the CUDA generator of the device in use,
  Python's ``random`` and NumPy's global generator;
- the batch sizes the data sampler was called with, in order. A sampler draws from the global
  generators or is a deterministic stream of its own (the tales corpus); replaying the calls on
  the freshly resolved target, before the generators are restored, puts such a stream back where
  it was.

Resuming rebuilds the run (without training the target: its weights are in the checkpoint),
loads this state and continues from step s. The steps that follow draw the same batches and masks
as if the run had never stopped, so the run ends bit-for-bit where an uninterrupted one would
(same number of processes, same device).
"""

from __future__ import annotations

import json
import os
import random
import uuid
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from spd_mcp.files import fsync_file
from spd_mcp.model.config import ConfigError, DecomposeConfig
from spd_mcp.model.targets import Sampler

CHECKPOINT_VERSION = 1


def checkpoint_path(out: Path) -> Path:
    """Where the run that will be published at ``out`` keeps its checkpoint while it trains."""
    return out.with_name(out.name + ".checkpoint.pt")


class Resumable(Protocol):
    """What a checkpoint needs from the trainer."""

    device: str

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class SamplerLog:
    """A sampler that records the batch sizes it is called with, run-length encoded."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.calls: list[list[int]] = []  # [[batch_size, times], ...]

    def __call__(self, batch_size: int, device: str) -> Tensor:
        if self.calls and self.calls[-1][0] == batch_size:
            self.calls[-1][1] += 1
        else:
            self.calls.append([batch_size, 1])
        return self.sampler(batch_size, device)

    def replay(self, calls: list[list[int]], device: str) -> None:
        """Make these calls again (and record them), discarding the batches."""
        for batch_size, times in calls:
            for _ in range(times):
                self(batch_size, device)


def rng_state(device: str) -> dict[str, Any]:
    """Every generator a decomposition draws from (tensors, tuples and numbers only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
    }
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: str) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Checkpoints:
    """A decomposition's checkpoint: when it is written, by whom, and the state it resumes from.

    ``every``: write before every step that is a multiple of it (None: never); ``write``: this
    process writes (rank 0 of a data-parallel job); ``state``: the checkpoint being resumed."""

    def __init__(
        self, path: Path, *, every: int | None, config: DecomposeConfig, write: bool,
        state: dict[str, Any] | None = None,
    ) -> None:
        self.path, self.every, self.write, self.state = path, every, write, state
        self.config_json = config.model_dump_json()
        self.log: SamplerLog | None = None
        self.target_metrics: dict[str, float] = (
            {} if state is None else json.loads(state["target_metrics"])
        )

    @classmethod
    def open(
        cls, out: Path, *, every: int | None, config: DecomposeConfig, resume: bool,
        overwrite: bool, write: bool = True,
    ) -> Checkpoints | None:
        """The checkpoints of the run at ``out`` (None: no checkpoint to write or resume).

        An existing checkpoint is resumed with ``resume``, discarded with ``overwrite``, and
        otherwise an error (it belongs to an unfinished run)."""
        path = checkpoint_path(out)
        state = None
        if path.exists():
            if resume:
                state = load_checkpoint(path, config)
            elif not overwrite:
                raise ConfigError(
                    f"{path} holds an unfinished run: pass --resume to continue it or "
                    "--overwrite to start again"
                )
        if every is not None and config.restarts is not None:
            raise ConfigError("checkpoints do not cover restarts yet (drop --checkpoint-every)")
        if every is None and state is None:
            return None
        return cls(path, every=every, config=config, write=write, state=state)

    def record(self, sampler: Sampler) -> Sampler:
        """Wrap the trainer's sampler so that its calls can be replayed on resume."""
        self.log = SamplerLog(sampler)
        return self.log

    def attach(self, trainer: Resumable) -> int:
        """Load the resumed state into ``trainer``; return the step to continue from (0: none)."""
        if self.state is None:
            return 0
        assert self.log is not None, "record(sampler) first"
        self.log.replay(self.state["sampler_calls"], trainer.device)
        trainer.load_state_dict(self.state["trainer"])
        set_rng_state(self.state["rng"], trainer.device)
        return int(self.state["step"])

    def due(self, step: int, start: int) -> bool:
        return self.every is not None and step > start and step % self.every == 0

    def save(self, step: int, trainer: Resumable) -> None:
        """Write the checkpoint taken before training step ``step`` (atomically)."""
        if not self.write:
            return
        assert self.log is not None, "record(sampler) first"
        state = {
            "version": CHECKPOINT_VERSION,
            "step": step,
            "config": self.config_json,
            "trainer": trainer.state_dict(),
            "rng": rng_state(trainer.device),
            "sampler_calls": [list(c) for c in self.log.calls],
            "target_metrics": json.dumps(self.target_metrics),
        }
        tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            torch.save(state, tmp)
            fsync_file(tmp)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def remove(self) -> None:
        if self.write:
            self.path.unlink(missing_ok=True)


def load_checkpoint(path: Path, config: DecomposeConfig) -> dict[str, Any]:
    """A checkpoint's state; it must have been written for ``config``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(f"{path}: checkpoint version {state.get('version')} is not "
                          f"{CHECKPOINT_VERSION}; pass --overwrite to start again")
    if state["config"] != config.model_dump_json():
        old, new = json.loads(state["config"]), config.model_dump(mode="json")
        keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise ConfigError(f"{path} was written for another config (differs in {keys}); "
                          "pass --overwrite to start again")
    return state
