"""``spd-mcp import goodfire PATH``: argument parsing (light) and the command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_import_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="import a decomposition made elsewhere (Goodfire spd)")
    isub = p.add_subparsers(dest="import_kind", required=True, metavar="KIND")
    g = isub.add_parser("goodfire", help="a run of Goodfire's spd (final_config.yaml + "
                        "model_<step>.pth), or the .pth itself")
    g.add_argument("path", type=Path)
    g.add_argument("--name", help="run name (default: the run directory's name)")
    g.add_argument("--out", type=Path, help="run directory (default: $SPD_MCP_HOME/runs/NAME)")
    g.add_argument("--tokenizer", type=Path,
                   help="tokenizer directory (save_pretrained) or tokenizer.json (LM runs)")
    g.add_argument("--data", type=Path, help="text for harvest and search: .txt (a document "
                   "per line), .jsonl ({'text': ...}) or a datasets save_to_disk directory")
    g.add_argument("--context", type=int, default=128, help="tokens per window (default 128)")
    g.add_argument("--target-config", type=Path,
                   help="the target's architecture: the pretrain run's model_config.yaml "
                   "(LlamaSimple, LlamaSimpleMLP, GPT2Simple) or a directory with config.json "
                   "(transformers targets)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run")


def import_command(args: argparse.Namespace) -> int:
    from spd_mcp.model.config import TextData
    from spd_mcp.model.goodfire.importer import import_goodfire
    from spd_mcp.paths import runs_dir

    src = args.path.expanduser().resolve()
    name = args.name or (src.parent.name if src.is_file() else src.name)
    out = args.out or runs_dir() / name
    data = (TextData(text=str(args.data.expanduser().resolve()), context=args.context)
            if args.data else None)
    rep = import_goodfire(src, out, name=name, tokenizer=args.tokenizer, data=data,
                          target_config=args.target_config, overwrite=args.overwrite)
    print(f"imported {rep.source} (step {rep.step}) as {rep.run}", file=sys.stderr)
    print(f"  target: {rep.target}; CI functions: {rep.ci_fn}", file=sys.stderr)
    for layer, C in rep.layers.items():
        print(f"  {layer}: C={C}", file=sys.stderr)
    for note in rep.notes:
        print(f"  note: {note}", file=sys.stderr)
    print(rep.run)
    return 0
