import pytest

from spd_mcp.model.config import ConfigError, load_config, parse_config

BASE = {
    "name": "t",
    "target": {"zoo": "tms-5-2"},
    "modules": [{"pattern": "linear*", "C": 4}],
    "losses": [{"type": "faithfulness", "coeff": 1.0}],
    "steps": 1,
    "batch_size": 2,
    "lr": 1e-3,
}


def test_unknown_top_level_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rate'"):
        parse_config({**BASE, "learning_rate": 1})


def test_unknown_nested_key_is_named():
    bad = {**BASE, "losses": [{"type": "stochastic_recon", "coeff": 1, "routng": "all"}]}
    with pytest.raises(ConfigError, match=r"unknown key 'losses.0.stochastic_recon.routng'"):
        parse_config(bad)


def test_bad_values_are_explained():
    with pytest.raises(ConfigError, match=r"modules.0.C"):
        parse_config({**BASE, "modules": [{"pattern": "x", "C": 0}]})
    with pytest.raises(ConfigError, match=r"losses.0"):
        parse_config({**BASE, "losses": [{"type": "nonsense", "coeff": 1}]})


def test_yaml_and_json_files(tmp_path):
    import json

    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "c.json").write_text(json.dumps(BASE))
    assert load_config(tmp_path / "c.yaml") == load_config(tmp_path / "c.json")
    (tmp_path / "c.toml").write_text("")
    with pytest.raises(ConfigError, match=r"must be \.yaml"):
        load_config(tmp_path / "c.toml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_zoo_default_configs_validate():
    from spd_mcp.model.zoo import get_entry, zoo_names

    for name in zoo_names():
        try:
            entry = get_entry(name)
        except ImportError:
            continue  # an entry still being built is reported by `zoo list`
        parse_config(entry.default_config(), source=name)
