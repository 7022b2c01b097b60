"""SPD training speed on the current device, printed as JSON.

For each zoo toy (``tms-5-2``, ``resid-mlp``) it times SPD optimisation steps with the zoo's default
losses and batch size, and, as a baseline measured in the same run, plain target training steps
(forward + backward + AdamW on the target alone, same batch). ``ratio`` = SPD step time / target
step time: what one SPD step costs in units of ordinary training.

    python benchmarks/decompose.py [--device cpu|cuda|auto] [--steps 50] [--warmup 10] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from spd_mcp.model.component_model import ComponentModel
from spd_mcp.model.config import parse_config
from spd_mcp.model.decompose import compute_losses, resolve_device
from spd_mcp.model.targets import resolve_target
from spd_mcp.model.zoo import get_entry


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(step, n: int, warmup: int, device: str) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / n


def bench(name: str, *, device: str, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    config = parse_config(get_entry(name).default_config())
    target = resolve_target(config.target)
    model = target.model.to(device)
    cm = ComponentModel(model, config.modules, config.ci_fn).to(device)
    for source, follower in config.tied:  # as in training (tms-5-2 ties linear2 to linear1)
        cm.tie(source, follower)
    opt = torch.optim.AdamW(list(cm.trainable_parameters()), lr=config.lr)
    output_loss = config.output_loss or target.output_loss
    B = config.batch_size

    def spd_step() -> None:
        cm.refresh_ties()
        x = target.sampler(B, device)
        terms = compute_losses(cm, config, x, output_loss=output_loss, step=0)
        coeff = {k: loss.coeff for k, loss in zip(terms, config.losses, strict=True)}
        total = sum(coeff[k] * v for k, v in terms.items())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    base = get_entry(name).build_model().to(device)  # a fresh, trainable copy of the target
    base_opt = torch.optim.AdamW(base.parameters(), lr=1e-3)

    def target_step() -> None:
        x = target.sampler(B, device)
        loss = base(x).pow(2).mean()
        base_opt.zero_grad(set_to_none=True)
        loss.backward()
        base_opt.step()

    spd_s = _time(spd_step, steps, warmup, device)
    tgt_s = _time(target_step, steps, warmup, device)
    return {
        "batch_size": B,
        "losses": [loss.type + (f"/{loss.routing}" if hasattr(loss, "routing") else "")
                   for loss in config.losses],
        "C": dict(cm.Cs),
        "spd_steps_per_s": round(1 / spd_s, 2),
        "spd_ms_per_step": round(spd_s * 1000, 2),
        "baseline_target_ms_per_step": round(tgt_s * 1000, 3),
        "ratio": round(spd_s / tgt_s, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--targets", nargs="+", default=["tms-5-2", "resid-mlp"])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    results = {
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "benchmarks": {n: bench(n, device=device, steps=args.steps, warmup=args.warmup)
                       for n in args.targets},
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
