"""The layers: commands -> flows -> Prefect tasks -> plain code; plain code never imports Prefect or the flows."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The Prefect side of tasks/: the tasks themselves and what only they use.
PREFECT_SIDE = {"prefect_tasks.py", "task_policy.py", "results.py", "drift_events.py", "reports.py"}


def imported(path: Path) -> set[str]:
    """Every module a source file imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_plain_code_imports_neither_prefect_nor_the_flows():
    plain = [path for path in (ROOT / "tasks").rglob("*.py") if path.name not in PREFECT_SIDE]
    assert len(plain) > 20
    for path in plain:
        wrong = {
            name for name in imported(path) if name.split(".")[0] == "prefect" or name.startswith("featuresum.flows")
        }
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_the_tasks_never_import_the_flows_and_the_flows_never_import_the_commands():
    for path in (ROOT / "tasks").rglob("*.py"):
        assert not {name for name in imported(path) if name.startswith("featuresum.flows")}, path
    for path in (ROOT / "flows").glob("*.py"):
        if path.name != "__main__.py":  # `python -m featuresum.flows` is the command line
            assert not {name for name in imported(path) if name.startswith("featuresum.flows.cli")}, path
