"""The layering rule of ``spd_mcp``, read from the code's own imports (docs/architecture.md).

Every module belongs to one *unit* (a top-level module or package; ``cli.py`` modules anywhere
belong to the ``cli`` unit, the command line). A unit may import only the units ``ALLOWED`` lists
for it; imports inside functions count, imports under ``if TYPE_CHECKING:`` do not. On top of
that: no import circle between modules, ``mcp`` only in the MCP face (and the scripted demo, an
MCP client), and the foundation torch-free.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

FOUNDATION = frozenset({"keys", "errors", "paths", "files", "http", "lazy"})
COMPUTATIONS = frozenset({"analysis", "harvest", "attributions", "editing", "interp",
                          "investigation", "bench"})
FACES = frozenset({"tools", "viewer", "api", "launch", "demo", "benchrun", "sdkagent"})
BELOW_SERVICE = FOUNDATION | {"model"} | COMPUTATIONS

ALLOWED: dict[str, frozenset[str]] = {
    # foundation: the key grammar, errors, paths, durable writes, HTTP serving helpers
    "errors": frozenset(),
    "keys": frozenset({"errors"}),
    "paths": frozenset(),
    "files": frozenset(),
    "http": frozenset(),
    "lazy": frozenset(),
    # the SPD core, run I/O, targets and the run session
    "model": FOUNDATION,
    # pure computations on a loaded run
    "analysis": FOUNDATION | {"model"},
    "harvest": FOUNDATION | {"model"},
    "attributions": FOUNDATION | {"model"},
    "editing": FOUNDATION | {"model", "analysis"},
    "interp": FOUNDATION | {"model", "harvest", "attributions"},
    "investigation": FOUNDATION,
    "bench": FOUNDATION | {"model", "analysis", "investigation"},
    # the application layer
    "service": BELOW_SERVICE,
    # faces: never another face
    "tools": BELOW_SERVICE | {"service"},
    "viewer": BELOW_SERVICE | {"service"},
    "api": BELOW_SERVICE | {"service"},
    "launch": FOUNDATION | {"investigation"},
    "demo": FOUNDATION | {"model", "investigation"},
    # the bench runner drives agents through the investigation launcher (the one face a face
    # may build on: it adds grading around launches, it does not duplicate them)
    "benchrun": FOUNDATION | {"model", "investigation", "bench", "launch"},
    # the built-in Messages-API agent: an MCP client needing nothing of the package below it
    "sdkagent": FOUNDATION,
    # the command line dispatches to everything
    "cli": BELOW_SERVICE | {"service"} | FACES,
}
ZOO_ALLOWED = frozenset({"model", "demo", "cli"})
"""Units that may import the built-in targets (``spd_mcp.model.zoo``) by name; everything else
reaches a model through its adapter (topology, text target)."""
MCP_ALLOWED = frozenset({"tools", "demo", "benchrun", "sdkagent"})
"""Units that may import the ``mcp`` SDK (the MCP face, and the MCP clients: the demo, the
bench runner, the SDK agent)."""
TORCH_FREE = FOUNDATION | {"launch", "sdkagent"}


@dataclass(frozen=True)
class Import:
    module: str  # importing module, e.g. spd_mcp.viewer.app
    target: str  # imported module, e.g. spd_mcp.service.state (or an external name)
    line: int
    path: Path


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def unit_of(module: str) -> str:
    """The unit a module of the package belongs to."""
    parts = module.split(".")[1:]
    if not parts:
        return "api"  # spd_mcp/__init__.py: load_run, the Python API's entry
    if parts[-1] == "cli" or parts[-1].startswith("cli_"):
        return "cli"
    if parts[0] == "server":
        return "tools"  # the MCP server assembles the tool modules: one face
    return parts[0]


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _walk(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports(root: Path) -> list[Import]:
    """All imports of the package under ``root`` (resolved to module names)."""
    modules = {module_name(root, p) for p in root.rglob("*.py")}
    out = []
    for path in sorted(root.rglob("*.py")):
        mod = module_name(root, path)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in _walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out += [Import(mod, a.name, node.lineno, path) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for a in node.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{target}.{a.name}"
                    out.append(Import(mod, sub if sub in modules else target, node.lineno,
                                      path))
    return out


def violations(root: Path) -> list[str]:
    """Every broken rule, one line each, naming the rule, the file and the import."""
    found: list[str] = []
    pkg = root.name
    edges: dict[str, set[str]] = defaultdict(set)
    for imp in imports(root):
        src = unit_of(imp.module)
        where = f"{imp.path.relative_to(root.parent)}:{imp.line}"
        top = imp.target.split(".")[0]
        if top == pkg:
            edges[imp.module].add(imp.target)
            dst = unit_of(imp.target)
            if dst != src and dst not in ALLOWED.get(src, frozenset()):
                allowed = ", ".join(sorted(ALLOWED.get(src, frozenset()))) or "nothing"
                found.append(f"layering: {src} may import only [{allowed}], but {where} "
                             f"imports {imp.target} ({dst})")
            elif imp.target.startswith(f"{pkg}.model.zoo") and src not in ZOO_ALLOWED:
                found.append(f"zoo only through target adapters: {where} ({src}) imports "
                             f"{imp.target}")
        elif top in ("mcp", "mcp_types") and src not in MCP_ALLOWED:
            found.append(f"mcp only in the MCP face: {where} ({src}) imports {imp.target}")
        elif top == "torch" and src in TORCH_FREE:
            found.append(f"torch-free: {where} ({src}) imports {imp.target}")
    found += [f"import circle: {' -> '.join(c)}" for c in cycles(edges)]
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:  # Tarjan, recursive (the graph is a few hundred modules)
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out
