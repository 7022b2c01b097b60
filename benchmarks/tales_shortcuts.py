"""Top-1 accuracy of a `tales` target per probe family and per shortcut, printed as JSON.

For every behaviour of the probe grammar (default v2) it reports top-1 on the behaviour's
held-out probes, on its ``<name>_shortcut`` family (probe points that no listed shortcut solves)
and, per shortcut, on the behaviour's probes where that shortcut's answer is wrong, with how
often the model's top-1 equals the shortcut's (wrong) answer there ("follows_shortcut"; on a
shortcut family: "follows").

    python benchmarks/tales_shortcuts.py --run tales                 # the shipped run's target
    python benchmarks/tales_shortcuts.py --train v2 --out /tmp/tales_v2_target
    python benchmarks/tales_shortcuts.py --target /tmp/tales_v2_target

``--train G`` builds and trains a target the way ``spd-mcp zoo build`` does
(``TalesEntry(grammar=G).build_model()`` + ``train_target``, text seed ``--train-seed`` (0),
the entry's default steps unless ``--target-steps``) and, with ``--out``, saves
``target.safetensors`` (usable as ``target: {zoo: tales, kwargs: {grammar: G}, weights: ...}``),
``tokenizer.json`` and ``train.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch


def top1(model: Any, tokenizer: Any, prompts: list[str], batch: int = 128) -> list[str]:
    """The model's top-1 next token after each prompt."""
    from spd_mcp.model.zoo.tales.train import pad_batch

    out: list[str] = []
    with torch.no_grad():
        for lo in range(0, len(prompts), batch):
            rows = [tokenizer.encode(p, bos=True) for p in prompts[lo : lo + batch]]
            logits = model(pad_batch(rows, tokenizer.pad_id))  # (B, T, V)
            last = torch.tensor([len(r) - 1 for r in rows])  # (B,)
            ids = logits[torch.arange(len(rows)), last].argmax(-1)  # (B,)
            out += [tokenizer.id_to_token(int(i)) for i in ids]
    return out


def score(model: Any, tokenizer: Any, grammar: str, seed: int, n: int) -> dict[str, Any]:
    from spd_mcp.model.zoo.tales.corpus import behaviours

    families: dict[str, dict[str, float]] = {}
    by_shortcut: dict[str, dict[str, dict[str, float]]] = {}
    for b in behaviours(grammar).values():  # type: ignore[arg-type]
        probes = b.probes(seed, n)
        answers = top1(model, tokenizer, [p.prompt for p in probes])
        hits = [a == p.expected for a, p in zip(answers, probes, strict=True)]
        families[b.name] = {"n": len(probes), "top1": sum(hits) / len(hits)}
        if b.shortcut_family is None:
            continue
        hard = b.shortcut_probes(seed, n)
        hard_answers = top1(model, tokenizer, [p.prompt for p in hard])
        families[b.shortcut_family] = {
            "n": len(hard),
            "top1": sum(a == p.expected for a, p in zip(hard_answers, hard, strict=True))
            / len(hard),
            # how often the top-1 is a shortcut's (always wrong) answer on this family
            "follows": {s.name: sum(a == s.predict(p.prompt.split(" "))
                                    for a, p in zip(hard_answers, hard, strict=True)) / len(hard)
                        for s in b.shortcuts},
        }
        rows: dict[str, dict[str, float]] = {}
        for s in b.shortcuts:
            guesses = [s.predict(p.prompt.split(" ")) for p in probes]
            idx = [i for i, (g, p) in enumerate(zip(guesses, probes, strict=True))
                   if g != p.expected]
            rows[s.name] = {
                "shortcut_right": 1 - len(idx) / len(probes),  # on the behaviour's probes
                "n_wrong": len(idx),
                "top1": sum(hits[i] for i in idx) / len(idx) if idx else float("nan"),
                "follows_shortcut": (sum(answers[i] == guesses[i] for i in idx) / len(idx)
                                     if idx else float("nan")),
            }
        by_shortcut[b.name] = rows
    return {"families": families, "by_shortcut": by_shortcut}


def train(
    grammar: str, steps: int | None, seed: int, out: Path | None
) -> tuple[Any, Any, dict[str, Any]]:
    from safetensors.torch import save_file

    from spd_mcp.model.zoo.tales.entry import TalesEntry

    entry = TalesEntry(grammar=grammar)
    model = entry.build_model()
    steps = entry.target_steps if steps is None else steps

    def progress(step: int, total: int, loss: float) -> None:
        if step % 200 == 0 or step == total:
            print(f"step {step}/{total} loss {loss:.4f}", flush=True, file=sys.stderr)

    metrics = entry.train_target(model, steps=steps, device="cpu", seed=seed, progress=progress)
    info = {"grammar": grammar, "steps": steps, "seed": seed, "kwargs": entry.kwargs.model_dump(),
            "metrics": metrics}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(out / "target.safetensors"))
        entry.tokenizer.save(out)
        (out / "train.json").write_text(json.dumps(info, indent=1) + "\n")
        info["saved_to"] = str(out)
    return model.eval(), entry.tokenizer, info


def load_target(directory: Path) -> tuple[Any, Any, dict[str, Any]]:
    from safetensors.torch import load_file

    from spd_mcp.model.zoo.tales.entry import TalesEntry

    info = json.loads((directory / "train.json").read_text())
    entry = TalesEntry(**info["kwargs"])
    model = entry.build_model()
    model.load_state_dict(load_file(str(directory / "target.safetensors")))
    return model.eval(), entry.tokenizer, {"loaded_from": str(directory), **info}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a decomposed run (name or directory): score its target")
    src.add_argument("--target", type=Path, help="a directory written by --train --out")
    src.add_argument("--train", choices=["v1", "v2"], help="train a target on this grammar")
    parser.add_argument("--out", type=Path, help="with --train: save the target here")
    parser.add_argument("--target-steps", type=int, help="with --train: training steps")
    parser.add_argument("--train-seed", type=int, default=0,
                        help="with --train: training-text seed (a decomposition config's seed)")
    parser.add_argument("--grammar", choices=["v1", "v2"], default="v2", help="probe grammar")
    parser.add_argument("--seed", type=int, default=12345, help="probe seed (held out)")
    parser.add_argument("--n", type=int, default=1000, help="probes per family")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    if args.run is not None:
        from spd_mcp.model.run_io import load_run

        run = load_run(args.run)
        model, tokenizer = run.target.model.eval(), run.target.entry.tokenizer
        info: dict[str, Any] = {"run": args.run, "run_id": run.run_id,
                                "grammar": run.target.entry.kwargs.grammar}
    elif args.target is not None:
        model, tokenizer, info = load_target(args.target)
    else:
        model, tokenizer, info = train(args.train, args.target_steps, args.train_seed, args.out)
    t1 = time.perf_counter()
    result = score(model, tokenizer, args.grammar, args.seed, args.n)
    print(json.dumps({
        "target": info, "probe_grammar": args.grammar, "probe_seed": args.seed, "n": args.n,
        **result,
        "seconds": {"target": round(t1 - t0, 1), "scoring": round(time.perf_counter() - t1, 1)},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
    }, indent=1))


if __name__ == "__main__":
    main()
