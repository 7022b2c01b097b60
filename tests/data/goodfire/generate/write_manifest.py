"""Write tests/data/goodfire/manifest.json (machine-readable index of the fixtures)."""

import json
import sys
from pathlib import Path

import torch
import yaml

DEST = Path(sys.argv[1]).resolve()

NOTES = {
    "tms-5-2-tied": "TMSModel 5-2 tied_weights; ci mlp[4]; 3 checkpoints (model_4/8/10; latest is "
    "model_10, which sorts BEFORE model_4/model_8 as a string). linear2 target weight and "
    "linear2 U/V are stored as transposed views of linear1 tensors.",
    "tms-5-2-id": "TMSModel 5-2 with 1 fixed-identity hidden layer; decomposes linear1, linear2, "
    "hidden_layers.0 and an inserted identity linear2.pre_identity (C=3); ci mlp[4].",
    "resid-mlp-1": "ResidMLP n_features=6 d_embed=8 d_mlp=4 1 layer relu, in/out biases; "
    "ci vector_mlp[3]. label_coeffs.json is written by Goodfire's resid_mlp_decomposition.",
    "llama-simple-mlp": "LlamaSimpleMLP 2L d16 2 heads 1 kv head, n_int 32; ci shared_mlp[5]; "
    "pretrain/ holds the pretrain-style run (model_config.yaml etc.).",
    "llama-simple": "LlamaSimple 1L d16 4 heads 2 kv heads (GQA), SwiGLU n_int 24; ci mlp[3]; wte "
    "(EmbeddingComponents) and lm_head decomposed (tied in target, independent components).",
    "gpt2-simple": "GPT2Simple 1L d16 2 heads; q/k/v/o + c_fc/down_proj (all with bias); "
    "ci vector_mlp[3].",
    "hf-gpt2": "transformers.GPT2LMHeadModel 1L d16 2 heads (Conv1D weights (d_in,d_out)); "
    "c_attn + c_fc; ci shared_mlp[4]; hf_config/config.json only (no weights; the SPD "
    "checkpoint holds every target tensor).",
    "dev-layerwise": "DEV branch: TMS 5-2 tied, ci_config layerwise vector_mlp[4]; keys "
    "ci_fn._ci_fns.*",
    "dev-global": "DEV branch: LlamaSimpleMLP (same arch as llama-simple-mlp) with wte, o_proj, "
    "c_fc, down_proj; ci_config global global_shared_mlp[6]; keys ci_fn._global_ci_fn.*",
    "old-keys": "tms-5-2-tied with all checkpoints re-keyed into the old format (patched_model., "
    ".original.weight, .components.{U,V}, _gates.); same numbers as tms-5-2-tied.",
    "old-keys-gpt2-simple": "gpt2-simple re-keyed into the old format; same numbers as "
    "gpt2-simple.",
}


def main() -> None:
    out = {}
    for d in sorted(p for p in DEST.iterdir() if p.is_dir() and p.name != "generate"):
        ref = json.loads((d / "reference.json").read_text())
        cfg = yaml.safe_load((d / "final_config.yaml").read_text())
        ckpts = sorted(d.glob("model_*.pth"), key=lambda p: int(p.stem.split("_")[-1]))
        sd = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
        prefixes = sorted({".".join(k.split(".")[:2]) if k.startswith("ci_fn.") else k.split(".")[0]
                           for k in sd})
        files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
        out[d.name] = dict(
            spd_commit=ref["spd_commit"],
            spd_branch="dev" if ref["spd_commit"].startswith("2ab728c0") else "main",
            latest_checkpoint=ckpts[-1].name,
            checkpoints=[p.name for p in ckpts],
            pretrained_model_class=cfg["pretrained_model_class"],
            pretrained_model_path=cfg.get("pretrained_model_path"),
            pretrained_model_name=cfg.get("pretrained_model_name"),
            ci=cfg.get("ci_config") or dict(ci_fn_type=cfg.get("ci_fn_type"),
                                             ci_fn_hidden_dims=cfg.get("ci_fn_hidden_dims")),
            module_paths=ref["module_paths"],
            state_dict_key_prefixes=prefixes,
            files=files,
            bytes=sum(p.stat().st_size for p in d.rglob("*") if p.is_file()),
            notes=NOTES.get(d.name, ""),
        )
    (DEST / "manifest.json").write_text(json.dumps(out, indent=1) + "\n")
    print("manifest:", len(out), "fixtures")


if __name__ == "__main__":
    main()
