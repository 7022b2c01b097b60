"""Rewrite a fixture's checkpoints into the OLD state-dict key format and verify with Goodfire's loader.

usage: GF_WORKSPACE=<dest_dir> SPD_SRC=<main export> python gen_old_keys.py <source_fixture> <dest_dir>

The rewrite is the inverse of Goodfire's `handle_deprecated_state_dict_keys_` (main @ 3f0bb61e):
  target_model.<m>.weight  (m decomposed)  -> patched_model.<m>.original.weight
  target_model.<other>                      -> patched_model.<other>
  _components.<m-mangled>.{U,V}             -> patched_model.<m>.components.{U,V}
  _ci_fns.<...>                             -> _gates.<...>
  _components.<m-mangled>.bias              -> unchanged: main has no migration for the old
                                               `.components.bias` / `.original.bias` keys, so a
                                               checkpoint that used them would not load there.
Tensors are re-keyed, not copied, so storage sharing (tied TMS weights, wte/lm_head) is kept.
All other run files are copied unchanged (final_config.yaml stays in the current format).

Verification: `ComponentModel.from_pretrained(<dest>/model_<N>.pth)` (their loader, which applies
`handle_deprecated_state_dict_keys_` and a strict `load_state_dict`) must give a state dict whose
keys and tensors are exactly those of the source checkpoint (torch.equal), for every checkpoint.
"""

import os
import shutil
import sys
from pathlib import Path

SRC = Path(sys.argv[1]).resolve()
DEST = Path(sys.argv[2]).resolve()
if DEST.exists():
    shutil.rmtree(DEST)
shutil.copytree(SRC, DEST, ignore=shutil.ignore_patterns("reference.json", "model_*.pth"))
os.environ["GF_WORKSPACE"] = str(DEST)
os.chdir(DEST)

import _bootstrap  # noqa: E402
import torch  # noqa: E402

from spd.models.component_model import ComponentModel  # noqa: E402


def to_old_keys(sd: dict[str, torch.Tensor], modules: list[str]) -> dict[str, torch.Tensor]:
    mangled = {m.replace(".", "-"): m for m in modules}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith("target_model."):
            path = k.removeprefix("target_model.")
            mod, _, leaf = path.rpartition(".")
            if leaf == "weight" and mod in modules:
                nk = f"patched_model.{mod}.original.weight"
            else:
                nk = "patched_model." + path
        elif k.startswith("_components."):
            mm, _, leaf = k.removeprefix("_components.").rpartition(".")
            if leaf in ("U", "V"):
                nk = f"patched_model.{mangled[mm]}.components.{leaf}"
            else:
                nk = k
        elif k.startswith("_ci_fns."):
            nk = "_gates." + k.removeprefix("_ci_fns.")
        else:
            raise ValueError(k)
        assert nk not in out
        out[nk] = v
    return out


def main() -> None:
    ckpts = sorted(SRC.glob("model_*.pth"))
    assert ckpts
    for ckpt in ckpts:
        src_sd = torch.load(ckpt, map_location="cpu", weights_only=True)
        # module list exactly as Goodfire's loader builds it (source checkpoint placed in DEST
        # for a moment so that relative pretrained_model_path/name values resolve)
        tmp = DEST / ("_src_" + ckpt.name)
        shutil.copy2(ckpt, tmp)
        modules = ComponentModel.from_pretrained(tmp).target_module_paths
        tmp.unlink()
        old = to_old_keys(src_sd, list(modules))
        torch.save(old, DEST / ckpt.name)

        loaded = ComponentModel.from_pretrained(DEST / ckpt.name).state_dict()
        assert set(loaded) == set(src_sd), set(loaded) ^ set(src_sd)
        for k in src_sd:
            assert torch.equal(loaded[k], src_sd[k]), k
        n_old = sum(1 for k in old if k.startswith(("patched_model.", "_gates.")))
        print(f"{ckpt.name}: {len(old)} keys ({n_old} in old format); their loader restores "
              "identical tensors")


if __name__ == "__main__":
    main()
