"""Submit investigations, harvest shards and attributions to SLURM with ``sbatch --parsable``.

Jobs run the same Python environment as the submitter (its absolute interpreter path) and the
same ``spd-mcp`` commands as a local launch; files they write must be on a filesystem the node
sees. Every submission gets a directory (``<root>/slurm/<stamp>``) holding its scripts and logs.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from spd_mcp.errors import OperationError
from spd_mcp.launch.local import LaunchOptions, launch_argv
from spd_mcp.launch.taskdir import default_root
from spd_mcp.paths import spd_home


class SlurmError(OperationError):
    """sbatch is missing or refused a job."""


class SlurmOptions(BaseModel):
    """Resources for the jobs (None: the cluster's default)."""

    model_config = ConfigDict(extra="forbid")

    partition: str | None = None
    time: str | None = None
    gpus: int | None = Field(None, ge=0)
    mem: str | None = None
    dependency: str | None = None
    cpus: int | None = Field(None, ge=1)

    @field_validator("dependency")
    @classmethod
    def _dependency(cls, v: str | None) -> str | None:
        """A bare job id means ``afterok:ID``; anything else is passed as written."""
        if v is None:
            return None
        return f"afterok:{v}" if v.replace("_", "").isdigit() else v

    def directives(self) -> list[str]:
        out = []
        if self.partition:
            out.append(f"--partition={self.partition}")
        if self.time:
            out.append(f"--time={self.time}")
        if self.gpus:
            out.append(f"--gpus={self.gpus}")
        if self.mem:
            out.append(f"--mem={self.mem}")
        if self.cpus:
            out.append(f"--cpus-per-task={self.cpus}")
        if self.dependency:
            out.append(f"--dependency={self.dependency}")
        return out


def submission_dir(root: Path, kind: str) -> Path:
    """A fresh directory for one submission's scripts and logs."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for i in range(1000):
        path = root / "slurm" / f"{stamp}-{kind}{'' if i == 0 else f'-{i}'}"
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise SlurmError(f"cannot make a submission directory under {root / 'slurm'}")


def sbatch_script(name: str, command: Sequence[str], out_dir: Path, opts: SlurmOptions, *,
                  array: int | None = None, extra: Sequence[str] = ()) -> str:
    """A bash sbatch script running `command` (one job, or an array of `array` tasks)."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}"]
    log = "%x-%A_%a.out" if array is not None else "%x-%j.out"
    lines.append(f"#SBATCH --output={out_dir / log}")
    if array is not None:
        lines.append(f"#SBATCH --array=0-{array - 1}")
    lines += [f"#SBATCH {d}" for d in [*opts.directives(), *extra]]
    lines += [
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}",
        f"export SPD_MCP_HOME={shlex.quote(str(spd_home().resolve()))}",
        "export PYTHONUNBUFFERED=1",
        'echo "spd-mcp job ${SLURM_JOB_ID:-?} task ${SLURM_ARRAY_TASK_ID:-} on $(hostname)"',
        "exec " + " ".join(shlex.quote(c) for c in command),
        "",
    ]
    return "\n".join(lines)


