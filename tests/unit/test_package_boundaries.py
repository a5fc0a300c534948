"""The product package never reaches into the lab or the tests."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "conntrace"


def test_conntrace_imports_nothing_from_tests_or_scripts():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in ("tests", "labkit", "benchkit", "scripts"):
                    offenders.append(f"{path.name}: import {name}")
    assert not offenders, offenders
    assert len(list(PACKAGE.rglob("*.py"))) >= 10
