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


# The parts of a run directory (recreason.rundir.RunPaths names each); only rundir.py may join them onto a path.
RUN_PARTS = {"run.json", "config.yaml", "best", "last", "snapshots", "summary.json", "train_log.jsonl", "tensorboard",
             "ranker", "generated", "eval", "candidates", "tuning", "trials.json", "tuned.yaml", "serving.db",
             "generic-table.json"}


def run_path_joins(paths, root: Path = ROOT) -> list[str]:
    """Places that build a run's path by hand: ``x / "best"``, ``x / f"snapshots/..."`` and the like."""
    found = []
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)):
                continue
            right = node.right
            if isinstance(right, ast.JoinedStr):
                right = right.values[0] if right.values else None
            if isinstance(right, ast.Constant) and isinstance(right.value, str):
                head = right.value.split("/")[0]
                if head in RUN_PARTS or any(head.startswith(p + "-") for p in ("candidates", "report", "eval")):
                    found.append((str(path.relative_to(root)), node.lineno, right.value))
    return [f"{name}:{line} / {part!r}" for name, line, part in sorted(found)]


def test_only_rundir_joins_the_parts_of_a_run():
    paths = [p for p in sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))
             if p.name != "rundir.py"]
    assert run_path_joins(paths) == []


def test_the_check_finds_a_hand_built_run_path(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text('out = run / "generated" / "x.jsonl"\nstep = run / f"snapshots/step-{n}"\nok = d / "records.jsonl"\n')
    assert run_path_joins([planted], tmp_path) == ["planted.py:1 / 'generated'", "planted.py:2 / 'snapshots/step-'"]
