"""Build a TMS / ResidMLP fixture with Goodfire's own training entry points.

usage: GF_WORKSPACE=<build_dir> SPD_SRC=<spd export> python gen_toy.py <name> <build_dir>

1. trains the tiny target model with Goodfire's `train_tms.run_train` / `train_resid_mlp.run_train`
   (a few hundred steps) and writes that target run into <build_dir>/target/ (their file names);
2. runs Goodfire's decomposition script (`tms_decomposition.main` / `resid_mlp_decomposition.main`)
   for a few optimisation steps, which writes a normal SPD run directory under $SPD_OUT_DIR/spd/;
3. copies that run directory into <build_dir>/.

`pretrained_model_path` in the SPD config is the relative ModelPath `target/<file>`; Goodfire's
settings resolve it against GITHUB_WORKSPACE (set from GF_WORKSPACE by _bootstrap).
"""

import hashlib
import shutil
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (must come before any spd import)
import yaml

NAME = sys.argv[1]
BUILD = Path(sys.argv[2]).resolve()

COMMON = dict(
    wandb_project=None,
    seed=0,
    autocast_bf16=False,
    n_mask_samples=1,
    sampling="continuous",
    sigmoid_type="leaky_hard",
    use_delta_component=True,
    output_loss_type="mse",
    batch_size=32,
    eval_batch_size=32,
    lr_schedule=dict(start_val=1e-2, fn_type="cosine", warmup_pct=0.0, final_val_frac=0.1),
    faithfulness_warmup_steps=2,
    faithfulness_warmup_lr=0.01,
    faithfulness_warmup_weight_decay=0.1,
    n_eval_steps=1,
    ci_alive_threshold=0.1,
    eval_metric_configs=[dict(classname="CI_L0", groups=None)],
)

TMS_LOSSES = [
    dict(classname="ImportanceMinimalityLoss", coeff=3e-3, pnorm=1.0, beta=0),
    dict(classname="StochasticReconLoss", coeff=1.0),
    dict(classname="StochasticReconLayerwiseLoss", coeff=1.0),
]


def tms_cfg(**kw):
    cfg = dict(COMMON)
    cfg.update(
        loss_metric_configs=TMS_LOSSES,
        pretrained_model_class="spd.experiments.tms.models.TMSModel",
        pretrained_model_path="target/tms.pth",
        task_config=dict(
            task_name="tms", feature_probability=0.2, data_generation_type="at_least_zero_active"
        ),
    )
    cfg.update(kw)
    return cfg


SPECS = {
    "tms-5-2-tied": dict(
        kind="tms",
        target=dict(n_features=5, n_hidden=2, n_hidden_layers=0, fixed_identity=False),
        spd=tms_cfg(
            ci_fn_type="mlp",
            ci_fn_hidden_dims=[4],
            module_info=[dict(module_pattern="linear1", C=6), dict(module_pattern="linear2", C=6)],
            # steps=10 with save_freq=4 -> model_4.pth, model_8.pth, model_10.pth (numeric vs
            # lexicographic "latest checkpoint" choice matters: model_8 > model_10 as strings)
            steps=10,
            save_freq=4,
            train_log_freq=5,
            eval_freq=5,
            slow_eval_freq=10,
        ),
    ),
    "tms-5-2-id": dict(
        kind="tms",
        target=dict(n_features=5, n_hidden=2, n_hidden_layers=1, fixed_identity=True),
        spd=tms_cfg(
            ci_fn_type="mlp",
            ci_fn_hidden_dims=[4],
            module_info=[
                dict(module_pattern="linear1", C=6),
                dict(module_pattern="linear2", C=6),
                dict(module_pattern="hidden_layers.0", C=6),
            ],
            identity_module_info=[dict(module_pattern="linear2", C=3)],
            steps=6,
            save_freq=None,
            train_log_freq=3,
            eval_freq=3,
            slow_eval_freq=6,
        ),
    ),
    "resid-mlp-1": dict(
        kind="resid_mlp",
        target=dict(n_features=6, d_embed=8, d_mlp=4, n_layers=1, act_fn_name="relu"),
        spd=dict(
            COMMON,
            ci_fn_type="vector_mlp",
            ci_fn_hidden_dims=[3],
            module_info=[
                dict(module_pattern="layers.*.mlp_in", C=5),
                dict(module_pattern="layers.*.mlp_out", C=5),
            ],
            identity_module_info=None,
            loss_metric_configs=[
                dict(classname="ImportanceMinimalityLoss", coeff=1e-5, pnorm=2.0, beta=0),
                dict(classname="StochasticReconLayerwiseLoss", coeff=1.0),
                dict(classname="StochasticReconLoss", coeff=1.0),
            ],
            steps=6,
            save_freq=None,
            train_log_freq=3,
            eval_freq=3,
            slow_eval_freq=6,
            pretrained_model_class="spd.experiments.resid_mlp.models.ResidMLP",
            pretrained_model_path="target/resid_mlp.pth",
            task_config=dict(
                task_name="resid_mlp",
                feature_probability=0.2,
                data_generation_type="at_least_zero_active",
            ),
        ),
    ),
    # dev-branch format: ci_config block, keys ci_fn._ci_fns.*
    "dev-layerwise": dict(
        kind="tms",
        src="dev",
        target=dict(n_features=5, n_hidden=2, n_hidden_layers=0, fixed_identity=False),
        spd=tms_cfg(
            ci_config=dict(mode="layerwise", fn_type="vector_mlp", hidden_dims=[4]),
            module_info=[dict(module_pattern="linear1", C=6), dict(module_pattern="linear2", C=6)],
            steps=6,
            save_freq=None,
            train_log_freq=3,
            eval_freq=3,
            slow_eval_freq=6,
        ),
    ),
}


