import json
import subprocess
import sys

import pytest
import torch
import yaml

from spd_mcp.model.config import parse_config
from spd_mcp.model.decompose import decompose
from spd_mcp.model.run_io import RunError, list_runs, load_run, resolve_run

BYO = {
    "name": "byo",
    "target": {"factory": "tests.byo_model:make", "kwargs": {"hidden": 8},
               "data": "tests.byo_model:data", "output_loss": "kl"},
    "modules": [
        {"pattern": "embed", "C": 5}, {"pattern": "up", "C": 6}, {"pattern": "down", "C": 7}
    ],
    "losses": [
        {"type": "faithfulness", "coeff": 1},
        {"type": "importance_minimality", "coeff": 1e-3},
        {"type": "stochastic_recon", "coeff": 1},
    ],
    "steps": 4, "batch_size": 8, "lr": 1e-3, "eval_every": 2, "eval_batch_size": 16,
}


def test_saved_run_reloads_to_identical_outputs(tmp_path):
    config = parse_config(BYO)
    out = decompose(config, out=tmp_path / "byo")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["DONE", "components.safetensors", "metrics.jsonl", "run.json",
                     "target.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    a, b = load_run(out), load_run(str(out))
    ids = torch.randint(0, 11, (3, 4))
    out_a, ci_a = a.model.ci_for(ids)
    out_b, ci_b = b.model.ci_for(ids)
    assert torch.equal(out_a, out_b)
    for n in a.model.layer_names:
        assert torch.equal(ci_a.lower[n], ci_b.lower[n])
        assert torch.equal(a.model(ids, masks=ci_a.lower), b.model(ids, masks=ci_b.lower))
    meta = json.loads((out / "run.json").read_text())
    assert meta["schema_version"] == 1 and meta["layers"]["up"]["C"] == 6
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "layers" in r] == [0, 2, 4]


def test_refuses_to_overwrite_and_replaces_atomically(tmp_path):
    config = parse_config({**BYO, "steps": 1})
    out = decompose(config, out=tmp_path / "r")
    with pytest.raises(RunError, match="already exists"):
        decompose(config, out=out)
    decompose(config, out=out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_incomplete_run_is_refused(tmp_path):
    config = parse_config({**BYO, "steps": 1})
    out = decompose(config, out=tmp_path / "r")
    (out / "DONE").unlink()
    with pytest.raises(RunError, match="no DONE marker"):
        load_run(out)


def test_run_by_name_under_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SPD_MCP_HOME", str(tmp_path))
    config = parse_config({**BYO, "steps": 1})
    decompose(config, out=tmp_path / "runs" / "named")
    assert resolve_run("named") == tmp_path / "runs" / "named"
    assert ("named", tmp_path / "runs" / "named") in list_runs()
    with pytest.raises(RunError, match="not found"):
        resolve_run("missing-run")


def test_tampered_components_file_is_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    out = decompose(parse_config({**BYO, "steps": 1}), out=tmp_path / "r")
    state = load_file(str(out / "components.safetensors"))
    state["components.up.V"] = torch.zeros(3, 3)
    state["extra"] = torch.zeros(1)
    save_file(state, str(out / "components.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\].*components.up.V"):
        load_run(out)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "spd_mcp.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_cli_decompose_bring_your_own(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(BYO))
    r = _cli("decompose", str(cfg), "--out", str(tmp_path / "run"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "DONE").exists()
    r = _cli("evaluate", str(tmp_path / "run"), "--json")
    assert r.returncode == 0, r.stderr
    layers = json.loads(r.stdout)["layers"]
    assert {n: v["C"] for n, v in layers.items()} == {"embed": 5, "up": 6, "down": 7}


def test_cli_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**BYO, "bogus_key": 1}))
    r = _cli("decompose", str(bad))
    assert r.returncode == 2 and "unknown key 'bogus_key'" in r.stderr
    r = _cli("decompose", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "config file not found" in r.stderr
    r = _cli("zoo", "build", "no-such-model")
    assert r.returncode == 2 and "unknown zoo target 'no-such-model'" in r.stderr
    r = _cli("evaluate", "no-such-run")
    assert r.returncode == 2 and "not found" in r.stderr
    r = _cli("zoo", "build", "tms-5-2", "--device", "tpu")
    assert r.returncode == 2 and "--device" in r.stderr
    nomatch = tmp_path / "nomatch.yaml"
    nomatch.write_text(yaml.safe_dump({**BYO, "modules": [{"pattern": "zzz", "C": 2}]}))
    r = _cli("decompose", str(nomatch), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "'zzz' matches no" in r.stderr


def test_cli_zoo_list():
    r = _cli("zoo", "list")
    assert r.returncode == 0
    for name in ("tms-5-2", "tms-5-2-id", "tms-40-10", "resid-mlp", "induction", "tales"):
        assert name in r.stdout


def test_shipped_run_checksums_are_verified(tmp_path):
    from spd_mcp.model.run_io import ship_run

    src = decompose(parse_config({**BYO, "steps": 1}), out=tmp_path / "src")
    (src / "extra").mkdir()
    (src / "extra" / "notes.txt").write_text("sub-directories ship too (e.g. hf/)")
    dst = ship_run(src, tmp_path / "shipped")
    manifest = json.loads((dst / "manifest.json").read_text())["sha256"]
    assert set(manifest) == {"components.safetensors", "metrics.jsonl", "run.json",
                             "target.safetensors", "extra/notes.txt"}
    load_run(dst)  # verifies
    (dst / "extra" / "notes.txt").write_text("tampered")
    with pytest.raises(RunError, match=r"checksum mismatch .*extra/notes.txt"):
        load_run(dst)
    (dst / "extra" / "notes.txt").write_text("sub-directories ship too (e.g. hf/)")
    with open(dst / "target.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(RunError, match=r"checksum mismatch .*target.safetensors"):
        load_run(dst)
