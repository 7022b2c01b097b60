"""Benchmark tasks: one YAML file each (``spd_mcp/bench/tasks/*.yaml``), validated into
:class:`BenchTask`. Unknown keys are errors; every error names the file and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from spd_mcp.errors import InputError

TASKS_DIR = Path(__file__).with_name("tasks")
"""The shipped tasks."""
TOY_TASKS_DIR = TASKS_DIR / "toys"
"""The shipped tasks on toys with known features (``feature`` tasks)."""

RESERVED_SEEDS = frozenset({0, 1, 7, 99, 12345, 424_242})
"""Corpus seeds something else reads, so never held out: the target's (0) and SPD's (1) training
streams, the demo's probe (7), the editing probes (99), the behaviour evaluation (12345) and the
held-out KL text (424242)."""

TOY_RESERVED_SEEDS = frozenset({1234})
"""Seeds a toy's evaluation reads (``spd-mcp evaluate``), so never held out for feature tasks."""

MIN_DISTRIBUTED_BUDGET = 16
"""A distributed mechanism is many components: such tasks allow at least this many."""


class TaskError(InputError):
    """A task file that does not load or validate."""


class BenchTask(BaseModel):
    """One question about a run's planted behaviour and how an answer to it is graded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="the file's stem")
    run: str = Field(min_length=1, description="the run the agent investigates, e.g. tales")
    question: str = Field(min_length=1, description="what the agent is asked")
    behaviour: str = Field(min_length=1, description="a planted behaviour of the run (feature "
                           "tasks: 'feature-K', filled in)")
    metric: Literal["prob", "accuracy", "recon"] = Field(
        "prob", description="mean expected-token probability, or top-1 accuracy, on the probes; "
        "feature tasks: recon (default) or accuracy")
    threshold: float = Field(gt=0, le=1, description="min relative drop of the behaviour's "
                             "metric with the claimed components ablated everywhere")
    tolerance: float = Field(ge=0, lt=1, description="max relative drop of each other behaviour")
    budget: int = Field(ge=1, le=512, description="max number of claimed components")
    n_probes: int = Field(64, ge=8, le=512, description="held-out probes per behaviour")
    probe_seed: int = Field(ge=0, description="corpus seed of the held-out probes")
    n_random: int = Field(10, ge=1, le=100, description="random same-size control sets")
    distributed: bool = Field(False, description="the honest answer is a distributed mechanism")
    feature: int | None = Field(None, ge=0, strict=True, description="toys with known "
                                "features: the input feature asked about (its index); makes "
                                "this a feature task")
    complete: bool = Field(False, description="feature tasks: the answer must name the "
                           "feature's component in every matrix with known pieces")
    match_threshold: float = Field(0.9, gt=0, le=1, description="feature tasks: min |cosine| "
                                   "between a claimed component and the feature's known piece")

    @model_validator(mode="before")
    @classmethod
    def _feature_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("feature") is not None:
            data = {"behaviour": f"feature-{data['feature']}", "metric": "recon", **data}
        return data

    @property
    def is_feature(self) -> bool:
        """A question about a toy's known input feature (graded against ground truth)."""
        return self.feature is not None

    @model_validator(mode="after")
    def _consistent(self) -> BenchTask:
        if self.tolerance >= self.threshold:
            raise ValueError(f"tolerance {self.tolerance} must be below threshold "
                             f"{self.threshold}")
        if self.probe_seed in RESERVED_SEEDS:
            raise ValueError(f"probe_seed {self.probe_seed} is not held out (reserved: "
                             f"{sorted(RESERVED_SEEDS)})")
        if self.distributed and self.budget < MIN_DISTRIBUTED_BUDGET:
            raise ValueError(f"a distributed task needs budget >= {MIN_DISTRIBUTED_BUDGET}")
        if self.feature is None:
            toy_only = {"complete", "match_threshold"} & self.model_fields_set
            if toy_only or self.metric == "recon":
                what = ", ".join(sorted(toy_only)) or "metric 'recon'"
                raise ValueError(f"{what}: only for feature tasks (give 'feature')")
            return self
        if self.behaviour != f"feature-{self.feature}":
            raise ValueError(f"a feature task's behaviour is 'feature-{self.feature}' (or "
                             f"omitted), got {self.behaviour!r}")
        if self.metric == "prob":
            raise ValueError("a feature task's metric is 'recon' or 'accuracy'")
        if self.probe_seed in TOY_RESERVED_SEEDS:
            raise ValueError(f"probe_seed {self.probe_seed} is not held out (a toy's evaluation "
                             f"reads {sorted(TOY_RESERVED_SEEDS)})")
        return self


def _field_errors(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(task)"
        parts.append(f"field {where!r}: {err['msg']}")
    return "; ".join(parts)


def load_task(path: Path | str) -> BenchTask:
    """Read and validate one task file; the id must equal the file's stem."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise TaskError(f"{path}: cannot read task: {e}") from None
    if not isinstance(data, dict):
        raise TaskError(f"{path}: a task is a mapping of fields, got {type(data).__name__}")
    try:
        task = BenchTask.model_validate(data)
    except ValidationError as e:
        raise TaskError(f"{path}: {_field_errors(e)}") from None
    if task.id != path.stem:
        raise TaskError(f"{path}: field 'id': {task.id!r} must equal the file name "
                        f"{path.stem!r}")
    return task


def suites() -> list[str]:
    """The shipped suites: one folder of task files each (``tales``, ``tales-llama``, ...)."""
    return sorted(p.name for p in TASKS_DIR.iterdir() if p.is_dir() and any(p.glob("*.yaml")))


def load_tasks(directory: Path | str | None = None, suite: str | None = None) -> list[BenchTask]:
    """Every ``*.yaml`` task of ``directory`` (its sub-folders too), else of the shipped
    ``suite``, else of every shipped suite; sorted by id, ids unique."""
    if directory is not None:
        root = Path(directory)
    elif suite is not None:
        if suite not in suites():
            raise TaskError(f"unknown suite {suite!r}; shipped: {', '.join(suites())}")
        root = TASKS_DIR / suite
    else:
        root = TASKS_DIR
    files = sorted(root.rglob("*.yaml"))
    if not files:
        raise TaskError(f"{root}: no *.yaml task files")
    tasks = sorted((load_task(f) for f in files), key=lambda t: t.id)
    ids = [t.id for t in tasks]
    if dup := sorted({i for i in ids if ids.count(i) > 1}):
        raise TaskError(f"{root}: task id(s) {', '.join(dup)} defined more than once")
    return tasks
