"""The import structure of spd_mcp follows its layering rule (tests/layering.py), read from the
code; a planted violation of each kind is caught."""

from __future__ import annotations

from pathlib import Path

import spd_mcp
from tests.layering import ALLOWED, unit_of, violations

ROOT = Path(spd_mcp.__file__).parent


def test_spd_mcp_follows_the_layering_rule() -> None:
    found = violations(ROOT)
    assert not found, "\n".join(found)


def test_every_unit_has_a_rule() -> None:
    units = {unit_of(m) for m in _modules(ROOT)}
    assert units <= set(ALLOWED), f"units without a rule: {sorted(units - set(ALLOWED))}"


def _modules(root: Path) -> list[str]:
    from tests.layering import module_name

    return [module_name(root, p) for p in root.rglob("*.py")]


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "spd_mcp"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    return root


def test_a_face_importing_a_face_is_caught(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"viewer/app.py": "from spd_mcp.tools.common import state\n",
                            "tools/common.py": "x = 1\n"})
    found = violations(root)
    assert len(found) == 1
    assert found[0].startswith("layering: viewer may import only [")
    assert "spd_mcp/viewer/app.py:1 imports spd_mcp.tools.common (tools)" in found[0]


def test_an_upward_import_inside_a_function_is_caught(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "analysis/graph.py": "def f():\n    from spd_mcp.service.state import AppState\n",
        "service/state.py": "",
    })
    (found,) = violations(root)
    assert "spd_mcp/analysis/graph.py:2 imports spd_mcp.service.state (service)" in found


def test_type_checking_imports_do_not_count(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "model/zoo.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                        "    from spd_mcp.service.state import AppState\n",
        "service/state.py": "",
    })
    assert violations(root) == []


def test_an_import_circle_is_caught(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"model/a.py": "from spd_mcp.model import b\n",
                            "model/b.py": "def f():\n    from spd_mcp.model.a import x\n"})
    assert violations(root) == ["import circle: spd_mcp.model.a -> spd_mcp.model.b"]


def test_mcp_outside_the_mcp_face_and_torch_in_the_foundation_are_caught(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"service/x.py": "from mcp.server.mcpserver import Context\n",
                            "paths.py": "import torch\n",
                            "tools/y.py": "from mcp.server.mcpserver import Context\n"})
    found = sorted(violations(root))
    assert len(found) == 2
    assert found[0].startswith("mcp only in the MCP face: spd_mcp/service/x.py:1 (service)")
    assert found[1].startswith("torch-free: spd_mcp/paths.py:1 (paths)")


def test_the_zoo_by_name_outside_the_model_is_caught(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"analysis/graph.py": "from spd_mcp.model.zoo.x import T\n",
                            "model/zoo/x.py": "T = 1\n"})
    (found,) = violations(root)
    assert found.startswith("zoo only through target adapters: spd_mcp/analysis/graph.py:1")
