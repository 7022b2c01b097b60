"""Build an LM fixture with Goodfire's own SPD training entry point (`spd.run_spd.run_experiment`).

usage: GF_WORKSPACE=<build_dir> SPD_SRC=<spd export> python gen_lm.py <name> <build_dir>

Goodfire's `lm_decomposition.main` differs from what we do only in where the data come from (it
streams a HuggingFace dataset, which we cannot download): we replicate its target-model loading
verbatim (`PretrainRunInfo.from_path` + `from_run_info`, or HF `from_pretrained`) and feed
`run_experiment` a tiny DataLoader of random token ids ({"input_ids": ...} batches).

Target models are NOT pretrained: the model class is instantiated (seed 0) and every parameter
is re-drawn with scaled Gaussian noise so that logits are O(1). For `spd.pretrain` models we
then write a pretrain-style run with Goodfire's own `spd.pretrain.train.save_configs` /
`save_model` into <build_dir>/pretrain/ (final_config.yaml, model_config.yaml,
checkpoints/model_step_0.pt); `pretrained_model_name` is the relative path
`pretrain/checkpoints/model_step_0.pt` (resolved against the working directory, which is
<build_dir> while training and the fixture dir when loading). For HF GPT-2 the config is saved
with `save_pretrained` into <build_dir>/hf_config/ and `pretrained_model_name` is `hf_config`;
the weights file is deleted after training (only config.json is kept).
"""

import hashlib
import math
import os
import shutil
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (must come before any spd import)
import torch
from torch.utils.data import DataLoader

NAME = sys.argv[1]
BUILD = Path(sys.argv[2]).resolve()
MAIN = "3f0bb61ebb56c493f8de5c21618d866bbed60298"
DEV = "2ab728c04940a71ee34948733e0c10e322367509"

LLAMA_MLP_CFG = dict(
    model_type="LlamaSimpleMLP",
    block_size=32,
    vocab_size=40,
    n_layer=2,
    n_head=2,
    n_embd=16,
    n_intermediate=32,
    rotary_dim=8,
    n_ctx=32,
    n_key_value_heads=1,
    flash_attention=False,
)

SPECS = {
    "llama-simple-mlp": dict(
        cls="spd.pretrain.models.llama_simple_mlp.LlamaSimpleMLP",
        model=LLAMA_MLP_CFG,
        spd=dict(
            ci_fn_type="shared_mlp",
            ci_fn_hidden_dims=[5],
            module_info=[
                dict(module_pattern="h.*.attn.*_proj", C=4),
                dict(module_pattern="h.*.mlp.c_fc", C=6),
                dict(module_pattern="h.*.mlp.down_proj", C=5),
            ],
        ),
    ),
    "llama-simple": dict(
        cls="spd.pretrain.models.llama_simple.LlamaSimple",
        model=dict(
            model_type="LlamaSimple",
            block_size=32,
            vocab_size=40,
            n_layer=1,
            n_head=4,
            n_embd=16,
            n_intermediate=24,
            rotary_dim=4,
            n_ctx=32,
            n_key_value_heads=2,
            use_grouped_query_attention=True,
            flash_attention=False,
        ),
        spd=dict(
            ci_fn_type="mlp",
            ci_fn_hidden_dims=[3],
            module_info=[
                dict(module_pattern="wte", C=5),
                dict(module_pattern="h.*.attn.*_proj", C=3),
                dict(module_pattern="h.*.mlp.*_proj", C=4),
                dict(module_pattern="lm_head", C=4),
            ],
        ),
    ),
    "gpt2-simple": dict(
        cls="spd.pretrain.models.gpt2_simple.GPT2Simple",
        model=dict(
            model_type="GPT2Simple",
            block_size=32,
            vocab_size=40,
            n_layer=1,
            n_head=2,
            n_embd=16,
            flash_attention=False,
        ),
        spd=dict(
            ci_fn_type="vector_mlp",
            ci_fn_hidden_dims=[3],
            module_info=[
                dict(module_pattern="h.*.attn.q_proj", C=3),
                dict(module_pattern="h.*.attn.k_proj", C=3),
                dict(module_pattern="h.*.attn.v_proj", C=3),
                dict(module_pattern="h.*.attn.o_proj", C=3),
                dict(module_pattern="h.*.mlp.c_fc", C=4),
                dict(module_pattern="h.*.mlp.down_proj", C=4),
            ],
        ),
    ),
    "hf-gpt2": dict(
        cls="transformers.GPT2LMHeadModel",
        model=dict(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=32),
        spd=dict(
            ci_fn_type="shared_mlp",
            ci_fn_hidden_dims=[4],
            module_info=[
                dict(module_pattern="transformer.h.*.attn.c_attn", C=4),
                dict(module_pattern="transformer.h.*.mlp.c_fc", C=5),
            ],
        ),
    ),
    # dev-branch format with a global CI function (keys ci_fn._global_ci_fn.*)
    "dev-global": dict(
        src="dev",
        cls="spd.pretrain.models.llama_simple_mlp.LlamaSimpleMLP",
        model=LLAMA_MLP_CFG,
        spd=dict(
            ci_config=dict(mode="global", fn_type="global_shared_mlp", hidden_dims=[6]),
            module_info=[
                dict(module_pattern="wte", C=4),
                dict(module_pattern="h.*.attn.o_proj", C=3),
                dict(module_pattern="h.*.mlp.c_fc", C=5),
                dict(module_pattern="h.*.mlp.down_proj", C=4),
            ],
        ),
    ),
}

