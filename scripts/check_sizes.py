"""List modules over 500 lines and functions over 80 lines under ``normfold/`` (issue 10's size limits).

Usage: ``python scripts/check_sizes.py [ROOT]``; exit 1 when anything is over, each offender on one line.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def offenders(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            found.append(f"{path}: module {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                length = (node.end_lineno or node.lineno) - start + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{path}:{node.lineno}: function {node.name} {length} lines")
    return found


if __name__ == "__main__":
    over = offenders(Path(sys.argv[1] if len(sys.argv) > 1 else "normfold"))
    print("\n".join(over) if over else "all modules <= 500 lines, all functions <= 80 lines")
    sys.exit(1 if over else 0)
