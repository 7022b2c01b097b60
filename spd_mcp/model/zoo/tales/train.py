"""Train the `tales` target language model and score its planted behaviours.

Run ``python -m spd_mcp.model.zoo.tales.train`` for a quick train-and-report.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spd_mcp.model.zoo.tales.corpus import (
    DEFAULT_GRAMMAR,
    GRAMMARS,
    Grammar,
    Probe,
    TalesCorpus,
    probe_families,
)
from spd_mcp.model.zoo.tales.tokenizer import Tokenizer
from spd_mcp.model.zoo.transformer import Transformer, TransformerConfig

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
"""Maps token ids (B, T) to logits (B, T, vocab)."""
ProgressFn = Callable[[int, int, float], None]
"""Called as ``progress(step, total_steps, loss)`` after every optimiser step."""

EVAL_SEED = 12345  # probe seed; never used for training text
DEFAULT_STEPS = 1600  # v2 reaches >= 99.8% on every probe family (v1 was shipped at 1200)
DEFAULT_BATCH_SIZE = 32
DEFAULT_LR = 1e-2


@dataclass
class TalesTrainResult:
    """A trained `tales` target and how it was obtained."""

    model: Transformer
    tokenizer: Tokenizer
    config: TransformerConfig
    final_loss: float  # mean training loss over the last 5% of steps
    seconds: float
    steps: int
    batch_size: int
    seed: int
    grammar: Grammar = DEFAULT_GRAMMAR

    def save(self, directory: str | Path) -> Path:
        """Write ``model.pt`` (state dict), ``config.json`` and ``tokenizer.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), directory / "model.pt")
        (directory / "config.json").write_text(self.config.model_dump_json(indent=1) + "\n")
        self.tokenizer.save(directory)
        return directory


def load_tales_target(directory: str | Path) -> tuple[Transformer, Tokenizer]:
    """Load a target written by :meth:`TalesTrainResult.save` (eval mode, CPU)."""
    directory = Path(directory)
    config = TransformerConfig.model_validate(json.loads((directory / "config.json").read_text()))
    model = Transformer(config)
    state = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval(), Tokenizer.load(directory)


def default_config(tokenizer: Tokenizer) -> TransformerConfig:
    """The default `tales` target: 2 layers, d_model 64, 4 heads, MLP 256, context 128."""
    return TransformerConfig(vocab_size=tokenizer.vocab_size)


def story_batches(
    tokenizer: Tokenizer, seed: int, batch_size: int, *, max_len: int = 128, pool: int = 8,
    grammar: Grammar = DEFAULT_GRAMMAR,
) -> Iterator[torch.Tensor]:  # fmt: skip
    """Endless right-padded (B, T) ``<bos> story <eos>`` batches of ``TalesCorpus(seed, grammar)``.

    Stories are drawn ``pool`` batches at a time and grouped by length to cut padding; T is
    the longest row of each batch. Deterministic given the arguments.
    """
    stories = TalesCorpus(seed, grammar).stories()
    order = random.Random(f"batches/{seed}")
    while True:
        rows = [tokenizer.encode(next(stories), eos=True) for _ in range(batch_size * pool)]
        if any(len(r) > max_len for r in rows):
            raise ValueError(f"a story does not fit in max_len={max_len}")
        rows.sort(key=len)
        chunks = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        order.shuffle(chunks)
        for chunk in chunks:
            yield pad_batch(chunk, tokenizer.pad_id)


