"""Compute <fixture>/reference.json with Goodfire's own loader and forward code.

usage: SPD_SRC=<spd export> python make_reference.py <fixture_dir> <scratch_dir>

The fixture is first copied to <scratch_dir> (so nothing is written next to it except
reference.json), and Goodfire's settings are pointed at that copy (GF_WORKSPACE -> CI /
GITHUB_WORKSPACE) so relative `pretrained_model_path` values resolve inside it; the process
also chdir()s there so relative `pretrained_model_name` values resolve inside it.

The model is loaded with `ComponentModel.from_pretrained(<copy>/model_<latest>.pth)` where the
latest checkpoint is picked with Goodfire's `fetch_latest_local_checkpoint(dir, prefix="model")`.
For `hf-gpt2` only: `hf_config/` holds just config.json, and HF `from_pretrained` needs a weights
file, so in the scratch copy we first write an arbitrary-weight `GPT2LMHeadModel(config)` there.
Every target weight is then overwritten by Goodfire's strict `load_state_dict` of the SPD
checkpoint (which contains all `target_model.*` tensors), so those arbitrary weights never reach
the numbers below (we assert the loaded state dict equals the checkpoint exactly).
"""

import json
import os
import shutil
import sys
from pathlib import Path

FIXTURE = Path(sys.argv[1]).resolve()
SCRATCH = Path(sys.argv[2]).resolve()
if SCRATCH.exists():
    shutil.rmtree(SCRATCH)
shutil.copytree(FIXTURE, SCRATCH, ignore=shutil.ignore_patterns("reference.json"))
os.environ["GF_WORKSPACE"] = str(SCRATCH)
os.chdir(SCRATCH)

import _bootstrap  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from spd.models.component_model import ComponentModel  # noqa: E402
from spd.models.components import make_mask_infos  # noqa: E402
from spd.utils.general_utils import fetch_latest_local_checkpoint  # noqa: E402

LM_TOKENS = [[1, 5, 7, 2, 9, 3]]
INPUT_SEED = 0
MASK_SEED = 12345


def tl(t: torch.Tensor):
    return t.detach().to(torch.float32).cpu().tolist()


