"""The package's layout rules (docs/architecture.md), checked by reading the source.

Imports run one way: a part of transfer/ imports only from the layers below its own. A name
with a leading underscore is private to its module: no other module imports it. And the size
bars of issue 13: no function longer than 60 lines, no module over 400.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "transfer"

# Low to high; a part imports only from layers before its own (docs/architecture.md).
LAYERS = [
    {"errors"},
    {"url", "units", "durable", "aio", "qmp", "reports", "runs"},
    {"tls", "_native"},
    {"ranges", "integrity", "stream"},
    {"disks", "observe"},
    {"tracking", "pipeline"},
    {"state", "serve"},
    {"migration"},
    {"api", "plans"},
    {"demo"},
    {"cli"},
]
LAYER = {part: i for i, parts in enumerate(LAYERS) for part in parts}
MAX_FUNCTION = 60
MAX_MODULE = 400


def _modules() -> list[tuple[str, pathlib.Path]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out.append((name, path))
    return out


def _part(module: str) -> str:
    """The layout unit a module belongs to: transfer.migration.warm -> migration."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(name: str, path: pathlib.Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) of every import of a transfer module."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "transfer" or module.startswith("transfer."):
                out.append((node.lineno, module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names
                    if a.name == "transfer" or a.name.startswith("transfer.")]
    return out


def _is_module(module: str, name: str) -> bool:
    base = ROOT.parent.joinpath(*module.split("."))
    return base.joinpath(name + ".py").exists() or base.joinpath(name, "__init__.py").exists()


def upward_imports() -> list[str]:
    """Every import of a part from its own layer or above (another part), in words."""
    bad = []
    for name, path in _modules():
        part = _part(name)
        if part not in LAYER:
            continue  # the package's root, transfer/__init__.py: the facade over everything
        for line, module, names in _imports(name, path):
            targets = [module] if module != "transfer" else [f"transfer.{n}" for n in names]
            for target in targets:
                other = _part(target)
                if other and other != part and LAYER.get(other, len(LAYERS)) >= LAYER[part]:
                    bad.append(f"{path.relative_to(ROOT.parent)}:{line} ({part}, layer "
                               f"{LAYER[part]}) imports {target} ({other}, layer "
                               f"{LAYER.get(other)})")
    return bad


def private_imports() -> list[str]:
    bad = []
    for name, path in _modules():
        for line, module, names in _imports(name, path):
            for n in names:
                if n.startswith("_") and not n.startswith("__") and not _is_module(module, n):
                    bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {module}.{n}")
    return bad


def test_every_part_has_a_layer():
    parts = {_part(name) for name, _ in _modules()} - {""}
    assert parts <= set(LAYER), f"parts with no layer in LAYERS: {sorted(parts - set(LAYER))}"


def test_imports_run_one_way():
    assert upward_imports() == []


def test_no_private_name_is_imported_across_modules():
    assert private_imports() == []


@pytest.mark.parametrize("name,path", _modules(), ids=[n for n, _ in _modules()])
def test_functions_and_modules_stay_short(name, path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE, f"{name}: {len(text.splitlines())} lines"
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for n in ast.walk(ast.parse(text))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION]
    assert long == [], f"{name}: functions over {MAX_FUNCTION} lines"


def test_the_check_finds_an_upward_import(tmp_path, monkeypatch):
    """The rule can fail: a module of a low layer importing the migration layer is found."""
    fake = tmp_path / "transfer"
    (fake / "integrity").mkdir(parents=True)
    (fake / "integrity" / "__init__.py").write_text("")
    (fake / "integrity" / "bad.py").write_text("from ..migration import warm\n")
    (fake / "integrity" / "worse.py").write_text("from ..state.records import _HANDLERS\n")
    monkeypatch.setitem(globals(), "ROOT", fake)
    assert upward_imports() == ["transfer/integrity/bad.py:1 (integrity, layer 3) imports "
                                "transfer.migration (migration, layer 7)",
                                "transfer/integrity/worse.py:1 (integrity, layer 3) imports "
                                "transfer.state.records (state, layer 6)"]
    assert private_imports() == ["transfer/integrity/worse.py:1 imports "
                                 "transfer.state.records._HANDLERS"]


def test_the_wheel_lists_every_package():
    """pyproject.toml names the packages the wheel carries: each directory of transfer/ with an
    __init__.py is one (transfer.serve and transfer.stream were once left out: an installed
    wheel could not serve or read https://)."""
    import tomllib

    listed = set(tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]
                 ["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT.parent).parts) for p in ROOT.rglob("__init__.py")}
    assert listed == found
