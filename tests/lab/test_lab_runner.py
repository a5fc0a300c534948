"""The lab itself: classes resolve, guests boot the right kernel, exit codes and dmesg
come back, and a hung guest is killed by the watchdog."""
from __future__ import annotations

import re

import pytest

from .conftest import CLASSES, run_lab

pytestmark = pytest.mark.lab

EXPECTED_PREFIX = {"5.10": "5.10.", "6.1-variadic": "6.1.", "6.1": "6.1.", "6.12": "6.12."}


def test_kernels_resolves_every_class():
    proc = run_lab(["kernels"], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.strip()}
    for klass in CLASSES:
        assert klass in rows, proc.stdout
        version = rows[klass][1]
        assert version.startswith(EXPECTED_PREFIX[klass]), rows[klass]
    # The ABI boundaries inside 6.1 are what the classes exist for.
    patch = lambda v: int(v.split(".")[2])  # noqa: E731
    assert patch(rows["6.1-variadic"][1]) < 184
    assert patch(rows["6.1"][1]) >= 184


@pytest.mark.parametrize("klass", CLASSES)
def test_guest_runs_command_returns_status_and_keeps_dmesg(klass, tmp_path):
    proc = run_lab(["run", "--kernel", klass, "--keep", str(tmp_path), "--",
                    "sh", "-c", "uname -r; id -u; echo out-of-guest > $LAB_RUN_DIR/marker; exit 7"],
                   timeout=300)
    assert proc.returncode == 7, proc.stderr
    lines = proc.stdout.split()
    assert lines[0].startswith(EXPECTED_PREFIX[klass].rstrip(".").split(".")[0]), proc.stdout
    m = re.search(r"Linux (\S+) \(", proc.stderr)
    assert m and m.group(1).startswith(EXPECTED_PREFIX[klass]), proc.stderr
    assert lines[1] == "0", "the command must run as root"
    assert (tmp_path / "marker").read_text().strip() == "out-of-guest"
    dmesg = (tmp_path / "dmesg.txt").read_text()
    assert "Linux version" in dmesg and lines[0] in dmesg


def test_watchdog_kills_a_hung_guest(tmp_path):
    proc = run_lab(["run", "--kernel", "6.1", "--timeout", "25", "--keep", str(tmp_path), "--",
                    "sleep", "100000"], timeout=200)
    assert proc.returncode == 124
    assert "watchdog" in proc.stderr


def test_unknown_class_is_a_clear_error():
    proc = run_lab(["run", "--kernel", "4.4", "--", "true"], timeout=60)
    assert proc.returncode != 0
    assert "invalid choice" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_shows_top_catching_the_middlebox():
    """`scripts/lab demo` is what a newcomer runs first: it must show the story end to end."""
    proc = run_lab(["demo"], timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-3000:]
    out = proc.stdout
    assert "SACK_OVER" in out, out[-3000:]
    assert "randomiz" in out and "be_liberal" in out, out[-3000:]
    assert "transfer time with be_liberal=0" in out and "transfer time with be_liberal=1" in out