SPD_COMMON = dict(
    wandb_project=None,
    wandb_run_name=None,
    wandb_run_name_prefix="",
    seed=0,
    autocast_bf16=False,
    n_mask_samples=1,
    sampling="continuous",
    sigmoid_type="leaky_hard",
    identity_module_info=None,
    use_delta_component=True,
    loss_metric_configs=[
        dict(classname="ImportanceMinimalityLoss", coeff=2e-3, pnorm=2.0, beta=0.1),
        dict(classname="StochasticReconSubsetLoss", coeff=0.5),
        dict(classname="StochasticReconLoss", coeff=0.5),
        dict(classname="FaithfulnessLoss", coeff=1.0),
    ],
    output_loss_type="kl",
    steps=4,
    batch_size=8,
    faithfulness_warmup_steps=2,
    faithfulness_warmup_lr=0.01,
    faithfulness_warmup_weight_decay=0.0,
    lr_schedule=dict(start_val=1e-2, fn_type="cosine", warmup_pct=0.0, final_val_frac=0.1),
    train_log_freq=2,
    eval_freq=2,
    eval_batch_size=8,
    slow_eval_freq=4,
    n_eval_steps=1,
    slow_eval_on_first_step=True,
    save_freq=None,
    eval_metric_configs=[dict(classname="CI_L0", groups=None)],
    ci_alive_threshold=0.0,
    pretrained_model_path=None,
    tokenizer_name=None,
    task_config=dict(
        task_name="lm",
        max_seq_len=16,
        buffer_size=1000,
        dataset_name="SimpleStories/SimpleStories",
        column_name="story",
        train_data_split="train",
        eval_data_split="test",
        shuffle_each_epoch=True,
        is_tokenized=False,
        streaming=False,
    ),
)


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter so the untrained target gives O(1) logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                is_norm_weight = name.endswith("weight")
                noise = torch.randn(p.shape, generator=g)
                p.copy_(1.0 + 0.1 * noise if is_norm_weight else 0.1 * noise)
            else:
                fan_in = p.shape[0] if "wte" in name or "wpe" in name else p.shape[-1]
                if type(model).__name__ == "GPT2LMHeadModel" and "transformer.h." in name:
                    fan_in = p.shape[0]  # HF Conv1D weight is (d_in, d_out)
                scale = 1.0 if ("wte" in name or "wpe" in name) else 1.0 / math.sqrt(fan_in)
                p.copy_(scale * torch.randn(p.shape, generator=g))


def token_loader(seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (32, 16), generator=g)
    rows = [{"input_ids": r} for r in ids]
    return DataLoader(rows, batch_size=8, shuffle=False)


