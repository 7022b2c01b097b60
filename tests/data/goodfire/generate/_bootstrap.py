"""Shared set-up for the fixture generators (import this before anything from `spd`).

Environment variables:
  SPD_SRC        root of an unmodified export of goodfire-ai/spd (default /tmp/gf_src/main)
  SPD_OUT_DIR    Goodfire's own output-dir setting; we point it at scratch (default /tmp/gf_out)
  GF_WORKSPACE   directory that relative `ModelPath`s should resolve against. We pass it to
                 Goodfire's settings via their own CI hook (CI=1, GITHUB_WORKSPACE=...), so a
                 config value such as `target/tms.pth` means `<fixture dir>/target/tms.pth`.
"""

import os
import sys
from pathlib import Path

sys.dont_write_bytecode = True
HERE = Path(__file__).resolve().parent
SPD_SRC = Path(os.environ.get("SPD_SRC", "/tmp/gf_src/main")).resolve()
os.environ.setdefault("SPD_OUT_DIR", "/tmp/gf_out")
os.environ.setdefault("WANDB_MODE", "disabled")
if os.environ.get("GF_WORKSPACE"):
    os.environ["CI"] = "1"
    os.environ["GITHUB_WORKSPACE"] = str(Path(os.environ["GF_WORKSPACE"]).resolve())

sys.path.insert(0, str(HERE))
import py311_compat  # noqa: E402

py311_compat.install(SPD_SRC)

import torch  # noqa: E402

torch.set_num_threads(1)


def spd_commit() -> str:
    """Commit of the export in SPD_SRC (written by gen_all.sh as SPD_SRC/.commit)."""
    f = SPD_SRC / ".commit"
    return f.read_text().strip() if f.exists() else "unknown"
