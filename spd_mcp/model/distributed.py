"""Data-parallel decomposition: one run over N processes (``torchrun``), its batch split by rows.

The contract is that an N-process run computes the single-process run on the same global batch:

1. Every rank builds the same target, ComponentModel and optimiser (same seeds), draws the whole
   global batch of B rows from the shared generators and keeps rows [r·b, (r+1)·b), b = B / N.
2. Inside its loss (:class:`GlobalDraws`) every per-datapoint random draw (stochastic sources,
   delta masks, subset routes, PGD starts) is made for all B rows and sliced to the rank's rows,
   so each rank's masks are those the single process samples for these rows and every generator
   advances exactly as in the single process. Draws that are not per datapoint (``randperm`` of
   layers) are made identically on every rank.
3. A loss averaged over the positions a padding mask keeps is rescaled by the rank's share of the
   kept positions (``decompose._Trainer._rank_objective``), so each term's mean over ranks is the
   global term; gradients are averaged over ranks (:func:`average_grads`).
4. Evaluation runs on every rank (its random draws keep the generators in step, and it costs no
   wall time: the other ranks would wait for rank 0 anyway); rank 0 keeps the rows, writes the
   checkpoints and the run.

Losses that do not split over rows are refused (:func:`check_config`): PGD with one adversarial
source shared by the batch and the ``beta`` term of importance minimality (nonlinear in a sum over
the batch). Restarts and revival are not supported yet.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor
from torch.overrides import TorchFunctionMode

from spd_mcp.model.config import ConfigError, DecomposeConfig, ImportanceMinimality, PGDRecon


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (from torchrun's environment)."""

    rank: int
    world: int
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, x: Tensor) -> Tensor:
        """This rank's rows of a global batch (dim 0)."""
        b = x.shape[0] // self.world
        return x[self.rank * b : (self.rank + 1) * b]


def from_env() -> Dist | None:
    """The job torchrun started this process in; None when it runs alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def check_config(config: DecomposeConfig, world: int) -> None:
    """Refuse what data parallelism cannot reproduce exactly (see the module docstring)."""
    problems = []
    if config.batch_size % world:
        problems.append(f"batch_size {config.batch_size} is not divisible by {world} processes")
    if config.restarts is not None or config.revive is not None:
        problems.append("restarts and revive are not supported with several processes yet")
    for loss in config.losses:
        if isinstance(loss, PGDRecon) and loss.sources == "shared":
            problems.append("pgd_recon with sources: shared needs the whole batch on one process")
        if isinstance(loss, ImportanceMinimality) and loss.beta:
            problems.append("importance_minimality beta > 0 sums over the whole batch")
    if problems:
        raise ConfigError("cannot decompose on several processes: " + "; ".join(problems))


def join(d: Dist, device: str) -> str:
    """Join the process group (gloo on CPU, nccl on CUDA); return this rank's device."""
    if device.startswith("cuda"):
        device = f"cuda:{d.local_rank}"
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        tdist.init_process_group(backend, rank=d.rank, world_size=d.world)
    return device


def leave() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def average_grads(params: list[Tensor], world: int) -> None:
    """Replace each gradient by its mean over ranks, in one flat all-reduce.

    An explicit all-reduce rather than DistributedDataParallel: one training step runs the
    ComponentModel several times (target pass, CI, one pass per mask sample and layer set, PGD's
    inner ``autograd.grad`` loops), adds a faithfulness term computed outside any forward, and ties
    parameters by views; DDP's reducer expects one forward and one backward per step."""
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    tdist.all_reduce(has, op=tdist.ReduceOp.MAX)  # a gradient on any rank: all ranks take part
    used = [p for p, h in zip(params, has.tolist(), strict=True) if h]
    if not used:
        return
    flat = torch.cat([
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in used
    ])
    tdist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in used:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p)
        offset += n


def mean_over_ranks(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached scalars averaged over ranks (for progress reports)."""
    keys = list(values)
    flat = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    tdist.all_reduce(flat)
    flat /= tdist.get_world_size()
    return dict(zip(keys, flat.unbind(), strict=True))


_DRAWS = {torch.rand, torch.randn, torch.randint}
_DRAWS_LIKE = {torch.rand_like, torch.randn_like, torch.randint_like}
_UNSPLIT = {
    torch.bernoulli, torch.normal, torch.multinomial, Tensor.uniform_, Tensor.normal_,
    Tensor.bernoulli_, Tensor.random_, Tensor.exponential_, Tensor.geometric_,
    Tensor.cauchy_, Tensor.log_normal_,
}


class GlobalDraws(TorchFunctionMode):
    """Inside: a ``rand``/``randn``/``randint`` (or ``*_like``) draw whose first dimension is the
    rank's batch (``local`` rows) is made for the global batch and sliced to the rank's rows.

    The global draw has the shape the single process draws (contiguous, as ``rand_like`` of a
    freshly computed tensor is), so the values and the generator's advance are the same. The
    rows are copied out, so the autograd graph keeps only them; the global draw is transient
    (N times one rank's draw, briefly). Other random functions raise, so that a new loss cannot
    silently break the equivalence."""

    def __init__(self, d: Dist, local: int) -> None:
        super().__init__()
        self.d, self.local = d, local

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _DRAWS_LIKE and args[0].dim() and args[0].shape[0] == self.local:
            like = args[0].new_empty((self.local * self.d.world, *args[0].shape[1:]))
            return self.d.rows(func(like, *args[1:], **kwargs)).clone()
        if func in _DRAWS:
            call = _global_call(func, args, kwargs, self.local, self.d.world)
            if call is not None:
                return self.d.rows(func(*call[0], **call[1])).clone()
        if func in _UNSPLIT:
            raise NotImplementedError(
                f"{getattr(func, '__name__', func)} inside a data-parallel loss: draw with "
                "torch.rand / randn / randint (or *_like) so the draw can be split by rows"
            )
        return func(*args, **kwargs)


def _global_call(
    func: Any, args: tuple, kwargs: dict, local: int, world: int
) -> tuple[tuple, dict] | None:
    """(args, kwargs) asking a factory draw for ``world · local`` rows when its first dimension
    is ``local`` rows, else None."""
    if "size" in kwargs:
        size = tuple(kwargs["size"])
    elif func is torch.randint:  # randint(high, size) or randint(low, high, size)
        size = tuple(args[-1])
    elif len(args) == 1 and isinstance(args[0], tuple | list | torch.Size):
        size = tuple(args[0])
    else:
        size = tuple(args)
    if not size or size[0] != local:
        return None
    new = (local * world, *size[1:])
    if "size" in kwargs:
        return args, {**kwargs, "size": new}
    if func is torch.randint:
        return (*args[:-1], new), kwargs
    return (new,), kwargs
