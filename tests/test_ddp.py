"""Data-parallel decomposition and checkpoints (``spd_mcp.model.distributed``, ``.checkpoint``).

Oracles: two gloo processes take the single process's step on the same global batch; the ranks'
objectives average to the full-batch objective, gradient for gradient, and advance the generator
as the full batch does; a run stopped and resumed from its checkpoint ends bit-for-bit where an
uninterrupted run ends, drawing the same stochastic masks.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from spd_mcp.cli import main
from spd_mcp.model import losses as L
from spd_mcp.model.checkpoint import checkpoint_path
from spd_mcp.model.component_model import ComponentModel
from spd_mcp.model.config import ConfigError, parse_config
from spd_mcp.model.decompose import _Trainer, decompose, seed_everything
from spd_mcp.model.distributed import Dist
from spd_mcp.model.targets import ResolvedTarget
from tests.byo_model import data, make

ROOT = Path(__file__).resolve().parents[1]

# Every kind of per-datapoint randomness: sampled sources (two samples), delta masks, subset
# routes, a random layer choice, PGD's random starts; tokens (B, T) so masks are (B, T, C).
CONFIG = {
    "name": "ddp",
    "seed": 3,
    "target": {"factory": "tests.byo_model:make", "kwargs": {"hidden": 8},
               "data": "tests.byo_model:data", "output_loss": "kl"},
    "modules": [
        {"pattern": "embed", "C": 5}, {"pattern": "up", "C": 6}, {"pattern": "down", "C": 7}
    ],
    "losses": [
        {"type": "faithfulness", "coeff": 1},
        {"type": "importance_minimality", "coeff": 1e-3, "p": 0.9},
        {"type": "stochastic_recon", "coeff": 1, "n_mask_samples": 2},
        {"type": "stochastic_recon", "coeff": 1, "routing": "subset"},
        {"type": "stochastic_recon", "coeff": 1, "routing": "layerwise", "layers_per_step": 2},
        {"type": "ci_masked_recon", "coeff": 1, "routing": "layerwise"},
        {"type": "pgd_recon", "coeff": 1, "init": "random"},
    ],
    "steps": 1, "batch_size": 8, "lr": 1e-3, "eval_every": 100, "eval_batch_size": 16,
}


def _params(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "components.safetensors"))


def test_two_gloo_processes_take_the_single_process_step(tmp_path: Path) -> None:
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "spd_mcp.cli", "decompose", str(cfg), "--nproc", "2",
         "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "two")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(tmp_path / "two")  # rank 0 prints once
    summary = json.loads((tmp_path / "two" / "run.json").read_text())["summary"]
    assert summary["processes"] == 2
    config = parse_config(CONFIG)
    one = decompose(config, out=tmp_path / "one")
    start = decompose(config.model_copy(update={"steps": 0}), out=tmp_path / "start")
    a, b, s = _params(one), _params(tmp_path / "two"), _params(start)
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    step = max(float((a[k] - s[k]).abs().max()) for k in a)
    print(f"2 gloo processes vs 1 process, one step: max |Δparam| = {diff:.3g} "
          f"(the step itself moves parameters by up to {step:.3g})")
    assert diff <= 1e-6
    assert step > 1e-4


class _Padded:
    """An adapter whose token 0 is padding (positions masked out of the losses)."""

    def position_mask(self, x: torch.Tensor) -> torch.Tensor:
        return x != 0


def test_rank_objectives_average_to_the_full_batch_objective() -> None:
    """Per-rank gradients (padding unevenly spread over the ranks) average to the full batch's,
    with the same masks: each rank's generator ends where the full batch's does."""
    config = parse_config({**CONFIG, "batch_size": 6})
    seed_everything(0)
    target = ResolvedTarget(make(hidden=8), data, "kl", _Padded())  # type: ignore[arg-type]
    cm = ComponentModel(target.model, config.modules, config.ci_fn)
    trainer = _Trainer(cm, target, config, device="cpu", reporter=None)
    x = data(6, "cpu")  # (6, 4)
    x[:3, 1:] = 0  # rank 0 keeps 3 positions, rank 1 up to 12
    params = list(cm.trainable_parameters())
    rng = torch.get_rng_state()
    total, _ = trainer.objective(x, 0)
    full = torch.autograd.grad(total, params, allow_unused=True)
    after = torch.get_rng_state()
    summed = [torch.zeros_like(p) for p in params]
    for rank in range(2):
        torch.set_rng_state(rng)
        trainer.dist = Dist(rank, 2)
        total_r, _ = trainer._rank_objective(x, 0)
        assert torch.equal(torch.get_rng_state(), after)
        for acc, g in zip(summed, torch.autograd.grad(total_r, params, allow_unused=True),
                          strict=True):
            if g is not None:
                acc += g / 2
    diff = max(float((f - s).abs().max()) for f, s in zip(full, summed, strict=True)
               if f is not None)
    scale = max(float(f.abs().max()) for f in full if f is not None)
    assert diff <= 1e-6 * max(1.0, scale), (diff, scale)


def test_resumed_run_continues_bit_for_bit(tmp_path: Path, monkeypatch) -> None:
    config = parse_config({
        **CONFIG, "steps": 14, "eval_every": 3, "faithfulness_warmup_steps": 2,
        "schedule": {"type": "cosine", "warmup_frac": 0.2},
    })
    drawn: list[dict[str, torch.Tensor]] = []
    sample = L.stochastic_masks

    def recording(ci: dict[str, torch.Tensor], kind: L.SourceKind) -> dict[str, torch.Tensor]:
        masks = sample(ci, kind)
        drawn.append({n: m.detach().clone() for n, m in masks.items()})
        return masks

    monkeypatch.setattr(L, "stochastic_masks", recording)
    full = decompose(config, out=tmp_path / "full", reporter=lambda *_: None)
    full_draws, drawn[:] = list(drawn), []

    class Preempted(Exception):
        pass

    def stop_in_step_10(step: int, total: int, latest: dict[str, float]) -> None:
        if step == 11:  # step 10 was trained after checkpoint 10 was written: lost work
            raise Preempted

    out = tmp_path / "part"
    with pytest.raises(Preempted):
        decompose(config, out=out, checkpoint_every=5, reporter=stop_in_step_10)
    assert checkpoint_path(out).is_file() and not out.exists()
    with pytest.raises(ConfigError, match="--resume"):
        decompose(config, out=out)
    drawn[:] = []
    resumed = decompose(config, out=out, checkpoint_every=5, resume=True,
                        reporter=lambda *_: None)
    assert not checkpoint_path(out).exists()

    a, b = _params(full), _params(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(drawn) == 4 * 4  # steps 10..13, four mask draws each (2 samples, subset, layerwise)
    for mine, theirs in zip(drawn, full_draws[-len(drawn):], strict=True):
        assert all(torch.equal(mine[n], theirs[n]) for n in mine)

    def rows(run: Path) -> list[dict]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]

    assert rows(full) == rows(resumed)
    done = (out / "components.safetensors").stat().st_mtime_ns
    assert decompose(config, out=out, checkpoint_every=5, resume=True) == out  # finished
    assert (out / "components.safetensors").stat().st_mtime_ns == done  # left as it is


def test_sbatch_script_runs_torchrun_on_two_nodes(tmp_path: Path, monkeypatch,
                                                   capsys) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 4242\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "run"
    assert main(["decompose", str(cfg), "--out", str(out), "--device", "cuda", "--slurm",
                 "--nodes", "2", "--nproc", "2", "--checkpoint-every", "100",
                 "--partition", "gpu"]) == 0
    assert capsys.readouterr().out.strip() == "4242"
    [script] = (Path(os.environ["SPD_MCP_HOME"]) / "slurm").glob("*-decompose/decompose.sbatch")
    text = script.read_text()
    for directive in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=2", "--requeue",
                      "--partition=gpu"):
        assert f"#SBATCH {directive}\n" in text, directive
    [line] = [ln for ln in text.splitlines() if ln.startswith("exec srun")]
    head = '"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):29500"'
    assert (f"exec srun --ntasks-per-node=1 {sys.executable} -m torch.distributed.run "
            f"--nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint {head} "
            f'--rdzv-id "${{SLURM_JOB_ID}}" -m spd_mcp.cli decompose {cfg} --out {out} '
            "--device cuda --checkpoint-every 100 --resume") == line
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