def sbatch(script: Path, *args: str) -> str:
    """Submit `script` with ``sbatch --parsable``; return the job id."""
    exe = shutil.which("sbatch")
    if exe is None:
        raise SlurmError("sbatch not found: is SLURM installed (see scripts/slurm-local.sh)?")
    done = subprocess.run([exe, "--parsable", *args, str(script)], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120, check=False)
    if done.returncode != 0:
        raise SlurmError(f"sbatch failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]


def submit_investigations(opts: LaunchOptions, slurm: SlurmOptions) -> str:
    """One job (or an array of ``opts.agents``), each task running one local investigation."""
    root = (opts.root or default_root()).resolve()
    sub = submission_dir(root, "investigate")
    question = sub / "question.md"
    question.write_text(opts.question)
    node_opts = opts.model_copy(update={"root": root, "agents": 1})
    argv = list(launch_argv(node_opts, question))
    array = opts.agents if opts.agents > 1 else None
    script = sub / "investigate.sbatch"
    script.write_text(sbatch_script("spd-investigate", argv, sub, slurm, array=array))
    job = sbatch(script)
    (sub / "job_id").write_text(job + "\n")
    return job


def submit_harvest(run: str, shards: int, flags: Sequence[str], slurm: SlurmOptions,
                   threads: int | None = None) -> tuple[str, str]:
    """An array of `shards` harvest shards and a merge job after all of them succeed."""
    sub = submission_dir(spd_home().resolve(), "harvest")
    py = [sys.executable, "-m", "spd_mcp.cli", "harvest"]
    thr = ["--threads", str(threads)] if threads else []
    shard_cmd = [*py, run, "--shard", f"${{SLURM_ARRAY_TASK_ID}}/{shards}", *flags, *thr]
    script = sub / "shards.sbatch"
    text = sbatch_script("spd-harvest", shard_cmd, sub, slurm, array=shards)
    # the shard index comes from the environment: unquote that one word
    text = text.replace(shlex.quote(f"${{SLURM_ARRAY_TASK_ID}}/{shards}"),
                        f'"${{SLURM_ARRAY_TASK_ID}}/{shards}"')
    script.write_text(text)
    array_job = sbatch(script)
    merge_opts = slurm.model_copy(update={"dependency": f"afterok:{array_job}", "gpus": None})
    merge = sub / "merge.sbatch"
    merge_cmd = [*py, "merge", run, "--shards", str(shards), *_merge_flags(flags)]
    merge.write_text(sbatch_script("spd-harvest-merge", merge_cmd, sub, merge_opts))
    merge_job = sbatch(merge)
    (sub / "job_id").write_text(f"{array_job}\n{merge_job}\n")
    return array_job, merge_job


def _merge_flags(flags: Sequence[str]) -> list[str]:
    """Harvest flags that identify the configuration (merge needs them, not run options)."""
    drop = {"--checkpoint-every", "--device", "--threads"}
    out, skip = [], False
    for f in flags:
        if skip:
            skip = False
            continue
        if f in drop:
            skip = True
            continue
        out.append(f)
    return out


def submit_command(name: str, argv: Sequence[str], slurm: SlurmOptions) -> str:
    """One job running ``python -m spd_mcp.cli ARGV`` (e.g. attributions)."""
    sub = submission_dir(spd_home().resolve(), name)
    script = sub / f"{name}.sbatch"
    script.write_text(sbatch_script(f"spd-{name}", [sys.executable, "-m", "spd_mcp.cli", *argv],
                                    sub, slurm))
    job = sbatch(script)
    (sub / "job_id").write_text(job + "\n")
    return job


def slurm_env_ok() -> bool:
    """Whether sbatch is callable here (SLURM_CONF set or a default config)."""
    return shutil.which("sbatch") is not None and (
        bool(os.environ.get("SLURM_CONF")) or Path("/etc/slurm/slurm.conf").is_file()
    )


def submit_bench(argv: Sequence[str], n_runs: int, out: Path,
                 slurm: SlurmOptions) -> tuple[str, str]:
    """``spd-mcp bench run ARGV --shard I`` as an array of ``n_runs`` elements (each writes
    ``out/shard-I``), then ``spd-mcp bench report out`` once all have ended (``afterany``: a
    failed element must not hide the others' results)."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    sub = submission_dir(out, "bench")
    py = [sys.executable, "-m", "spd_mcp.cli"]
    script = sub / "runs.sbatch"
    text = sbatch_script("spd-bench", [*py, *argv, "--shard", "${SLURM_ARRAY_TASK_ID}"], sub,
                         slurm, array=n_runs)
    text = text.replace(shlex.quote("${SLURM_ARRAY_TASK_ID}"), '"${SLURM_ARRAY_TASK_ID}"')
    script.write_text(text)
    array_job = sbatch(script)
    report_opts = slurm.model_copy(update={"dependency": f"afterany:{array_job}", "gpus": None})
    report = sub / "report.sbatch"
    report.write_text(sbatch_script("spd-bench-report", [*py, "bench", "report", str(out)], sub,
                                    report_opts))
    report_job = sbatch(report)
    (sub / "job_id").write_text(f"{array_job}\n{report_job}\n")
    return array_job, report_job


def decompose_script(argv: Sequence[str], out_dir: Path, slurm: SlurmOptions, *, nodes: int,
                     nproc: int, gpus: bool, port: int = 29500) -> str:
    """An sbatch script for ``spd-mcp`` ARGV (a ``decompose`` command) data-parallel over `nodes`
    nodes × `nproc` processes: srun starts one torchrun per node, and they meet (c10d
    rendezvous) on the job's first node at `port`. ``--requeue``: with ``--resume`` and
    ``--checkpoint-every`` in ARGV, a preempted job continues from its last checkpoint."""
    head = '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
    endpoint = f"{head}:{port}"
    command = ["srun", "--ntasks-per-node=1", sys.executable, "-m", "torch.distributed.run",
               "--nnodes", str(nodes), "--nproc-per-node", str(nproc),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
               "--rdzv-id", "${SLURM_JOB_ID}", "-m", "spd_mcp.cli", *argv]
    extra = [f"--nodes={nodes}", "--ntasks-per-node=1", "--requeue", "--open-mode=append"]
    if gpus:
        extra.append(f"--gpus-per-node={nproc}")
    text = sbatch_script("spd-decompose", command, out_dir, slurm.model_copy(update={"gpus": None}),
                         extra=extra)
    for word in (endpoint, "${SLURM_JOB_ID}"):  # expanded by bash on the job's first node
        text = text.replace(shlex.quote(word), f'"{word}"')
    return text


def submit_decompose(argv: Sequence[str], slurm: SlurmOptions, *, nodes: int, nproc: int,
                     gpus: bool, port: int = 29500) -> str:
    """Submit :func:`decompose_script`; return the job id."""
    sub = submission_dir(spd_home().resolve(), "decompose")
    script = sub / "decompose.sbatch"
    script.write_text(decompose_script(argv, sub, slurm, nodes=nodes, nproc=nproc, gpus=gpus,
                                       port=port))
    job = sbatch(script)
    (sub / "job_id").write_text(job + "\n")
    return job