class _Stamp:
    """Stand-in for spd.utils.run_utils.ExecutionStamp (which shells out to git in REPO_ROOT)."""

    def __init__(self, out_dir: Path):
        self.run_id = "t-fixture"
        self.out_dir = out_dir

    @classmethod
    def factory(cls, out_dir: Path):
        return type("ExecutionStamp", (), {"create": staticmethod(lambda **_: cls(out_dir))})


def train_target(spec: dict, target_dir: Path) -> None:
    from spd.configs import ScheduleConfig

    target_dir.mkdir(parents=True, exist_ok=True)
    t = spec["target"]
    if spec["kind"] == "tms":
        from spd.experiments.tms import train_tms
        from spd.experiments.tms.configs import TMSModelConfig, TMSTrainConfig

        train_tms.ExecutionStamp = _Stamp.factory(target_dir)
        config = TMSTrainConfig(
            wandb_project=None,
            tms_model_config=TMSModelConfig(
                n_features=t["n_features"],
                n_hidden=t["n_hidden"],
                n_hidden_layers=t["n_hidden_layers"],
                tied_weights=True,
                device="cpu",
                init_bias_to_zero=False,
            ),
            feature_probability=0.2,
            batch_size=256,
            steps=300,
            seed=0,
            lr_schedule=ScheduleConfig(start_val=5e-3, fn_type="constant"),
            data_generation_type="at_least_zero_active",
            fixed_identity_hidden_layers=t["fixed_identity"],
            fixed_random_hidden_layers=False,
        )
        _bootstrap.torch.manual_seed(0)
        train_tms.run_train(config, device="cpu")
        keep = {"tms_train_config.yaml", "tms.pth"}
    else:
        from spd.experiments.resid_mlp import train_resid_mlp
        from spd.experiments.resid_mlp.configs import ResidMLPModelConfig, ResidMLPTrainConfig

        train_resid_mlp.ExecutionStamp = _Stamp.factory(target_dir)
        config = ResidMLPTrainConfig(
            wandb_project=None,
            seed=0,
            resid_mlp_model_config=ResidMLPModelConfig(
                n_features=t["n_features"],
                d_embed=t["d_embed"],
                d_mlp=t["d_mlp"],
                n_layers=t["n_layers"],
                act_fn_name=t["act_fn_name"],
                in_bias=True,
                out_bias=True,
            ),
            label_fn_seed=0,
            label_type="act_plus_resid",
            loss_type="readoff",
            use_trivial_label_coeffs=True,
            feature_probability=0.2,
            importance_val=1,
            data_generation_type="at_least_zero_active",
            batch_size=256,
            steps=300,
            print_freq=100,
            lr_schedule=ScheduleConfig(start_val=3e-3, fn_type="cosine"),
            fixed_random_embedding=True,
            fixed_identity_embedding=False,
        )
        from spd.utils.general_utils import set_seed

        set_seed(config.seed)
        train_resid_mlp.run_train(config, device="cpu")
        keep = {"resid_mlp_train_config.yaml", "resid_mlp.pth", "label_coeffs.json"}
    for f in target_dir.iterdir():  # drop the analysis plots; keep what RunInfo loads
        if f.name not in keep:
            f.unlink()


def main() -> None:
    spec = SPECS[NAME]
    want = "2ab728c04940a71ee34948733e0c10e322367509" if spec.get("src") == "dev" else (
        "3f0bb61ebb56c493f8de5c21618d866bbed60298"
    )
    assert _bootstrap.spd_commit() == want, (_bootstrap.spd_commit(), want)
    if BUILD.exists():
        shutil.rmtree(BUILD)
    BUILD.mkdir(parents=True)
    train_target(spec, BUILD / "target")

    cfg_path = Path(_bootstrap.os.environ["SPD_OUT_DIR"]) / f"{NAME}_config.yaml"
    with open(cfg_path, "w") as f:
        yaml.dump(spec["spd"], f, sort_keys=False)
    run_id = "s-" + hashlib.sha256(NAME.encode()).hexdigest()[:8]

    if spec["kind"] == "tms":
        from spd.experiments.tms.tms_decomposition import main as decompose
    else:
        from spd.experiments.resid_mlp.resid_mlp_decomposition import main as decompose
    from spd.settings import SPD_OUT_DIR

    run_dir = SPD_OUT_DIR / "spd" / run_id
    if run_dir.exists():
        shutil.rmtree(run_dir)
    decompose(config_path=str(cfg_path), run_id=run_id)

    for f in sorted(run_dir.iterdir()):
        if f.is_dir():  # figures/ (CI_L0 bar-chart JSON only; no image metrics configured)
            shutil.copytree(f, BUILD / f.name)
        else:
            shutil.copy2(f, BUILD / f.name)
    print("run_id", run_id)
    print("built", NAME, "->", BUILD, sorted(p.name for p in BUILD.iterdir()))


if __name__ == "__main__":
    main()
