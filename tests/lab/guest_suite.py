"""Everything the lab tests check, done in one guest boot per kernel class.

Why one run: each `conntrace` start compiles its BPF (about a minute under emulation), so
the guest does all the work once and leaves artifacts; the pytest side (tests/lab/test_*.py)
only reads them and asserts. Steps never abort the suite: each records its own outcome.

    python3 -m tests.lab.guest_suite --out DIR [--steps trace,top,middlebox,apply]

Artifacts in DIR:
  facts.json            kernel release, ABI facts seen from inside the guest
  scenarios.json        the scenario library's oracle, recorded while `trace` ran
  trace.ndjson          `conntrace trace --write` during the scenarios
  trace.out / .err      its table and stderr; trace-lifecycle.json: exit status, probes
                        registered before and after Ctrl-C
  trace-flood.json      a 10 000-segment flood from 3 peers after the scenarios, still traced
  flood.json, top.ndjson `conntrace top --json` during a 100 000-segment flood from 3 peers
  middlebox.json        the seed story, be_liberal 0 then 1
  mbtop.ndjson          `conntrace top --json` during it; report/ from `conntrace report`
  apply.json            `conntrace advise --apply` on one of two namespaces
  steps.json            each step's duration and error, if any
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
READY = re.compile(r"Hit Ctrl-C|Ctrl-C ends")
ATTACH_TIMEOUT = 600      # BCC compile under TCG: about a minute, more on a loaded host
FLOOD_COUNTS = (50000, 30000, 20000)
TRACE_FLOOD_COUNTS = (5000, 3000, 2000)   # far more than trace decodes under emulation


def conntrace(*args: str) -> list[str]:
    return [sys.executable, "-m", "conntrace", *args]


def registered_kprobes() -> list[str]:
    """Every kprobe the kernel has registered (perf-PMU ones included, unlike kprobe_events)."""
    for path in ("/sys/kernel/debug/kprobes/list",):
        try:
            with open(path) as fh:
                return [line.strip() for line in fh if line.strip()]
        except OSError:
            continue
    return []


class Background:
    """A conntrace command running while the step injects traffic."""

    def __init__(self, out: Path, name: str, argv: list[str]):
        self.name = name
        self.stdout_path = out / f"{name}.out"
        self.stderr_path = out / f"{name}.err"
        self.started = time.time()
        self.proc = subprocess.Popen(argv, cwd=CHECKOUT, stdin=subprocess.DEVNULL,
                                     stdout=open(self.stdout_path, "w"), stderr=open(self.stderr_path, "w"))
        self.ready_after = None

    def wait_ready(self, timeout: float = ATTACH_TIMEOUT) -> float:
        while time.time() - self.started < timeout:
            if READY.search(self.stderr_path.read_text(errors="replace")):
                self.ready_after = time.time() - self.started
                return self.ready_after
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before attaching: "
                                   + self.stderr_path.read_text(errors="replace")[-800:])
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not attached after {timeout} s")

    def interrupt(self, timeout: float = 60) -> dict:
        t0 = time.time()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = "killed"
        return {"rc": rc, "exit_seconds": round(time.time() - t0, 2), "ready_after": self.ready_after}

    def wait(self, timeout: float) -> dict:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.interrupt()
        return {"rc": rc, "ready_after": self.ready_after}


def run(argv: list[str], out: Path, name: str, timeout: float) -> int:
    with open(out / f"{name}.log", "w") as log:
        return subprocess.run(argv, cwd=CHECKOUT, stdin=subprocess.DEVNULL, stdout=log,
                              stderr=subprocess.STDOUT, timeout=timeout).returncode


def step_facts(out: Path) -> None:
    subprocess.run(["modprobe", "nf_conntrack"], check=False)
    kallsyms = Path("/proc/kallsyms").read_text()
    btf = Path("/sys/kernel/btf/nf_conntrack")
    facts = {
        "release": os.uname().release,
        "proc_version": Path("/proc/version").read_text().strip(),
        "python": sys.version.split()[0],
        "has_nf_tcp_log_invalid": bool(re.search(r" nf_tcp_log_invalid(\s|$)", kallsyms)),
        "btf_nf_conntrack": btf.exists(),
        "btf_has_invalid_log_struct": btf.exists() and b"nf_tcp_invalid_log" in btf.read_bytes(),
    }
    (out / "facts.json").write_text(json.dumps(facts, indent=1))


def step_trace(out: Path) -> None:
    """`conntrace trace` while the scenario library reproduces every reason."""
    tracer = Background(out, "trace", conntrace("trace", "--write", str(out / "trace.ndjson")))
    tracer.wait_ready()
    during = registered_kprobes()
    rc = run([sys.executable, "-m", "tests.lab.scenarios", "run", "--ipv6-too", "--liberal", "both",
              "--out", str(out / "scenarios.json")], out, "scenarios", timeout=900)
    # Then more than it can show: every segment must be shown or counted lost, and the
    # kernel's total must be exact (the same compiled probe: no second compile).
    flood_rc = run([sys.executable, "-m", "tests.lab.flood", "peers", "--count",
                    *map(str, TRACE_FLOOD_COUNTS), "--out", str(out / "trace-flood.json")],
                   out, "trace-flood", timeout=900)
    time.sleep(1.0)  # let the last events reach user space
    result = tracer.interrupt()
    result.update({"scenarios_rc": rc, "flood_rc": flood_rc, "kprobes_during": during,
                   "kprobes_after": registered_kprobes()})
    (out / "trace-lifecycle.json").write_text(json.dumps(result, indent=1))


def step_top(out: Path) -> None:
    """`conntrace top --json` during a flood from three peers in known proportions."""
    top = Background(out, "top", conntrace("top", "--json", "--interval", "1"))
    top.wait_ready()
    rc = run([sys.executable, "-m", "tests.lab.flood", "peers", "--count", *map(str, FLOOD_COUNTS),
              "--out", str(out / "flood.json")], out, "flood", timeout=900)
    time.sleep(3.0)  # two more snapshots after the last segment
    result = top.interrupt()
    result["flood_rc"] = rc
    os.replace(out / "top.out", out / "top.ndjson")
    (out / "top-lifecycle.json").write_text(json.dumps(result, indent=1))


def step_middlebox(out: Path) -> None:
    """The seed story: transfer times with be_liberal 0 and 1; then, watched by `top` and
    captured by `report --duration`, transfers kept running with be_liberal=0 (the
    namespaces must outlive the capture so that report can read their settings)."""
    # The timed transfers run alone: the guest's vCPUs share one host thread, and a BCC
    # compile beside them made the liberal transfer ten times slower.
    rc = run([sys.executable, "-m", "tests.lab.middlebox", "run", "--liberal", "both", "--size", "3",
              "--out", str(out / "middlebox.json")], out, "middlebox", timeout=600)
    top = Background(out, "mbtop", conntrace("top", "--json", "--interval", "2"))
    report = Background(out, "report", conntrace("report", "--duration", "40", "--out", str(out / "report")))
    top.wait_ready()
    report.wait_ready()
    watched = subprocess.Popen([sys.executable, "-m", "tests.lab.middlebox", "run", "--liberal", "0",
                                "--size", "3", "--keep-running", "75", "--out", str(out / "middlebox-watched.json")],
                               cwd=CHECKOUT, stdin=subprocess.DEVNULL, stdout=open(out / "middlebox-watched.log", "w"),
                               stderr=subprocess.STDOUT)
    rep = report.wait(timeout=180)
    mb = top.interrupt()
    watched_rc = watched.wait(timeout=300)
    os.replace(out / "mbtop.out", out / "mbtop.ndjson")
    (out / "middlebox-lifecycle.json").write_text(json.dumps(
        {"middlebox_rc": rc, "watched_rc": watched_rc, "top": mb, "report": rep}, indent=1))


def step_apply(out: Path) -> None:
    """`advise --apply` changes the named namespace only, and prints the undo."""
    names = ["ctl-apply-a", "ctl-apply-b"]
    key = "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal"

    def read(ns):
        cmd = ["cat", key] if ns is None else ["ip", "netns", "exec", ns, "cat", key]
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()

    for ns in names:
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        before = {ns: read(ns) for ns in names} | {"init": read(None)}
        proc = subprocess.run(conntrace("advise", "--apply", "be-liberal", "--netns", names[0]), cwd=CHECKOUT,
                              capture_output=True, text=True, timeout=120)
        after = {ns: read(ns) for ns in names} | {"init": read(None)}
        result = {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr,
                  "before": before, "after": after, "target": names[0]}
        undo = re.search(r"^undo: (.+)$", proc.stdout, re.M)
        if undo:
            subprocess.run(undo.group(1), shell=True)
            result["after_undo"] = {ns: read(ns) for ns in names} | {"init": read(None)}
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns])
    (out / "apply.json").write_text(json.dumps(result, indent=1))


STEPS = {"facts": step_facts, "trace": step_trace, "top": step_top, "middlebox": step_middlebox,
         "apply": step_apply}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m tests.lab.guest_suite")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", default=",".join(STEPS))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {}
    for name in args.steps.split(","):
        t0 = time.time()
        print(f"guest_suite: {name} ...", flush=True)
        try:
            STEPS[name](out)
            record[name] = {"ok": True, "seconds": round(time.time() - t0, 1)}
        except Exception as exc:  # a failed step is recorded; the tests say what it breaks
            record[name] = {"ok": False, "seconds": round(time.time() - t0, 1), "error": str(exc),
                            "traceback": traceback.format_exc()}
        print(f"guest_suite: {name} {'ok' if record[name]['ok'] else 'FAILED: ' + record[name]['error']}"
              f" ({record[name]['seconds']} s)", flush=True)
        (out / "steps.json").write_text(json.dumps(record, indent=1))
    return 0 if all(r["ok"] for r in record.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
