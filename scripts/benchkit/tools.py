"""Finding (and, for pwru, fetching) the alternative tools the benchmark compares with.

Host side: `prepare()` runs before the guest boots, because the guest's / is this machine's
/ read-only. pwru is only packaged in Debian trixie: its .deb (and bookworm's libpcap0.8,
which pwru links against) are fetched through the lab's private apt state and unpacked under
the lab cache, never installed. bpftrace and iperf3 must be installed on this machine
(apt-get install bpftrace iperf3); we only say what is missing.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1]


def pwru_dir() -> Path:
    sys.path.insert(0, str(SCRIPTS))
    from labkit.paths import cache_dir
    return cache_dir() / "pwru"


def pwru_paths(root: Path | None = None) -> dict:
    root = root or pwru_dir()
    return {"binary": root / "root/usr/bin/pwru", "libdir": root / "root/usr/lib/x86_64-linux-gnu"}


def fetch_pwru(log=print) -> dict:
    """Download and unpack pwru (trixie) + libpcap0.8 (host suite) into the lab cache."""
    d = pwru_dir()
    paths = pwru_paths(d)
    if paths["binary"].exists() and glob.glob(str(paths["libdir"] / "libpcap.so.0.8*")):
        return {"ok": True, **{k: str(v) for k, v in paths.items()}}
    d.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(SCRIPTS))
    try:
        from labkit import kernels
        kernels.update_index()         # no-op when the lab's package index is fresh
        opts = kernels.apt_options()
    except Exception as exc:  # the lab's apt state is not there yet
        return {"ok": False, "error": f"lab apt state unavailable: {exc}"}
    steps = [(["apt-get", *opts, "download", "pwru"], "pwru (trixie, via the lab's apt state)"),
             (["apt-get", "download", "libpcap0.8"], "libpcap0.8 (this machine's apt)")]
    for cmd, what in steps:
        proc = subprocess.run(cmd, cwd=d, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"ok": False, "error": f"apt-get download {what} failed: "
                                          f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"}
    for deb in sorted(d.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(d / "root")], check=True)
    ok = paths["binary"].exists()
    log(f"bench: pwru unpacked in {d}" if ok else f"bench: pwru .deb has no {paths['binary']}")
    return {"ok": ok, **{k: str(v) for k, v in paths.items()}} if ok else {"ok": False, "error": "no binary"}


def check(want_pwru: bool = True, log=print) -> dict:
    """{tool: {"ok": bool, "path"/"error": ...}} for every tool the guest run uses."""
    out = {}
    for name, pkg in (("iperf3", "iperf3"), ("bpftrace", "bpftrace"), ("ip", "iproute2"), ("nft", "nftables")):
        path = shutil.which(name)
        out[name] = {"ok": True, "path": path} if path else \
            {"ok": False, "error": f"{name} not installed on this machine (apt-get install {pkg})"}
    if want_pwru:
        out["pwru"] = fetch_pwru(log)
    else:
        out["pwru"] = {"ok": False, "error": "not run (pwru is not in --phases; --quick leaves it out)"}
    return out


def pwru_env(info: dict) -> dict:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = info.get("libdir", "")
    return env
