"""The package's shape, checked: no module reaches into another module's private names.

(The layering itself is checked by import-linter: `lint-imports`, run by `make test`.)
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def private_imports(paths, root: Path = ROOT) -> list[str]:
    found = []
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("recreason"):
                found += [f"{path.relative_to(root)}:{node.lineno} {node.module}.{a.name}"
                          for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_module_imports_a_private_name_of_another():
    paths = sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))
    assert private_imports(paths) == []


def test_the_check_finds_a_private_import(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("from recreason.training.trainer import _secret\n")
    assert private_imports([planted], tmp_path) == ["planted.py:1 recreason.training.trainer._secret"]
