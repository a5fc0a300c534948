"""Build the small initramfs that mounts the host's root over 9p and runs the command.

It holds a static busybox, the virtio/9p/overlay modules of the guest kernel
(decompressed, in load order) and `init` (scripts/labkit/init.sh).  One is built per
kernel and cached next to it.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import shutil
import stat
import subprocess
from pathlib import Path

from .kernels import Kernel, LabError, cache_lock

BUSYBOX = Path("/bin/busybox")
# What init needs to reach the root filesystem.  modprobe resolves their dependencies
# (9pnet, netfs, fscache, virtio_ring ...), which differ between kernels.
ROOT_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay"]
INIT_SCRIPT = Path(__file__).with_name("init.sh")


def _module_paths(k: Kernel) -> list[Path]:
    paths: list[Path] = []
    for module in ROOT_MODULES:
        # One module per call: modprobe reads further words as module parameters.
        out = subprocess.run(["modprobe", "-d", k.tree, "-S", k.kver, "--show-depends", module],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise LabError(f"modprobe --show-depends {module} for {k.kver}: {out.stderr.strip()}")
        for line in out.stdout.splitlines():
            parts = line.split()
            if not parts or parts[0] != "insmod":
                continue  # "builtin 9p" needs nothing
            # modprobe prints the path under the -d base (or absolute to the tree).
            p = Path(parts[1])
            if not p.is_relative_to(k.tree):
                p = Path(k.tree) / parts[1].lstrip("/")
            if p not in paths:
                paths.append(p)
    return paths


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive from (name, mode, data); directories have empty data."""
    buf = io.BytesIO()
    ino = 1
    for name, mode, data in entries + [("TRAILER!!!", 0, b"")]:
        namez = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(namez), 0))
        buf.write(hdr.encode() + namez)
        buf.write(b"\0" * ((4 - (110 + len(namez)) % 4) % 4))
        buf.write(data)
        buf.write(b"\0" * ((4 - len(data) % 4) % 4))
        ino += 1
    return buf.getvalue()


def build(k: Kernel) -> Path:
    if not BUSYBOX.exists():
        raise LabError("the lab needs a static busybox: apt-get install busybox-static")
    init = INIT_SCRIPT.read_bytes()
    mods = _module_paths(k)
    key = hashlib.sha256(init + BUSYBOX.read_bytes()[:4096] + "\n".join(map(str, mods)).encode()).hexdigest()[:12]
    out = Path(k.tree).parent / f"initramfs-{key}.cpio.gz"
    if out.exists():
        return out
    with cache_lock(f"initramfs-{k.kver}"):
        if out.exists():
            return out
        d, f, x = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644, stat.S_IFREG | 0o755
        entries = [(p, d, b"") for p in ("bin", "dev", "proc", "sys", "mnt", "modules", "newroot")]
        entries.append(("bin/busybox", x, BUSYBOX.read_bytes()))
        entries.append(("init", x, init))
        order = []
        for p in mods:
            data = p.read_bytes()
            name = p.name
            if name.endswith(".xz"):
                data, name = lzma.decompress(data), name[:-3]
            elif name.endswith(".zst"):
                data = subprocess.run(["zstd", "-dc", str(p)], capture_output=True, check=True).stdout
                name = name[:-4]
            entries.append((f"modules/{name}", f, data))
            order.append(name)
        entries.append(("modules/order", f, ("\n".join(order) + "\n").encode()))
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(gzip.compress(_cpio_newc(entries), compresslevel=6))
        os.replace(tmp, out)
    return out
