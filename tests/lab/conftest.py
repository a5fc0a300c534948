"""Fixtures for tests that boot lab guests (marker `lab`).

A guest run is expensive (boot + one BCC compile), so each kernel class is booted once
per session by `guest_suite` and every test reads the artifacts it left behind.
A lab that cannot run fails these tests; it never skips them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[2]
LAB = CHECKOUT / "scripts" / "lab"
CLASSES = ["5.10", "6.1-variadic", "6.1", "6.12"]


def run_lab(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LAB), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=CHECKOUT)


class SuiteRun:
    """The artifacts of one guest_suite run on one kernel class."""

    def __init__(self, klass: str, directory: Path, proc: subprocess.CompletedProcess):
        self.klass = klass
        self.dir = directory
        self.proc = proc

    def json(self, name: str):
        path = self.dir / name
        assert path.exists(), (f"{self.klass}: the guest did not write {name}; lab stderr:\n"
                               f"{self.proc.stderr[-3000:]}\nguest output:\n{self.proc.stdout[-3000:]}")
        return json.loads(path.read_text())

    def text(self, name: str) -> str:
        path = self.dir / name
        assert path.exists(), f"{self.klass}: the guest did not write {name}"
        return path.read_text(errors="replace")


_suite_cache: dict[str, SuiteRun] = {}


@pytest.fixture(scope="session", params=CLASSES)
def suite(request, tmp_path_factory) -> SuiteRun:
    klass = request.param
    reuse = os.environ.get("CONNTRACE_LAB_REUSE")
    if reuse and klass not in _suite_cache and (Path(reuse) / klass / "steps.json").exists():
        # Developers iterating on assertions: read the artifacts of an earlier guest run
        # (CI never sets this; every CI run boots its guests).
        done = subprocess.CompletedProcess([], 0, (Path(reuse) / klass / "out.log").read_text(), "")
        _suite_cache[klass] = SuiteRun(klass, Path(reuse) / klass, done)
    if klass not in _suite_cache:
        out = tmp_path_factory.mktemp(f"lab-{klass}")
        keep = os.environ.get("CONNTRACE_LAB_KEEP")
        if keep:  # keep artifacts somewhere stable, e.g. for BENCHMARKS or examples
            out = Path(keep) / klass
            out.mkdir(parents=True, exist_ok=True)
        proc = run_lab(["run", "--kernel", klass, "--timeout", "1500", "--keep", str(out), "--",
                        "python3", "-m", "tests.lab.guest_suite", "--out", str(out)], timeout=1700)
        (out / "lab-stdout.txt").write_text(proc.stdout)
        (out / "lab-stderr.txt").write_text(proc.stderr)
        _suite_cache[klass] = SuiteRun(klass, out, proc)
    return _suite_cache[klass]