def write_target(spec: dict) -> str:
    """Create the target model files; return the pretrained_model_name to use."""
    torch.manual_seed(0)
    if spec["cls"].startswith("transformers."):
        import transformers

        cfg = transformers.GPT2Config(**spec["model"])
        model = transformers.GPT2LMHeadModel(cfg)
        perturb_(model, seed=1)
        model.save_pretrained(str(BUILD / "hf_config"))  # weights removed after training
        return "hf_config"

    from spd.data import DatasetConfig
    from spd.pretrain.models import MODEL_CLASSES
    from spd.pretrain.train import Config as PretrainConfig
    from spd.pretrain.train import save_configs, save_model

    ds = dict(
        name="SimpleStories/SimpleStories",
        is_tokenized=False,
        hf_tokenizer_path=None,
        streaming=False,
        n_ctx=spec["model"]["block_size"] + 1,
        seed=0,
        column_name="story",
    )
    pcfg = PretrainConfig(
        wandb_project=None,
        train_dataset_config=DatasetConfig(split="train", **ds),
        val_dataset_config=DatasetConfig(split="test", **ds),
        output_dir=Path("target_models"),
        model=spec["model"],
        batch_size=8,
        num_iterations=1,
        learning_rate=3e-4,
        warmup_iters=0,
        learning_rate_decay_frac=0.1,
        weight_decay=0.1,
        grad_clip=1.0,
        val_loss_every=0,
        val_max_steps=0,
        sample_every=0,
        compile=False,
        device="cpu",
        dtype="float32",
        intermediate_checkpoints=True,
    )
    model = MODEL_CLASSES[pcfg.model.model_type](pcfg.model)
    perturb_(model, seed=1)
    out = BUILD / "pretrain"
    (out / "checkpoints").mkdir(parents=True)
    save_configs(
        out,
        config_dict=pcfg.model_dump(mode="json"),
        model_config_dict=pcfg.model.model_dump(mode="json"),
    )
    save_model(out / "checkpoints", model, step=0)
    return "pretrain/checkpoints/model_step_0.pt"


def load_target_like_lm_decomposition(config) -> torch.nn.Module:
    """Verbatim logic of spd/experiments/lm/lm_decomposition.py:main (target-model part)."""
    from spd.pretrain.run_info import PretrainRunInfo
    from spd.utils.general_utils import resolve_class

    pretrained_model_class = resolve_class(config.pretrained_model_class)
    if config.pretrained_model_class.startswith("spd.pretrain"):
        run_info = PretrainRunInfo.from_path(config.pretrained_model_name)
        if "model_type" not in run_info.model_config_dict:
            run_info.model_config_dict["model_type"] = config.pretrained_model_class.split(".")[-1]
        target_model = pretrained_model_class.from_run_info(run_info)
    else:
        target_model = pretrained_model_class.from_pretrained(config.pretrained_model_name)
    target_model.eval()
    return target_model


def main() -> None:
    spec = SPECS[NAME]
    want = DEV if spec.get("src") == "dev" else MAIN
    assert _bootstrap.spd_commit() == want, (_bootstrap.spd_commit(), want)
    if BUILD.exists():
        shutil.rmtree(BUILD)
    BUILD.mkdir(parents=True)
    os.chdir(BUILD)

    pretrained_model_name = write_target(spec)

    from spd.configs import Config
    from spd.run_spd import run_experiment
    from spd.settings import SPD_OUT_DIR
    from spd.utils.general_utils import set_seed

    cfg = dict(SPD_COMMON)
    cfg.update(spec["spd"])
    cfg.update(
        pretrained_model_class=spec["cls"],
        pretrained_model_name=pretrained_model_name,
        pretrained_model_output_attr="logits" if spec["cls"].startswith("transformers.") else "idx_0",
    )
    config = Config(**cfg)
    set_seed(config.seed)
    target_model = load_target_like_lm_decomposition(config)

    run_id = "s-" + hashlib.sha256(NAME.encode()).hexdigest()[:8]
    run_dir = SPD_OUT_DIR / "spd" / run_id
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_experiment(
        target_model=target_model,
        config=config,
        device="cpu",
        train_loader=token_loader(seed=config.seed),
        eval_loader=token_loader(seed=config.seed + 1),
        experiment_tag="lm",
        run_id=run_id,
    )

    for f in sorted(run_dir.iterdir()):
        if f.is_dir():
            shutil.copytree(f, BUILD / f.name)
        else:
            shutil.copy2(f, BUILD / f.name)
    hf = BUILD / "hf_config"
    if hf.is_dir():
        for f in hf.iterdir():
            if f.name != "config.json":
                f.unlink()
    print("run_id", run_id)
    print("built", NAME, "->", BUILD, sorted(p.name for p in BUILD.iterdir()))


if __name__ == "__main__":
    main()