def main() -> None:
    hf_cfg = SCRATCH / "hf_config"
    if hf_cfg.is_dir() and not any(hf_cfg.glob("*.safetensors")) and not any(hf_cfg.glob("*.bin")):
        import transformers

        cfg = transformers.AutoConfig.from_pretrained(str(hf_cfg))
        torch.manual_seed(999)
        transformers.GPT2LMHeadModel(cfg).save_pretrained(str(hf_cfg))

    ckpt = fetch_latest_local_checkpoint(SCRATCH, prefix="model")
    cm = ComponentModel.from_pretrained(ckpt)
    cm.eval()

    # the loaded model must hold exactly the checkpoint's tensors (after Goodfire's key migration)
    from spd.models.component_model import handle_deprecated_state_dict_keys_

    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    handle_deprecated_state_dict_keys_(raw)
    sd = cm.state_dict()
    assert set(sd) == set(raw), set(sd) ^ set(raw)
    for k in sd:
        assert torch.equal(sd[k], raw[k]), k

    is_lm = cm.pretrained_model_output_attr is not None
    if is_lm:
        x = torch.tensor(LM_TOKENS, dtype=torch.long)
        input_desc = "token ids, shape (1, 6)"
    else:
        n_features = cm.target_model.config.n_features
        g = torch.Generator().manual_seed(INPUT_SEED)
        vals = torch.rand(3, n_features, generator=g)
        keep = torch.rand(3, n_features, generator=g) < 0.6
        x = vals * keep
        input_desc = (
            f"float batch (3, {n_features}): torch.Generator().manual_seed({INPUT_SEED}); "
            "rand(3,n) * (rand(3,n) < 0.6)"
        )

    modules = list(cm.target_module_paths)
    with torch.no_grad():
        target_out = cm(x)
        cached = cm(x, cache_type="input")
        assert torch.equal(cached.output, target_out)
        pre = cached.cache
        ci = cm.calc_causal_importances(pre, sampling="continuous", detach_inputs=False)
        comp_acts = cm.get_all_component_acts(pre)

        out_ci = cm(x, mask_infos=make_mask_infos({m: ci.lower_leaky[m] for m in modules}))

        ones = {m: torch.ones_like(ci.lower_leaky[m]) for m in modules}
        deltas = cm.calc_weight_deltas()
        wdm = {m: (deltas[m], torch.ones(ci.lower_leaky[m].shape[:-1])) for m in modules}
        out_ones_delta = cm(x, mask_infos=make_mask_infos(ones, weight_deltas_and_masks=wdm))
        out_ones_nodelta = cm(x, mask_infos=make_mask_infos(ones))

        g = torch.Generator().manual_seed(MASK_SEED)
        rmask = {m: torch.rand(ci.lower_leaky[m].shape, generator=g) for m in modules}
        out_rand = cm(x, mask_infos=make_mask_infos(rmask))

    ref = {
        "fixture": FIXTURE.name,
        "spd_commit": _bootstrap.spd_commit(),
        "checkpoint": ckpt.name,
        "how": (
            "ComponentModel.from_pretrained(<fixture>/" + ckpt.name + ") with Goodfire's code at "
            "spd_commit, fp32 on CPU, no autocast, torch.no_grad(). target_output = cm(x). "
            "ci_* = cm.calc_causal_importances(cm(x, cache_type='input').cache, "
            "sampling='continuous') -- continuous sampling adds no noise, so ci_lower_leaky is "
            "exactly lower_leaky_fn(ci_pre_sigmoid) (leaky_hard: clamp(z,0,1)) and "
            "ci_upper_leaky is upper_leaky_fn(ci_pre_sigmoid). component_acts = "
            "cm.get_all_component_acts(cache). Masked outputs use "
            "cm(x, mask_infos=make_mask_infos(masks[, weight_deltas_and_masks])) on ALL "
            "decomposed modules at once (routing 'all'): output_ci_masked: masks = "
            "ci_lower_leaky, no delta; output_all_ones_with_delta: masks = 1, weight delta "
            "(target_weight - V@U orientation as in calc_weight_deltas) with delta mask 1; "
            "output_all_ones_no_delta: masks = 1, no delta; output_random_mask: masks = "
            "random_mask, no delta."
        ),
        "input_description": input_desc,
        "input": tl(x) if not is_lm else x.tolist(),
        "module_paths": modules,
        "C": {m: int(cm.module_to_c[m]) for m in modules},
        "sigmoid_type": yaml.safe_load((SCRATCH / "final_config.yaml").read_text())["sigmoid_type"],
        "target_output": tl(target_out),
        "ci_pre_sigmoid": {m: tl(ci.pre_sigmoid[m]) for m in modules},
        "ci_lower_leaky": {m: tl(ci.lower_leaky[m]) for m in modules},
        "ci_upper_leaky": {m: tl(ci.upper_leaky[m]) for m in modules},
        "component_acts": {m: tl(comp_acts[m]) for m in modules},
        "output_ci_masked": tl(out_ci),
        "output_all_ones_with_delta": tl(out_ones_delta),
        "max_abs_diff_all_ones_with_delta_vs_target": float(
            (out_ones_delta - target_out).abs().max()
        ),
        "output_all_ones_no_delta": tl(out_ones_nodelta),
        "random_mask_description": (
            f"torch.Generator().manual_seed({MASK_SEED}); torch.rand(shape) per module, in "
            "module_paths order"
        ),
        "random_mask": {m: tl(rmask[m]) for m in modules},
        "output_random_mask": tl(out_rand),
    }
    with open(FIXTURE / "reference.json", "w") as f:
        f.write("{\n")
        items = list(ref.items())
        for i, (k, v) in enumerate(items):
            f.write(f"  {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}")
            f.write(",\n" if i < len(items) - 1 else "\n")
        f.write("}\n")
    print(
        f"wrote {FIXTURE / 'reference.json'}: modules={modules} "
        f"max|ones+delta - target|={ref['max_abs_diff_all_ones_with_delta_vs_target']:.3g} "
        f"max|target|={target_out.abs().max():.3g} "
        f"max|ci_out - target|={(out_ci - target_out).abs().max():.3g}"
    )
    for m in modules:
        z = ci.pre_sigmoid[m]
        print(f"  {m}: pre-sigmoid range [{z.min():.3f}, {z.max():.3f}], "
              f"frac in (0,1): {((z > 0) & (z < 1)).float().mean():.2f}")


if __name__ == "__main__":
    main()