def pad_batch(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """Right-pad token id lists into a (B, T) LongTensor."""
    ids = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids


def _lr_factor(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's CPU thread count (``None``: leave it alone)."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_tales_model(
    model: nn.Module,
    tokenizer: Tokenizer,
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "cpu",
    lr: float = DEFAULT_LR,
    weight_decay: float = 0.01,
    warmup: int = 100,
    num_threads: int | None = 1,
    progress: ProgressFn | None = None,
    grammar: Grammar = DEFAULT_GRAMMAR,
    max_len: int | None = None,
) -> float:
    """Train ``model`` (any ``ids -> logits`` module; ``max_len`` defaults to the zoo
    Transformer's) in place on stories of ``TalesCorpus(seed, grammar)``; return the final loss.

    fp32 AdamW with linear warm-up and cosine decay; next-token loss on ``<bos> story <eos>``
    rows, padding ignored. ``num_threads`` (default 1, fastest for this small model on a
    shared CPU) applies only while training. The final loss is the mean over the last 5% of
    steps.
    """
    if seed == EVAL_SEED:
        raise ValueError(f"seed {EVAL_SEED} is reserved for held-out behaviour probes")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimiser = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: _lr_factor(s, steps, min(warmup, steps))
    )
    batches = story_batches(
        tokenizer, seed, batch_size, max_len=max_len or model.config.max_len, grammar=grammar
    )
    tail_losses: list[float] = []
    model.to(device).train()
    with _threads(num_threads if torch.device(device).type == "cpu" else None):
        for step in range(steps):
            ids = next(batches).to(device)  # (B, T)
            logits = model(ids[:, :-1])  # (B, T-1, V)
            targets = ids[:, 1:].masked_fill(ids[:, 1:] == tokenizer.pad_id, -100)  # (B, T-1)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            value = loss.item()
            if step >= steps - max(1, steps // 20):
                tail_losses.append(value)
            if progress is not None:
                progress(step + 1, steps, value)
    model.eval()
    return sum(tail_losses) / len(tail_losses)


def build_tales_model(
    tokenizer: Tokenizer, *, seed: int = 0, config: TransformerConfig | None = None
) -> Transformer:
    """An untrained target (``default_config`` unless given), initialised from ``seed``."""
    config = config or default_config(tokenizer)
    if config.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"config.vocab_size {config.vocab_size} != {tokenizer.vocab_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Transformer(config)


def train_tales_target(
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "cpu",
    lr: float = DEFAULT_LR,
    config: TransformerConfig | None = None,
    num_threads: int | None = 1,
    progress: ProgressFn | None = None,
    grammar: Grammar = DEFAULT_GRAMMAR,
) -> TalesTrainResult:
    """Build and train the `tales` target; ``seed`` fixes initialisation and training text.

    Evaluate it with :func:`evaluate_behaviours`, whose probes come from another seed.
    """
    start = time.perf_counter()
    tokenizer = Tokenizer(TalesCorpus.vocabulary(grammar))
    model = build_tales_model(tokenizer, seed=seed, config=config)
    final_loss = train_tales_model(
        model,
        tokenizer,
        seed=seed,
        steps=steps,
        batch_size=batch_size,
        device=device,
        lr=lr,
        num_threads=num_threads,
        progress=progress,
        grammar=grammar,
    )
    return TalesTrainResult(
        model=model,
        tokenizer=tokenizer,
        config=model.config,
        final_loss=final_loss,
        seconds=time.perf_counter() - start,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        grammar=grammar,
    )


@lru_cache(maxsize=64)
def _probes(grammar: Grammar, family: str, seed: int, n: int) -> tuple[Probe, ...]:
    return tuple(probe_families(grammar)[family](seed, n))


@torch.no_grad()
def score_probes(
    logits_fn: LogitsFn, tokenizer: Tokenizer, probes: list[Probe] | tuple[Probe, ...],
    *, batch_size: int = 128, device: str | torch.device = "cpu",
) -> list[bool]:  # fmt: skip
    """Whether the top-1 next-token prediction after each probe's prompt is its expected token."""
    correct: list[bool] = []
    for lo in range(0, len(probes), batch_size):
        chunk = probes[lo : lo + batch_size]
        rows = [tokenizer.encode(p.prompt, bos=True) for p in chunk]
        ids = pad_batch(rows, tokenizer.pad_id)  # (B, T)
        logits = logits_fn(ids.to(device))  # (B, T, V)
        last = torch.tensor([len(r) - 1 for r in rows], device=logits.device)  # (B,)
        top1 = logits[torch.arange(len(rows), device=logits.device), last].argmax(-1)  # (B,)
        expected = [tokenizer.token_to_id(p.expected) for p in chunk]
        correct.extend(int(t) == e for t, e in zip(top1.tolist(), expected, strict=True))
    return correct


def evaluate_behaviours(
    logits_fn: LogitsFn,
    tokenizer: Tokenizer,
    *,
    seed: int = EVAL_SEED,
    n: int = 200,
    device: str | torch.device = "cpu",
    grammar: Grammar = DEFAULT_GRAMMAR,
) -> dict[str, float]:
    """Top-1 accuracy per probe family on ``n`` probes each from ``TalesCorpus(seed, grammar)``.

    Families are the behaviours and, for v2, each behaviour's ``<name>_shortcut`` family.
    """
    scores: dict[str, float] = {}
    for family in probe_families(grammar):
        probes = _probes(grammar, family, seed, n)
        correct = score_probes(logits_fn, tokenizer, probes, device=device)
        scores[family] = sum(correct) / len(correct)
    return scores


def format_report(result: TalesTrainResult, scores: dict[str, float]) -> str:
    """Human-readable summary of a training run and its behaviour accuracies."""
    lines = [
        f"tales target: {result.model.num_parameters():,} parameters, vocab "
        f"{result.tokenizer.vocab_size}, d_model {result.config.d_model}, "
        f"{result.config.n_layers} layers",
        f"grammar {result.grammar}: trained {result.steps} steps x {result.batch_size} stories "
        f"in {result.seconds:.1f} s, final loss {result.final_loss:.4f}",
        "behaviour            top-1",
    ]
    lines += [f"{name:<20} {acc:6.1%}" for name, acc in scores.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--n-probes", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--grammar", choices=GRAMMARS, default=DEFAULT_GRAMMAR,
                        help="corpus grammar to train and probe on")
    parser.add_argument("--out", type=Path, default=None, help="directory to save the target")
    args = parser.parse_args(argv)
    overrides = {
        k: v
        for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("lr", args.lr))
        if v is not None
    }

    def progress(step: int, total: int, loss: float) -> None:
        if step % 100 == 0 or step == total:
            print(f"step {step:5d}/{total}  loss {loss:.4f}", flush=True)

    result = train_tales_target(
        seed=args.seed, num_threads=args.threads, progress=progress, grammar=args.grammar,
        **overrides,
    )
    scores = evaluate_behaviours(
        result.model, result.tokenizer, n=args.n_probes, grammar=args.grammar
    )
    print(format_report(result, scores))
    if args.out is not None:
        print(f"saved to {result.save(args.out)}")


if __name__ == "__main__":
    main()
