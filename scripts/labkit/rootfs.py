"""A Debian trixie root filesystem for kernels whose headers bookworm's bcc cannot compile.

bookworm's bcc 0.26 stops in 6.12's include/linux/bpf.h (incomplete struct bpf_wq,
bpf_rb_root, bpf_refcount); a real trixie host runs bcc 0.31 and Python 3.13 anyway.
Built once with mmdebstrap into the cache; the kernel's modules and headers are laid
over it at boot like for the host userland, and the checkout is bound at its host path.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .kernels import LabError, cache_dir, cache_lock, KEYRING, MIRROR, SECURITY

PACKAGES = [
    "python3", "python3-bpfcc", "bpfcc-tools", "python3-click", "python3-tabulate", "python3-psutil",
    "iproute2", "nftables", "conntrack", "iptables", "kmod",
    "procps", "util-linux", "iperf3", "bash", "ca-certificates",
]
VERSION = "1"  # bump when PACKAGES change, so the cached root is rebuilt


def prepare(userland: str) -> Path:
    if userland != "trixie":
        raise LabError(f"unknown userland {userland!r}")
    root = cache_dir() / "rootfs" / f"trixie-v{VERSION}"
    if (root / ".complete").exists():
        return root
    if shutil.which("mmdebstrap") is None:
        raise LabError("building the trixie root needs mmdebstrap (apt-get install mmdebstrap)")
    with cache_lock("rootfs-trixie"):
        if (root / ".complete").exists():
            return root
        if root.exists():
            shutil.rmtree(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        cmd = ["mmdebstrap", "--variant=minbase", "--mode=root", f"--keyring={KEYRING}",
               "--include=" + ",".join(PACKAGES),
               "--dpkgopt=path-exclude=/usr/share/{doc,man,locale}/*",
               "trixie", str(root),
               f"deb {MIRROR} trixie main", f"deb {SECURITY} trixie-security main"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-5:]
            shutil.rmtree(root, ignore_errors=True)
            raise LabError("mmdebstrap trixie failed: " + " | ".join(tail))
        (root / ".complete").write_text("ok\n")
    return root
