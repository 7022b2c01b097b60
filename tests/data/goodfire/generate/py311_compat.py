"""Import Goodfire's unmodified `spd` sources under Python 3.11.

Goodfire's `spd` declares `requires-python = "==3.13.*"`, but the only CPU torch wheel available
offline on the machine that built these fixtures is cp311. The `spd` modules we need use only
three post-3.11 features, all of them typing sugar:

* PEP 695 type-parameter lists (`def f[T](...)`, `class C[T](Base):`),
* `typing.override` (3.12),
* PEP 701 f-strings (only in `spd/utils/compute_utils.py`, which we never import).

`install(src_root)` puts `src_root` first on `sys.path` and registers a meta-path finder that,
for modules under the `spd` package only, rewrites each PEP 695 header into the equivalent
pre-3.12 form (module-level `TypeVar`/`ParamSpec` definitions + `Generic[...]` base) before
compiling. No runtime behaviour changes: the rewritten names appear only in annotations and
generic bases. Nothing is written to disk (bytecode caching is disabled for these modules).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import re
import sys
import typing
from pathlib import Path

import typing_extensions

if not hasattr(typing, "override"):
    typing.override = typing_extensions.override  # type: ignore[attr-defined]

_HEADER = re.compile(
    r"^(?P<indent>[ \t]*)(?P<kw>(?:async[ \t]+)?def|class)[ \t]+(?P<name>\w+)\[(?P<params>[^\]]*)\]",
    re.MULTILINE,
)


def _typevar_defs(params: str, indent: str) -> tuple[list[str], list[str]]:
    lines: list[str] = []
    names: list[str] = []
    for raw in params.split(","):
        p = raw.strip()
        if not p:
            continue
        if p.startswith("**"):
            n = p[2:].strip()
            lines.append(f'{indent}{n} = __import__("typing").ParamSpec("{n}")')
        elif p.startswith("*"):
            n = p[1:].strip()
            lines.append(f'{indent}{n} = __import__("typing").TypeVarTuple("{n}")')
        elif ":" in p:
            n, bound = (s.strip() for s in p.split(":", 1))
            lines.append(f'{indent}{n} = __import__("typing").TypeVar("{n}", bound={bound})')
        else:
            n = p
            lines.append(f'{indent}{n} = __import__("typing").TypeVar("{n}")')
        names.append(n)
    return lines, names


def rewrite_pep695(source: str) -> str:
    lines = source.splitlines(keepends=True)
    out = list(lines)
    # process bottom-up so insertions do not shift pending line numbers
    matches = []
    for m in _HEADER.finditer(source):
        lineno = source.count("\n", 0, m.start())
        matches.append((lineno, m))
    for lineno, m in reversed(matches):
        indent, kw, name, params = m["indent"], m["kw"], m["name"], m["params"]
        defs, names = _typevar_defs(params, indent)
        line = out[lineno]
        head = f"{indent}{kw} {name}[{params}]"
        assert line.startswith(head), (line, head)
        rest = line[len(head):]
        if kw == "class":
            generic = f'__import__("typing").Generic[{", ".join(names)}]'
            if rest.startswith("("):
                # append Generic[...] as the last base
                close = rest.index(")")
                rest = rest[:close] + f", {generic}" + rest[close:]
            else:
                rest = f"({generic})" + rest
        out[lineno] = f"{indent}{kw} {name}" + rest
        # insert TypeVar definitions above any decorators of this def/class
        ins = lineno
        while ins > 0 and out[ins - 1].lstrip().startswith("@") and out[ins - 1].startswith(indent):
            ins -= 1
        out[ins:ins] = [d + "\n" for d in defs]
    return "".join(out)


class _Loader(importlib.machinery.SourceFileLoader):
    def source_to_code(self, data, path, *, _optimize=-1):  # type: ignore[override]
        src = importlib.util.decode_source(data)  # type: ignore[attr-defined]
        return compile(rewrite_pep695(src), path, "exec", dont_inherit=True, optimize=_optimize)

    def set_data(self, *args, **kwargs):  # never write .pyc next to Goodfire's sources
        return None

    def get_code(self, fullname):
        source_path = self.get_filename(fullname)
        return self.source_to_code(self.get_data(source_path), source_path)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname, path, target=None):
        if fullname != "spd" and not fullname.startswith("spd."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path or [str(self.root)])
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            return spec
        spec.loader = _Loader(fullname, spec.origin)
        return spec


def install(src_root: str | Path) -> None:
    import importlib.util  # noqa: F401  (needed by _Loader)

    root = Path(src_root).resolve()
    assert (root / "spd" / "__init__.py").exists() or (root / "spd").is_dir(), root
    sys.path.insert(0, str(root))
    sys.meta_path.insert(0, _Finder(root))
