"""The package layers hold: runtime (the backends) imports nothing from fusers (the graph passes).

Scanned with ``ast`` over every module of ``normfold/runtime``, lazy imports inside functions included,
so a convenience import cannot quietly turn the layering around again.
"""

from __future__ import annotations

import ast
from pathlib import Path

import normfold

ROOT = Path(normfold.__file__).parent.parent


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module ``path`` imports anywhere (``import a.b``, ``from a.b import c``; relative ones resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = path.relative_to(root).with_suffix("").parts[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = list(package[: len(package) - node.level + 1]) if node.level else []
            base = ".".join([*parts, *([node.module] if node.module else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_runtime_imports_nothing_from_fusers() -> None:
    modules = sorted((ROOT / "normfold" / "runtime").rglob("*.py"))
    assert len(modules) >= 8  # the scan really sees the package
    offending = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.startswith("normfold.fusers"))
        for path in modules
    }
    assert {k: v for k, v in offending.items() if v} == {}


def test_the_scan_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    probe = tmp_path / "normfold" / "runtime" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(
        "import normfold.fusers.base\n"
        "def f():\n"
        "    from normfold.fusers.precision import convert_precision\n"
        "    from ..fusers import pipeline\n"
        "    from . import base\n"
    )
    found = imported_modules(probe, root=tmp_path)
    assert {"normfold.fusers.base", "normfold.fusers.precision", "normfold.fusers.pipeline"} <= found
    assert "normfold.runtime.base" in found
