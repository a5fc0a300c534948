"""Boot one QEMU (TCG) guest on a lab kernel and run a command in it.

Layout of a run directory (shared read-write with the guest at the same path):
  stage2.sh    written here: environment, working directory, the command
  out.log      the command's stdout+stderr (the guest's second serial port)
  console.log  the kernel console (first serial port)
  dmesg.txt    the guest's kernel log, saved before power-off
  rc           the command's exit status
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import initramfs, kernels, rootfs
from .kernels import Kernel, LabError
from .paths import CHECKOUT, cache_dir

# The environment a command needs to find the same Python, venv and tools as on the host.
PASSED_ENV = ("PATH", "PYTHONPATH", "VIRTUAL_ENV", "PYENV_ROOT", "PYENV_VERSION", "LANG", "LC_ALL",
              "TERM", "CONNTRACE_LAB_CACHE", "CI", "HOME")
EXIT_TIMEOUT = 124


def new_run_dir(keep: Path | None = None) -> Path:
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
        for name in ("out.log", "console.log", "dmesg.txt", "rc"):
            (keep / name).unlink(missing_ok=True)
        return keep.resolve()
    runs = cache_dir() / "runs"
    runs.mkdir(exist_ok=True)
    # Keep the last few runs for post-mortems, not all of them.
    old = sorted(runs.iterdir(), key=lambda p: p.stat().st_mtime)
    for p in old[:-20]:
        shutil.rmtree(p, ignore_errors=True)
    d = runs / time.strftime(f"%Y%m%d-%H%M%S-{os.getpid()}")
    d.mkdir()
    return d


def write_stage2(run: Path, command: list[str], cwd: str, userland: str) -> None:
    lines = ["#!/bin/sh", "# written by scripts/lab: runs inside the guest as root"]
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    if userland != "host":
        # A foreign userland has its own Python; only keep what is path-independent.
        env = {k: v for k, v in env.items() if k in ("LANG", "LC_ALL", "TERM", "CI", "CONNTRACE_LAB_CACHE")}
        env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        env["HOME"] = "/root"
    env["LAB_RUN_DIR"] = str(run)
    env["LAB_KERNEL_USERLAND"] = userland
    env["PYTHONDONTWRITEBYTECODE"] = "1"   # the checkout is read-only in the guest
    for k, v in env.items():
        lines.append(f"export {k}={shlex.quote(v)}")
    lines.append(f"cd {shlex.quote(cwd)} || exit 125")
    lines.append("exec " + " ".join(shlex.quote(c) for c in command))
    (run / "stage2.sh").write_text("\n".join(lines) + "\n")


def qemu_command(k: Kernel, initrd: Path, run: Path, mode: str, root: Path | None, pvh: bool,
                 memory: str, smp: int) -> list[str]:
    append = ["console=ttyS0", "panic=-1", "loglevel=4", "quiet", "rdinit=/init",
              f"lab.mode={mode}", f"lab.run={run}", f"lab.ckout={CHECKOUT}",
              f"lab.root={'rootfs' if root else 'host'}", "net.ifnames=0", "nokaslr", "tsc=reliable"]
    share = "security_model=none,multidevs=remap"
    # One host thread runs both vCPUs (thread=single). Multi-threaded TCG lets a vCPU run a stale
    # translation of code the other vCPU is patching: a 6.12 guest died in CI at boot with an
    # int3 oops in sched_clock_cpu while its static key flipped. Round-robin TCG cannot race
    # that way. Cost measured here: BCC's compile no slower (one thread anyway), a class's lab
    # suite ≈9.5 min instead of ≈7.5 min with the same checks; anything run beside a compile
    # in the guest now shares its core.
    cmd = ["qemu-system-x86_64", "-accel", "tcg,thread=single", "-cpu", "qemu64", "-smp", str(smp), "-m", memory,
           "-nodefaults", "-no-reboot", "-display", "none", "-nic", "none",
           "-kernel", k.vmlinux if pvh else k.bzimage, "-initrd", str(initrd), "-append", " ".join(append),
           "-virtfs", f"local,path=/,mount_tag=hostroot,{share},readonly=on",
           "-virtfs", f"local,path={k.tree},mount_tag=ktree,{share},readonly=on",
           "-virtfs", f"local,path={run},mount_tag=labrun,{share}"]
    if root:
        cmd += ["-virtfs", f"local,path={root},mount_tag=rootfs,{share},readonly=on"]
    if mode == "shell":
        cmd += ["-serial", "mon:stdio", "-serial", f"file:{run / 'out.log'}"]
    else:
        cmd += ["-serial", f"file:{run / 'console.log'}", "-serial", f"file:{run / 'out.log'}"]
    return cmd


def _stream(path: Path, pos: int, out) -> int:
    try:
        with open(path, "rb") as fh:
            fh.seek(pos)
            chunk = fh.read()
    except FileNotFoundError:
        return pos
    if chunk:
        out.write(chunk.decode("utf-8", "replace"))
        out.flush()
    return pos + len(chunk)


def run(class_name: str, command: list[str], *, timeout: float = 900, mode: str = "run",
        cwd: str | None = None, keep: Path | None = None, memory: str = "1G", smp: int = 2,
        out=sys.stdout, err=sys.stderr) -> int:
    """Boot, run, stream output, return the command's exit status (124 on watchdog)."""
    k = kernels.prepare(class_name)
    klass = kernels.CLASSES[class_name]
    root = rootfs.prepare(klass.userland) if klass.userland != "host" else None
    initrd = initramfs.build(k)
    run_dir = new_run_dir(keep)
    write_stage2(run_dir, command or ["true"], cwd or os.getcwd(), klass.userland)
    if shutil.which("qemu-system-x86_64") is None:
        raise LabError("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    pvh = bool(k.vmlinux)
    qcmd = qemu_command(k, initrd, run_dir, mode, root, pvh, memory, smp)
    print(f"lab: {class_name} = Linux {k.upstream} ({k.kver}), {k.abi} ABI, "
          f"{'trixie' if root else 'host'} userland; run dir {run_dir}", file=err, flush=True)
    started = time.monotonic()
    if mode == "shell":
        return subprocess.call(qcmd)
    proc = subprocess.Popen(qcmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=_die_with_parent)
    pos = 0
    timed_out = False
    try:
        while proc.poll() is None:
            pos = _stream(run_dir / "out.log", pos, out)
            if time.monotonic() - started > timeout:
                timed_out = True
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        proc.kill()
        raise
    finally:
        proc.wait()
    pos = _stream(run_dir / "out.log", pos, out)
    qemu_out = proc.stdout.read().decode("utf-8", "replace").strip() if proc.stdout else ""
    elapsed = time.monotonic() - started
    if timed_out:
        print(f"lab: watchdog: guest still running after {timeout:.0f} s, killed; "
              f"kernel console in {run_dir / 'console.log'}", file=err, flush=True)
        _tail_console(run_dir, err)
        return EXIT_TIMEOUT
    rc_file = run_dir / "rc"
    if not rc_file.exists():
        msg = qemu_out.splitlines()[-1] if qemu_out else "no exit status written"
        print(f"lab: guest ended without running the command to completion ({msg}); "
              f"kernel console in {run_dir / 'console.log'}", file=err, flush=True)
        _tail_console(run_dir, err)
        return 125
    rc = int(rc_file.read_text().strip() or 125)
    print(f"lab: exit {rc} after {elapsed:.1f} s; dmesg in {run_dir / 'dmesg.txt'}", file=err, flush=True)
    return rc


def _die_with_parent() -> None:
    """QEMU must not outlive the runner (killed test, CI timeout): PR_SET_PDEATHSIG."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _tail_console(run_dir: Path, err) -> None:
    try:
        lines = (run_dir / "console.log").read_text(errors="replace").splitlines()[-15:]
    except FileNotFoundError:
        return
    for line in lines:
        print(f"  console| {line}", file=err)
