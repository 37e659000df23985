"""The package's layers: the lower ones (backbones, data) import nothing from the upper ones
(training, runs, app), neither at the top of a module nor inside a function."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import wpeft

PACKAGE = Path(wpeft.__file__).resolve().parent
LOWER = ("wpeft.backbones", "wpeft.data")
UPPER = ("wpeft.training", "wpeft.runs", "wpeft.app")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every ``import``/``from`` statement in ``path``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the module's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return out


def _is_upper(name: str) -> bool:
    return any(name == u or name.startswith(u + ".") for u in UPPER)


@pytest.mark.parametrize("layer", LOWER)
def test_lower_layers_do_not_import_upper_ones(layer: str) -> None:
    files = sorted((PACKAGE.parent / layer.replace(".", "/")).rglob("*.py"))
    assert files, layer
    bad = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
        for path in files
        for line, name in _imported(path)
        if _is_upper(name)
    ]
    assert not bad, "\n".join(bad)


def test_the_import_check_sees_relative_and_nested_imports(tmp_path, monkeypatch) -> None:
    fake = tmp_path / "wpeft"
    (fake / "data").mkdir(parents=True)
    source = "def f():\n    from ..training import loop\n    import wpeft.runs.store\n"
    (fake / "data" / "x.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    names = [name for _, name in _imported(fake / "data" / "x.py")]
    assert "wpeft.training.loop" in names and "wpeft.runs.store" in names
    assert all(_is_upper(n) for n in names)


def test_importing_the_lower_layers_loads_no_upper_module() -> None:
    modules = sorted(
        _module_name(p)
        for layer in LOWER
        for p in (PACKAGE.parent / layer.replace(".", "/")).rglob("*.py")
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        f"print(sorted(m for m in sys.modules if m.startswith({UPPER!r})))\n"
    )
    path = os.pathsep.join(filter(None, [str(PACKAGE.parent), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": path},
    )
    assert result.stdout.strip() == "[]", result.stdout
